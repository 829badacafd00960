"""Dynamic embedding tables: raw 64-bit ids -> embedding rows through hash tables partitioned by id.

A dynamic table of ``capacity`` ids (``embedding.dynamic``) has ``P`` partitions; partition
``p`` holds the ids with :func:`partition_of` ``== p`` in its own collision-free hash table
(:mod:`recjax.layers.hash_table`) of ``K_p = slots_for(ceil(capacity / P), max_load)`` slots.
The embedding rows are a :class:`~recjax.layers.embedding.LookupTable` ``[P * K_p, d]``: row
``p * K_p + s`` belongs to slot ``s`` of partition ``p``, so an id's row never moves while it
is resident. The hash state (:class:`HashSlots` variables ``[P, K_p]``, ``[P]``, ``[P, 4]``)
and the rows share their leading split (logical axis ``table_rows``): each device holds whole
partitions with their rows, which is why ``P`` must be a multiple of the table's row shards.

Two sharded passes, each one ``jax.shard_map`` over the batch axes and the partitions' axes:

- :func:`find_rows` (every forward, training and evaluation): the ids are all-gathered over
  the batch axes; each device probes its partitions for the ids they own; a max over the
  partition axes gives every id its row (``-1``: not resident, or resident but not admitted,
  count below ``threshold``); each device keeps its batch shard's rows. The rows are then read
  like any other table's (``gather_rows`` or the all-to-all exchange).
- :func:`update_tables` (the train step, before the loss): the same gather, then each
  partition counts, evicts and inserts its ids (:func:`~recjax.layers.hash_table.update`,
  step clock = the train step), and the rows of slots inserted this step and their optimizer
  slots are reset -- rows to :func:`~recjax.layers.hash_table.initial_rows` of the new id, so
  an evicted id that returns starts from the same row, on any mesh and after any resume.

Only ids move between devices here (8 bytes per id of the global batch, gathered, and 4 bytes
per id combined by the max), never rows. Every partition's update is independent of the
others and sees its ids in a fixed order, so results do not depend on the mesh: 1 device
with ``P`` partitions gives the same table as ``P`` devices with one each.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from recjax.config import DynamicTableConfig
from recjax.layers import hash_table as ht
from recjax.parallel import sharding as shd

MISSING_HI = 0xFFFFFFFF  # raw ids are < 2^63: a hi half with the top bit set marks "missing"
FIELDS = ht.HashState._fields


class HashSlots(nnx.Variable):
    """Hash-table state of a dynamic table (keys, slot states, counts, clocks, counters): kept
    in the model so evaluation and checkpoints carry it, never differentiated nor optimized."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Sizes of one dynamic table: ``partitions`` x ``slots`` (per partition), ``capacity`` ids
    per partition; ``rows = partitions * slots``."""

    partitions: int
    capacity: int
    slots: int

    @classmethod
    def of(cls, cfg: DynamicTableConfig) -> Layout:
        if cfg.partitions < 1:
            raise ValueError(f"embedding.dynamic.partitions must be >= 1, got {cfg.partitions}")
        cap = math.ceil(cfg.capacity / cfg.partitions)
        return cls(cfg.partitions, cap, ht.slots_for(cap, cfg.max_load))

    @property
    def rows(self) -> int:
        return self.partitions * self.slots


def init_state(layout: Layout) -> dict[str, jax.Array]:
    """Empty hash state of every partition: field -> ``[P, ...]``."""
    one = ht.init(layout.slots)
    return {f: jnp.broadcast_to(getattr(one, f), (layout.partitions, *getattr(one, f).shape)) for f in FIELDS}


def logical_axes(field: str, row_sharded: bool) -> tuple[str | None, ...]:
    lead = "table_rows" if row_sharded else None
    return (lead,) if field == "size" else (lead, None)


def partition_of(hi: jax.Array, lo: jax.Array, partitions: int) -> jax.Array:
    """Owning partition ``[N]`` int32 of ids ``(hi, lo)``: a hash independent of the probe's
    home slot (another seed), so each partition's ids still spread over all its slots."""
    h = ht.fmix32(hi ^ ht.fmix32(lo ^ jnp.uint32(0x7F4A7C15)))
    return (h % jnp.uint32(partitions)).astype(jnp.int32)


