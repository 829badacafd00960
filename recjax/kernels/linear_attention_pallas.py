"""Pallas (Triton) kernels for linear attention, forward and backward under ``jax.custom_vjp``.

Per (batch b, head h), the sequence is cut into chunks ``c`` of ``block`` rows; ``phi_q``,
``phi_k`` are the feature maps of q, k (see ``linear_attention``), zero at rows ``t >= n_b``;
``a`` is the output factor ``1/g`` (1 without ``length_scale``); ``tril`` keeps ``s <= t``.
Three kernels, each reading every input tile once::

    _forward_kernel  grid (b, h, value tile): one sequential pass over the chunks with the
                     state in registers, P_c = sum_{c' < c} phi_k[c']^T v[c'] (causal; else
                     first a pass for the total P)
                     o[c] = a (phi_q[c] P_c + tril(phi_q[c] phi_k[c]^T) v[c])
                     and, for the backward, P_c stored once in the input dtype
    _dq_kernel       grid (b, h, c), chunks in parallel, P_c read back:
                     dphi_q[c] = do'[c] P_c^T + tril(do'[c] v[c]^T) phi_k[c]
    _dkv_kernel      grid (b, h): one reverse pass with R_c = sum_{c' > c} phi_q[c']^T do'[c']
                     in registers (non-causal: the total, from a first pass)
                     dphi_k[c] = v[c] R_c^T + tril(do'[c] v[c]^T)^T phi_q[c]
                     dv[c]     = phi_k[c] R_c + tril(phi_q[c] phi_k[c]^T)^T do'[c]
    dq, dk = feature-map VJPs of dphi_q, dphi_k (in the kernels); da = sum do * o / a (XLA)

with ``do' = a do``. The dots take tiles in the input dtype (bf16 inputs: bf16 tensor-core
products) with fp32 accumulation; feature maps, states and the running sums stay fp32 in
registers, and the stored ``P_c`` are rounded to the input dtype once. fp32 inputs run fp32
dots (TF32 on GPU by default).

Bytes moved (:func:`hbm_bytes`, for B8 H8 S4096 D64 bf16 fwd+bwd): the inputs, outputs and the
stored states once each, against the earlier design's fp32 ``[B, H, C, d, d]`` states written
by a state kernel and re-read and re-written by XLA's cumulative sums, in the forward and twice
in the backward.

Triton rules are kept by construction: ``block`` is a power of two >= 16; head dims are
zero-padded to the next power of two >= 16 (zero columns leave every feature map and product
unchanged; a head_dim of 96 therefore costs as much as 128), and the sequence is zero-padded
to a multiple of ``block`` and masked through ``n_b``. Block, value tile, warps and pipeline
stages come from :data:`TUNING` by head dim: chosen for register budget (the dk/dv kernel holds
R and five tiles), not yet measured on a GPU.
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

# padded key head dim -> (block rows, value tile, warps, pipeline stages)
TUNING = {16: (64, 16, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 3), 128: (64, 64, 8, 2), 256: (32, 64, 8, 2)}


@dataclasses.dataclass(frozen=True)
class _Config:
    causal: bool
    kind: str
    q_factor: float
    block: int
    value_tile: int
    warps: int
    stages: int
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
    dk_p, dv_p = (max(16, pl.next_power_of_2(d)) for d in (head_dim, dv))
    block, tile, warps, stages = TUNING[min(dk_p, 256)]
    block = block_size or min(block, max(16, pl.next_power_of_2(seq)))
    seq_p = pl.cdiv(seq, block) * block

    def pad(x, d_p):
        return jnp.pad(x, ((0, 0), (0, seq_p - seq), (0, 0), (0, d_p - x.shape[-1])))

    cfg = _Config(causal, feature_map, query_factor(feature_map, head_dim), block, min(tile, dv_p), warps,
                  stages, interpret)
    out = _attention(pad(q, dk_p), pad(k, dk_p), pad(v, dv_p), n, scale, cfg)
    return out[:, :seq, :, :dv]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, n, scale, cfg):
    return _forward(q, k, v, n, scale, cfg, save_states=False)[0]


def _attention_fwd(q, k, v, n, scale, cfg):
    out, states = _forward(q, k, v, n, scale, cfg, save_states=True)
    return out, (q, k, v, n, scale, states, None if scale is None else out)


def _attention_bwd(cfg, residuals, do):
    q, k, v, n, scale, states, out = residuals
    dq = _dq(q, k, v, do, n, scale, states, cfg)
    dk, dv = _dkv(q, k, v, do, n, scale, cfg)
    dscale = None
    if scale is not None:
        dscale = jnp.einsum("bthe,bthe->bh", do.astype(jnp.float32), out.astype(jnp.float32))
        dscale = dscale / scale
    return dq, dk, dv, None, dscale


_attention.defvjp(_attention_fwd, _attention_bwd)


def hbm_bytes(batch: int, seq: int, heads: int, d: int, *, itemsize: int = 2, block: int = 64,
              design: str = "sequential") -> dict[str, int]:
    """Analytic HBM bytes of one causal fwd+bwd (``dk = dv = d``, with a length scale).

    ``sequential`` (these kernels): forward reads q, k once per value tile and v once, writes
    o and the ``C = seq / block`` states ``[B, H, C, d, d]`` in the input dtype; the dq kernel
    reads q, k, v, do and the states and writes dq; the dk/dv kernel reads q, k, v, do and
    writes dk, dv; the length-scale gradient reads do and o. ``chunked`` (the earlier design):
    fp32 chunk states written by a state kernel, then an XLA cumulative sum and a shift (each
    reading and writing them), read by the output kernel; the backward recomputes the prefix
    states the same way and builds the reverse ones from q and do, then one kernel reads q, k,
    v, do and both state arrays and writes dq, dk, dv.
    """
    act = batch * seq * heads * d * itemsize
    chunks = seq // block
    if design == "sequential":
        tiles = d // TUNING[max(16, pl.next_power_of_2(d))][1] if d >= 16 else 1
        states = batch * heads * chunks * d * d * itemsize
        fwd = (2 * tiles + 1) * act + act + states
        bwd = (4 * act + states + act) + (4 * act + 2 * act) + 2 * act
        return {"forward": fwd, "backward": bwd, "total": fwd + bwd}
    if design != "chunked":
        raise ValueError(f"hbm_bytes: design must be 'sequential' or 'chunked', got {design!r}")
    states = batch * heads * chunks * d * d * 4
    state_pass = 2 * act + states + 2 * states + 2 * states  # kernel, cumsum, shift
    fwd = state_pass + 3 * act + states + act
    bwd = 2 * state_pass + (4 * act + 2 * states + 3 * act) + 2 * act
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def _compiler_params(cfg) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=cfg.warps, num_stages=cfg.stages)


def _whole(seq, d, index):
    """The whole ``[seq, d]`` of one (batch, head) of a ``[B, T, H, d]`` array."""
    return pl.BlockSpec((None, seq, None, d), index)


def _extras(n, scale):
    """The ``n`` (and ``scale``) inputs with whole-array specs."""
    specs = [pl.BlockSpec(n.shape, lambda *g: (0,))]
    if scale is None:
        return specs, [n]
    return specs + [pl.BlockSpec(scale.shape, lambda *g: (0, 0))], [n, scale]


def _valid(c, block, n):
    return (c * block + jnp.arange(block) < n)[:, None]


def _forward(q, k, v, n, scale, cfg, *, save_states):
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    tile, chunks = cfg.value_tile, seq // cfg.block
    specs, extras = _extras(n, scale)
    in_specs = specs + [_whole(seq, dk, lambda b, h, j: (b, 0, h, 0))] * 2 + [
        _whole(seq, tile, lambda b, h, j: (b, 0, h, j))]
    out_specs = [_whole(seq, tile, lambda b, h, j: (b, 0, h, j))]
    out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if save_states:
        stored = chunks if cfg.causal else 1
        out_specs.append(pl.BlockSpec((None, None, stored, dk, tile), lambda b, h, j: (b, h, 0, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, stored, dk, dv), v.dtype))
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, chunks=chunks, scaled=scale is not None,
                          save_states=save_states),
        grid=(batch, heads, dv // tile),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="linear_attention_fwd",
    )(*extras, q, k, v)
    return outs[0], (outs[1] if save_states else None)


def _forward_kernel(*refs, cfg, chunks, scaled, save_states):
    refs = list(refs)
    n_ref = refs.pop(0)
    scale_ref = refs.pop(0) if scaled else None
    q_ref, k_ref, v_ref, o_ref = refs[:4]
    p_ref = refs[4] if save_states else None
    b, h = pl.program_id(0), pl.program_id(1)
    n = n_ref[b]
    a = scale_ref[b, h] if scaled else 1.0
    dt = v_ref.dtype
    live = lax.div(n + cfg.block - 1, cfg.block)  # chunks holding valid rows
    tril = _tril(cfg.block)

    def tiles(c):
        rows = pl.ds(c * cfg.block, cfg.block)
        valid = _valid(c, cfg.block, n)
        pq = _phi(q_ref[rows, :], valid, cfg.kind, cfg.q_factor)
        pk = _phi(k_ref[rows, :], valid, cfg.kind, 1.0)
        return rows, pq, pk, jnp.where(valid, v_ref[rows, :], 0).astype(dt)

    def add_state(c, state):
        _, _, pk, vv = tiles(c)
        return state + plgpu.dot(pk.astype(dt), vv, trans_a=True)

    zero = jnp.zeros((q_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    total = zero if cfg.causal else lax.fori_loop(0, live, add_state, zero)
    if p_ref is not None and not cfg.causal:
        p_ref[0, :, :] = total.astype(p_ref.dtype)

    def step(c, state):
        rows, pq, pk, vv = tiles(c)
        prefix = state if cfg.causal else total
        o = plgpu.dot(pq.astype(dt), prefix.astype(dt))
        if cfg.causal:
            scores = jnp.where(tril, plgpu.dot(pq.astype(dt), pk.astype(dt), trans_b=True), 0.0)
            o = o + plgpu.dot(scores.astype(dt), vv)
            if p_ref is not None:
                p_ref[c, :, :] = state.astype(p_ref.dtype)
            state = state + plgpu.dot(pk.astype(dt), vv, trans_a=True)
        o_ref[rows, :] = (o * a).astype(o_ref.dtype)
        return state

    lax.fori_loop(0, live, step, zero)

    def clear(c, carry):  # chunks past n_b: zero outputs (and states, never read)
        o_ref[pl.ds(c * cfg.block, cfg.block), :] = jnp.zeros((cfg.block, o_ref.shape[-1]), o_ref.dtype)
        if p_ref is not None and cfg.causal:
            p_ref[c, :, :] = jnp.zeros(p_ref.shape[1:], p_ref.dtype)
        return carry

    lax.fori_loop(live, chunks, clear, 0)


def _dq(q, k, v, do, n, scale, states, cfg):
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    specs, extras = _extras(n, scale)
    chunk = lambda d: pl.BlockSpec((None, cfg.block, None, d), lambda b, h, c: (b, c, h, 0))
    state_index = (lambda b, h, c: (b, h, c, 0, 0)) if cfg.causal else (lambda b, h, c: (b, h, 0, 0, 0))
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, scaled=scale is not None),
        grid=(batch, heads, seq // cfg.block),
        in_specs=specs + [chunk(dk), chunk(dk), chunk(dv), chunk(dv),
                          pl.BlockSpec((None, None, None, dk, dv), state_index)],
        out_specs=chunk(dk),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="linear_attention_dq",
    )(*extras, q, k, v, do, states)


def _dq_kernel(*refs, cfg, scaled):
    refs = list(refs)
    n_ref = refs.pop(0)
    scale_ref = refs.pop(0) if scaled else None
    q_ref, k_ref, v_ref, do_ref, p_ref, dq_ref = refs
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    dt = v_ref.dtype
    valid = _valid(c, cfg.block, n_ref[b])
    do = jnp.where(valid, do_ref[...].astype(jnp.float32), 0.0)
    if scale_ref is not None:
        do = do * scale_ref[b, h]
    dpq = plgpu.dot(do.astype(dt), p_ref[...], trans_b=True)
    if cfg.causal:
        pk = _phi(k_ref[...], valid, cfg.kind, 1.0)
        vv = jnp.where(valid, v_ref[...], 0).astype(dt)
        dov = jnp.where(_tril(cfg.block), plgpu.dot(do.astype(dt), vv, trans_b=True), 0.0)
        dpq = dpq + plgpu.dot(dov.astype(dt), pk.astype(dt))
    xq = q_ref[...].astype(jnp.float32)
    dq_ref[...] = jnp.where(valid, _feature_map_vjp(xq, dpq * cfg.q_factor, cfg.kind), 0.0).astype(dq_ref.dtype)


def _dkv(q, k, v, do, n, scale, cfg):
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    specs, extras = _extras(n, scale)
    whole = lambda d: _whole(seq, d, lambda b, h: (b, 0, h, 0))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, chunks=seq // cfg.block, scaled=scale is not None),
        grid=(batch, heads),
        in_specs=specs + [whole(dk), whole(dk), whole(dv), whole(dv)],
        out_specs=[whole(dk), whole(dv)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="linear_attention_dkv",
    )(*extras, q, k, v, do)


def _dkv_kernel(*refs, cfg, chunks, scaled):
    refs = list(refs)
    n_ref = refs.pop(0)
    scale_ref = refs.pop(0) if scaled else None
    q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref = refs
    b, h = pl.program_id(0), pl.program_id(1)
    n = n_ref[b]
    a = scale_ref[b, h] if scaled else 1.0
    dt = v_ref.dtype
    live = lax.div(n + cfg.block - 1, cfg.block)
    tril = _tril(cfg.block)

    def tiles(c):
        rows = pl.ds(c * cfg.block, cfg.block)
        valid = _valid(c, cfg.block, n)
        pq = _phi(q_ref[rows, :], valid, cfg.kind, cfg.q_factor)
        do = (jnp.where(valid, do_ref[rows, :].astype(jnp.float32), 0.0) * a).astype(dt)
        return rows, valid, pq, do

    def add_state(c, state):
        _, _, pq, do = tiles(c)
        return state + plgpu.dot(pq.astype(dt), do, trans_a=True)

    zero = jnp.zeros((q_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    total = zero if cfg.causal else lax.fori_loop(0, live, add_state, zero)

    def step(i, state):
        c = live - 1 - i  # reverse: R_c holds the chunks after c
        rows, valid, pq, do = tiles(c)
        suffix = (state if cfg.causal else total).astype(dt)
        xk = k_ref[rows, :].astype(jnp.float32)
        pk = jnp.where(valid, apply_feature_map(xk, cfg.kind), 0.0)
        vv = jnp.where(valid, v_ref[rows, :], 0).astype(dt)
        dpk = plgpu.dot(vv, suffix, trans_b=True)
        dv = plgpu.dot(pk.astype(dt), suffix)
        if cfg.causal:
            dov = jnp.where(tril, plgpu.dot(do, vv, trans_b=True), 0.0)
            dpk = dpk + plgpu.dot(dov.astype(dt), pq.astype(dt), trans_a=True)
            scores = jnp.where(tril, plgpu.dot(pq.astype(dt), pk.astype(dt), trans_b=True), 0.0)
            dv = dv + plgpu.dot(scores.astype(dt), do, trans_a=True)
            state = state + plgpu.dot(pq.astype(dt), do, trans_a=True)
        dk_ref[rows, :] = jnp.where(valid, _feature_map_vjp(xk, dpk, cfg.kind), 0.0).astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        return state

    lax.fori_loop(0, live, step, zero)

    def clear(c, carry):
        dk_ref[pl.ds(c * cfg.block, cfg.block), :] = jnp.zeros((cfg.block, dk_ref.shape[-1]), dk_ref.dtype)
        dv_ref[pl.ds(c * cfg.block, cfg.block), :] = jnp.zeros((cfg.block, dv_ref.shape[-1]), dv_ref.dtype)
        return carry

    lax.fori_loop(live, chunks, clear, 0)


def _phi(x, valid, kind, factor):
    """fp32 ``phi(x) * factor`` of a tile, zero on invalid rows."""
    return jnp.where(valid, apply_feature_map(x.astype(jnp.float32), kind) * factor, 0.0)


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
