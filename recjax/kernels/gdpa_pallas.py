"""Pallas (Triton) kernels for GDPA, forward and backward under ``jax.custom_vjp``.

Flash-style tiling without the running maximum: GDPA has no softmax, so a query block's output
is a plain sum over key blocks and nothing is rescaled. With ``S = q k^T`` (one query block x
one key block), ``m`` the mask of ``gdpa`` and ``a = scale``::

    _forward_kernel  grid (b, hq, query block): o   = sum_j (m * act(S) a) v[j]
    _dq_kernel       grid (b, hq, query block): dS  = m * (do v[j]^T) * a * act'(S)
                                                dq  = sum_j dS k[j]
    _dkv_kernel      grid (b, hkv, key block):  dv  = sum_{g, i} (m * act(S) a)^T do[i, g]
                                                dk  = sum_{g, i} dS^T q[i, g]

The dk/dv kernel loops over the ``hq / hkv`` query heads sharing its kv head (GQA/MQA), so
no per-query-head copy of dk, dv is written. Each program visits only the key (or query)
blocks its window, causality and the row's lengths can reach. The dots take tiles in the
input dtype (bf16 inputs: bf16 tensor-core products) with fp32 accumulation; scores and
activations stay fp32 in registers; nothing but the output is stored by the forward (the
backward recomputes ``S``).

Triton rules kept by construction: blocks are powers of two >= 16; head dims are zero-padded
to the next power of two >= 16 (zero columns change no product); both sequences are
zero-padded to multiples of their blocks and masked through the lengths. Block sizes, warps
and stages come from :data:`TUNING` by padded head dim; not yet measured on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from recjax.kernels.gdpa import activation, activation_grad, erf_approx

# padded head dim -> (query block, key block, warps, pipeline stages)
TUNING = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 3), 128: (64, 32, 4, 2), 256: (32, 32, 8, 2)}


@dataclasses.dataclass(frozen=True)
class _Config:
    kind: str
    scale: float
    window: int | None
    causal: bool
    block_q: int
    block_k: int
    warps: int
    stages: int
    interpret: bool


def gdpa_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    nq: jax.Array,
    nkv: jax.Array,
    *,
    activation: str,
    scale: float,
    window: int | None,
    causal: bool,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pads to Triton-friendly shapes, runs the kernels, slices back.

    ``q [B, Tq, Hq, d]``, ``k [B, Tk, Hkv, d]``, ``v [B, Tk, Hkv, dv]``, ``nq``/``nkv`` int32
    ``[B]`` valid lengths. Returns ``[B, Tq, Hq, dv]``.
    """
    _, tq, _, d = q.shape
    tk, dv = k.shape[1], v.shape[-1]
    d_p, dv_p = (max(16, pl.next_power_of_2(x)) for x in (d, dv))
    bq, bk, warps, stages = TUNING[min(max(d_p, dv_p), 256)]
    bq = block_q or min(bq, max(16, pl.next_power_of_2(tq)))
    bk = block_k or min(bk, max(16, pl.next_power_of_2(tk)))
    tq_p, tk_p = pl.cdiv(tq, bq) * bq, pl.cdiv(tk, bk) * bk

    def pad(x, t_p, d_p):
        return jnp.pad(x, ((0, 0), (0, t_p - x.shape[1]), (0, 0), (0, d_p - x.shape[-1])))

    cfg = _Config(activation, float(scale), window, causal, bq, bk, warps, stages, interpret)
    q, k = q.astype(v.dtype), k.astype(v.dtype)  # one tile dtype for every dot
    out = _gdpa(pad(q, tq_p, d_p), pad(k, tk_p, d_p), pad(v, tk_p, dv_p), nq, nkv, cfg)
    return out[:, :tq, :, :dv]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gdpa(q, k, v, nq, nkv, cfg):
    return _forward(q, k, v, nq, nkv, cfg)


def _gdpa_fwd(q, k, v, nq, nkv, cfg):
    return _forward(q, k, v, nq, nkv, cfg), (q, k, v, nq, nkv)