def present(hi: jax.Array) -> jax.Array:
    return hi != jnp.uint32(MISSING_HI)


def _state(tree: dict[str, jax.Array]) -> ht.HashState:
    return ht.HashState(**{f: tree[f] for f in FIELDS})


def _gather_batch(x: jax.Array, batch_axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.all_gather(x, batch_axes, tiled=True) if batch_axes else x


def _my_slice(x: jax.Array, n: int, batch_axes: tuple[str, ...]) -> jax.Array:
    """This device's ``n`` entries of an all-gathered ``[S n, ...]`` array."""
    if not batch_axes:
        return x
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(batch_axes) * n, n)


def _first_partition(local: int, row_axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.axis_index(row_axes) * local if row_axes else jnp.zeros((), jnp.int32)


def _axes(mesh: Mesh, rules: Any, partitions: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(mesh axes the partitions are split over, mesh axes the batch is split over)."""
    rows = shd.spec_axes(tuple(shd.fit_spec(shd.logical_to_spec(("table_rows",), rules, mesh), (partitions,), mesh))[0])
    batch = shd.spec_axes(shd.logical_to_spec(("batch",), rules, mesh)[0])
    return rows, batch


def _run(fn, mesh: Mesh | None, in_specs, out_specs, *args):
    """``fn`` under ``shard_map`` on ``mesh``, or directly (one device's view) without one."""
    if mesh is None:
        return fn(*args)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def find_rows(state: dict[str, jax.Array], hi: jax.Array, lo: jax.Array, *, layout: Layout, threshold: int,
              row_sharded: bool) -> jax.Array:
    """Rows ``[N]`` int32 of raw ids ``(hi, lo) [N]`` (``-1``: missing, not resident or not yet
    admitted); under the active mesh (``use_rules``) the ids are split over the batch axes and,
    for a row-sharded table, the partitions over the row axes."""
    ctx = shd.active()
    mesh, row_axes, batch_axes = None, (), ()
    if ctx is not None:
        mesh = ctx[0]
        row_axes, batch_axes = _axes(ctx[0], ctx[1], layout.partitions)
        row_axes = row_axes if row_sharded else ()
    n_local = hi.shape[0] // (math.prod(mesh.shape[a] for a in batch_axes) if batch_axes else 1)

    def local(st: dict[str, jax.Array], hi: jax.Array, lo: jax.Array) -> jax.Array:
        hi_g, lo_g = _gather_batch(hi, batch_axes), _gather_batch(lo, batch_axes)
        owner = partition_of(hi_g, lo_g, layout.partitions)
        valid = present(hi_g)
        n_part = st["state"].shape[0]
        parts = _first_partition(n_part, row_axes) + jnp.arange(n_part)

        rows = jnp.full(hi_g.shape, -1, jnp.int32)
        for i in range(n_part):  # a loop, not vmap: a batched probe gathers ~40x slower on CPU
            st_p = {f: v[i] for f, v in st.items()}
            slot, _ = ht.find(_state(st_p), hi_g, lo_g, valid & (owner == parts[i]))
            admitted = (slot >= 0) & (st_p["count"][jnp.maximum(slot, 0)] >= threshold)
            rows = jnp.where(admitted, parts[i] * layout.slots + slot, rows)
        if row_axes:
            rows = jax.lax.pmax(rows, row_axes)
        return _my_slice(rows, n_local, batch_axes)

    P = PartitionSpec
    lead, bl = (row_axes or None), (batch_axes or None)
    st_specs = {f: P(lead) if f == "size" else P(lead, None) for f in FIELDS}
    return _run(local, mesh, (st_specs, P(bl), P(bl)), P(bl), state, hi, lo)


def update_partitions(state: dict[str, jax.Array], table: jax.Array, slots: dict[str, jax.Array],
                      hi: jax.Array, lo: jax.Array, step: jax.Array, active: jax.Array, *,
                      layout: Layout, cfg: DynamicTableConfig, fills: dict[str, float], mesh: Mesh | None,
                      row_axes: tuple[str, ...], batch_axes: tuple[str, ...]) -> tuple[Any, jax.Array, Any, dict[str, jax.Array]]:
    """One train step's hash update of one table: ids ``(hi, lo) [N]`` (batch-sharded); the hash
    state, the table ``[P K_p, d]`` and its optimizer ``slots`` (``[P K_p(, d)]``, reset to
    ``fills``) split over ``row_axes``. Nothing changes unless ``active``. Returns the new state,
    table, slots and this step's int32/fp32 metrics (counter increments, occupancy, probes)."""
    dim = table.shape[1]

    def local(st, table, slots, hi, lo, step, active):
        hi_g, lo_g = _gather_batch(hi, batch_axes), _gather_batch(lo, batch_axes)
        owner = partition_of(hi_g, lo_g, layout.partitions)
        valid = present(hi_g) & active
        n_part = st["state"].shape[0]
        parts = _first_partition(n_part, row_axes) + jnp.arange(n_part)

        outs = []
        for i in range(n_part):  # a loop, not vmap: the eviction sort stays conditional
            new_p, out = ht.update(_state({f: v[i] for f, v in st.items()}), hi_g, lo_g, valid & (owner == parts[i]),
                                   step, capacity=layout.capacity, policy=cfg.policy, threshold=cfg.threshold)
            outs.append((new_p._asdict(), out["fresh"], out["probes"]))
        new = {f: jnp.stack([o[0][f] for o in outs]) for f in FIELDS}
        fresh = jnp.stack([o[1] for o in outs])  # [P_loc, N] local slots, -1 padded
        probes = jnp.stack([o[2] for o in outs])
        n = hi_g.shape[0]
        rows = jnp.where(fresh >= 0, jnp.arange(n_part)[:, None] * layout.slots + fresh, -1).reshape(-1)
        if rows.shape[0] > n:  # at most N fresh rows in all (one owner per id): keep those
            rows = -jnp.sort(-rows)[:n]
        ok = rows >= 0
        at = jnp.maximum(rows, 0)
        init = ht.initial_rows(new["key_hi"].reshape(-1)[at], new["key_lo"].reshape(-1)[at], dim, cfg.seed)
        dest = jnp.where(ok, rows, table.shape[0] + jnp.arange(rows.shape[0]))
        table = table.at[dest].set(init.astype(table.dtype), mode="drop", unique_indices=True)
        slots = {k: s.at[dest].set(jnp.asarray(fills[k], s.dtype), mode="drop", unique_indices=True)
                 for k, s in slots.items()}
        counts = jnp.sum(new["counters"] - st["counters"], axis=0)  # [4]
        size = jnp.sum(new["size"])
        probe_sum, probe_max = jnp.sum(probes), jnp.max(probes, initial=0)
        if row_axes:
            counts, size = jax.lax.psum(counts, row_axes), jax.lax.psum(size, row_axes)
            probe_sum, probe_max = jax.lax.psum(probe_sum, row_axes), jax.lax.pmax(probe_max, row_axes)
        lookups = jnp.sum(present(hi_g), dtype=jnp.int32)
        metrics = {**{f"table_{c}": counts[i] for i, c in enumerate(ht.COUNTERS)},
                   "table_occupancy": size.astype(jnp.float32) / (layout.partitions * layout.capacity),
                   "table_probe_mean": probe_sum.astype(jnp.float32) / jnp.maximum(lookups, 1).astype(jnp.float32),
                   "table_probe_max": probe_max}
        return new, table, slots, metrics

    P = PartitionSpec
    lead, bl = (row_axes or None), (batch_axes or None)
    st_specs = {f: P(lead) if f == "size" else P(lead, None) for f in FIELDS}
    slot_specs = {k: P(lead, *([None] * (s.ndim - 1))) for k, s in slots.items()}
    metric_specs = {k: P() for k in (*(f"table_{c}" for c in ht.COUNTERS), "table_occupancy", "table_probe_mean",
                                      "table_probe_max")}
    return _run(local, mesh, (st_specs, P(lead, None), slot_specs, P(bl), P(bl), P(), P()),
                (st_specs, P(lead, None), slot_specs, metric_specs),
                state, table, slots, hi, lo, jnp.asarray(step, jnp.int32), active)
