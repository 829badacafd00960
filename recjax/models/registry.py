"""Model registry: name -> (config dataclass, builder, analytic forward FLOPs).

A model is an ``nnx.Module`` called as ``model(batch, train=True) -> (logits [B], aux)``
where ``batch`` holds the device keys of :mod:`recjax.data.spec` and ``aux`` is a dict of
diagnostics the trainer logs (scalars, or ``[E]`` vectors logged per entry, e.g.
``oov_ids``, ``moe_expert_fraction``). ``aux["aux_loss"]``, when present, is a scalar
added to the task loss (auxiliary heads, load balancing, router penalties). ``train=False``
is the serving path used by evaluation (e.g. sparse-inference routers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from recjax.config import Config, ConfigError, ModelConfig, register_model_config
from recjax.data.spec import FeatureSpec

# Parameters carry logical axis names; shardings are applied by the trainer from the mesh
# rules, not eagerly at creation (flax >= 0.12 defaults to eager sharding).
nnx.use_eager_sharding(False)

Builder = Callable[[Config, FeatureSpec, jnp.dtype, nnx.Rngs], nnx.Module]
FlopsFn = Callable[[Config, FeatureSpec], float]
CountFn = Callable[[Config, FeatureSpec], float]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type[ModelConfig]
    build: Builder
    forward_flops: FlopsFn  # matmul FLOPs of one example's forward pass (2 per multiply-add)
    inactive_params: CountFn | None = None  # params an example does not use (unselected experts)
    activation_bytes: CountFn | None = None  # activations kept for backward, per example


MODELS: dict[str, ModelEntry] = {}


def register(
    name: str,
    config_cls: type[ModelConfig],
    build: Builder,
    forward_flops: FlopsFn,
    *,
    inactive_params: CountFn | None = None,
    activation_bytes: CountFn | None = None,
) -> None:
    MODELS[name] = ModelEntry(name, config_cls, build, forward_flops, inactive_params, activation_bytes)
    register_model_config(name, config_cls)


def get(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; registered: {sorted(MODELS)}")
    return MODELS[name]


def build_model(cfg: Config, features: FeatureSpec, rngs: nnx.Rngs) -> nnx.Module:
    dtype = jnp.bfloat16 if cfg.train.compute_dtype == "bfloat16" else jnp.float32
    return get(cfg.model.name).build(cfg, features, dtype, rngs)


def forward_flops_per_example(cfg: Config, features: FeatureSpec) -> float:
    return get(cfg.model.name).forward_flops(cfg, features)
