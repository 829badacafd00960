"""Kunlun's sequence layers (MODELS.md section 3), each with the baseline it replaces.

Shapes: a sequence ``s [B, L, D]`` with valid lengths ``n [B]`` (valid positions first), event
ages ``age [B, L]`` in hours, context tokens ``x [B, T, D]``.

- :func:`rote`: rotary embedding at positions ``log(1 + age)`` (ROTE).
- :class:`ContextInteraction`: the sequence reads the context through per-example weights
  generated from it, ``K = (A_k x) W_k``, ``V = (A_v x) W_v`` ``[B, keys, D]``:
  ``gdpa``: ``GDPA(s W_q, K, V) W_o`` (heads, ``act`` applied to the scores, scale
  ``1/sqrt(keys)``); ``pffn`` (InterFormer's PFFN, the baseline):
  ``gelu(s K^T) V / sqrt(keys)``, the same per-example FFN without heads or q and output
  projections. Production's PFFN normalises twice (``GELU -> RMSNorm -> W2 -> RMSNorm``); inside
  this pre-norm residual branch that form could not learn the event stream's sequence signal
  (Kunlun's baseline, size l, seed 0, 200k examples: excess KL 0.134 with both norms, 0.122
  without the output norm, 0.128 without the hidden one, 0.086 with neither; the sequence-blind
  model 0.117).
- :class:`WindowSelfAttention`: GDPA self-attention over the events with ``|i - j| <= window``
  (``None``: full attention), ROTE on q and k, scale ``1/sqrt(keys in reach)``.
- :class:`SeedPooling`: ``hsp``: ``S`` learnable seeds attend over the sequence
  (``Z = MHA(RMSNorm(E_seed), s, s)``, softmax over the valid positions), then SumKronLinear
  compresses them to ``T`` tokens, ``Y = sum_{i<k} P_i^T Z W_i`` (``P_i [S, T]``, ``W_i [D, D]``:
  ``k (S T + D^2)`` parameters); ``pma``: ``T`` seeds attend directly (Set Transformer's PMA).

FLOPs of each (per example, matmuls only) are the ``*_flops`` functions next to them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.kernels.gdpa import banded_shape, gdpa
from recjax.layers.token_mixing import fan_in_init, rms_norm, stacked_param
from recjax.parallel.sharding import constrain

WINDOW_CHUNK = 16  # query rows per band of the banded GDPA path (and the kernels' query block)


def rote(x: jax.Array, age: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary embedding of ``x [B, L, H, dh]`` (dh even) at positions ``log(1 + age [B, L])``."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = jnp.log1p(jnp.maximum(age.astype(jnp.float32), 0.0))[:, :, None, None] * freq  # [B, L, 1, half]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def _weight(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...] | None = None) -> nnx.Param:
    """fp32 weight with fan-in init; ``axes`` (default: none) shard the large projections as the
    MLPs do: ``("embed", "mlp")`` into a layer, ``("mlp", "embed")`` out of it."""
    return stacked_param(rngs, shape, axes or (None,) * len(shape), fan_in_init())


IN, OUT = ("embed", "mlp"), ("mlp", "embed")


def _ones(width: int) -> nnx.Param:
    return nnx.Param(jnp.ones((width,), jnp.float32), out_sharding=(None,))


class ContextInteraction(nnx.Module):
    """``s [B, L, D], x [B, T, D], n [B] -> [B, L, D]``; ``kind`` ``gdpa`` or ``pffn``."""

    def __init__(self, dim: int, tokens: int, keys: int, heads: int, kind: str, activation: str, *,
                 impl: str, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.kind, self.heads, self.activation, self.impl, self.dtype = kind, heads, activation, impl, dtype
        self.key_mix, self.value_mix = _weight(rngs, (keys, tokens)), _weight(rngs, (keys, tokens))
        self.key_proj, self.value_proj = _weight(rngs, (dim, dim), IN), _weight(rngs, (dim, dim), IN)
        if kind == "gdpa":
            self.query, self.out = _weight(rngs, (dim, dim), IN), _weight(rngs, (dim, dim), OUT)

    def __call__(self, s: jax.Array, x: jax.Array, n: jax.Array) -> jax.Array:
        cast = lambda p: p[...].astype(self.dtype)
        # project the T context tokens first (T <= keys), then mix them into the keys
        k = jnp.einsum("kt,btd->bkd", cast(self.key_mix), x @ cast(self.key_proj))  # [B, keys, D]
        v = jnp.einsum("kt,btd->bkd", cast(self.value_mix), x @ cast(self.value_proj))
        scale = 1.0 / math.sqrt(k.shape[1])
        if self.kind == "pffn":
            return jnp.einsum("blk,bkd->bld", jax.nn.gelu(jnp.einsum("bld,bkd->blk", s, k)) * scale, v)
        split = lambda a: a.reshape(*a.shape[:2], self.heads, -1)
        q = split(jnp.einsum("bld,de->ble", s, cast(self.query)))
        out = gdpa(q, split(k), split(v), activation=self.activation, scale=scale,
                   q_lengths=n, impl=self.impl)
        return jnp.einsum("ble,ed->bld", out.reshape(s.shape), cast(self.out))


def context_interaction_flops(length: int, dim: int, tokens: int, keys: int, kind: str) -> float:
    """K and V generation (``2 T D^2 + 2 keys T D`` each), then GDPA (``4 L keys D``) with
    its q and output projections (``2 L D^2`` each), or the PFFN's two products (``4 L keys D``)."""
    gen = 2 * (2.0 * tokens * dim * dim + 2.0 * keys * tokens * dim)
    mixing = 4.0 * length * keys * dim
    return gen + mixing + (4.0 * length * dim * dim if kind == "gdpa" else 0.0)


