"""HeMix layers (MODELS.md section 7): query-mixed interest extraction and the HeteroMixer block.

**QueryCrossAttention** -- ``Q`` query tokens read one behaviour sequence. Each query token
``j`` has its own query projection, keys, values and the output projection are shared::

    q_j = x_j W_Q,j    K = S W_K    V = S W_V            x [Q, D], S [L, D] (valid rows n)
    out_j = (concat_h softmax(q_j,h K_h^T / sqrt(d_h)) V_h) W_O        [Q, D]

(masked to the ``n`` valid events; an example without events gets zeros).

**HeteroMixerBlock** -- ``N`` tokens of width ``D``, ``H`` mix heads, ``d_h = D / H``::

    G      = RMSNorm(x) split into heads and regrouped: mix-token h = concat_i x_i,h   [H, N d_h]
    G'_h   = relu(G_h W_L,h) W_R,h        W_L,h [N d_h, r], W_R,h [r, N d_h] (low rank, per mix-token)
    x     += G' regrouped back to [N, D]
    x     += PerTokenFFN(RMSNorm(x))      token i: relu(x_i W1_i) W2_i, W1_i [D, F]

(pre-RMSNorm residual blocks, as in the reimplementation MODELS.md cites).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.layers.token_mixing import fan_in_init, rms_norm, stacked_param, xavier_init


class QueryCrossAttention(nnx.Module):
    """``(x [B, Q, D], s [B, L, D], n [B]) -> [B, Q, D]``; see the module docstring."""

    def __init__(self, queries: int, dim: int, heads: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        init = fan_in_init()
        self.heads, self.dtype = heads, dtype
        self.w_q = stacked_param(rngs, (queries, dim, dim), (None, "embed", "mlp"), init)
        self.w_kv = stacked_param(rngs, (dim, 2, dim), ("embed", None, "mlp"), xavier_init(fan_in_axis=-3))
        self.w_o = stacked_param(rngs, (dim, dim), ("mlp", "embed"), init)

    def __call__(self, x: jax.Array, s: jax.Array, n: jax.Array) -> jax.Array:
        dt, h = self.dtype, self.heads
        b, q, d = x.shape
        qs = jnp.einsum("bqd,qde->bqe", x.astype(dt), self.w_q[...].astype(dt)).reshape(b, q, h, d // h)
        kv = jnp.einsum("bld,dce->blce", s.astype(dt), self.w_kv[...].astype(dt))
        k, v = (kv[:, :, i].reshape(b, s.shape[1], h, d // h) for i in (0, 1))
        scores = jnp.einsum("bqhe,blhe->bhql", qs, k, preferred_element_type=jnp.float32) / (d // h) ** 0.5
        valid = jnp.arange(s.shape[1])[None, None, None, :] < n[:, None, None, None]
        p = jax.nn.softmax(jnp.where(valid, scores, -1e30), axis=-1) * valid  # no events: all zero
        out = jnp.einsum("bhql,blhe->bqhe", p.astype(dt), v).reshape(b, q, d)
        return out @ self.w_o[...].astype(dt)


class HeteroMixerBlock(nnx.Module):
    """``[B, N, D] -> [B, N, D]``: heterogeneous mixing, then per-token FFN (module docstring)."""

    def __init__(self, tokens: int, dim: int, heads: int, rank: int, hidden: int, *, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"HeteroMixerBlock: mix heads {heads} must divide the width {dim}")
        init, ones = fan_in_init(), nnx.initializers.ones_init()
        width = tokens * dim // heads  # one mix-token
        self.heads, self.dtype = heads, dtype
        self.mix_norm = stacked_param(rngs, (tokens, dim), ("tokens", None), ones)
        self.w_l = stacked_param(rngs, (heads, width, rank), (None, "embed", None), init)
        self.w_r = stacked_param(rngs, (heads, rank, width), (None, None, "embed"), init)
        self.ffn_norm = stacked_param(rngs, (tokens, dim), ("tokens", None), ones)
        self.w_1 = stacked_param(rngs, (tokens, dim, hidden), ("tokens", "embed", "mlp"), init)
        self.w_2 = stacked_param(rngs, (tokens, hidden, dim), ("tokens", "mlp", "embed"), init)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt, h = self.dtype, self.heads
        b, n, d = x.shape
        g = rms_norm(x, self.mix_norm[...]).astype(dt).reshape(b, n, h, d // h).transpose(0, 2, 1, 3)
        g = g.reshape(b, h, n * d // h)  # mix-token h: head h of every token
        g = jnp.einsum("bhr,hrw->bhw", jax.nn.relu(jnp.einsum("bhw,hwr->bhr", g, self.w_l[...].astype(dt))),
                       self.w_r[...].astype(dt))
        x = x + g.reshape(b, h, n, d // h).transpose(0, 2, 1, 3).reshape(b, n, d)
        y = rms_norm(x, self.ffn_norm[...]).astype(dt)
        y = jnp.einsum("bnf,nfd->bnd", jax.nn.relu(jnp.einsum("bnd,ndf->bnf", y, self.w_1[...].astype(dt))),
                       self.w_2[...].astype(dt))
        return x + y


def query_cross_attention_flops(queries: int, length: int, dim: int) -> float:
    """Per example: query, key/value and output projections, scores and weighted values."""
    return 2.0 * queries * dim * dim * 2 + 2.0 * length * dim * 2 * dim + 2.0 * 2 * queries * length * dim


def hetero_mixer_flops(tokens: int, dim: int, rank: int, hidden: int) -> float:
    """Per example: the two low-rank maps of every mix-token (``4 N D r`` together) and the
    per-token FFN (``4 N D F``)."""
    return 4.0 * tokens * dim * rank + 4.0 * tokens * dim * hidden