def _gdpa_bwd(cfg, residuals, do):
    q, k, v, nq, nkv = residuals
    dq = _dq(q, k, v, do, nq, nkv, cfg)
    dk, dv = _dkv(q, k, v, do, nq, nkv, cfg)
    return dq, dk, dv, None, None


_gdpa.defvjp(_gdpa_fwd, _gdpa_bwd)


def _compiler_params(cfg) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=cfg.warps, num_stages=cfg.stages)


def _lengths_specs(batch):
    """Whole-array specs of the two ``[batch]`` length inputs."""
    return [pl.BlockSpec((batch,), lambda *g: (0,))] * 2


def _key_range(c, cfg, nkv):
    """Key blocks ``[lo, hi)`` that query block ``c`` can reach."""
    lo, hi = 0, lax.div(nkv + cfg.block_k - 1, cfg.block_k)
    first, last = c * cfg.block_q, (c + 1) * cfg.block_q - 1  # query rows of the block
    if cfg.window is not None:
        lo = jnp.maximum(first - cfg.window, 0) // cfg.block_k
        hi = jnp.minimum(hi, (last + cfg.window) // cfg.block_k + 1)
    if cfg.causal:
        hi = jnp.minimum(hi, last // cfg.block_k + 1)
    return lo, hi


def _query_range(j, cfg, nq):
    """Query blocks ``[lo, hi)`` that key block ``j`` can reach."""
    lo, hi = 0, lax.div(nq + cfg.block_q - 1, cfg.block_q)
    first, last = j * cfg.block_k, (j + 1) * cfg.block_k - 1  # key rows of the block
    if cfg.window is not None:
        hi = jnp.minimum(hi, (last + cfg.window) // cfg.block_q + 1)
        lo = jnp.maximum(first - cfg.window, 0) // cfg.block_q
    if cfg.causal:
        lo = jnp.maximum(lo, first // cfg.block_q)
    return lo, hi


def _keep(c, j, cfg, nq, nkv):
    """The ``[block_q, block_k]`` mask of query block ``c`` against key block ``j``."""
    t = (c * cfg.block_q + jnp.arange(cfg.block_q))[:, None]
    s = (j * cfg.block_k + jnp.arange(cfg.block_k))[None, :]
    keep = (t < nq) & (s < nkv)
    if cfg.window is not None:
        keep &= jnp.abs(t - s) <= cfg.window
    if cfg.causal:
        keep &= s <= t
    return keep


def _forward(q, k, v, nq, nkv, cfg):
    batch, tq, hq, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    block = lambda rows, d: pl.BlockSpec((None, rows, None, d), lambda b, h, c: (b, c, h, 0))
    whole = lambda d: pl.BlockSpec((None, tk, None, d), lambda b, h, c: (b, 0, h // group, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=(batch, hq, tq // cfg.block_q),
        in_specs=_lengths_specs(batch) + [block(cfg.block_q, d), whole(d), whole(dv)],
        out_specs=block(cfg.block_q, dv),
        out_shape=jax.ShapeDtypeStruct((batch, tq, hq, dv), v.dtype),
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="gdpa_fwd",
    )(nq, nkv, q, k, v)


def _forward_kernel(nq_ref, nkv_ref, q_ref, k_ref, v_ref, o_ref, *, cfg):
    b, c = pl.program_id(0), pl.program_id(2)
    nq, nkv = nq_ref[b], nkv_ref[b]
    dt = v_ref.dtype
    qb = q_ref[...]

    def step(j, acc):
        cols = pl.ds(j * cfg.block_k, cfg.block_k)
        scores = plgpu.dot(qb, k_ref[cols, :], trans_b=True)
        p = jnp.where(_keep(c, j, cfg, nq, nkv), activation(scores, cfg.kind, erf_approx) * cfg.scale, 0.0)
        return acc + plgpu.dot(p.astype(dt), v_ref[cols, :])

    lo, hi = _key_range(c, cfg, nkv)
    acc = lax.fori_loop(lo, hi, step, jnp.zeros((cfg.block_q, v_ref.shape[-1]), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _dq(q, k, v, do, nq, nkv, cfg):
    batch, tq, hq, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    block = lambda d: pl.BlockSpec((None, cfg.block_q, None, d), lambda b, h, c: (b, c, h, 0))
    whole = lambda d: pl.BlockSpec((None, tk, None, d), lambda b, h, c: (b, 0, h // group, 0))
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(batch, hq, tq // cfg.block_q),
        in_specs=_lengths_specs(batch) + [block(d), whole(d), whole(dv), block(dv)],
        out_specs=block(d),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="gdpa_dq",
    )(nq, nkv, q, k, v, do)


def _dq_kernel(nq_ref, nkv_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, *, cfg):
    b, c = pl.program_id(0), pl.program_id(2)
    nq, nkv = nq_ref[b], nkv_ref[b]
    dt = v_ref.dtype
    qb, dob = q_ref[...], do_ref[...]

    def step(j, acc):
        cols = pl.ds(j * cfg.block_k, cfg.block_k)
        kb = k_ref[cols, :]
        scores = plgpu.dot(qb, kb, trans_b=True)
        dp = plgpu.dot(dob, v_ref[cols, :], trans_b=True)
        ds = jnp.where(_keep(c, j, cfg, nq, nkv), dp * cfg.scale * activation_grad(scores, cfg.kind, erf_approx), 0.0)
        return acc + plgpu.dot(ds.astype(dt), kb)

    lo, hi = _key_range(c, cfg, nkv)
    acc = lax.fori_loop(lo, hi, step, jnp.zeros((cfg.block_q, q_ref.shape[-1]), jnp.float32))
    dq_ref[...] = acc.astype(dq_ref.dtype)


def _dkv(q, k, v, do, nq, nkv, cfg):
    batch, tq, hq, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    block = lambda d: pl.BlockSpec((None, cfg.block_k, None, d), lambda b, h, j: (b, j, h, 0))
    # the query heads h * group ... (h + 1) * group - 1 of kv head h, whole sequence
    heads = lambda d: pl.BlockSpec((None, tq, group, d), lambda b, h, j: (b, 0, h, 0))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, group=group),
        grid=(batch, hkv, tk // cfg.block_k),
        in_specs=_lengths_specs(batch) + [heads(d), block(d), block(dv), heads(dv)],
        out_specs=[block(d), block(dv)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="gdpa_dkv",
    )(nq, nkv, q, k, v, do)


def _dkv_kernel(nq_ref, nkv_ref, q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref, *, cfg, group):
    b, j = pl.program_id(0), pl.program_id(2)
    nq, nkv = nq_ref[b], nkv_ref[b]
    dt = v_ref.dtype
    kb, vb = k_ref[...], v_ref[...]
    lo, hi = _query_range(j, cfg, nq)
    dk = jnp.zeros((cfg.block_k, k_ref.shape[-1]), jnp.float32)
    dv = jnp.zeros((cfg.block_k, v_ref.shape[-1]), jnp.float32)
    for g in range(group):  # static: the query heads sharing this kv head

        def step(i, acc, g=g):
            dk, dv = acc
            rows = pl.ds(i * cfg.block_q, cfg.block_q)
            qb, dob = q_ref[rows, g, :], do_ref[rows, g, :]
            keep = _keep(i, j, cfg, nq, nkv)
            scores = plgpu.dot(qb, kb, trans_b=True)
            p = jnp.where(keep, activation(scores, cfg.kind, erf_approx) * cfg.scale, 0.0)
            dp = plgpu.dot(dob, vb, trans_b=True)
            ds = jnp.where(keep, dp * cfg.scale * activation_grad(scores, cfg.kind, erf_approx), 0.0)
            dv = dv + plgpu.dot(p.astype(dt), dob, trans_a=True)
            dk = dk + plgpu.dot(ds.astype(dt), qb, trans_a=True)
            return dk, dv

        dk, dv = lax.fori_loop(lo, hi, step, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
