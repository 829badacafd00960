"""Pallas (Triton) kernels for linear attention, forward and backward under ``jax.custom_vjp``.

Per (batch b, head h), the sequence is cut into chunks ``c`` of ``block`` rows; ``phi_q``,
``phi_k`` are the feature maps of q, k (see ``linear_attention``), zero at rows ``t >= n_b``;
``a`` is the output factor ``1/g`` (1 without ``length_scale``); ``tril`` keeps ``s <= t``::

    _state_kernel    S_c  = phi_k[c]^T v[c]                                  fp32 [dk, dv]
    (XLA)            P_c  = sum_{c' < c} S_c'   (causal)   or  P = sum_c S_c (non-causal)
    _output_kernel   o[c] = a (phi_q[c] P_c + tril(phi_q[c] phi_k[c]^T) v[c])

The non-causal tril term is absent. Backward, with ``do' = a do`` and the reverse state
``R_c = sum_{c' > c} phi_q[c']^T do'[c']`` (non-causal: the total; again ``_state_kernel``)::

    _backward_kernel dphi_q[c] = do'[c] P_c^T + tril(do'[c] v[c]^T) phi_k[c]
                     dphi_k[c] = v[c] R_c^T + tril(do'[c] v[c]^T)^T phi_q[c]
                     dv[c]     = phi_k[c] R_c + tril(phi_q[c] phi_k[c]^T)^T do'[c]
                     dq, dk    = feature-map VJPs of dphi_q, dphi_k (in the kernel)
    (XLA)            da        = sum_{t, e} do * o / a

Chunk states are recomputed in the backward pass, not saved. Causal passes materialise
``P`` (and ``R``) as fp32 ``[batch, heads, seq / block, dk, dv]``; non-causal state passes let
each program reduce up to ``ROWS_PER_PROGRAM`` rows, stopping at ``n_b``.

Triton rules are kept by construction: ``block`` is a power of two >= 16; head dims are
zero-padded to the next power of two >= 16 (zero columns leave every feature map and product
unchanged; a head_dim of 96 therefore costs as much as 128), and the sequence is zero-padded
to a multiple of ``block`` and masked through ``n_b``. Tiles are loaded in the input dtype and
all products take fp32 operands with fp32 accumulation (TF32 tensor cores on GPU by default).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from recjax.kernels.linear_attention import EPS, apply_feature_map, query_factor

DEFAULT_BLOCK = 64
ROWS_PER_PROGRAM = 1024


@dataclasses.dataclass(frozen=True)
class _Config:
    causal: bool
    kind: str
    q_factor: float
    block: int
    interpret: bool


def linear_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    n: jax.Array,
    scale: jax.Array | None,
    *,
    causal: bool,
    feature_map: str,
    block_size: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pads to Triton-friendly shapes, runs the kernels, slices back.

    ``q, k [B, T, H, d]``, ``v [B, T, H, dv]``, ``n`` int32 ``[B]`` valid lengths in
    ``[0, T]``, ``scale`` fp32 ``[B, H]`` output factor or None. Returns ``[B, T, H, dv]``.
    """
    _, seq, _, head_dim = q.shape
    dv = v.shape[-1]
    block = block_size or min(DEFAULT_BLOCK, max(16, pl.next_power_of_2(seq)))
    seq_p = pl.cdiv(seq, block) * block
    dk_p, dv_p = (max(16, pl.next_power_of_2(d)) for d in (head_dim, dv))

    def pad(x, d_p):
        return jnp.pad(x, ((0, 0), (0, seq_p - seq), (0, 0), (0, d_p - x.shape[-1])))

    cfg = _Config(causal, feature_map, query_factor(feature_map, head_dim), block, interpret)
    out = _attention(pad(q, dk_p), pad(k, dk_p), pad(v, dv_p), n, scale, cfg)
    return out[:, :seq, :, :dv]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, n, scale, cfg):
    return _forward(q, k, v, n, scale, cfg)


def _forward(q, k, v, n, scale, cfg):
    p = _prefix_states(k, v, n, None, cfg, x_factor=1.0, reverse=False)
    return _output(q, k, v, n, scale, p, cfg)


def _attention_fwd(q, k, v, n, scale, cfg):
    out = _forward(q, k, v, n, scale, cfg)
    return out, (q, k, v, n, scale, None if scale is None else out)


def _attention_bwd(cfg, residuals, do):
    q, k, v, n, scale, out = residuals
    p = _prefix_states(k, v, n, None, cfg, x_factor=1.0, reverse=False)
    r = _prefix_states(q, do, n, scale, cfg, x_factor=cfg.q_factor, reverse=True)
    dq, dk, dv = _backward(q, k, v, do, n, scale, p, r, cfg)
    dscale = None
    if scale is not None:
        dscale = jnp.einsum("bthe,bthe->bh", do.astype(jnp.float32), out.astype(jnp.float32))
        dscale = dscale / scale
    return dq, dk, dv, None, dscale


