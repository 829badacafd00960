"""Token-layout primitives shared by RankMixer and TokenMixer-Large.

- :func:`mix` / :func:`revert`: the parameter-free token mixing of RankMixer (TokenMix) and
  TokenMixer-Large. ``mix`` splits each of the ``T`` tokens of width ``D`` into ``H`` heads
  of width ``D/H`` and makes head ``h`` of every token one new token::

      [B, T, D] -> [B, T, H, D/H] -> [B, H, T, D/H] -> [B, H, T*D/H]

  ``revert`` is its exact inverse (``revert(mix(x, H), T) == x``).
- :func:`per_token_dense`: ``y_t = x_t W_t`` for every token position ``t`` at once, a
  batched einsum over the token axis (``btd,tdf->btf``); a 2-D ``W`` is shared by all tokens.
- :func:`swiglu`: ``W_down (silu(x W_gate) * (x W_up))``, per token (pSwiGLU) when the
  weights carry a leading token axis, shared otherwise.
- :func:`rms_norm` and :func:`layer_norm` over the last axis, statistics in fp32.
- :func:`stacked_param`: an ``nnx.Param`` with leading stacked axes (layers, tokens); the
  initializers here (:func:`fan_in_init`, :func:`xavier_init`) take fan-in/fan-out from the
  last two axes only.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def mix(x: jax.Array, heads: int) -> jax.Array:
    """``[B, T, D] -> [B, H, T*D/H]``: new token ``h`` = head ``h`` of every token, concatenated."""
    b, t, d = x.shape
    if d % heads:
        raise ValueError(f"token width {d} is not divisible by {heads} heads")
    return x.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3).reshape(b, heads, t * d // heads)


def revert(y: jax.Array, tokens: int) -> jax.Array:
    """``[B, H, T*D/H] -> [B, T, D]``, the inverse of :func:`mix`."""
    b, h, w = y.shape
    if w % tokens:
        raise ValueError(f"mixed width {w} is not divisible by {tokens} tokens")
    return y.reshape(b, h, tokens, w // tokens).transpose(0, 2, 1, 3).reshape(b, tokens, h * w // tokens)


def per_token_dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [B, T, I]`` times ``w [T, I, O]`` (own weights per token) or ``w [I, O]`` (shared)."""
    w = w.astype(x.dtype)
    if w.ndim == 3:
        return jnp.einsum("bti,tio->bto", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.einsum("bti,io->bto", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """pSwiGLU ``W_down_t (silu(W_gate_t x_t) * W_up_t x_t)``: ``x [B, T, D]`` -> ``[B, T, D]``.

    Weights ``[T, D, F]``/``[T, F, D]`` are per token; ``[D, F]``/``[F, D]`` are shared.
    """
    h = jax.nn.silu(per_token_dense(x, w_gate)) * per_token_dense(x, w_up)
    return per_token_dense(h, w_down)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / rms(x) * scale`` over the last axis; ``scale`` broadcasts (e.g. ``[T, D]``)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``(x - mean) / std * scale + bias`` over the last axis, statistics in fp32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


def fan_in_init(std_scale: float = 1.0) -> nnx.Initializer:
    """Truncated-normal ``std = std_scale / sqrt(fan_in)``, fan-in = the second-to-last axis."""

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        std = std_scale / (shape[-2] ** 0.5)
        return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) / 0.87962566

    return init


def xavier_init(scale: float = 1.0, fan_in_axis: int = -2) -> nnx.Initializer:
    """``scale`` x Xavier-uniform: ``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))`` with
    ``fan_in = shape[fan_in_axis]`` and ``fan_out = shape[-1]`` (stacked leading axes are
    independent matrices; ``fan_in_axis=-3`` for pre-concatenated ``[.., D, 2, F]`` gate/up
    weights)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        limit = scale * (6.0 / (shape[fan_in_axis] + shape[-1])) ** 0.5
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def stacked_param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    axes: Sequence[str | None],
    init: nnx.Initializer,
) -> nnx.Param:
    """fp32 ``nnx.Param`` of ``shape`` annotated with logical ``axes`` (one per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} logical axes for a {len(shape)}-d parameter {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), out_sharding=tuple(axes))
