"""Linear attention with a feature map: Cotten4Rec (cosine), LinRec (ELU + L2), identity.

Shapes: ``q, k [batch, seq, heads, d]``, ``v [batch, seq, heads, dv]``; the output is shaped
like ``v``. With ``n_b`` the valid length of row ``b`` (``lengths``, else ``seq``)::

    phi_q[t] = c * phi(q[t]),  phi_k[s] = phi(k[s])       both zero where t, s >= n_b
    non-causal:  out[t] = phi_q[t] (sum_s      phi_k[s]^T v[s]) / g[b, h]
    causal:      out[t] = phi_q[t] (sum_{s<=t} phi_k[s]^T v[s]) / g[b, h]
    g[b, h] = max(n_b ** sigmoid(m_h), 1)  with ``length_scale`` m (shape [heads]), else 1

Feature maps act over ``head_dim``: ``cosine`` ``phi(x) = x / max(|x|, eps)`` (c = 1);
``elu_l2`` ``phi(x) = elu(x) / max(|elu(x)|, eps)`` with c = 1/sqrt(d), i.e. the scores
``phi(q) . phi(k)`` are scaled by 1/sqrt(d) once; ``identity`` ``phi(x) = x`` (c = 1).
Padding positions (t >= n_b) contribute nothing and their outputs are zero; ``lengths``
are clipped to ``[0, seq]``.

Implementations (``impl``), all computing in fp32 and returning ``v.dtype``:

- ``reference``: the quadratic form ``mask(phi_q phi_k^T) v`` at HIGHEST precision. The spec.
- ``xla``: non-causal ``phi_q (phi_k^T v)``; causal chunkwise (an intra-chunk masked
  product plus an exclusive cumulative sum of fp32 chunk states ``phi_k[c]^T v[c]``), never
  forming a seq x seq matrix. Plain autodiff.
- ``pallas`` (GPU) / ``interpret`` (the same kernels in Pallas interpret mode, any
  backend): Triton kernels under ``jax.custom_vjp``, see ``linear_attention_pallas``.
- ``auto``: ``pallas`` on GPU, ``xla`` elsewhere.

``block_size`` (a power of two >= 16) is the chunk length of ``xla`` (default 64 for
head_dim <= 64, else 128) and the row block of the kernels (default: their table by head dim).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "pallas", "xla", "reference", "interpret")
FEATURE_MAPS = ("cosine", "elu_l2", "identity")
EPS = 1e-6


def apply_feature_map(x: jax.Array, kind: str) -> jax.Array:
    """``phi(x)`` over the last axis of fp32 ``x`` (no query factor); Triton-lowerable ops only."""
    if kind == "identity":
        return x
    if kind == "elu_l2":
        # The inner minimum keeps expm1 finite for large x, so its gradient is never 0 * inf.
        x = jnp.where(x > 0, x, jnp.expm1(jnp.minimum(x, 0.0)))
    return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), EPS * EPS))


def query_factor(kind: str, head_dim: int) -> float:
    """The constant ``c`` multiplying ``phi(q)``: 1/sqrt(d) for ``elu_l2``, else 1."""
    return 1.0 / math.sqrt(head_dim) if kind == "elu_l2" else 1.0


def valid_lengths(lengths: jax.Array | None, batch: int, seq: int) -> jax.Array:
    """``n_b`` as int32 ``[batch]``: ``lengths`` clipped to ``[0, seq]``, or ``seq``."""
    if lengths is None:
        return jnp.full((batch,), seq, jnp.int32)
    return jnp.clip(lengths.astype(jnp.int32), 0, seq)


def output_factor(n: jax.Array, length_scale: jax.Array) -> jax.Array:
    """``1 / g`` as fp32 ``[batch, heads]`` with ``g = max(n ** sigmoid(m), 1)``."""
    g = jnp.power(n.astype(jnp.float32)[:, None], jax.nn.sigmoid(length_scale.astype(jnp.float32)))
    return 1.0 / jnp.maximum(g, 1.0)


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    feature_map: str = "cosine",
    length_scale: jax.Array | None = None,
    lengths: jax.Array | None = None,
    impl: str = "auto",
    block_size: int | None = None,
) -> jax.Array:
    """Linear attention ``[batch, seq, heads, d] x2, [batch, seq, heads, dv] -> like v``.

    See the module docstring for the equations, feature maps and implementations.
    """
    _check_inputs(q, k, v, feature_map, length_scale, lengths, impl, block_size)
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    if impl == "reference":
        return linear_attention_reference(
            q, k, v, causal=causal, feature_map=feature_map, length_scale=length_scale,
            lengths=lengths,
        )
    batch, seq = q.shape[:2]
    n = valid_lengths(lengths, batch, seq)
    scale = None if length_scale is None else output_factor(n, length_scale)
    if impl == "xla":
        mask = None if lengths is None else jnp.arange(seq)[None, :] < n[:, None]
        chunk = block_size or (64 if q.shape[-1] <= 64 else 128)
        return _xla(q, k, v, mask, scale, causal, feature_map, chunk)
    if impl == "pallas" and jax.default_backend() != "gpu":
        raise RuntimeError(
            f"linear_attention(impl='pallas') needs a GPU, but the JAX backend is "
            f"'{jax.default_backend()}'. Use impl='interpret' to run the Pallas kernels on this "
            "backend (slow, for testing), or impl='xla' / impl='auto'."
        )
    from recjax.kernels.linear_attention_pallas import linear_attention_pallas

    return linear_attention_pallas(
        q, k, v, n, scale, causal=causal, feature_map=feature_map, block_size=block_size,
        interpret=impl == "interpret",
    )


def linear_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    feature_map: str = "cosine",
    length_scale: jax.Array | None = None,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """The spec: ``mask(phi_q phi_k^T) v / g`` with the full ``[seq, seq]`` score matrix."""
    _check_inputs(q, k, v, feature_map, length_scale, lengths, "reference", None)
    batch, seq, _, head_dim = q.shape
    hi = lax.Precision.HIGHEST
    pq = apply_feature_map(q.astype(jnp.float32), feature_map) * query_factor(feature_map, head_dim)
    pk = apply_feature_map(k.astype(jnp.float32), feature_map)
    vf = v.astype(jnp.float32)
    n = valid_lengths(lengths, batch, seq)
    valid = (jnp.arange(seq)[None, :] < n[:, None])[:, :, None, None]
    pq, pk, vf = (jnp.where(valid, x, 0.0) for x in (pq, pk, vf))
    scores = jnp.einsum("bthd,bshd->bhts", pq, pk, precision=hi)
    if causal:
        scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, 0.0)
    out = jnp.einsum("bhts,bshe->bthe", scores, vf, precision=hi)
    if length_scale is not None:
        out = out * output_factor(n, length_scale)[:, None, :, None]
    return out.astype(v.dtype)


def _xla(q, k, v, mask, scale, causal, kind, chunk):
    """Non-causal ``phi_q (phi_k^T v)``; causal chunkwise with fp32 exclusive-prefix states."""
    batch, seq, heads, head_dim = q.shape
    pq = apply_feature_map(q.astype(jnp.float32), kind) * query_factor(kind, head_dim)
    pk = apply_feature_map(k.astype(jnp.float32), kind)
    vf = v.astype(jnp.float32)
    if mask is not None:
        pq, pk, vf = (jnp.where(mask[:, :, None, None], x, 0.0) for x in (pq, pk, vf))
    if not causal:
        state = jnp.einsum("bshd,bshe->bhde", pk, vf)
        out = jnp.einsum("bthd,bhde->bthe", pq, state)
    else:
        # Head-major chunks [batch, heads, chunks, chunk, d]: measured faster on CPU.
        chunks = -(-seq // chunk)
        pad = ((0, 0), (0, chunks * chunk - seq), (0, 0), (0, 0))
        pq, pk, vf = (
            jnp.pad(x, pad).transpose(0, 2, 1, 3).reshape(batch, heads, chunks, chunk, -1)
            for x in (pq, pk, vf)
        )
        states = jnp.einsum("bhnsd,bhnse->bhnde", pk, vf)
        prefix = jnp.cumsum(states, axis=2)
        prefix = jnp.concatenate([jnp.zeros_like(prefix[:, :, :1]), prefix[:, :, :-1]], axis=2)
        scores = jnp.einsum("bhntd,bhnsd->bhnts", pq, pk)
        scores = jnp.where(jnp.tril(jnp.ones((chunk, chunk), bool)), scores, 0.0)
        out = jnp.einsum("bhntd,bhnde->bhnte", pq, prefix)
        out = out + jnp.einsum("bhnts,bhnse->bhnte", scores, vf)
        out = out.reshape(batch, heads, chunks * chunk, -1)[:, :, :seq].transpose(0, 2, 1, 3)
    if scale is not None:
        out = out * scale[:, None, :, None]
    return out.astype(v.dtype)


def _check_inputs(q, k, v, kind, length_scale, lengths, impl, block_size):
    if impl not in IMPLS:
        raise ValueError(f"linear_attention: unknown impl {impl!r}; expected one of {IMPLS}.")
    if kind not in FEATURE_MAPS:
        raise ValueError(
            f"linear_attention: unknown feature_map {kind!r}; expected one of {FEATURE_MAPS}."
        )
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "linear_attention: expected q and k of equal shape [batch, seq, heads, head_dim] and "
            f"v [batch, seq, heads, dv] with the same batch, seq and heads; got q {q.shape}, "
            f"k {k.shape}, v {v.shape}."
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"linear_attention: {name} must be floating point, got {x.dtype}.")
    batch, _, heads, _ = q.shape
    if length_scale is not None and tuple(length_scale.shape) != (heads,):
        raise ValueError(
            f"linear_attention: length_scale must have shape [heads] = ({heads},), "
            f"got {tuple(length_scale.shape)}."
        )
    if lengths is not None and (
        tuple(lengths.shape) != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer)
    ):
        raise ValueError(
            f"linear_attention: lengths must be an integer array of shape [batch] = ({batch},), "
            f"got {lengths.dtype} {tuple(lengths.shape)}."
        )
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(
            f"linear_attention: block_size must be a power of two >= 16, got {block_size}."
        )
