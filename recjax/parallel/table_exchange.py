"""Lookups into a row-sharded table by an explicit all-to-all (TorchRec's input/output dist).

A table ``[R, d]`` split into ``S`` row shards of ``r = R / S`` rows over mesh axes ``A``;
the ids ``[N]`` split over the same axes (the batch), ``n = N / S`` per device. Per device,
inside ``jax.shard_map``:

1. :func:`bucket_by_owner`: sort the local ids, keep each distinct id once, and place it in
   the send buffer ``[S, C]`` at row ``owner = id // r`` (ids are sorted, so owners are
   non-decreasing and an id's rank within its owner's bucket is its rank among the distinct
   ids minus the bucket's start). ``C`` is the fixed per-destination capacity: ``n`` (exact,
   the default) or ``ceil(f n / S)`` for a capacity factor ``f`` (``embedding.exchange_capacity``);
   a distinct id past ``C`` in its bucket is not sent: its lookups return zeros and are counted
   (``exchange_overflow``).
2. ``all_to_all`` over ``A``: every device receives the ``[S, C]`` ids it owns, gathers them
   from its local rows, and a second ``all_to_all`` returns the ``[S, C, d]`` rows.
3. Each id position reads its row from the returned buffer.

Bytes sent per device per lookup: ``(S - 1) C (4 + 4 d)``; with a capacity factor that is
``~ f n (1 + d) 4``, which grows with the per-device batch, where the GSPMD lookup (an
all-gather of the ids and an all-reduce of the ``[N, d]`` result) grows with the global
batch. The backward is autodiff's transpose: the rows' cotangents travel back by the reverse
all-to-all and are scatter-added on the owner. :func:`exchange_row_grads` sends a sparse
step's deduplicated row gradients to their owners the same way.

``jax.lax.ragged_all_to_all`` would send only the filled part of each bucket, but XLA:CPU
does not implement it (jax 0.10.2), so this fixed-capacity form is the one every test runs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec


def capacity(n: int, shards: int, factor: float) -> int:
    """Per-destination slots for ``n`` local ids: ``n`` if ``factor <= 0``, else
    ``ceil(factor * n / shards)`` rounded up to a multiple of 8, at most ``n``."""
    if factor <= 0:
        return n
    return min(n, -(-math.ceil(factor * n / shards) // 8) * 8)


def bucket_by_owner(ids: jax.Array, rows_per_shard: int, shards: int, cap: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Local ``ids [n]`` (``-1``: none) -> (send buffer ``[shards * cap]`` of distinct ids,
    ``-1``-padded; each position's slot in it ``[n]`` (``-1``: not sent); int32 count of
    distinct ids that did not fit)."""
    n = ids.shape[0]
    sid, order = jax.lax.sort((ids, jnp.arange(n, dtype=jnp.int32)), num_keys=1)
    valid = sid >= 0
    first = valid & jnp.concatenate([jnp.ones((1,), bool), sid[1:] != sid[:-1]])
    unique_rank = jnp.cumsum(first) - 1  # at every position: its id's rank among distinct ids
    owner = jnp.where(valid, sid // rows_per_shard, 0)
    # distinct ids before the first id owned by each shard (sid is sorted, -1s first)
    bounds = jnp.searchsorted(sid, jnp.arange(shards, dtype=sid.dtype) * rows_per_shard, side="left")
    firsts_before = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(first, dtype=jnp.int32)])
    bucket_start = firsts_before[bounds]
    rank = unique_rank - bucket_start[owner]
    fits = valid & (rank < cap)
    slot_sorted = jnp.where(fits, owner * cap + rank, -1)
    send = jnp.full((shards * cap,), -1, ids.dtype)
    # one writer per slot: the first position of each distinct id; others parked out of range
    dest = jnp.where(first & fits, slot_sorted, shards * cap + jnp.arange(n))
    send = send.at[dest].set(sid, mode="drop", unique_indices=True)
    slot = jnp.zeros((n,), jnp.int32).at[order].set(slot_sorted, unique_indices=True)
    overflow = jnp.sum(first & ~fits, dtype=jnp.int32)
    return send, slot, overflow


def exchange_axes(row_axes: tuple[str, ...], batch_axes: tuple[str, ...]) -> tuple[str, ...] | None:
    """The axes an all-to-all lookup runs over: a table's row axes when the batch is split over
    exactly the same axes (else None: the lookup stays a GSPMD gather)."""
    return row_axes if row_axes and row_axes == batch_axes else None


def _lookup_local(table: jax.Array, ids: jax.Array, *, axes: tuple[str, ...], cap: int) -> tuple[jax.Array, jax.Array]:
    rows_per_shard, shards = table.shape[0], jax.lax.axis_size(axes)
    send, slot, overflow = bucket_by_owner(ids, rows_per_shard, shards, cap)
    recv = jax.lax.all_to_all(send.reshape(shards, cap), axes, 0, 0, tiled=True).reshape(-1)
    local = recv - jax.lax.axis_index(axes) * rows_per_shard
    found = (recv >= 0)[:, None]
    rows = jnp.where(found, jnp.take(table, jnp.clip(local, 0, rows_per_shard - 1), axis=0), 0)
    back = jax.lax.all_to_all(rows.reshape(shards, cap, -1), axes, 0, 0, tiled=True).reshape(shards * cap, -1)
    out = jnp.where((slot >= 0)[:, None], jnp.take(back, jnp.maximum(slot, 0), axis=0), 0)
    return out, jax.lax.psum(overflow, axes)


def exchange_lookup(table: jax.Array, ids: jax.Array, *, mesh: Mesh, axes: tuple[str, ...],
                    cap: int) -> tuple[jax.Array, jax.Array]:
    """``table [R, d]`` rows split over ``axes``, ``ids [N]`` (``-1``: none, else ``< R``) split
    over the same axes, ``cap`` slots per destination (:func:`capacity`) -> (rows ``[N, d]``,
    zeros where ``-1`` or overflowed; int32 overflow count)."""
    P = PartitionSpec
    fn = jax.shard_map(
        lambda t, i: _lookup_local(t, i, axes=axes, cap=cap), mesh=mesh,
        in_specs=(P(axes, None), P(axes)), out_specs=(P(axes, None), P()), check_vma=False,
    )
    return fn(table, ids)


def exchange_row_grads(ids: jax.Array, sums: jax.Array, *, axes: tuple[str, ...], rows_per_shard: int,
                       cap: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inside ``shard_map``: distinct local ``ids [n]`` (``-1``: none) with row sums ``[n, d]``
    -> what this shard received for its own rows: global ids ``[S * cap]`` (``-1``: none; an id
    may arrive from several devices), their sums ``[S * cap, d]``, and the int32 count of ids
    that did not fit (summed over ``axes``)."""
    shards = jax.lax.axis_size(axes)
    send, slot, overflow = bucket_by_owner(ids, rows_per_shard, shards, cap)
    dest = jnp.where(slot >= 0, slot, shards * cap + jnp.arange(ids.shape[0]))
    send_rows = jnp.zeros((shards * cap, sums.shape[1]), sums.dtype).at[dest].set(sums, mode="drop", unique_indices=True)
    recv = jax.lax.all_to_all(send.reshape(shards, cap), axes, 0, 0, tiled=True).reshape(-1)
    recv_rows = jax.lax.all_to_all(send_rows.reshape(shards, cap, -1), axes, 0, 0, tiled=True)
    return recv, recv_rows.reshape(shards * cap, -1), jax.lax.psum(overflow, axes)