class WindowSelfAttention(nnx.Module):
    """``s [B, L, D], age [B, L], n [B] -> [B, L, D]``: windowed GDPA self-attention."""

    def __init__(self, dim: int, heads: int, window: int | None, activation: str, use_rote: bool, *,
                 impl: str, dtype: jnp.dtype, rngs: nnx.Rngs):
        if (dim // heads) % 2:
            raise ValueError(f"WindowSelfAttention: the head dim {dim}/{heads} must be even for ROTE")
        self.heads, self.window, self.activation, self.use_rote = heads, window, activation, use_rote
        self.impl, self.dtype = impl, dtype
        self.qkv, self.out = _weight(rngs, (dim, 3, dim), ("embed", None, "mlp")), _weight(rngs, (dim, dim), OUT)

    def __call__(self, s: jax.Array, age: jax.Array, n: jax.Array) -> jax.Array:
        batch, length, dim = s.shape
        qkv = jnp.einsum("bld,dce->cble", s, self.qkv[...].astype(self.dtype)).reshape(3, batch, length, self.heads, -1)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.use_rote:
            q, k = rote(q, age), rote(k, age)
        reach = length if self.window is None else min(length, 2 * self.window + 1)
        out = gdpa(q, k, v, activation=self.activation, scale=1.0 / math.sqrt(reach), q_lengths=n, kv_lengths=n,
                   window=self.window, impl=self.impl, block_q=WINDOW_CHUNK)
        return jnp.einsum("ble,ed->bld", out.reshape(batch, length, dim), self.out[...].astype(self.dtype))


def window_self_attention_flops(length: int, dim: int, window: int | None) -> float:
    """q, k, v and output projections (``8 L D^2``) and the scores and values over the keys the
    XLA path computes (:func:`recjax.kernels.gdpa.banded_shape`): bands of
    ``WINDOW_CHUNK + 2 window`` keys per ``WINDOW_CHUNK`` queries where that is less than all
    ``L``."""
    queries, keys = banded_shape(length, length, window, WINDOW_CHUNK) or (length, length)
    return 8.0 * length * dim * dim + 4.0 * queries * keys * dim


class SeedPooling(nnx.Module):
    """``s [B, L, D], n [B] -> [B, tokens, D]``; ``kind`` ``hsp`` (``seeds`` seeds, SumKronLinear
    with ``terms`` terms) or ``pma`` (``tokens`` seeds)."""

    def __init__(self, dim: int, heads: int, tokens: int, kind: str, seeds: int, terms: int, *,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        self.kind, self.heads, self.dtype = kind, heads, dtype
        n_seeds = seeds if kind == "hsp" else tokens
        self.seeds = stacked_param(rngs, (n_seeds, dim), (None, None), nnx.initializers.normal(1.0))
        self.seed_norm = _ones(dim)
        self.query, self.key, self.value = (_weight(rngs, (dim, dim), IN) for _ in range(3))
        self.out = _weight(rngs, (dim, dim), OUT)
        if kind == "hsp":
            self.compress = _weight(rngs, (terms, n_seeds, tokens))  # P_i, fan-in over seeds
            self.mix = _weight(rngs, (terms, dim, dim), (None, *IN))  # W_i

    def __call__(self, s: jax.Array, n: jax.Array) -> jax.Array:
        cast = lambda p: p[...].astype(self.dtype)
        batch, length, dim = s.shape
        split = lambda a: a.reshape(*a.shape[:-1], self.heads, -1)
        q = split(rms_norm(cast(self.seeds), self.seed_norm[...]) @ cast(self.query))  # [S, H, dh]
        k, v = split(s @ cast(self.key)), split(s @ cast(self.value))  # [B, L, H, dh]
        scores = jnp.einsum("shd,blhd->bhsl", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
        valid = (jnp.arange(length)[None, :] < n[:, None])[:, None, None, :]
        probs = jnp.where(valid, jax.nn.softmax(jnp.where(valid, scores, -1e30), axis=-1), 0.0)
        z = jnp.einsum("bhsl,blhd->bshd", probs.astype(self.dtype), v).reshape(batch, -1, dim) @ cast(self.out)
        if self.kind == "hsp":
            z = jnp.einsum("ist,bsd->bitd", cast(self.compress), z)  # P_i^T Z: T < S rows first
            z = jnp.einsum("bitd,ide->bte", z, cast(self.mix))
        return constrain(z, ("batch", None, None))


def seed_pooling_flops(length: int, dim: int, tokens: int, kind: str, seeds: int, terms: int) -> float:
    """Key and value projections (``4 L D^2``), scores and values (``4 S L D``), the output
    projection (``2 S D^2``) and SumKronLinear (``terms (2 T S D + 2 T D^2)``). The seeds' own
    query projection does not depend on the example and is not counted."""
    n_seeds = seeds if kind == "hsp" else tokens
    flops = 4.0 * length * dim * dim + 4.0 * n_seeds * length * dim + 2.0 * n_seeds * dim * dim
    if kind == "hsp":
        flops += terms * (2.0 * tokens * n_seeds * dim + 2.0 * tokens * dim * dim)
    return flops