_attention.defvjp(_attention_fwd, _attention_bwd)


def _compiler_params(*dims: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=4 if max(dims) <= 64 else 8, num_stages=2)


def _prefix_states(x, y, n, scale, cfg, *, x_factor, reverse):
    """``sum phi(x)^T (a y)`` per chunk, exclusive prefix (or ``reverse`` suffix) if causal.

    Returns fp32 ``[B, H, C, dx, dy]`` with ``C = T / block`` if causal, else ``C = 1``.
    """
    batch, seq, heads, dx = x.shape
    dy = y.shape[-1]
    chunks = seq // cfg.block
    per_program = 1 if cfg.causal else max(1, min(chunks, ROWS_PER_PROGRAM // cfg.block))
    programs = pl.cdiv(chunks, per_program)
    kernel = functools.partial(
        _state_kernel, kind=cfg.kind, x_factor=x_factor, block=cfg.block,
        per_program=per_program, scaled=scale is not None,
    )
    whole_seq = lambda d: pl.BlockSpec((None, seq, None, d), lambda b, h, s: (b, 0, h, 0))
    in_specs = [pl.BlockSpec((batch,), lambda b, h, s: (0,)), whole_seq(dx), whole_seq(dy)]
    args = [n, x, y]
    if scale is not None:
        in_specs.append(pl.BlockSpec((batch, heads), lambda b, h, s: (0, 0)))
        args.append(scale)
    states = pl.pallas_call(
        kernel,
        grid=(batch, heads, programs),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, None, dx, dy), lambda b, h, s: (b, h, s, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, heads, programs, dx, dy), jnp.float32),
        compiler_params=_compiler_params(dx, dy),
        interpret=cfg.interpret,
        name="linear_attention_states",
    )(*args)
    if not cfg.causal:
        return jnp.sum(states, axis=2, keepdims=True)
    incl = lax.cumsum(states, axis=2, reverse=reverse)
    zero = jnp.zeros_like(incl[:, :, :1])
    if reverse:
        return jnp.concatenate([incl[:, :, 1:], zero], axis=2)
    return jnp.concatenate([zero, incl[:, :, :-1]], axis=2)


def _state_kernel(n_ref, x_ref, y_ref, *refs, kind, x_factor, block, per_program, scaled):
    scale_ref, out_ref = refs if scaled else (None, *refs)
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = n_ref[b]
    first = s * per_program
    last = jnp.minimum(first + per_program, lax.div(n + block - 1, block))

    def body(i, acc):
        rows = pl.ds(i * block, block)
        valid = (i * block + jnp.arange(block) < n)[:, None]
        phi = apply_feature_map(x_ref[rows, :].astype(jnp.float32), kind) * x_factor
        phi = jnp.where(valid, phi, 0.0)
        y = jnp.where(valid, y_ref[rows, :].astype(jnp.float32), 0.0)
        return acc + plgpu.dot(phi, y, trans_a=True)

    acc = lax.fori_loop(first, last, body, jnp.zeros(out_ref.shape, jnp.float32))
    if scale_ref is not None:
        acc = acc * scale_ref[b, h]
    out_ref[...] = acc


def _chunk_specs(cfg, *dims):
    """Row-chunk BlockSpecs ``[block, d]`` of ``[B, T, H, d]`` arrays on grid ``(b, h, c)``."""
    return [pl.BlockSpec((None, cfg.block, None, d), lambda b, h, c: (b, c, h, 0)) for d in dims]


def _state_spec(cfg, dk, dv):
    if cfg.causal:
        return pl.BlockSpec((None, None, None, dk, dv), lambda b, h, c: (b, h, c, 0, 0))
    return pl.BlockSpec((None, None, None, dk, dv), lambda b, h, c: (b, h, 0, 0, 0))


def _extras(n, scale):
    """The ``n`` (and ``scale``) inputs with whole-array specs."""
    specs = [pl.BlockSpec(n.shape, lambda b, h, c: (0,))]
    if scale is None:
        return specs, [n]
    return specs + [pl.BlockSpec(scale.shape, lambda b, h, c: (0, 0))], [n, scale]


