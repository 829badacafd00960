"""Kunlun (arXiv 2602.10016, MODELS.md section 3): event-sequence towers that read the context
through GDPA and are summarised by hierarchical seed pooling, and a mixture of Wukong layers
for the global interaction. Every component has a config switch that puts its baseline back.

Inputs: the CTR batch (``sparse``, ``dense``) and the event sequence (``event_item``,
``event_type``, ``event_age``, :mod:`recjax.data.spec`). Per example::

    ctx_0   = (W_tok [e_1..e_F, dense_mlp(dense)]) W_in             [T, D] context tokens
    tower k (one per event type with `personalization`, else one over all events):
      s_k   = E_item[i] W_k + E_type[tau] + log1p(age) w_k  over its `length` most recent events  [L_k, D_k]
    layer l = 0 .. num_layers - 1, for each tower with l < its `layers`:
      interaction layer:  s_k += ContextInteraction(RMSNorm(s_k), ctx_l W_ctx,k)   (GDPA | PFFN)
      attention layer:    s_k += WindowSelfAttention(RMSNorm(s_k), ROTE(age))     (window | full)
      pooling:            y_k  = SeedPooling(RMSNorm(s_k)) W_out,k                  (HSP | PMA) [T_k, D]
      with `compskip`, even layers are interaction layers (then pooling) and odd layers attention
      layers that reuse the cached y_k, except that a tower's last layer always pools (else its
      attention would be computed for nothing); without it every layer is all three, in order.
    ctx_{l+1} = WukongMixture_l([ctx_l, y_1, .., y_K])                    [T, D]
    logit     = top_mlp(flatten([ctx_L, y_1, .., y_K]))

Switches (each reduces one component to its baseline): ``interaction`` gdpa | pffn,
``pooling`` hsp | pma, ``sliding_window`` (false: every tower attends over all its events),
``compskip``, ``personalization``, ``rote``, ``global_experts`` (1: a single Wukong layer);
``use_sequence: false`` drops the towers (the sequence-blind model of the same context path).
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
from recjax.kernels.gdpa import ACTIVATIONS, banded_shape
from recjax.layers.embedding import EmbeddingCollection
from recjax.layers.events import EventRows, most_recent
from recjax.layers.kunlun import (
    WINDOW_CHUNK,
    ContextInteraction,
    SeedPooling,
    WindowSelfAttention,
    context_interaction_flops,
    seed_pooling_flops,
    window_self_attention_flops,
)
from recjax.layers.mlp import MLP, mlp_flops
from recjax.layers.token_mixing import fan_in_init, rms_norm, stacked_param
from recjax.layers.wukong import WukongMixture, wukong_mixture_flops
from recjax.models.registry import register
from recjax.parallel.sharding import constrain


@dataclass
class TowerConfig:
    """One event tower: width, heads, summary tokens, layers, window (0: full), events kept."""

    width: int = 32
    heads: int = 2
    tokens: int = 2
    layers: int = 2
    window: int = 8
    length: int = 32


@dataclass
class KunlunConfig(ModelConfig):
    name: str = "kunlun"
    dim: int = 32  # D: width of the context tokens and of the global interaction
    tokens: int = 4  # T: context tokens
    num_layers: int = 2
    keys: int = 16  # per-example generated keys/values of the interaction (the PFFN hidden size)
    interaction: Literal["gdpa", "pffn"] = "gdpa"
    activation: str = "gelu"  # GDPA's activation (interaction and self-attention)
    pooling: Literal["hsp", "pma"] = "hsp"
    seeds: int = 8  # HSP seeds (more than a tower's tokens)
    sumkron_terms: int = 2  # k of SumKronLinear
    sliding_window: bool = True
    compskip: bool = True
    personalization: bool = True
    rote: bool = True
    use_sequence: bool = True
    item_feature: str = "C1"  # the sparse feature whose table embeds the event items
    towers: list[TowerConfig] = field(default_factory=lambda: [TowerConfig(length=32), TowerConfig(length=16),
                                                               TowerConfig(length=8)])
    global_experts: int = 2  # Wukong experts in the global mixture
    wukong_rank: int = 8
    wukong_mlp: list[int] = field(default_factory=lambda: [64])
    dense_mlp: list[int] = field(default_factory=lambda: [64])
    top_mlp: list[int] = field(default_factory=lambda: [64])
    gdpa_impl: str = "auto"


def _towers(mcfg: KunlunConfig, features: FeatureSpec) -> list[tuple[TowerConfig, tuple[int, ...]]]:
    """(config, event types it reads) of each tower; windows of 0 or without
    ``sliding_window`` become None (full attention)."""
    if not mcfg.use_sequence:
        return []
    if not features.events:
        raise ConfigError("kunlun reads event sequences: set data.synthetic.events > 0 (e.g. "
                          "configs/experiments/event_stream.yaml), or model.use_sequence=false")
    types = features.event_types
    if mcfg.personalization and len(mcfg.towers) != types:
        raise ConfigError(f"model.towers lists {len(mcfg.towers)} towers; personalization needs one per event "
                          f"type ({types})")
    chosen = list(zip(mcfg.towers, [(k,) for k in range(types)], strict=True)) if mcfg.personalization else [
        (mcfg.towers[0], tuple(range(types)))]
    out = []
    for tc, kinds in chosen:
        if tc.layers > mcfg.num_layers:
            raise ConfigError(f"model.towers: a tower has {tc.layers} layers but model.num_layers is "
                              f"{mcfg.num_layers}; towers run within the model's layers")
        if min(tc.width, tc.heads, tc.tokens, tc.layers, tc.length) <= 0 or tc.width % tc.heads or tc.window < 0:
            raise ConfigError(f"model.towers: width, heads, tokens, layers and length must be positive, heads must "
                              f"divide width and window be >= 0; got {tc}")
        window = tc.window if mcfg.sliding_window and tc.window > 0 else None
        length = min(tc.length, features.events)
        out.append((TowerConfig(tc.width, tc.heads, tc.tokens, tc.layers, window or 0, length), kinds))
    return out


def _check(cfg: Config, features: FeatureSpec) -> KunlunConfig:
    mcfg: KunlunConfig = cfg.model  # type: ignore[assignment]
    for key in ("dim", "tokens", "num_layers", "keys", "seeds", "sumkron_terms", "global_experts", "wukong_rank"):
        if getattr(mcfg, key) <= 0:
            raise ConfigError(f"model.{key} must be positive, got {getattr(mcfg, key)}")
    if mcfg.tokens < 2:
        raise ConfigError(f"model.tokens must be >= 2 (the Wukong layers split them into FM and LC halves), "
                          f"got {mcfg.tokens}")
    if mcfg.activation not in ACTIVATIONS:
        raise ConfigError(f"model.activation must be one of {ACTIVATIONS}, got {mcfg.activation!r}")
    if mcfg.use_sequence and mcfg.item_feature not in {f.name for f in features.sparse}:
        raise ConfigError(f"model.item_feature {mcfg.item_feature!r} is not a sparse feature")
    return mcfg


def _is_interaction(layer: int, compskip: bool) -> bool:
    return not compskip or layer % 2 == 0


def _is_attention(layer: int, compskip: bool) -> bool:
    return not compskip or layer % 2 == 1


def _is_pooling(layer: int, layers: int, compskip: bool) -> bool:
    return _is_interaction(layer, compskip) or layer == layers - 1


class Tower(nnx.Module):
    """One event tower: embedding, its interaction / attention / pooling layers, summary projection."""

    def __init__(self, tc: TowerConfig, mcfg: KunlunConfig, item_dim: int, types: int, *, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        w, d = tc.width, mcfg.dim
        window = tc.window or None
        self.dtype = dtype
        self.events = EventRows(item_dim, w, types, dtype=dtype, rngs=rngs)
        self.ctx_proj = stacked_param(rngs, (d, w), ("embed", "mlp"), fan_in_init())
        self.summary_proj = stacked_param(rngs, (w, d), ("mlp", "embed"), fan_in_init())
        ones = lambda: nnx.Param(jnp.ones((w,), jnp.float32), out_sharding=(None,))
        inter, attn, pool, norms = [], [], [], []
        for layer in range(tc.layers):
            i, a = _is_interaction(layer, mcfg.compskip), _is_attention(layer, mcfg.compskip)
            inter.append(ContextInteraction(w, mcfg.tokens, mcfg.keys, tc.heads, mcfg.interaction, mcfg.activation,
                                            impl=mcfg.gdpa_impl, dtype=dtype, rngs=rngs) if i else None)
            pool.append(SeedPooling(w, tc.heads, tc.tokens, mcfg.pooling, mcfg.seeds, mcfg.sumkron_terms,
                                    dtype=dtype, rngs=rngs) if _is_pooling(layer, tc.layers, mcfg.compskip) else None)
            attn.append(WindowSelfAttention(w, tc.heads, window, mcfg.activation, mcfg.rote, impl=mcfg.gdpa_impl,
                                            dtype=dtype, rngs=rngs) if a else None)
            norms.append(nnx.List([ones(), ones(), ones()]))
        self.interaction, self.attention, self.pooling = nnx.List(inter), nnx.List(attn), nnx.List(pool)
        self.norms = nnx.List(norms)

    def layer(self, layer: int, s: jax.Array, ctx: jax.Array, age: jax.Array, n: jax.Array):
        """One layer -> (``s``, the new summary ``[B, T_k, D]`` or None to keep the cached one)."""
        norm = lambda i, x: rms_norm(x, self.norms[layer][i][...])
        summary = None
        if self.interaction[layer] is not None:
            ctx_k = ctx @ self.ctx_proj[...].astype(self.dtype)
            s = s + self.interaction[layer](norm(0, s), ctx_k, n)
        if self.attention[layer] is not None:
            s = s + self.attention[layer](norm(1, s), age, n)
        if self.pooling[layer] is not None:
            summary = self.pooling[layer](norm(2, s), n) @ self.summary_proj[...].astype(self.dtype)
        return constrain(s, ("batch", None, None)), summary


class Kunlun(nnx.Module):
    """``model(batch) -> (logits fp32 [B], embedding stats)``; see the module docstring."""

    def __init__(self, cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs):
        mcfg = _check(cfg, features)
        self.mcfg, self.dtype = mcfg, dtype
        self.embedding = EmbeddingCollection(features, cfg.embedding, rngs=rngs, dtype=dtype)
        d = self.embedding.uniform_dim
        if d is None:
            raise ConfigError("kunlun needs every embedding table at one width")
        self.dense = MLP(features.num_dense, [*mcfg.dense_mlp, d], dtype=dtype, rngs=rngs) if features.num_dense else None
        n0 = features.num_sparse + (1 if features.num_dense else 0)
        self.token_mix = stacked_param(rngs, (mcfg.tokens, n0), (None, None), fan_in_init())
        self.token_proj = stacked_param(rngs, (d, mcfg.dim), ("embed", "mlp"), fan_in_init())
        towers = _towers(mcfg, features)
        self.tower_kinds = tuple(kinds for _, kinds in towers)
        self.tower_lengths = tuple(tc.length for tc, _ in towers)
        self.towers = nnx.List([Tower(tc, mcfg, d, features.event_types, dtype=dtype, rngs=rngs) for tc, _ in towers])
        self.tower_layers = tuple(tc.layers for tc, _ in towers)
        n_in = mcfg.tokens + sum(tc.tokens for tc, _ in towers)
        half = mcfg.tokens // 2
        self.mixtures = nnx.List([
            WukongMixture(mcfg.global_experts, n_in, mcfg.dim, half, mcfg.tokens - half, mcfg.wukong_rank,
                          mcfg.wukong_mlp, dtype=dtype, rngs=rngs) for _ in range(mcfg.num_layers)])
        self.top = MLP(n_in * mcfg.dim, [*mcfg.top_mlp, 1], dtype=dtype, rngs=rngs)

    def __call__(self, batch: dict[str, jax.Array], train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        mcfg, dt = self.mcfg, self.dtype
        vecs, stats = self.embedding.lookup(batch["sparse"])
        if self.dense is not None:
            vecs = [*vecs, self.dense(constrain(batch["dense"], ("batch", None)))]
        x0 = jnp.stack([v.astype(dt) for v in vecs], axis=1)  # [B, n0, d]
        ctx = jnp.einsum("tn,bnd->btd", self.token_mix[...].astype(dt), x0) @ self.token_proj[...].astype(dt)
        ctx = constrain(ctx, ("batch", None, None))
        seqs, summaries = [], []
        if len(self.towers):
            rows, oov = self.embedding.lookup_positions(mcfg.item_feature, batch["event_item"])
            stats = {**stats, "oov_ids": stats["oov_ids"] + oov}
            types, age = batch["event_type"], batch["event_age"]
            for tower, kinds, length in zip(self.towers, self.tower_kinds, self.tower_lengths, strict=True):
                hit = jnp.isin(types, jnp.asarray(kinds)) & (types >= 0)
                r, t, a, n = most_recent(hit, length, rows, types, age)
                seqs.append([tower.events(r, t, a, n), a, n])
                summaries.append(None)
        for layer, mixture in enumerate(self.mixtures):
            for k, tower in enumerate(self.towers):
                if layer < self.tower_layers[k]:
                    s, a, n = seqs[k]
                    seqs[k][0], summary = tower.layer(layer, s, ctx, a, n)
                    if summary is not None:
                        summaries[k] = summary
            ctx = mixture(jnp.concatenate([ctx, *summaries], axis=1))
        out = jnp.concatenate([ctx, *summaries], axis=1)
        logits = self.top(out.reshape(out.shape[0], -1))[:, 0].astype(jnp.float32)
        return constrain(logits, ("batch",)), dict(stats)


def build(cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs) -> Kunlun:
    return Kunlun(cfg, features, dtype, rngs)


def component_flops(cfg: Config, features: FeatureSpec) -> dict[str, float]:
    """Forward matmul FLOPs per example by component: ``context`` (tokens, dense MLP),
    ``interaction``, ``pooling``, ``attention`` (all towers), ``global`` (Wukong mixtures), ``top``."""
    mcfg = _check(cfg, features)
    d = cfg.embedding.dim
    n0 = features.num_sparse + (1 if features.num_dense else 0)
    out = {"context": 2.0 * mcfg.tokens * n0 * d + 2.0 * mcfg.tokens * d * mcfg.dim, "interaction": 0.0,
           "pooling": 0.0, "attention": 0.0}
    if features.num_dense:
        out["context"] += mlp_flops(features.num_dense, [*mcfg.dense_mlp, d])
    towers = _towers(mcfg, features)
    for tc, _ in towers:
        w, length = tc.width, tc.length
        out["context"] += 2.0 * length * d * w  # item projection
        for layer in range(tc.layers):
            if _is_interaction(layer, mcfg.compskip):
                out["interaction"] += 2.0 * mcfg.tokens * mcfg.dim * w + context_interaction_flops(
                    length, w, mcfg.tokens, mcfg.keys, mcfg.interaction)
            if _is_pooling(layer, tc.layers, mcfg.compskip):
                out["pooling"] += seed_pooling_flops(length, w, tc.tokens, mcfg.pooling, mcfg.seeds,
                                                     mcfg.sumkron_terms) + 2.0 * tc.tokens * w * mcfg.dim
            if _is_attention(layer, mcfg.compskip):
                out["attention"] += window_self_attention_flops(length, w, tc.window or None)
    n_in = mcfg.tokens + sum(tc.tokens for tc, _ in towers)
    half = mcfg.tokens // 2
    out["global"] = mcfg.num_layers * wukong_mixture_flops(mcfg.global_experts, n_in, mcfg.dim, half,
                                                           mcfg.tokens - half, mcfg.wukong_rank, mcfg.wukong_mlp)
    out["top"] = mlp_flops(n_in * mcfg.dim, [*mcfg.top_mlp, 1])
    return out


def forward_flops(cfg: Config, features: FeatureSpec) -> float:
    """The sum of :func:`component_flops`."""
    return sum(component_flops(cfg, features).values())


def activation_bytes_per_example(cfg: Config, features: FeatureSpec) -> float:
    """Bytes of activations kept for the backward pass per example (analytic memory estimate).

    Per tower layer, in the compute dtype: about ``4 L w`` for an interaction (norm, queries,
    GDPA output, residual), ``7 L w`` for an attention layer (norm, q, k, v, rotated q and k,
    output) and ``3 L w`` for a pooling (norm, keys, values); in fp32 (GDPA's XLA path and the
    pooling softmax compute their scores in fp32), the scores and their activation, ``2 H L n``
    with ``n`` the keys each query reaches (``keys``, the band, or the seeds). Per layer of the
    global mixture and expert: the Wukong layer's input, the ``n k`` interactions before and
    after their LayerNorm, every FMB hidden width twice and the output three times.
    """
    mcfg = _check(cfg, features)
    width = 2 if cfg.train.compute_dtype == "bfloat16" else 4
    total = 0.0
    for tc, _ in _towers(mcfg, features):
        w, length, heads = tc.width, tc.length, tc.heads
        rows, band = banded_shape(length, length, tc.window or None, WINDOW_CHUNK) or (length, length)
        for layer in range(tc.layers):
            if _is_interaction(layer, mcfg.compskip):
                total += width * 4 * length * w + 4 * 2 * heads * length * mcfg.keys
            if _is_attention(layer, mcfg.compskip):
                total += width * 7 * length * w + 4 * 2 * heads * rows * band
            if _is_pooling(layer, tc.layers, mcfg.compskip):
                seeds = mcfg.seeds if mcfg.pooling == "hsp" else tc.tokens
                total += width * 3 * length * w + 4 * 2 * heads * seeds * length
    n_in = mcfg.tokens + sum(tc.tokens for tc, _ in _towers(mcfg, features))
    wukong = n_in * mcfg.dim + 2 * n_in * mcfg.wukong_rank + 2 * sum(mcfg.wukong_mlp) + 3 * mcfg.tokens * mcfg.dim
    total += width * mcfg.num_layers * mcfg.global_experts * wukong
    return total


register("kunlun", KunlunConfig, build, forward_flops, activation_bytes=activation_bytes_per_example)
