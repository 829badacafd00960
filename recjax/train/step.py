"""The one train step: the task's loss, gradients, the optimizer, the NaN freeze.

Jitted once with explicit in/out shardings and state donation. The task's
``loss(model, batch, rng)`` gives ``(total, metrics)``; ``rng = fold_in(state["rng"],
state["step"])``. A step whose total loss or gradient norm is not finite leaves the state
unchanged and records its step number in ``state["nonfinite_step"]``; later steps are frozen
too, so the trainer can stop with the exact step named (at its next host sync) and the last
good checkpoint stays the last one written.
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


def make_train_step(setup: TrainSetup) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
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
        ok = jnp.isfinite(total) & jnp.isfinite(grad_norm) & (state["nonfinite_step"] < 0)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = {
            "step": state["step"] + 1,
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "rng": state["rng"],
            "nonfinite_step": jnp.where(
                (state["nonfinite_step"] < 0) & ~ok, state["step"] + 1, state["nonfinite_step"]
            ),
        }
        return new_state, {"grad_norm": grad_norm, **metrics}

    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(setup.state_shardings, None),
        out_shardings=(setup.state_shardings, replicated),
        donate_argnums=(0,),
    )