def _output(q, k, v, n, scale, p, cfg):
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    specs, extras = _extras(n, scale)
    return pl.pallas_call(
        functools.partial(_output_kernel, cfg=cfg, scaled=scale is not None),
        grid=(batch, heads, seq // cfg.block),
        in_specs=specs + _chunk_specs(cfg, dk, dk, dv) + [_state_spec(cfg, dk, dv)],
        out_specs=_chunk_specs(cfg, dv)[0],
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        compiler_params=_compiler_params(dk, dv),
        interpret=cfg.interpret,
        name="linear_attention_fwd",
    )(*extras, q, k, v, p)


def _output_kernel(*refs, cfg, scaled):
    if scaled:
        n_ref, scale_ref, q_ref, k_ref, v_ref, p_ref, o_ref = refs
    else:
        (n_ref, q_ref, k_ref, v_ref, p_ref, o_ref), scale_ref = refs, None
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    valid = (c * cfg.block + jnp.arange(cfg.block) < n_ref[b])[:, None]
    pq = _phi(q_ref, valid, cfg.kind, cfg.q_factor)
    o = plgpu.dot(pq, p_ref[...])
    if cfg.causal:
        pk = _phi(k_ref, valid, cfg.kind, 1.0)
        vv = jnp.where(valid, v_ref[...].astype(jnp.float32), 0.0)
        scores = jnp.where(_tril(cfg.block), plgpu.dot(pq, pk, trans_b=True), 0.0)
        o = o + plgpu.dot(scores, vv)
    if scale_ref is not None:
        o = o * scale_ref[b, h]
    o_ref[...] = o.astype(o_ref.dtype)


def _backward(q, k, v, do, n, scale, p, r, cfg):
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    specs, extras = _extras(n, scale)
    chunk_out = _chunk_specs(cfg, dk, dk, dv)
    return pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg, scaled=scale is not None),
        grid=(batch, heads, seq // cfg.block),
        in_specs=specs + _chunk_specs(cfg, dk, dk, dv, dv) + [_state_spec(cfg, dk, dv)] * 2,
        out_specs=chunk_out,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
        compiler_params=_compiler_params(dk, dv),
        interpret=cfg.interpret,
        name="linear_attention_bwd",
    )(*extras, q, k, v, do, p, r)


def _backward_kernel(*refs, cfg, scaled):
    if scaled:
        n_ref, scale_ref, q_ref, k_ref, v_ref, do_ref, p_ref, r_ref, dq_ref, dk_ref, dv_ref = refs
    else:
        n_ref, q_ref, k_ref, v_ref, do_ref, p_ref, r_ref, dq_ref, dk_ref, dv_ref = refs
        scale_ref = None
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    valid = (c * cfg.block + jnp.arange(cfg.block) < n_ref[b])[:, None]
    xq = q_ref[...].astype(jnp.float32)
    xk = k_ref[...].astype(jnp.float32)
    pq = jnp.where(valid, apply_feature_map(xq, cfg.kind) * cfg.q_factor, 0.0)
    pk = jnp.where(valid, apply_feature_map(xk, cfg.kind), 0.0)
    vv = jnp.where(valid, v_ref[...].astype(jnp.float32), 0.0)
    do = jnp.where(valid, do_ref[...].astype(jnp.float32), 0.0)
    if scale_ref is not None:
        do = do * scale_ref[b, h]
    p, r = p_ref[...], r_ref[...]
    dpq = plgpu.dot(do, p, trans_b=True)
    dpk = plgpu.dot(vv, r, trans_b=True)
    dv = plgpu.dot(pk, r)
    if cfg.causal:
        tril = _tril(cfg.block)
        dov = jnp.where(tril, plgpu.dot(do, vv, trans_b=True), 0.0)
        dpq = dpq + plgpu.dot(dov, pk)
        dpk = dpk + plgpu.dot(dov, pq, trans_a=True)
        scores = jnp.where(tril, plgpu.dot(pq, pk, trans_b=True), 0.0)
        dv = dv + plgpu.dot(scores, do, trans_a=True)
    dq = jnp.where(valid, _feature_map_vjp(xq, dpq * cfg.q_factor, cfg.kind), 0.0)
    dk = jnp.where(valid, _feature_map_vjp(xk, dpk, cfg.kind), 0.0)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _phi(ref, valid, kind, factor):
    return jnp.where(valid, apply_feature_map(ref[...].astype(jnp.float32), kind) * factor, 0.0)


def _tril(block):
    idx = jnp.arange(block)
    return idx[:, None] >= idx[None, :]


def _feature_map_vjp(x, dy, kind):
    """``dx`` for ``y = apply_feature_map(x, kind)`` and cotangent ``dy``, rows of fp32 tiles.

    L2 step ``y = u / max(|u|, eps)``: ``du = (dy - y <dy, y>) / |u|``, or ``dy / eps`` where
    the norm is clamped; ELU step: ``dx = du`` where ``x > 0``, else ``du exp(x)``.
    """
    if kind == "identity":
        return dy
    u = x if kind == "cosine" else jnp.where(x > 0, x, jnp.expm1(jnp.minimum(x, 0.0)))
    sq = jnp.sum(u * u, axis=-1, keepdims=True)
    inv = lax.rsqrt(jnp.maximum(sq, EPS * EPS))
    y = u * inv
    proj = jnp.where(sq > EPS * EPS, jnp.sum(dy * y, axis=-1, keepdims=True), 0.0)
    du = inv * (dy - y * proj)
    if kind == "cosine":
        return du
    return jnp.where(x > 0, du, du * jnp.exp(jnp.minimum(x, 0.0)))
