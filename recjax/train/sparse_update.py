"""Sparse row-wise embedding updates: a step reads and writes only the rows its batch looked up.

With ``optim.embedding.update=sparse`` the train step records every
:class:`~recjax.layers.embedding.LookupTable` lookup on a
:class:`~recjax.layers.embedding.LookupTape` and differentiates with respect to the looked-up
rows instead of the tables: per table, ids ``[N]`` (``-1``: no contribution) and row gradients
``[N, d]``, sharded over the batch. This module turns them into updates of the touched rows on
the shard that owns them, inside ``jax.shard_map`` (the table ``[R, d]`` is split into
``S`` row shards of ``R / S`` rows over its mesh axes, replicated over the others):

1. :func:`owned_row_grads`: each device sums its batch shard's duplicate ids
   (:func:`~recjax.layers.embedding.sum_duplicate_rows`); the (id, row sum) pairs go to their
   owners -- by all-to-all for a table looked up that way, else all-gathered over the batch
   axes; each row shard keeps the ids it owns and sums duplicates again. Result per row shard: ``M = N`` local row indices (``-1``: none) and their summed
   gradients ``[M, d]``, and the squared norm over all of them -- the table's share of the
   global gradient norm, equal to the dense table gradient's (whose rows are these sums).
2. :func:`apply_rows`: the row rule updates those rows and their optimizer slots with one
   gather and one unique-index scatter per array, in place (the train state is donated).
   Clipping applies to the summed gradients; a non-finite step writes nothing.

Row rules, for a touched row ``w [d]`` with summed, clipped gradient ``g [d]``, ``lr = lr(c)``
at the embedding optimizer's update count ``c``::

    sgd:             w -= lr g
    adagrad:         a += g^2  (element-wise, [R, d]);  w -= lr g / sqrt(a + eps)  (0 where a = 0)
    rowwise_adagrad: a += mean_j g_j^2  (one per row, [R]);  w -= lr g / (sqrt(a) + eps)
    lazy_adam:       m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2   ([R, d] each)
                     w -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps),  t = c + 1

Untouched rows keep their weights and slots. For ``sgd`` and both Adagrads that is exactly
what the dense update does (a zero gradient row changes nothing), so the dense path is their
test oracle. Dense Adam differs: it decays every row's moments each step and keeps moving rows
that were not looked up with their momentum. Lazy Adam (TensorFlow's LazyAdam) touches only
looked-up rows, with bias correction by the global step ``t``; the two agree only for rows
looked up at every step.

The all-gather of step 1 moves every batch shard's distinct ids to every device: ``N_global``
rows of ``d`` floats per table per step, which grows with the global batch; the all-to-all
moves ``S * cap`` rows per device (see :mod:`recjax.parallel.table_exchange`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from recjax.config import EmbeddingOptimConfig
from recjax.errors import ConfigError
from recjax.layers.embedding import sum_duplicate_rows
from recjax.parallel.table_exchange import exchange_row_grads

RULES = ("sgd", "adagrad", "rowwise_adagrad", "lazy_adam")

Rows = dict[str, jax.Array]  # slot name -> rows [M, ...] of that slot


def slot_shapes(name: str, rows: int, dim: int) -> dict[str, tuple[int, ...]]:
    """Optimizer slots of one table ``[rows, dim]`` under rule ``name``."""
    if name == "sgd":
        return {}
    if name == "adagrad":
        return {"acc": (rows, dim)}
    if name == "rowwise_adagrad":
        return {"acc": (rows,)}
    if name == "lazy_adam":
        return {"m": (rows, dim), "v": (rows, dim)}
    raise ConfigError(
        f"optim.embedding.name={name!r} has no sparse row update (sparse rules: {', '.join(RULES)}); "
        + ("dense Adam moves every row every step: use lazy_adam, or optim.embedding.update=dense"
           if name == "adam" else "use one of them, or optim.embedding.update=dense")
    )


def slot_fills(cfg: EmbeddingOptimConfig) -> dict[str, float]:
    """Initial value of each optimizer slot (also what a re-initialised row's slots get)."""
    return {"acc": cfg.initial_accumulator, "m": 0.0, "v": 0.0}


def init_slots(cfg: EmbeddingOptimConfig, rows: int, dim: int) -> dict[str, jax.Array]:
    fill = slot_fills(cfg)
    return {k: jnp.full(s, fill[k], jnp.float32) for k, s in slot_shapes(cfg.name, rows, dim).items()}


def row_rule(cfg: EmbeddingOptimConfig) -> Callable[..., tuple[jax.Array, Rows]]:
    """``(w [M, d], g [M, d], slots, lr, count, row_mean=mean over axis 1) -> (new w, new
    slots)`` for ``cfg.name``; ``row_mean`` averages ``[M, d]`` over each full row (a
    column-sharded table passes one that also reduces over the column shards)."""
    eps = cfg.eps
    slot_shapes(cfg.name, 1, 1)  # validates the name

    def rule(w: jax.Array, g: jax.Array, s: Rows, lr: jax.Array, count: jax.Array,
             row_mean: Callable[[jax.Array], jax.Array] = lambda x: jnp.mean(x, axis=1)) -> tuple[jax.Array, Rows]:
        if cfg.name == "sgd":
            return w - lr * g, {}
        if cfg.name == "adagrad":
            acc = s["acc"] + jnp.square(g)
            step = jnp.where(acc > 0, g * jax.lax.rsqrt(acc + eps), 0.0)
            return w - lr * step, {"acc": acc}
        if cfg.name == "rowwise_adagrad":
            acc = s["acc"] + row_mean(jnp.square(g))
            denom = (jnp.sqrt(acc) + eps)[:, None]
            step = jnp.where(denom > 0, g / jnp.where(denom > 0, denom, 1.0), 0.0)
            return w - lr * step, {"acc": acc}
        t = (count + 1).astype(jnp.float32)
        m = cfg.b1 * s["m"] + (1 - cfg.b1) * g
        v = cfg.b2 * s["v"] + (1 - cfg.b2) * jnp.square(g)
        m_hat = m / (1 - cfg.b1**t)
        v_hat = v / (1 - cfg.b2**t)
        return w - lr * m_hat / (jnp.sqrt(v_hat) + eps), {"m": m, "v": v}

    return rule


def _lead(axes: tuple[str, ...]) -> Any:
    return axes if axes else None


def _shard_index(axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.axis_index(axes) if axes else jnp.zeros((), jnp.int32)


def owned_row_grads(
    ids: jax.Array, grads: jax.Array, *, mesh: Mesh, batch_axes: tuple[str, ...],
    row_axes: tuple[str, ...], rows_per_shard: int, exchange_cap: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-lookup ``ids [N]`` (``-1``: none) and ``grads [N, d]`` (batch-sharded) -> the touched
    rows of each row shard: local row indices ``[S * M]`` (``-1``: none; each index at most once
    per shard), summed fp32 gradients ``[S * M, d]`` (both split over ``row_axes``), and the fp32
    squared norm of all sums (replicated).

    ``exchange_cap > 0`` (the table is looked up by all-to-all, batch and rows over the same
    axes): each device sends its distinct ids' sums to their owners by
    :func:`~recjax.parallel.table_exchange.exchange_row_grads` with ``exchange_cap`` slots per
    destination (ids its forward could not send had no row, hence no gradient), ``M = S * cap``.
    Otherwise the sums are all-gathered over the batch axes, ``M = N``."""

    def local(ids: jax.Array, grads: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        sid, sums, last = sum_duplicate_rows(ids, grads)
        sid = jnp.where(last & (sid >= 0), sid, -1)
        if exchange_cap:
            sid, sums, _ = exchange_row_grads(sid, sums, axes=row_axes, rows_per_shard=rows_per_shard,
                                              cap=exchange_cap)
        elif batch_axes:
            sid = jax.lax.all_gather(sid, batch_axes, tiled=True)
            sums = jax.lax.all_gather(sums, batch_axes, tiled=True)
        loc = sid - _shard_index(row_axes) * rows_per_shard
        loc = jnp.where((sid >= 0) & (loc >= 0) & (loc < rows_per_shard), loc, -1)
        if batch_axes:  # the same id may come from several batch shards
            loc, sums, last = sum_duplicate_rows(loc, jnp.where((loc >= 0)[:, None], sums, 0.0))
            loc = jnp.where(last & (loc >= 0), loc, -1)
        sq = jnp.sum(jnp.where(loc >= 0, jnp.sum(jnp.square(sums), axis=1), 0.0))
        if row_axes:
            sq = jax.lax.psum(sq, row_axes)
        return loc, sums, sq

    P = PartitionSpec
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(_lead(batch_axes)), P(_lead(batch_axes), None)),
        out_specs=(P(_lead(row_axes)), P(_lead(row_axes), None), P()),
        check_vma=False,
    )(ids, grads)


def apply_rows(
    table: jax.Array, slots: dict[str, jax.Array], loc: jax.Array, sums: jax.Array, *,
    rule: Callable, lr: jax.Array, count: jax.Array, clip: Callable[[jax.Array], jax.Array],
    ok: jax.Array, mesh: Mesh, row_axes: tuple[str, ...], col_axes: tuple[str, ...] = (),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Update the touched rows ``loc`` of ``table [R, d]`` and its ``slots`` (split like the
    table: rows over ``row_axes``, ``[R, d]`` slots' columns over ``col_axes``) with ``rule`` on
    gradients ``clip(sums)``; nothing is written unless ``ok``."""
    dim = table.shape[1]

    def row_mean(x: jax.Array) -> jax.Array:  # over the full row, also when its columns are split
        total = jnp.sum(x, axis=1)
        return (jax.lax.psum(total, col_axes) if col_axes else total) / dim

    def local(table, slots, loc, sums, lr, count, ok):
        rows = table.shape[0]
        valid = (loc >= 0) & ok
        idx = jnp.where(valid, loc, 0)
        # every valid index occurs once; V + i parks the others out of range, all distinct
        dest = jnp.where(valid, loc, rows + jnp.arange(loc.shape[0], dtype=loc.dtype))
        g = clip(sums)
        w, new = rule(table[idx].astype(jnp.float32), g, {k: s[idx] for k, s in slots.items()}, lr, count, row_mean)

        def write(a: jax.Array, v: jax.Array) -> jax.Array:
            return a.at[dest].set(v.astype(a.dtype), mode="drop", unique_indices=True)

        return write(table, w), {k: write(slots[k], v) for k, v in new.items()}

    P = PartitionSpec
    lead, cols = _lead(row_axes), _lead(col_axes)
    slot_specs = {k: P(lead, cols) if s.ndim == 2 else P(lead) for k, s in slots.items()}
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(lead, cols), slot_specs, P(lead), P(lead, cols), P(), P(), P()),
        out_specs=(P(lead, cols), slot_specs),
        check_vma=False,
    )(table, slots, loc, sums, lr, count, ok)



# ----------------------------------------------------------------------------- param trees

Path = tuple[str, ...]


def split_tables(tree: dict, paths: tuple[Path, ...]) -> tuple[dict, dict]:
    """A nested dict -> (it without the leaves at ``paths`` and without dicts left empty, a
    nested dict of just those leaves)."""
    rest = _copy_dicts(tree)
    tables: dict = {}
    for path in paths:
        nodes = [rest]
        for k in path[:-1]:
            nodes.append(nodes[-1][k])
        set_path(tables, path, nodes[-1].pop(path[-1]))
        for parent, k, node in zip(reversed(nodes[:-1]), reversed(path[:-1]), reversed(nodes[1:]), strict=True):
            if not node:
                del parent[k]
    return rest, tables


def join_tables(rest: dict, tables: dict) -> dict:
    """Inverse of :func:`split_tables`."""
    out = _copy_dicts(rest)
    for path, leaf in flat_paths(tables):
        set_path(out, path, leaf)
    return out


def set_path(tree: dict, path: Path, leaf: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = leaf


def get_path(tree: dict, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def flat_paths(tree: dict, prefix: Path = ()) -> list[tuple[Path, Any]]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += flat_paths(v, (*prefix, k))
        else:
            out.append(((*prefix, k), v))
    return out


def _copy_dicts(tree: Any) -> Any:
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree
