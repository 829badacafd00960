"""Model entries: config dataclass, builder, analytic FLOPs, and the task that trains the model.

A model is built from ``(cfg, data_info, rngs)`` (:func:`build_model`): ``data_info`` is what
its task knows about the data (a CTR :class:`~recjax.data.spec.FeatureSpec`, or the
sequential task's :class:`~recjax.models.seqrec.SequenceInfo`); models import no data
readers. The call convention is the task's (``recjax.tasks``): CTR models are
``model(batch, train=True) -> (logits [B], aux)`` (``[B, T]`` on multi-task data, for models
registered with ``multi_task``) with ``aux`` a dict of diagnostics
(scalars, or ``[E]`` vectors logged per entry); ``aux["aux_loss"]`` is a scalar added to the
task loss and ``aux["aux_logits"]`` an auxiliary head's logits that the task scores with the
same BCE. ``train=False`` is the serving path used by evaluation.

Entries live in :data:`recjax.registry.MODELS`, which imports a model's module the first
time its name is looked up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
from flax import nnx

from recjax.config import Config, ModelConfig, model_entry
from recjax.registry import MODELS

# Parameters carry logical axis names; shardings are applied by the trainer from the mesh
# rules, not eagerly at creation (flax >= 0.12 defaults to eager sharding).
nnx.use_eager_sharding(False)

Builder = Callable[[Config, Any, jnp.dtype, nnx.Rngs], nnx.Module]
FlopsFn = Callable[[Config, Any], float]
CountFn = Callable[[Config, Any], float]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type[ModelConfig]
    build: Builder
    forward_flops: FlopsFn  # matmul FLOPs of one example's forward pass (2 per multiply-add)
    task: str = "ctr"  # the recjax.tasks entry that trains this model
    inactive_params: CountFn | None = None  # params an example does not use (unselected experts)
    activation_bytes: CountFn | None = None  # activations kept for backward, per example
    multi_task: bool = False  # predicts the T labels of multi-task data (logits [B, T])


def register(
    name: str,
    config_cls: type[ModelConfig],
    build: Builder,
    forward_flops: FlopsFn,
    *,
    task: str = "ctr",
    inactive_params: CountFn | None = None,
    activation_bytes: CountFn | None = None,
    multi_task: bool = False,
) -> None:
    MODELS.register(
        name, ModelEntry(name, config_cls, build, forward_flops, task, inactive_params, activation_bytes, multi_task)
    )


def get(name: str) -> ModelEntry:
    return model_entry(name)


def compute_dtype(cfg: Config) -> jnp.dtype:
    return jnp.bfloat16 if cfg.train.compute_dtype == "bfloat16" else jnp.float32


def build_model(cfg: Config, data_info: Any, rngs: nnx.Rngs) -> nnx.Module:
    return get(cfg.model.name).build(cfg, data_info, compute_dtype(cfg), rngs)


def forward_flops_per_example(cfg: Config, data_info: Any) -> float:
    return get(cfg.model.name).forward_flops(cfg, data_info)
