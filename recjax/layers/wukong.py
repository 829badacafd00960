"""Wukong interaction layers (Zhang et al., 2024, MODELS.md section 5) and a mixture of them.

A layer maps ``X [B, n, d]`` (n embeddings of width d) to ``[B, n_f + n_l, d]``::

    X_{i+1} = LN(concat(FMB(X_i), LCB(X_i)) + res(X_i))
    FMB(X)  = reshape(MLP(LN(flatten(X (X^T Y)))))      Y [n, k]: the optimised FM, n x k
                                                       interactions; the MLP ends at n_f * d
    LCB(X)  = W_L X                                     W_L [n_l, n]
    res(X)  = X, or W_R X with W_R [n_f + n_l, n] when n != n_f + n_l

LayerNorms act over d per embedding (the outer one) and over the flattened ``n k`` vector
(inside FMB). ``WukongMixture`` is Kunlun's global interaction: ``E`` Wukong layers of equal
shape mixed by a softmax gate on the mean embedding, ``sum_e g_e(X) layer_e(X)``. The
"attentive" Y (an MLP over the compressed input) is not implemented: Y is a learned matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.layers.mlp import MLP, mlp_flops
from recjax.layers.token_mixing import fan_in_init, layer_norm, stacked_param
from recjax.parallel.sharding import constrain


def _norm_params(width: int) -> tuple[nnx.Param, nnx.Param]:
    return (nnx.Param(jnp.ones((width,), jnp.float32), out_sharding=(None,)),
            nnx.Param(jnp.zeros((width,), jnp.float32), out_sharding=(None,)))


class WukongLayer(nnx.Module):
    """``[B, n_in, d] -> [B, n_f + n_l, d]``; see the module docstring."""

    def __init__(self, n_in: int, dim: int, n_f: int, n_l: int, rank: int, fmb_mlp: Sequence[int], *,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        if min(n_in, dim, n_f, n_l, rank) <= 0:
            raise ValueError(f"Wukong layer sizes must be positive: n_in {n_in}, d {dim}, n_f {n_f}, "
                             f"n_l {n_l}, k {rank}")
        self.n_f, self.n_l, self.dim, self.dtype = n_f, n_l, dim, dtype
        self.fm_proj = stacked_param(rngs, (n_in, rank), (None, None), fan_in_init())  # Y
        self.fm_norm_scale, self.fm_norm_bias = _norm_params(n_in * rank)
        self.fmb = MLP(n_in * rank, [*fmb_mlp, n_f * dim], final_activation=False, dtype=dtype, rngs=rngs)
        self.lcb = stacked_param(rngs, (n_l, n_in), (None, None), fan_in_init())  # W_L
        n_out = n_f + n_l
        self.residual = None if n_in == n_out else stacked_param(rngs, (n_out, n_in), (None, None), fan_in_init())
        self.norm_scale, self.norm_bias = _norm_params(dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, n_in, _ = x.shape
        x = x.astype(self.dtype)
        fm_proj = self.fm_proj[...].astype(self.dtype)
        xty = jnp.einsum("bnd,nk->bdk", x, fm_proj)  # X^T Y [B, d, k]
        fm = jnp.einsum("bnd,bdk->bnk", x, xty).reshape(batch, -1)  # X X^T Y, flattened
        fm = layer_norm(fm, self.fm_norm_scale[...], self.fm_norm_bias[...])
        fmb = self.fmb(fm).reshape(batch, self.n_f, self.dim)
        lcb = jnp.einsum("ln,bnd->bld", self.lcb[...].astype(self.dtype), x)
        res = x if self.residual is None else jnp.einsum("mn,bnd->bmd", self.residual[...].astype(self.dtype), x)
        out = layer_norm(jnp.concatenate([fmb, lcb], axis=1) + res, self.norm_scale[...], self.norm_bias[...])
        return constrain(out, ("batch", None, None))


def wukong_layer_flops(n_in: int, dim: int, n_f: int, n_l: int, rank: int, fmb_mlp: Sequence[int]) -> float:
    """Matmul FLOPs of one example through a ``WukongLayer``: ``X^T Y`` and ``X (X^T Y)``
    (``2 n d k`` each), the FMB MLP, ``W_L X`` and the residual map when present."""
    flops = 4.0 * n_in * dim * rank + mlp_flops(n_in * rank, [*fmb_mlp, n_f * dim]) + 2.0 * n_l * n_in * dim
    if n_in != n_f + n_l:
        flops += 2.0 * (n_f + n_l) * n_in * dim
    return flops


def wukong_layer_params(n_in: int, dim: int, n_f: int, n_l: int, rank: int, fmb_mlp: Sequence[int]) -> int:
    widths = [n_in * rank, *fmb_mlp, n_f * dim]
    mlp = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    res = 0 if n_in == n_f + n_l else (n_f + n_l) * n_in
    return n_in * rank + 2 * n_in * rank + mlp + n_l * n_in + res + 2 * dim


class WukongMixture(nnx.Module):
    """``[B, n_in, d] -> [B, n_f + n_l, d]``: ``sum_e softmax(G mean_n X)_e WukongLayer_e(X)``."""

    def __init__(self, experts: int, n_in: int, dim: int, n_f: int, n_l: int, rank: int,
                 fmb_mlp: Sequence[int], *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.experts = nnx.List([WukongLayer(n_in, dim, n_f, n_l, rank, fmb_mlp, dtype=dtype, rngs=rngs)
                                 for _ in range(experts)])
        self.gate = stacked_param(rngs, (dim, experts), (None, None), fan_in_init())
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        if len(self.experts) == 1:
            return self.experts[0](x)
        gates = jax.nn.softmax(jnp.mean(x.astype(jnp.float32), axis=1) @ self.gate[...], axis=-1)  # [B, E]
        outs = jnp.stack([expert(x) for expert in self.experts], axis=-1)  # [B, n_out, d, E]
        return jnp.einsum("bnde,be->bnd", outs, gates.astype(outs.dtype))


def wukong_mixture_flops(experts: int, n_in: int, dim: int, n_f: int, n_l: int, rank: int,
                         fmb_mlp: Sequence[int]) -> float:
    """Every expert runs (a soft mixture), plus the gate ``2 d E``."""
    layer = wukong_layer_flops(n_in, dim, n_f, n_l, rank, fmb_mlp)
    return experts * layer + (2.0 * dim * experts if experts > 1 else 0.0)
