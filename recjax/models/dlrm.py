"""DLRM (Naumov et al., 2019): bottom MLP, pairwise dot-product interaction, top MLP.

For one example with dense ``x [num_dense]`` and sparse features ``1..F``:

- ``z = bottom_mlp(x)`` ``[d]`` (ReLU after every layer; ``bottom_mlp[-1] == d``, the
  embedding dim of every table);
- ``T = [z, e_1, ..., e_F]`` ``[n, d]`` with ``n = F + 1``; ``G = T T^T`` ``[n, n]`` in one
  batched einsum; ``p`` = the strict upper triangle of ``G`` (``n (n-1) / 2`` values), or
  the upper triangle with the diagonal when ``self_interaction`` (``n (n+1) / 2``);
- ``logit = top_mlp([z, p])`` with a final 1-unit layer appended to ``top_mlp``.

Without dense features (``num_dense == 0``) there is no bottom MLP and ``T = [e_1..e_F]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.config import Config, ModelConfig
from recjax.data.spec import FeatureSpec
from recjax.errors import ConfigError
from recjax.layers.embedding import EmbeddingCollection, resolve_tables
from recjax.layers.mlp import MLP, mlp_flops
from recjax.models.registry import register
from recjax.parallel.sharding import constrain


@dataclass
class DLRMConfig(ModelConfig):
    name: str = "dlrm"
    bottom_mlp: list[int] = field(default_factory=lambda: [64, 16])  # last width = embedding dim
    top_mlp: list[int] = field(default_factory=lambda: [256, 128])  # + a final 1-unit layer
    self_interaction: bool = False  # include <t_i, t_i> in the interaction


def _dims(cfg: Config, features: FeatureSpec) -> tuple[int, int]:
    """(embedding dim d, number of interacting vectors n); ConfigError if inconsistent."""
    mcfg: DLRMConfig = cfg.model  # type: ignore[assignment]
    dims = {t.dim for t in resolve_tables(features, cfg.embedding)}
    if len(dims) != 1:
        raise ConfigError(f"dlrm needs one embedding dim for every table, got {sorted(dims)}")
    d = dims.pop()
    if features.num_dense > 0:
        if not mcfg.bottom_mlp:
            raise ConfigError("model.bottom_mlp must not be empty when there are dense features")
        if mcfg.bottom_mlp[-1] != d:
            raise ConfigError(
                f"model.bottom_mlp[-1] ({mcfg.bottom_mlp[-1]}) must equal the embedding dim ({d})"
            )
    n = features.num_sparse + (1 if features.num_dense > 0 else 0)
    if n < 2 and not mcfg.self_interaction:
        raise ConfigError("dlrm needs at least two interacting vectors (dense + sparse features)")
    return d, n


def _num_pairs(n: int, self_interaction: bool) -> int:
    return n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2


class DLRM(nnx.Module):
    """``model(batch) -> (logits fp32 [B], embedding stats: {"oov_ids": int32, ...})``."""

    def __init__(self, cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs):
        mcfg: DLRMConfig = cfg.model  # type: ignore[assignment]
        d, n = _dims(cfg, features)
        self.dtype = dtype
        self.has_dense = features.num_dense > 0
        self.embedding = EmbeddingCollection(features, cfg.embedding, rngs=rngs, dtype=dtype)
        self.bottom = (
            MLP(features.num_dense, mcfg.bottom_mlp, final_activation=True, dtype=dtype, rngs=rngs)
            if self.has_dense
            else None
        )
        rows, cols = np.triu_indices(n, k=0 if mcfg.self_interaction else 1)
        self.pair_rows = tuple(int(r) for r in rows)
        self.pair_cols = tuple(int(c) for c in cols)
        top_in = (d if self.has_dense else 0) + len(rows)
        self.top = MLP(top_in, [*mcfg.top_mlp, 1], dtype=dtype, rngs=rngs)

    def interact(self, vectors: jax.Array) -> jax.Array:
        """``vectors`` ``[B, n, d]`` -> selected entries of ``T T^T``, ``[B, num_pairs]``."""
        gram = jnp.einsum("bnd,bmd->bnm", vectors, vectors)
        return gram[:, np.asarray(self.pair_rows), np.asarray(self.pair_cols)]

    def __call__(self, batch: dict[str, jax.Array], train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        emb, stats = self.embedding(batch["sparse"])  # [B, F, d]
        if self.has_dense:
            dense = constrain(batch["dense"], ("batch", None))
            z = constrain(self.bottom(dense), ("batch", None))  # [B, d]
            vectors = jnp.concatenate([z[:, None, :], emb], axis=1)
        else:
            vectors = emb
        pairs = constrain(self.interact(vectors.astype(self.dtype)), ("batch", None))
        top_in = jnp.concatenate([z, pairs], axis=1) if self.has_dense else pairs
        logits = self.top(top_in)[:, 0].astype(jnp.float32)
        return constrain(logits, ("batch",)), dict(stats)


def build(cfg: Config, features: FeatureSpec, dtype: jnp.dtype, rngs: nnx.Rngs) -> DLRM:
    return DLRM(cfg, features, dtype, rngs)


def forward_flops(cfg: Config, features: FeatureSpec) -> float:
    """Bottom MLP + the full ``n x n x d`` Gram einsum (as executed) + top MLP with logit."""
    mcfg: DLRMConfig = cfg.model  # type: ignore[assignment]
    d, n = _dims(cfg, features)
    flops = 2.0 * n * n * d
    top_in = _num_pairs(n, mcfg.self_interaction)
    if features.num_dense > 0:
        flops += mlp_flops(features.num_dense, mcfg.bottom_mlp)
        top_in += d
    return flops + mlp_flops(top_in, [*mcfg.top_mlp, 1])


register("dlrm", DLRMConfig, build, forward_flops)
