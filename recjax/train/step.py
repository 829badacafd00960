"""Pure train and eval steps, jitted once with explicit shardings and state donation.

Loss: mean sigmoid binary cross-entropy of the model's logits (logged as ``loss``) plus the
model's ``aux["aux_loss"]`` when it has one (``total_loss``). A step whose loss or
gradient norm is not finite leaves the state unchanged and records its step number in
``state["nonfinite_step"]``; later steps are frozen too, so the loop can stop with the
exact step named (at its next host sync) and the last good checkpoint stays the last
one written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from recjax.parallel import sharding as shd
from recjax.train.state import State, TrainSetup

Batch = dict[str, jax.Array]


def _forward(setup: TrainSetup, params: Any, batch: Batch, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    model = nnx.merge(setup.graphdef, params)
    return model(batch, train=train)


def _scalar_metrics(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Model diagnostics as scalars: a vector ``v [E]`` becomes ``name/0 .. name/E-1``."""
    out: dict[str, jax.Array] = {}
    for k, v in aux.items():
        v = jnp.asarray(v)
        if v.ndim == 0:
            out[k] = v
        else:
            out.update({f"{k}/{i}": v[i] for i in range(v.shape[0])})
    return out


def make_train_step(setup: TrainSetup) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    def loss_fn(params: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits, aux = _forward(setup, params, batch, train=True)
        loss = optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean()
        aux = dict(aux, loss=loss)
        if "aux_loss" in aux:
            aux["total_loss"] = loss + aux["aux_loss"]
            return aux["total_loss"], aux
        return loss, aux

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        with shd.use_rules(setup.mesh, setup.cfg.mesh.rules):
            (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
            # keep table gradients row-sharded like the tables (never a replicated [V, d])
            grads = jax.lax.with_sharding_constraint(grads, setup.state_shardings["params"])
            updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(total) & jnp.isfinite(grad_norm) & (state["nonfinite_step"] < 0)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = {
            "step": state["step"] + 1,
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "rng": jax.random.fold_in(state["rng"], state["step"]),
            "nonfinite_step": jnp.where(
                (state["nonfinite_step"] < 0) & ~ok, state["step"] + 1, state["nonfinite_step"]
            ),
        }
        metrics = {"grad_norm": grad_norm, **_scalar_metrics(aux)}
        return new_state, metrics

    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(setup.state_shardings, None),
        out_shardings=(setup.state_shardings, replicated),
        donate_argnums=(0,),
    )


def make_eval_step(setup: TrainSetup) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """Forward pass returning probabilities plus the eval keys, replicated on every process."""

    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        with shd.use_rules(setup.mesh, setup.cfg.mesh.rules):
            logits, _ = _forward(setup, params, batch, train=False)
        out = {"prob": jax.nn.sigmoid(logits), "label": batch["label"]}
        for key in ("user_id", "label_prob"):
            if key in batch:
                out[key] = batch[key]
        return out

    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return jax.jit(eval_step, in_shardings=(setup.state_shardings["params"], None), out_shardings=replicated)


def abstract_batch(setup: TrainSetup, local_batch: dict[str, Any] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Global-batch ShapeDtypeStructs (with shardings) for the device keys of the stream."""
    g = setup.cfg.data.global_batch
    f = setup.features
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {
        "dense": ((g, f.num_dense), jnp.float32),
        "sparse": ((g, f.num_sparse), jnp.int32),
        "label": ((g,), jnp.float32),
    }
    if f.has_user_id:
        shapes["user_id"] = ((g,), jnp.int32)
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=setup.batch_sharding(len(shape)))
        for k, (shape, dtype) in shapes.items()
    }
