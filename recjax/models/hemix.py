"""HeMix (arXiv 2602.09387, MODELS.md section 7): heterogeneous tokens -- queries made from the
target and context, plus learned fixed queries -- read a long-term and a real-time behaviour
sequence, and HeteroMixer blocks mix them with the non-sequence tokens.

Inputs: the CTR batch and the event sequence of the synthetic stream. Per example, with
``e_1..e_F`` the sparse features' embeddings (C1 is the target item)::

    ctx     = [e_1, .., e_F, dense_mlp(dense)]                           [n0, d]
    S_lt    = event rows of the `long_length` most recent events         [L_lt, D]
    S_rt    = the same of the `realtime_length` most recent events       [L_rt, D]
              (row = E_item[i] W_item + E_type[tau] + log1p(age) w_age)
    dyn     = query_mlp(flatten(ctx)) split into Q_d real-time and Q_d long-term tokens [2 Q_d, D]
    q_rt    = [dyn_rt, fixed_rt]   q_lt = [dyn_lt, fixed_lt]             [Q, D], Q = Q_d + Q_f
    x_0     = [QCA_rt(q_rt, S_rt), QCA_lt(q_lt, S_lt), (W_mix ctx) W_ns]  [N, D], N = 2 Q + T_ns
    x_l     = HeteroMixerBlock_l(x_{l-1}),  l = 1..num_layers
    logit_t = tower_t(mean_i x_L,i)                                      (one tower per task)

``interest: pool`` is the sequence-pooling baseline: each sequence's masked mean row, mapped
to its ``Q`` tokens by one linear layer, replaces the query cross-attention;
``fixed_queries: 0`` drops the fixed queries (an ablation of the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.config import Config, ModelConfig
from recjax.data.spec import FeatureSpec
from recjax.errors import ConfigError
from recjax.layers.embedding import EmbeddingCollection
from recjax.layers.events import EventRows, most_recent
from recjax.layers.hemix import (
    HeteroMixerBlock,
    QueryCrossAttention,
    hetero_mixer_flops,
    query_cross_attention_flops,
)
from recjax.layers.mlp import MLP, mlp_flops
from recjax.layers.multitask import TaskTowers, task_logits
from recjax.layers.token_mixing import fan_in_init, rms_norm, stacked_param
from recjax.models.multitask import num_tasks
from recjax.models.registry import register
from recjax.parallel.sharding import constrain


@dataclass
class HeMixConfig(ModelConfig):
    name: str = "hemix"
    dim: int = 32  # D: token width
    context_tokens: int = 4  # T_ns: non-sequence tokens
    dynamic_queries: int = 2  # Q_d per sequence, from the target and context
    fixed_queries: int = 2  # Q_f per sequence, learned
    attention_heads: int = 2
    long_length: int = 64  # L_lt: most recent events read by the long-term interest
    realtime_length: int = 8  # L_rt: most recent events read by the real-time interest
    interest: Literal["query", "pool"] = "query"
    num_layers: int = 2
    mix_heads: int = 4  # H
    rank: int = 8  # r of each mix-token's low-rank MLP
    ffn_hidden: int = 64  # F of the per-token FFN
    item_feature: str = "C1"  # the sparse feature whose table embeds the event items
    dense_mlp: list[int] = field(default_factory=lambda: [64])  # + the embedding width
    query_mlp: list[int] = field(default_factory=lambda: [128])  # + 2 Q_d D
    tower: list[int] = field(default_factory=lambda: [32])  # per task; + 1 logit


def _shapes(cfg: Config, features: FeatureSpec) -> tuple[int, int, int, int, int]:
    """(embedding width d, context inputs n0, queries per sequence Q, tokens N, L_rt); ConfigError
    on an unusable config."""
    m: HeMixConfig = cfg.model  # type: ignore[assignment]
    if not features.events:
        raise ConfigError("hemix reads event sequences: set data.synthetic.events > 0 (e.g. "
                          "configs/experiments/event_stream.yaml)")
    for key in ("dim", "context_tokens", "attention_heads", "long_length", "realtime_length", "num_layers",
                "mix_heads", "rank", "ffn_hidden"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key} must be positive, got {getattr(m, key)}")
    q = m.dynamic_queries + m.fixed_queries
    if min(m.dynamic_queries, m.fixed_queries) < 0 or q < 1:
        raise ConfigError(f"model.dynamic_queries and fixed_queries must be >= 0 with a positive sum, got "
                          f"{m.dynamic_queries}, {m.fixed_queries}")
    if m.dim % m.attention_heads or m.dim % m.mix_heads:
        raise ConfigError(f"model.attention_heads ({m.attention_heads}) and mix_heads ({m.mix_heads}) must divide "
                          f"model.dim ({m.dim})")
    if m.item_feature not in {f.name for f in features.sparse}:
        raise ConfigError(f"model.item_feature {m.item_feature!r} is not a sparse feature")
    d = cfg.embedding.dim
    n0 = features.num_sparse + (1 if features.num_dense else 0)
    return d, n0, q, 2 * q + m.context_tokens, min(m.realtime_length, features.events)


class HeMix(nnx.Module):
    """``model(batch) -> (logits fp32 [B] ([B, T] on multi-task data), embedding stats)``."""

    def __init__(self, cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs):
        m: HeMixConfig = cfg.model  # type: ignore[assignment]
        d, n0, q, n, _ = _shapes(cfg, features)
        self.m, self.dtype, self.tasks = m, dtype, features.tasks
        self.embedding = EmbeddingCollection(features, cfg.embedding, rngs=rngs, dtype=dtype)
        if self.embedding.uniform_dim != d:
            raise ConfigError("hemix needs every embedding table at embedding.dim")
        init = fan_in_init()
        self.dense = MLP(features.num_dense, [*m.dense_mlp, d], dtype=dtype, rngs=rngs) if features.num_dense else None
        self.token_mix = stacked_param(rngs, (m.context_tokens, n0), (None, None), init)
        self.token_proj = stacked_param(rngs, (d, m.dim), ("embed", "mlp"), init)
        self.events = EventRows(d, m.dim, features.event_types, dtype=dtype, rngs=rngs)
        self.interests = nnx.List()
        if m.interest == "query":
            self.queries = MLP(n0 * d, [*m.query_mlp, 2 * m.dynamic_queries * m.dim], dtype=dtype, rngs=rngs) \
                if m.dynamic_queries else None
            self.fixed = stacked_param(rngs, (2, m.fixed_queries, m.dim), (None, None, None),
                                       nnx.initializers.normal(1.0)) if m.fixed_queries else None
            self.interests = nnx.List([QueryCrossAttention(q, m.dim, m.attention_heads, dtype=dtype, rngs=rngs)
                                       for _ in range(2)])
        elif m.interest == "pool":
            self.pool_proj = stacked_param(rngs, (2, m.dim, q * m.dim), (None, "embed", "mlp"), init)
        else:
            raise ConfigError(f"model.interest must be 'query' or 'pool', got {m.interest!r}")
        self.blocks = nnx.List([HeteroMixerBlock(n, m.dim, m.mix_heads, m.rank, m.ffn_hidden, dtype=dtype, rngs=rngs)
                                for _ in range(m.num_layers)])
        self.final_norm = stacked_param(rngs, (m.dim,), (None,), nnx.initializers.ones_init())
        self.towers = TaskTowers(num_tasks(features), [m.dim, *m.tower, 1], rngs=rngs)

    def _sequence(self, rows: jax.Array, types: jax.Array, age: jax.Array, valid: jax.Array, length: int):
        """The ``length`` most recent events as rows ``[B, length, D]`` (zero past ``n``) and ``n``."""
        r, t, a, n = most_recent(valid, length, rows, types, age)
        return self.events(r, t, a, n), n

    def __call__(self, batch: dict[str, jax.Array], train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        m, dt = self.m, self.dtype
        vecs, stats = self.embedding.lookup(batch["sparse"])
        if self.dense is not None:
            vecs = [*vecs, self.dense(constrain(batch["dense"], ("batch", None)))]
        ctx = jnp.stack([v.astype(dt) for v in vecs], axis=1)  # [B, n0, d]
        b = ctx.shape[0]
        rows, oov = self.embedding.lookup_positions(m.item_feature, batch["event_item"])
        stats = {**stats, "oov_ids": stats["oov_ids"] + oov}
        valid = batch["event_type"] >= 0
        long_len = min(m.long_length, valid.shape[1])
        seqs = [self._sequence(rows, batch["event_type"], batch["event_age"], valid, length)
                for length in (min(m.realtime_length, long_len), long_len)]  # real-time, long-term
        if m.interest == "query":
            parts = []  # each [2, B, Q_part, D]: real-time, long-term
            if self.queries is not None:
                dyn = self.queries(ctx.reshape(b, -1)).reshape(b, 2, m.dynamic_queries, m.dim)
                parts.append(dyn.transpose(1, 0, 2, 3))
            if self.fixed is not None:
                parts.append(jnp.broadcast_to(self.fixed[...].astype(dt)[:, None], (2, b, m.fixed_queries, m.dim)))
            q = jnp.concatenate(parts, axis=2)  # [2, B, Q, D]
            interest = [attend(q[i], s, n) for i, (attend, (s, n)) in enumerate(zip(self.interests, seqs, strict=True))]
        else:
            interest = []
            for i, (s, n) in enumerate(seqs):
                mean = s.astype(jnp.float32).sum(1) / jnp.maximum(n, 1)[:, None].astype(jnp.float32)
                interest.append((mean.astype(dt) @ self.pool_proj[i].astype(dt)).reshape(b, -1, m.dim))
        context = jnp.einsum("tn,bnd->btd", self.token_mix[...].astype(dt), ctx) @ self.token_proj[...].astype(dt)
        x = constrain(jnp.concatenate([*interest, context], axis=1), ("batch", None, None))
        for block in self.blocks:
            x = constrain(block(x), ("batch", None, None))
        pooled = rms_norm(x.astype(jnp.float32).mean(axis=1), self.final_norm[...]).astype(dt)  # [B, D]
        logits = self.towers(jnp.broadcast_to(pooled, (self.towers.tasks, *pooled.shape))).T  # [B, T]
        return task_logits(logits, self.tasks), dict(stats)


def build(cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs) -> HeMix:
    return HeMix(cfg, features, dtype, rngs)


def forward_flops(cfg: Config, features: FeatureSpec) -> float:
    """Matmul FLOPs per example: dense MLP, context tokens, event rows, the two interests
    (:func:`query_cross_attention_flops` and the query MLP, or the pooling maps), the blocks
    (:func:`hetero_mixer_flops`) and the towers."""
    m: HeMixConfig = cfg.model  # type: ignore[assignment]
    d, n0, q, n, rt = _shapes(cfg, features)
    lt = min(m.long_length, features.events)
    rt = min(rt, lt)
    flops = 2.0 * m.context_tokens * n0 * d + 2.0 * m.context_tokens * d * m.dim
    if features.num_dense:
        flops += mlp_flops(features.num_dense, [*m.dense_mlp, d])
    flops += 2.0 * (rt + lt) * d * m.dim  # event rows
    if m.interest == "query":
        flops += sum(query_cross_attention_flops(q, length, m.dim) for length in (rt, lt))
        if m.dynamic_queries:
            flops += mlp_flops(n0 * d, [*m.query_mlp, 2 * m.dynamic_queries * m.dim])
    else:
        flops += 2 * 2.0 * m.dim * q * m.dim
    flops += m.num_layers * hetero_mixer_flops(n, m.dim, m.rank, m.ffn_hidden)
    return flops + num_tasks(features) * mlp_flops(m.dim, [*m.tower, 1])


register("hemix", HeMixConfig, build, forward_flops, multi_task=True)
