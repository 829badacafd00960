"""Multi-task CTR models: a shared encoder, an expert mixture, one tower per task (MODELS.md 6).

For ``T`` tasks (``data.synthetic.tasks``; one when the data has a single label)::

    x      = encoder([e_1, ..., e_F, dense])          [B, D]   (MLP over the concatenation)
    h      = mixture(x)                               [T, B, D] (recjax.layers.multitask)
    logit_t = tower_t(h_t)                            [B]       (per-task MLP, one output)

``model(batch) -> (logits fp32 [B, T] ([B] for single-label data), aux)``. The mixtures are
registered as three models: ``mmoe``, ``ple`` and ``smes``. SMES adds ``balance_weight x
balance_loss`` to the loss (``aux["aux_loss"]``) and logs ``expert_evals`` (experts run per
example) and ``expert_load [E]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.config import Config, ModelConfig
from recjax.data.spec import FeatureSpec
from recjax.errors import ConfigError
from recjax.layers.embedding import EmbeddingCollection, resolve_tables
from recjax.layers.mlp import MLP, mlp_flops
from recjax.layers.multitask import PLE, SMES, MMoE, TaskTowers, task_logits
from recjax.models.registry import register
from recjax.parallel.sharding import constrain


@dataclass
class MultiTaskConfig(ModelConfig):
    encoder: list[int] = field(default_factory=lambda: [256])  # hidden widths; + dim
    dim: int = 64  # D: the shared representation and every expert's width
    expert_hidden: int = 128  # F: SwiGLU hidden width of every expert
    tower: list[int] = field(default_factory=lambda: [64])  # hidden widths per task; + 1 logit


@dataclass
class MMoEConfig(MultiTaskConfig):
    name: str = "mmoe"
    experts: int = 8


@dataclass
class PLEConfig(MultiTaskConfig):
    name: str = "ple"
    levels: int = 2
    shared_experts: int = 2  # E_s per level
    task_experts: int = 2  # E_p per task and level


@dataclass
class SMESConfig(MultiTaskConfig):
    name: str = "smes"
    experts: int = 16  # E
    shared_k: int = 2  # K_s: experts of the shared stage
    private_k: int = 1  # K_a: private experts per task
    task_importance: list[float] = field(default_factory=list)  # w_t of the shared stage; [] = 1/T each
    balance_weight: float = 0.01  # beta
    impl: str = "auto"  # grouped matmul of expert_slots: auto, pallas, interpret, xla, tokamax, reference


def num_tasks(features: FeatureSpec) -> int:
    return max(features.tasks, 1)


def _input_width(cfg: Config, features: FeatureSpec) -> int:
    return sum(t.dim * len(t.features) for t in resolve_tables(features, cfg.embedding)) + features.num_dense


def _check(cfg: Config, features: FeatureSpec) -> None:
    m: MultiTaskConfig = cfg.model  # type: ignore[assignment]
    if min([m.dim, m.expert_hidden, *m.encoder, *m.tower]) <= 0:
        raise ConfigError("model.dim, expert_hidden, encoder and tower widths must be positive")
    t = num_tasks(features)
    if isinstance(m, SMESConfig):
        if min(m.shared_k, m.private_k) < 0 or not 1 <= m.shared_k + m.private_k <= m.experts:
            raise ConfigError(f"model: smes needs shared_k, private_k >= 0 and 1 <= shared_k + private_k <= "
                              f"experts={m.experts}; got {m.shared_k}, {m.private_k}")
        if m.task_importance and (len(m.task_importance) != t or min(m.task_importance) < 0):
            raise ConfigError(f"model.task_importance: {t} non-negative weights (one per task) or [], got "
                              f"{m.task_importance}")
    if isinstance(m, MMoEConfig) and m.experts < 1:
        raise ConfigError(f"model.experts must be >= 1, got {m.experts}")
    if isinstance(m, PLEConfig) and min(m.levels, m.shared_experts, m.task_experts) < 1:
        raise ConfigError("model: ple needs levels, shared_experts and task_experts >= 1, got "
                          f"{m.levels}, {m.shared_experts}, {m.task_experts}")


class MultiTaskModel(nnx.Module):
    def __init__(self, cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs):
        _check(cfg, features)
        m: MultiTaskConfig = cfg.model  # type: ignore[assignment]
        t = num_tasks(features)
        self.tasks, self.dtype = features.tasks, dtype
        self.balance_weight = getattr(m, "balance_weight", 0.0)
        self.embedding = EmbeddingCollection(features, cfg.embedding, rngs=rngs, dtype=dtype)
        self.encoder = MLP(_input_width(cfg, features), [*m.encoder, m.dim], final_activation=True, dtype=dtype,
                           rngs=rngs)
        d, f = m.dim, m.expert_hidden
        if isinstance(m, SMESConfig):
            weight = m.task_importance or [1.0 / t] * t
            self.mixture = SMES(d, f, m.experts, t, m.shared_k, m.private_k, weight, m.impl, rngs=rngs)
        elif isinstance(m, PLEConfig):
            self.mixture = PLE(d, f, m.shared_experts, m.task_experts, t, m.levels, rngs=rngs)
        else:
            self.mixture = MMoE(d, f, m.experts, t, rngs=rngs)
        self.towers = TaskTowers(t, [d, *m.tower, 1], rngs=rngs)

    def __call__(self, batch: dict[str, jax.Array], train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        vecs, stats = self.embedding.lookup(batch["sparse"])  # F x [B, d_f]
        x = jnp.concatenate([*(v.astype(self.dtype) for v in vecs), batch["dense"].astype(self.dtype)], axis=1)
        x = self.encoder(constrain(x, ("batch", None)))
        h, mix_stats = self.mixture(constrain(x, ("batch", None)))
        logits = self.towers(constrain(h, (None, "batch", None))).T  # [B, T]
        aux = {**stats, **mix_stats}
        if "balance_loss" in aux:
            aux["aux_loss"] = self.balance_weight * aux["balance_loss"]
        return task_logits(logits, self.tasks), aux


def build(cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs) -> MultiTaskModel:
    return MultiTaskModel(cfg, features, dtype, rngs)


def expert_evals_bound(cfg: Config, features: FeatureSpec) -> int:
    """Experts run per example: all of them (MMoE, PLE), at most ``K_s + T K_a`` for SMES."""
    m = cfg.model
    t = num_tasks(features)
    if isinstance(m, SMESConfig):
        return min(m.shared_k + t * m.private_k, m.experts)
    if isinstance(m, PLEConfig):
        return m.levels * (m.shared_experts + t * m.task_experts)
    return m.experts


def forward_flops(cfg: Config, features: FeatureSpec) -> float:
    """Encoder + gates/routers + experts run (SMES: its bound ``K_s + T K_a``, an upper bound;
    the trainer logs the measured ``expert_evals``) + towers. An expert is ``6 D F``."""
    _check(cfg, features)
    m: MultiTaskConfig = cfg.model  # type: ignore[assignment]
    t, d = num_tasks(features), m.dim
    flops = mlp_flops(_input_width(cfg, features), [*m.encoder, d]) + t * mlp_flops(d, [*m.tower, 1])
    flops += expert_evals_bound(cfg, features) * 6.0 * d * m.expert_hidden
    if isinstance(m, PLEConfig):
        gate_in = m.levels * t * (m.task_experts + m.shared_experts)
        gate_in += (m.levels - 1) * (t * m.task_experts + m.shared_experts)
        return flops + 2.0 * d * gate_in
    return flops + 2.0 * d * m.experts * t


def inactive_params(cfg: Config, features: FeatureSpec) -> float:
    """SMES: the expert parameters beyond the ``K_s + T K_a`` an example can use at most."""
    m = cfg.model
    if not isinstance(m, SMESConfig):
        return 0.0
    return (m.experts - expert_evals_bound(cfg, features)) * 3.0 * m.dim * m.expert_hidden


register("mmoe", MMoEConfig, build, forward_flops, multi_task=True)
register("ple", PLEConfig, build, forward_flops, multi_task=True)
register("smes", SMESConfig, build, forward_flops, multi_task=True, inactive_params=inactive_params)
