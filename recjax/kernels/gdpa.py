"""GDPA, generalized dot-product attention (Kunlun, MODELS.md section 3): a pointwise
activation of the scores instead of a softmax, no row normalisation.

Shapes: ``q [batch, tq, hq, d]``, ``k [batch, tk, hkv, d]``, ``v [batch, tk, hkv, dv]`` with
``hq`` a multiple of ``hkv`` (MHA ``hkv = hq``, GQA, MQA ``hkv = 1``; query head ``h`` reads
kv head ``h // (hq / hkv)``). The output is ``[batch, tq, hq, dv]`` in ``v.dtype``::

    out[b, t, h] = sum_s m[b, t, s] * act(q[b, t, h] . k[b, s, h']) * scale * v[b, s, h']

with ``m = 1`` where ``t < nq_b`` and ``s < nkv_b`` (``q_lengths``, ``kv_lengths``; jagged
rows), ``|t - s| <= window`` (optional) and ``s <= t`` (``causal``), else 0. Every activation
here has ``act(0) = 0``, so a masked position is a score of 0, as in Meta's kernel (not
``-inf``). Rows ``t >= nq_b`` of the output are zero. ``window`` and ``causal`` need
``tq == tk`` (self-attention positions).

Activations (:data:`ACTIVATIONS`): identity, gelu (erf), gelu_approx (tanh), relu, relu2
(``relu(x)^2``), silu, leaky_relu (slope 0.01), hardswish (``x relu6(x + 3) / 6``).

Implementations (``impl``), all computing in fp32 and returning ``v.dtype``:

- ``reference``: the masked ``[tq, tk]`` score matrix at HIGHEST precision. The spec.
- ``xla``: the same product at default precision; with a window, banded where that computes
  less (:func:`banded_shape`): query chunks of ``block_q`` rows against their
  ``block_q + 2 window`` keys only, so FLOPs grow as ``tq (block_q + 2 window)`` instead of
  ``tq tk``. Plain autodiff.
- ``pallas`` (GPU) / ``interpret`` (any backend): flash-style Triton kernels under
  ``jax.custom_vjp`` with no running maximum (nothing to normalise), see ``gdpa_pallas``.
- ``auto``: ``pallas`` on GPU, ``xla`` elsewhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IMPLS = ("auto", "pallas", "xla", "reference", "interpret")
ACTIVATIONS = ("identity", "gelu", "gelu_approx", "relu", "relu2", "silu", "leaky_relu", "hardswish")
LEAKY_SLOPE = 0.01
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def erf_approx(x: jax.Array) -> jax.Array:
    """``erf(x)`` by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7): Triton has no erf."""
    a = jnp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return jnp.sign(x) * (1.0 - poly * jnp.exp(-a * a))


def activation(x: jax.Array, kind: str, erf=lax.erf) -> jax.Array:
    """``act(x)`` elementwise on fp32 ``x``; the kernels pass ``erf=erf_approx``."""
    if kind == "identity":
        return x
    if kind == "gelu":
        return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
    if kind == "gelu_approx":
        return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    if kind == "relu":
        return jnp.maximum(x, 0.0)
    if kind == "relu2":
        r = jnp.maximum(x, 0.0)
        return r * r
    if kind == "silu":
        return x * jax.nn.sigmoid(x)
    if kind == "leaky_relu":
        return jnp.where(x > 0, x, LEAKY_SLOPE * x)
    if kind == "hardswish":
        return x * jnp.clip(x + 3.0, 0.0, 6.0) * (1.0 / 6.0)
    raise ValueError(f"gdpa: unknown activation {kind!r}; expected one of {ACTIVATIONS}.")


def activation_grad(x: jax.Array, kind: str, erf=lax.erf) -> jax.Array:
    """``act'(x)`` elementwise on fp32 ``x``, for the kernels' hand-written backward."""
    if kind == "identity":
        return jnp.ones_like(x)
    if kind == "gelu":
        cdf = 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
        return cdf + x * jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    if kind == "gelu_approx":
        t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    if kind == "relu":
        return jnp.where(x > 0, 1.0, 0.0)
    if kind == "relu2":
        return 2.0 * jnp.maximum(x, 0.0)
    if kind == "silu":
        s = jax.nn.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    if kind == "leaky_relu":
        return jnp.where(x > 0, 1.0, LEAKY_SLOPE)
    if kind == "hardswish":
        return jnp.where(x < -3.0, 0.0, jnp.where(x > 3.0, 1.0, (2.0 * x + 3.0) * (1.0 / 6.0)))
    raise ValueError(f"gdpa: unknown activation {kind!r}; expected one of {ACTIVATIONS}.")


def gdpa(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    activation: str = "gelu",
    scale: float = 1.0,
    q_lengths: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    window: int | None = None,
    causal: bool = False,
    impl: str = "auto",
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """``[batch, tq, hq, d], [batch, tk, hkv, d], [batch, tk, hkv, dv] -> [batch, tq, hq, dv]``.

    See the module docstring for the equation, masks and implementations. ``block_q`` /
    ``block_k`` (powers of two >= 16) are the query/key blocks of the kernels (default: their
    table by head dim); ``block_q`` is also the chunk of the banded ``xla`` path (default 64).
    """
    kind = activation
    _check_inputs(q, k, v, kind, q_lengths, kv_lengths, window, causal, impl, block_q, block_k)
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    batch, tq = q.shape[:2]
    tk = k.shape[1]
    nq = _lengths(q_lengths, batch, tq)
    nkv = _lengths(kv_lengths, batch, tk)
    if impl == "reference":
        return _quadratic(q, k, v, nq, nkv, kind, scale, window, causal, lax.Precision.HIGHEST)
    if impl == "xla":
        chunk = block_q or 64
        if banded_shape(tq, tk, window, chunk) is not None:
            return _banded(q, k, v, nq, nkv, kind, scale, window, causal, chunk)
        return _quadratic(q, k, v, nq, nkv, kind, scale, window, causal, None)
    if impl == "pallas" and jax.default_backend() != "gpu":
        raise RuntimeError(
            f"gdpa(impl='pallas') needs a GPU, but the JAX backend is '{jax.default_backend()}'. "
            "Use impl='interpret' to run the Pallas kernels on this backend (slow, for testing), "
            "or impl='xla' / impl='auto'."
        )
    from recjax.kernels.gdpa_pallas import gdpa_pallas

    return gdpa_pallas(
        q, k, v, nq, nkv, activation=kind, scale=scale, window=window, causal=causal,
        block_q=block_q, block_k=block_k, interpret=impl == "interpret",
    )


def gdpa_flops(batch: int, tq: int, tk: int, hq: int, d: int, dv: int, *, window: int | None = None,
               causal: bool = False) -> float:
    """Forward matmul FLOPs over the unmasked (t, s) pairs: ``2 hq pairs (d + dv)`` per row.

    ``pairs`` counts ``s`` with ``|t - s| <= window`` and ``s <= t`` (causal) over full-length
    rows; the backward is twice this.
    """
    t = np.arange(tq)[:, None]
    s = np.arange(tk)[None, :]
    keep = np.ones((tq, tk), bool)
    if window is not None:
        keep &= np.abs(t - s) <= window
    if causal:
        keep &= s <= t
    return 2.0 * batch * hq * float(keep.sum()) * (d + dv)


def banded_shape(tq: int, tk: int, window: int | None, chunk: int) -> tuple[int, int] | None:
    """(query rows, keys per row) the banded XLA path computes -- ``tq`` padded to whole chunks,
    ``chunk + 2 window`` keys -- or None where the whole ``tq x tk`` product is no larger (the
    path then computes that)."""
    if window is None:
        return None
    rows, keys = -(-tq // chunk) * chunk, chunk + 2 * window
    return (rows, keys) if rows * keys < tq * tk else None


def _lengths(lengths, batch, seq):
    if lengths is None:
        return jnp.full((batch,), seq, jnp.int32)
    return jnp.clip(lengths.astype(jnp.int32), 0, seq)


def _mask(t, s, nq, nkv, window, causal):
    """``m [batch, len(t), len(s)]`` from 1-D query positions ``t`` and key positions ``s``."""
    pair = (s[None, :] >= 0) & jnp.ones((t.shape[0], 1), bool)
    if window is not None:
        pair &= jnp.abs(t[:, None] - s[None, :]) <= window
    if causal:
        pair &= s[None, :] <= t[:, None]
    rows = t[None, :, None] < nq[:, None, None]
    cols = s[None, None, :] < nkv[:, None, None]
    return pair[None] & rows & cols


def _grouped(q, hkv):
    batch, tq, hq, d = q.shape
    return q.reshape(batch, tq, hkv, hq // hkv, d)


def _quadratic(q, k, v, nq, nkv, kind, scale, window, causal, precision):
    """``mask(act(q k^T)) scale v`` with the whole ``[tq, tk]`` score matrix per head."""
    batch, tq, hq, _ = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    qg = _grouped(q.astype(jnp.float32), hkv)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32), precision=precision)
    keep = _mask(jnp.arange(tq), jnp.arange(tk), nq, nkv, window, causal)
    p = jnp.where(keep[:, None, None], activation(scores, kind) * scale, 0.0)
    out = jnp.einsum("bkgts,bske->btkge", p, v.astype(jnp.float32), precision=precision)
    return out.reshape(batch, tq, hq, dv).astype(v.dtype)


def _banded(q, k, v, nq, nkv, kind, scale, window, causal, chunk):
    """Query chunks ``[c0, c0 + chunk)`` against keys ``[c0 - window, c0 + chunk + window)``."""
    batch, tq, hq, _ = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    chunks = -(-tq // chunk)
    span = chunk + 2 * window
    qg = _grouped(jnp.pad(q.astype(jnp.float32), ((0, 0), (0, chunks * chunk - tq), (0, 0), (0, 0))), hkv)
    qg = qg.reshape(batch, chunks, chunk, *qg.shape[2:])
    # keys padded by `window` on the left and up to the last chunk's reach on the right
    right = max(0, chunks * chunk + window - tk)
    kv_pad = ((0, 0), (window, right), (0, 0), (0, 0))
    kp, vp = (jnp.pad(x.astype(jnp.float32), kv_pad) for x in (k, v))
    idx = (jnp.arange(chunks) * chunk)[:, None] + jnp.arange(span)[None, :]  # padded key index
    kw, vw = kp[:, idx], vp[:, idx]  # [batch, chunks, span, hkv, d]
    scores = jnp.einsum("bnckgd,bnskd->bnkgcs", qg, kw)
    t = (jnp.arange(chunks) * chunk)[:, None] + jnp.arange(chunk)[None, :]  # [chunks, chunk]
    keep = jax.vmap(lambda tt, ss: _mask(tt, ss, nq, nkv, window, causal), out_axes=1)(t, idx - window)
    p = jnp.where(keep[:, :, None, None], activation(scores, kind) * scale, 0.0)
    out = jnp.einsum("bnkgcs,bnske->bnckge", p, vw)
    out = out.reshape(batch, chunks * chunk, hq, dv)[:, :tq]
    return out.astype(v.dtype)


def _check_inputs(q, k, v, kind, q_lengths, kv_lengths, window, causal, impl, block_q, block_k):
    if impl not in IMPLS:
        raise ValueError(f"gdpa: unknown impl {impl!r}; expected one of {IMPLS}.")
    if kind not in ACTIVATIONS:
        raise ValueError(f"gdpa: unknown activation {kind!r}; expected one of {ACTIVATIONS}.")
    if (
        q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3]
        or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]
    ):
        raise ValueError(
            "gdpa: expected q [batch, tq, hq, d], k [batch, tk, hkv, d], v [batch, tk, hkv, dv] "
            f"with hq a multiple of hkv; got q {q.shape}, k {k.shape}, v {v.shape}."
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"gdpa: {name} must be floating point, got {x.dtype}.")
    batch = q.shape[0]
    for name, x in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
        if x is not None and (tuple(x.shape) != (batch,) or not jnp.issubdtype(x.dtype, jnp.integer)):
            raise ValueError(
                f"gdpa: {name} must be an integer array of shape [batch] = ({batch},), "
                f"got {x.dtype} {tuple(x.shape)}."
            )
    if (window is not None or causal) and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"gdpa: window and causal compare query and key positions, so they need tq == tk; "
            f"got tq {q.shape[1]}, tk {k.shape[1]}."
        )
    if window is not None and (not isinstance(window, int) or window < 0):
        raise ValueError(f"gdpa: window must be a non-negative int or None, got {window!r}.")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None and (b < 16 or b & (b - 1)):
            raise ValueError(f"gdpa: {name} must be a power of two >= 16, got {b}.")
