"""Wukong (Zhang et al., 2024, "Wukong: Towards a Scaling Law for Large-Scale Recommendation")
as a CTR model (MODELS.md section 5).

Embedding layer: each sparse feature is one embedding ``[B, d]`` (every table at width d);
the dense features go through ``dense_mlp`` to ``dense_tokens`` more embeddings. Then
``num_layers`` Wukong layers (``recjax.layers.wukong``: FMB + LCB + residual, LayerNorm),
with ``n_f = fm_tokens`` and ``n_l = lc_tokens`` embeddings out of each, and a top MLP on the
flattened output to one logit::

    X_0 = [e_1, ..., e_F, reshape(dense_mlp(dense))]      [B, F + dense_tokens, d]
    X_{i+1} = WukongLayer_i(X_i)                          [B, n_f + n_l, d]
    logit = top_mlp(flatten(X_L))

Layer ``i`` captures interactions up to order ``2^i``; the paper scales the layer count first,
then n, k and the FMB MLP (its Table 5 is reproduced by the presets ``wukong_*``).
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
from recjax.layers.wukong import WukongLayer, wukong_layer_flops, wukong_layer_params
from recjax.models.registry import register
from recjax.parallel.sharding import constrain


@dataclass
class WukongConfig(ModelConfig):
    name: str = "wukong"
    num_layers: int = 2
    fm_tokens: int = 8  # n_F: embeddings out of each FMB
    lc_tokens: int = 8  # n_L: embeddings out of each LCB (the paper keeps n_F = n_L)
    rank: int = 24  # k: columns of Y in X (X^T Y)
    fmb_mlp: list[int] = field(default_factory=lambda: [256, 256])  # hidden widths; + n_F d out
    dense_mlp: list[int] = field(default_factory=lambda: [512, 256])  # bottom MLP hidden widths
    dense_tokens: int = 1  # embeddings made from the dense features
    top_mlp: list[int] = field(default_factory=lambda: [256])  # hidden widths; + 1 logit


def _shapes(cfg: Config, features: FeatureSpec) -> tuple[int, int]:
    """(d, n_0): the embedding width and the number of input embeddings."""
    mcfg: WukongConfig = cfg.model  # type: ignore[assignment]
    for key in ("num_layers", "fm_tokens", "lc_tokens", "rank"):
        if getattr(mcfg, key) <= 0:
            raise ConfigError(f"model.{key} must be positive, got {getattr(mcfg, key)}")
    if any(w <= 0 for w in [*mcfg.fmb_mlp, *mcfg.dense_mlp, *mcfg.top_mlp]):
        raise ConfigError("model.fmb_mlp, dense_mlp and top_mlp widths must be positive")
    dims = {t.dim for t in resolve_tables(features, cfg.embedding)}
    if len(dims) != 1:
        raise ConfigError(f"wukong needs every embedding table at one width; got widths {sorted(dims)}")
    dense_tokens = mcfg.dense_tokens if features.num_dense else 0
    return dims.pop(), features.num_sparse + dense_tokens


def _layer_shapes(cfg: Config, features: FeatureSpec) -> list[tuple]:
    """``(n_in, d, n_f, n_l, k, fmb_mlp)`` of every layer."""
    mcfg: WukongConfig = cfg.model  # type: ignore[assignment]
    dim, n = _shapes(cfg, features)
    shapes = []
    for _ in range(mcfg.num_layers):
        shapes.append((n, dim, mcfg.fm_tokens, mcfg.lc_tokens, mcfg.rank, tuple(mcfg.fmb_mlp)))
        n = mcfg.fm_tokens + mcfg.lc_tokens
    return shapes


class Wukong(nnx.Module):
    """``model(batch) -> (logits fp32 [B], embedding stats)``."""

    def __init__(self, cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs):
        mcfg: WukongConfig = cfg.model  # type: ignore[assignment]
        dim, _ = _shapes(cfg, features)
        self.dim, self.dtype = dim, dtype
        self.embedding = EmbeddingCollection(features, cfg.embedding, rngs=rngs, dtype=dtype)
        self.dense_tokens = mcfg.dense_tokens if features.num_dense else 0
        self.bottom = (MLP(features.num_dense, [*mcfg.dense_mlp, self.dense_tokens * dim], final_activation=False,
                           dtype=dtype, rngs=rngs) if self.dense_tokens else None)
        self.layers = nnx.List([WukongLayer(*s[:5], s[5], dtype=dtype, rngs=rngs)
                                for s in _layer_shapes(cfg, features)])
        n_out = mcfg.fm_tokens + mcfg.lc_tokens
        self.top = MLP(n_out * dim, [*mcfg.top_mlp, 1], final_activation=False, dtype=dtype, rngs=rngs)

    def __call__(self, batch: dict[str, jax.Array], train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        vecs, stats = self.embedding.lookup(batch["sparse"])  # F x [B, d]
        tokens = [v.astype(self.dtype) for v in vecs]
        x = jnp.stack(tokens, axis=1)
        if self.bottom is not None:
            dense = self.bottom(constrain(batch["dense"], ("batch", None)))
            x = jnp.concatenate([x, dense.reshape(x.shape[0], self.dense_tokens, self.dim)], axis=1)
        x = constrain(x, ("batch", None, None))
        for layer in self.layers:
            x = layer(x)
        logits = self.top(x.reshape(x.shape[0], -1))[:, 0].astype(jnp.float32)
        return constrain(logits, ("batch",)), dict(stats)


def build(cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs) -> Wukong:
    return Wukong(cfg, features, dtype, rngs)


def forward_flops(cfg: Config, features: FeatureSpec) -> float:
    """Bottom MLP + every Wukong layer (``wukong_layer_flops``) + the top MLP."""
    mcfg: WukongConfig = cfg.model  # type: ignore[assignment]
    dim, _ = _shapes(cfg, features)
    dense_tokens = mcfg.dense_tokens if features.num_dense else 0
    bottom = mlp_flops(features.num_dense, [*mcfg.dense_mlp, dense_tokens * dim]) if dense_tokens else 0.0
    layers = sum(wukong_layer_flops(*s[:5], s[5]) for s in _layer_shapes(cfg, features))
    top = mlp_flops((mcfg.fm_tokens + mcfg.lc_tokens) * dim, [*mcfg.top_mlp, 1])
    return bottom + layers + top


def dense_params(cfg: Config, features: FeatureSpec) -> int:
    """Parameters outside the embedding tables (bottom MLP, layers, top MLP)."""
    mcfg: WukongConfig = cfg.model  # type: ignore[assignment]
    dim, _ = _shapes(cfg, features)
    dense_tokens = mcfg.dense_tokens if features.num_dense else 0

    def mlp(widths):
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))

    bottom = mlp([features.num_dense, *mcfg.dense_mlp, dense_tokens * dim]) if dense_tokens else 0
    layers = sum(wukong_layer_params(*s[:5], s[5]) for s in _layer_shapes(cfg, features))
    return bottom + layers + mlp([(mcfg.fm_tokens + mcfg.lc_tokens) * dim, *mcfg.top_mlp, 1])


register("wukong", WukongConfig, build, forward_flops)
