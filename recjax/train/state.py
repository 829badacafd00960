"""Train state built abstractly first, then materialised straight into its shardings.

The state is a plain dict pytree::

    {"step": int32[], "params": {...}, "opt_state": optax state, "rng": uint32[2],
     "nonfinite_step": int32[]}   # -1 until a step produced a NaN/inf loss

``TrainSetup`` derives everything from the config once: mesh, model graph, the abstract
state (``jax.ShapeDtypeStruct`` leaves carrying their ``NamedSharding``), the optimizer,
and the batch shardings. The same abstract tree is the init target, the checkpoint
restore target and the input of the ahead-of-time compile (``recjax compile``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recjax.config import Config, ConfigError
from recjax.data.spec import FeatureSpec, feature_spec
from recjax.models import registry
from recjax.parallel import sharding as shd
from recjax.parallel.mesh import make_mesh
from recjax.train import optim

State = dict[str, Any]


def opt_state_shardings(abstract_opt: Any, param_shardings: dict[tuple, NamedSharding], mesh: Mesh) -> Any:
    """Shard each optimizer-state leaf like the parameter whose key path ends its own.

    Optax states mirror the params tree (``mu``, ``nu``, accumulators), so a leaf whose key
    path ends with a parameter's key path takes that parameter's spec, truncated to the
    leaf's rank (e.g. the per-row accumulator ``[V]`` of a ``[V, d]`` table keeps the row
    sharding). Anything else (step counters) is replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    by_len = sorted(param_shardings.items(), key=lambda kv: -len(kv[0]))

    def one(path: tuple, leaf: Any) -> NamedSharding:
        keys = optim.path_keys(path)
        for pkeys, s in by_len:
            if len(keys) >= len(pkeys) and keys[len(keys) - len(pkeys):] == pkeys:
                spec = tuple(s.spec)[: len(leaf.shape)]
                return NamedSharding(mesh, shd.fit_spec(PartitionSpec(*spec), leaf.shape, mesh))
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt)


@dataclasses.dataclass
class TrainSetup:
    cfg: Config
    mesh: Mesh
    features: FeatureSpec
    graphdef: Any
    tx: optax.GradientTransformation
    abstract_state: State  # ShapeDtypeStruct leaves with .sharding
    state_shardings: State
    batch_axes: tuple[str, ...]  # mesh axes the leading (batch) dimension is split over

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    def init_state(self) -> State:
        """Materialise the state directly into its shardings (no host-side full copy)."""
        init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
        with shd.use_rules(self.mesh, self.cfg.mesh.rules):
            return init(jax.random.PRNGKey(self.cfg.seed))

    def _init_fn(self, rng: jax.Array) -> State:
        model_rng, state_rng = jax.random.split(rng)
        model = registry.build_model(self.cfg, self.features, nnx.Rngs(params=model_rng))
        params = nnx.split(model)[1].to_pure_dict()
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": self.tx.init(params),
            "rng": state_rng,
            "nonfinite_step": jnp.full((), -1, jnp.int32),
        }

    def batch_sharding(self, ndim: int) -> NamedSharding:
        lead = self.batch_axes if self.batch_axes else None
        return NamedSharding(self.mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def batch_axes(cfg: Config, mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in cfg.mesh.rules.get("batch", []) if mesh.shape[a] > 1)


def build_setup(cfg: Config, devices: list[jax.Device] | None = None) -> TrainSetup:
    mesh = make_mesh(cfg.mesh, devices)
    features = feature_spec(cfg.data)
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps)

    abstract_model = nnx.eval_shape(
        lambda: registry.build_model(cfg, features, nnx.Rngs(params=jax.random.PRNGKey(0)))
    )
    graphdef, abstract_params = nnx.split(abstract_model)
    logical_specs = nnx.get_partition_spec(abstract_params).to_pure_dict()
    abstract_params = abstract_params.to_pure_dict()
    param_shardings = shd.tree_shardings(logical_specs, abstract_params, mesh, cfg.mesh.rules)

    setup = TrainSetup(cfg, mesh, features, graphdef, tx, {}, {}, batch_axes(cfg, mesh))
    abstract = jax.eval_shape(setup._init_fn, jax.random.PRNGKey(cfg.seed))
    replicated = NamedSharding(mesh, PartitionSpec())
    flat_params = {
        optim.path_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    }
    shardings = {
        "step": replicated,
        "params": param_shardings,
        "opt_state": opt_state_shardings(abstract["opt_state"], flat_params, mesh),
        "rng": replicated,
        "nonfinite_step": replicated,
    }
    setup.state_shardings = shardings
    setup.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    axes = setup.batch_axes
    n_batch_shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if cfg.data.global_batch % n_batch_shards:
        raise ConfigError(
            f"data.global_batch={cfg.data.global_batch} is not divisible by the {n_batch_shards} "
            f"batch shards of mesh axes {axes}"
        )
    return setup


def param_counts(params: Any) -> dict[str, int]:
    """Parameter counts split into embedding tables and dense weights."""
    counts = {"embedding": 0, "dense": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        kind = "embedding" if optim.is_embedding_path(path) else "dense"
        counts[kind] += int(np.prod(leaf.shape))
    counts["total"] = counts["embedding"] + counts["dense"]
    return counts


def describe_model(setup: TrainSetup) -> dict[str, float]:
    """Parameter counts and analytic FLOPs per example (training = 3 x forward matmuls).

    ``params_active``: dense parameters one example uses (MoE: minus the unselected experts).
    """
    return _describe(setup.cfg, setup.features, setup.abstract_state["params"])


def describe_config(cfg: Config) -> dict[str, float]:
    """:func:`describe_model` from the config alone: no mesh, no devices, nothing allocated."""
    features = feature_spec(cfg.data)
    model = nnx.eval_shape(
        lambda: registry.build_model(cfg, features, nnx.Rngs(params=jax.random.PRNGKey(0)))
    )
    return _describe(cfg, features, nnx.split(model)[1].to_pure_dict())


def _describe(cfg: Config, features: FeatureSpec, params: Any) -> dict[str, float]:
    counts = param_counts(params)
    fwd = registry.forward_flops_per_example(cfg, features)
    entry = registry.get(cfg.model.name)
    inactive = entry.inactive_params(cfg, features) if entry.inactive_params else 0
    return {
        "params_dense": counts["dense"],
        "params_active": counts["dense"] - inactive,
        "params_embedding": counts["embedding"],
        "fwd_flops_per_example": fwd,
        "train_flops_per_example": 3 * fwd,
    }
