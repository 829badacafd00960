"""The one train step: the task's loss, gradients, the optimizer, the NaN freeze.

Jitted once with explicit in/out shardings and state donation. The task's
``loss(model, batch, rng)`` gives ``(total, metrics)``; ``rng = fold_in(state["rng"],
state["step"])``. A step whose total loss or gradient norm is not finite leaves the state
unchanged and records its step number in ``state["nonfinite_step"]``; later steps are frozen
too, so the trainer can stop with the exact step named (at its next host sync) and the last
good checkpoint stays the last one written.

With sparse tables (``setup.sparse_tables``, ``optim.embedding.update=sparse``) the loss is
differentiated with respect to the dense params and the looked-up rows (a
:class:`~recjax.layers.embedding.LookupTape`), never the tables; the global gradient norm,
clipping and the NaN guard cover the dense gradients and the touched rows' summed gradients
together, and :mod:`recjax.train.sparse_update` writes the touched rows in place. Dynamic
(raw-id) tables first insert and evict the batch's ids (``update_dynamic_tables``), so the
forward pass finds every admitted id's row; their hash state is carried through unchanged by
the rest of the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from recjax.layers import dynamic_table as dyn
from recjax.layers.embedding import LookupTape, recording
from recjax.parallel import sharding as shd
from recjax.train import sparse_update as sparse
from recjax.train.optim import learning_rate_schedule
from recjax.train.state import State, TrainSetup

Batch = dict[str, jax.Array]


def make_train_step(setup: TrainSetup) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    step = _sparse_step(setup) if setup.sparse_tables else _dense_step(setup)
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(setup.state_shardings, None),
        out_shardings=(setup.state_shardings, replicated),
        donate_argnums=(0,),
    )


def discover_lookups(setup: TrainSetup, params: Any, batch: Any, rng: jax.Array) -> LookupTape:
    """A tape of one step's :class:`LookupTable` lookups, traced but not computed (call it under
    ``use_rules``): per table, each call's ids as ``ShapeDtypeStruct`` and its all-to-all slots
    per destination."""
    tapes = []

    def ids_only(params, batch, rng):
        with recording(LookupTape()) as tape:
            setup.task.loss(nnx.merge(setup.graphdef, params), batch, rng)
        tapes.append(tape)
        return tape.ids

    shapes = jax.eval_shape(ids_only, params, batch, rng)
    return LookupTape(ids=shapes, exchange_caps=tapes[0].exchange_caps)


def _ok(total: jax.Array, grad_norm: jax.Array, state: State) -> jax.Array:
    return jnp.isfinite(total) & jnp.isfinite(grad_norm) & (state["nonfinite_step"] < 0)


def _nonfinite_step(state: State, ok: jax.Array) -> jax.Array:
    return jnp.where((state["nonfinite_step"] < 0) & ~ok, state["step"] + 1, state["nonfinite_step"])


def _keep(ok: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _dense_step(setup: TrainSetup) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    task = setup.task

    def loss_fn(params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        return task.loss(nnx.merge(setup.graphdef, params), batch, rng)

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state["rng"], state["step"])
        with shd.use_rules(setup.mesh, setup.cfg.mesh.rules):
            (total, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng)
            # keep table gradients row-sharded like the tables (never a replicated [V, d])
            grads = jax.lax.with_sharding_constraint(grads, setup.state_shardings["params"])
            updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree_utils.tree_norm(grads)
        ok = _ok(total, grad_norm, state)
        new_state = {
            "step": state["step"] + 1,
            "params": _keep(ok, params, state["params"]),
            "opt_state": _keep(ok, opt_state, state["opt_state"]),
            "rng": state["rng"],
            "nonfinite_step": _nonfinite_step(state, ok),
        }
        return new_state, {"grad_norm": grad_norm, **metrics}

    return train_step


def _sparse_step(setup: TrainSetup) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    task, tables, paths = setup.task, setup.sparse_tables, setup.sparse_paths
    ecfg = setup.cfg.optim.embedding
    rule = sparse.row_rule(ecfg)
    emb_lr = learning_rate_schedule(setup.cfg.optim, ecfg.lr, setup.total_steps)
    clip = setup.cfg.optim.grad_clip_norm
    dense_shardings, _ = sparse.split_tables(setup.state_shardings["params"], paths + setup.hash_paths)
    lead = setup.batch_axes if setup.batch_axes else None
    row_sharding = NamedSharding(setup.mesh, PartitionSpec(lead, None))

    def loss_fn(dense: Any, deltas: Any, tables_: Any, batch: Batch, rng: jax.Array):
        with recording(LookupTape(deltas)) as tape:
            total, metrics = task.loss(nnx.merge(setup.graphdef, sparse.join_tables(dense, tables_)), batch, rng)
        return total, (metrics, tape.ids)

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state["rng"], state["step"])
        opt = state["opt_state"]
        with shd.use_rules(setup.mesh, setup.cfg.mesh.rules):
            params, rows, dyn_metrics = update_dynamic_tables(state["params"], opt["rows"], batch["sparse"]
                                                              if setup.dynamic_tables else None, state)
            opt = {**opt, "rows": rows}
            # hash state rides with the tables: looked up, never differentiated
            dense, table_vals = sparse.split_tables(params, paths + setup.hash_paths)
            found = discover_lookups(setup, params, batch, rng)
            deltas = {t.name: [jax.lax.with_sharding_constraint(jnp.zeros((s.shape[0], t.dim), jnp.float32), row_sharding)
                               for s in found.ids.get(t.name, [])] for t in tables}
            (total, (metrics, ids)), (g_dense, g_rows) = jax.value_and_grad(
                loss_fn, argnums=(0, 1), has_aux=True)(dense, deltas, table_vals, batch, rng)
            g_dense = jax.lax.with_sharding_constraint(g_dense, dense_shardings)
            owned = {}
            for t in tables:
                if not ids.get(t.name):
                    continue
                # tables looked up by all-to-all send their row gradients back the same way
                # (several lookups of one table, e.g. a feature and a sequence of its items, send
                # their concatenated ids: per destination at most the sum of their capacities)
                caps = found.exchange_caps[t.name]
                if any(caps) and not all(caps):
                    raise ValueError(f"table {t.name}: lookups mix the all-to-all exchange and local gathers")
                owned[t.name] = sparse.owned_row_grads(
                    jnp.concatenate(ids[t.name]), jnp.concatenate(g_rows[t.name]), mesh=setup.mesh,
                    batch_axes=setup.batch_axes, row_axes=t.row_axes, rows_per_shard=t.rows_per_shard,
                    exchange_cap=sum(caps))
            sq = jnp.square(optax.tree_utils.tree_norm(g_dense)) + sum(o[2] for o in owned.values())
            grad_norm = jnp.sqrt(sq)
            ok = _ok(total, grad_norm, state)

            def clipped(g: jax.Array) -> jax.Array:  # optax.clip_by_global_norm's formula
                return jax.lax.select(grad_norm < clip, g, (g / grad_norm) * clip) if clip > 0 else g

            g_dense = jax.tree.map(clipped, g_dense)
            updates, dense_opt = setup.tx.update(g_dense, opt["dense"], dense)
            new_dense = optax.apply_updates(dense, updates)
            rows = opt["rows"]
            count = rows["count"]
            new_tables, new_rows = {}, {"count": jnp.where(ok, count + 1, count)}
            for t in tables:
                table = sparse.get_path(table_vals, t.path)
                slots = {k: sparse.get_path(v, t.path) for k, v in rows.items() if k != "count"}
                if t.name in owned:
                    loc, sums, _ = owned[t.name]
                    table, slots = sparse.apply_rows(
                        table, slots, loc, sums, rule=rule, lr=emb_lr(count), count=count,
                        clip=clipped, ok=ok, mesh=setup.mesh, row_axes=t.row_axes, col_axes=t.col_axes)
                sparse.set_path(new_tables, t.path, table)
                for k, v in slots.items():
                    sparse.set_path(new_rows.setdefault(k, {}), t.path, v)
        for path in setup.hash_paths:
            sparse.set_path(new_tables, path, sparse.get_path(table_vals, path))
        new_state = {
            "step": state["step"] + 1,
            "params": sparse.join_tables(_keep(ok, new_dense, dense), new_tables),
            "opt_state": {"dense": _keep(ok, dense_opt, opt["dense"]), "rows": new_rows},
            "rng": state["rng"],
            "nonfinite_step": _nonfinite_step(state, ok),
        }
        return new_state, {"grad_norm": grad_norm, **metrics, **dyn_metrics}

    def update_dynamic_tables(params: Any, rows: Any, raw: jax.Array | None, state: State):
        """Insert and evict this batch's raw ids ``[B, F(, H), 2]`` in every dynamic table, resetting
        the rows and optimizer slots of fresh slots (:mod:`recjax.layers.dynamic_table`); a frozen
        (non-finite) run changes nothing. Metrics are summed over the tables (occupancy and probe
        length: averaged; probe max: the max)."""
        if raw is None:
            return params, rows, {}
        params, rows = sparse.join_tables(params, {}), sparse.join_tables(rows, {})  # copies to update
        fills = sparse.slot_fills(ecfg)
        active = state["nonfinite_step"] < 0
        per_table = []
        for t in setup.dynamic_tables:
            cols = raw[:, jnp.asarray(t.columns)]
            hash_state = sparse.get_path(params, t.hash_path)
            slots = {k: sparse.get_path(v, t.rows.path) for k, v in rows.items() if k != "count"}
            hash_state, table, slots, m = dyn.update_partitions(
                hash_state, sparse.get_path(params, t.rows.path), slots, cols[..., 0].reshape(-1),
                cols[..., 1].reshape(-1), state["step"], active, layout=t.layout, cfg=setup.cfg.embedding.dynamic,
                fills=fills, mesh=setup.mesh, row_axes=t.rows.row_axes, batch_axes=setup.batch_axes)
            sparse.set_path(params, t.hash_path, hash_state)
            sparse.set_path(params, t.rows.path, table)
            for k, v in slots.items():
                sparse.set_path(rows[k], t.rows.path, v)
            per_table.append(m)
        n = len(per_table)
        out = {k: sum(m[k] for m in per_table) for k in per_table[0] if k != "table_probe_max"}
        out["table_occupancy"] = out["table_occupancy"] / n
        out["table_probe_mean"] = out["table_probe_mean"] / n
        out["table_probe_max"] = jnp.max(jnp.stack([m["table_probe_max"] for m in per_table]))
        return params, rows, out

    return train_step
