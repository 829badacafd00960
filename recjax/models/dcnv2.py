"""DCN-V2 (Wang et al., 2021): explicit cross layers plus a deep MLP.

``x0 = [dense, e_1, ..., e_F]`` ``[D]`` with ``D = num_dense + sum_f d_f`` (tables may
differ in dim). Cross layer ``l``:

    x_{l+1} = x0 * (W_l x_l + b_l) + x_l

with ``W_l`` ``[D, D]`` (``low_rank: 0``) or ``W_l = U_l V_l^T``, ``U_l, V_l`` ``[D, r]``
(``low_rank: r``; computed as ``U_l (V_l^T x_l)``, stored as two ``nnx.Linear`` kernels
``V_l`` ``[D, r]`` and ``U_l^T`` ``[r, D]``).

- ``stacked``: ``logit = w^T deep(cross(x0))``
- ``parallel``: ``logit = w^T [cross(x0), deep(x0)]``

``deep`` is an MLP with ReLU after every layer, ``w`` a final 1-unit layer. Sharding: the
cross kernels are ``[D_in, D_out]`` ``("embed", "mlp")`` -- storage splits over FSDP, the
output features over ``tensor`` (``D`` is small, so in practice the constraints fall away
when ``D`` does not divide). Low-rank: ``V`` ``("embed", None)``, ``U^T`` ``(None, "mlp")``.
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
from recjax.layers.embedding import EmbeddingCollection, resolve_tables
from recjax.layers.mlp import MLP, dense, mlp_flops
from recjax.models.registry import register
from recjax.parallel.sharding import constrain


@dataclass
class DCNv2Config(ModelConfig):
    name: str = "dcnv2"
    num_cross_layers: int = 3
    low_rank: int = 0  # 0: full-rank W [D, D]; r > 0: W = U V^T with U, V [D, r]
    deep_mlp: list[int] = field(default_factory=lambda: [256, 128])
    structure: Literal["stacked", "parallel"] = "stacked"


def _input_dim(cfg: Config, features: FeatureSpec) -> int:
    mcfg: DCNv2Config = cfg.model  # type: ignore[assignment]
    if mcfg.num_cross_layers < 0:
        raise ConfigError(f"model.num_cross_layers must be >= 0, got {mcfg.num_cross_layers}")
    if mcfg.low_rank < 0:
        raise ConfigError(f"model.low_rank must be >= 0, got {mcfg.low_rank}")
    if any(w <= 0 for w in mcfg.deep_mlp):
        raise ConfigError(f"model.deep_mlp widths must be positive, got {mcfg.deep_mlp}")
    dims = {t.name: t.dim for t in resolve_tables(features, cfg.embedding)}
    table_of = {f: t.name for t in resolve_tables(features, cfg.embedding) for f in t.features}
    return features.num_dense + sum(dims[table_of[f.name]] for f in features.sparse)


class CrossLayer(nnx.Module):
    """``(x0, x) [B, D] -> x0 * (W x + b) + x``; full-rank or low-rank ``W``."""

    def __init__(self, dim: int, low_rank: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        if low_rank > 0:
            self.down = dense(
                dim, low_rank, axes=("embed", None), dtype=dtype, rngs=rngs, use_bias=False
            )
            self.up = dense(low_rank, dim, axes=(None, "mlp"), dtype=dtype, rngs=rngs)
        else:
            self.down = None
            self.up = dense(dim, dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)

    def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:
        h = self.down(x) if self.down is not None else x
        return x0 * self.up(h) + x


class DCNv2(nnx.Module):
    """``model(batch) -> (logits fp32 [B], embedding stats: {"oov_ids": int32, ...})``."""

    def __init__(self, cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs):
        mcfg: DCNv2Config = cfg.model  # type: ignore[assignment]
        dim = _input_dim(cfg, features)
        self.dtype = dtype
        self.structure = mcfg.structure
        self.embedding = EmbeddingCollection(features, cfg.embedding, rngs=rngs, dtype=dtype)
        self.cross = nnx.List(
            [
                CrossLayer(dim, mcfg.low_rank, dtype=dtype, rngs=rngs)
                for _ in range(mcfg.num_cross_layers)
            ]
        )
        self.deep = MLP(dim, mcfg.deep_mlp, final_activation=True, dtype=dtype, rngs=rngs)
        head_in = self.deep.out_dim + (dim if mcfg.structure == "parallel" else 0)
        self.head = dense(head_in, 1, axes=("mlp", None), dtype=dtype, rngs=rngs)

    def __call__(self, batch: dict[str, jax.Array], train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        vecs, stats = self.embedding.lookup(batch["sparse"])  # F x [B, d_f]
        dense_in = constrain(batch["dense"], ("batch", None)).astype(self.dtype)
        x0 = constrain(jnp.concatenate([dense_in, *vecs], axis=1), ("batch", None))  # [B, D]
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        x = constrain(x, ("batch", None))
        if self.structure == "stacked":
            h = self.deep(x)
        else:
            h = jnp.concatenate([x, self.deep(x0)], axis=1)
        logits = self.head(constrain(h, ("batch", None)))[:, 0].astype(jnp.float32)
        return constrain(logits, ("batch",)), dict(stats)


def build(cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs) -> DCNv2:
    return DCNv2(cfg, features, dtype, rngs)


def forward_flops(cfg: Config, features: FeatureSpec) -> float:
    """Cross layers (``2 D^2`` or ``4 D r`` each) + deep MLP + the 1-unit head."""
    mcfg: DCNv2Config = cfg.model  # type: ignore[assignment]
    dim = _input_dim(cfg, features)
    per_cross = 4.0 * dim * mcfg.low_rank if mcfg.low_rank > 0 else 2.0 * dim * dim
    deep_out = mcfg.deep_mlp[-1] if mcfg.deep_mlp else dim
    head_in = deep_out + (dim if mcfg.structure == "parallel" else 0)
    return mcfg.num_cross_layers * per_cross + mlp_flops(dim, mcfg.deep_mlp) + 2.0 * head_in


register("dcnv2", DCNv2Config, build, forward_flops)
