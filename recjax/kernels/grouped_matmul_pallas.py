"""Grouped matrix multiplication as a Triton-lowered Pallas kernel, forward and backward.

    out[m] = x[m] @ w[g(m)]        x [M, K], w [G, K, N], group_sizes [G] int -> out [M, N]

Rows are sorted by group: group ``g`` owns rows ``offsets[g] .. offsets[g+1]-1`` with
``offsets`` the exclusive cumulative sum of ``group_sizes``. Rows at or after
``sum(group_sizes)`` are zero (the semantics of ``jax.lax.ragged_dot``). Groups may be empty.

Forward tiling. Each group's rows are cut into tiles of ``block_m`` rows starting at the
group's first row, so a tile never straddles two groups: every output row is written by
exactly one program and no tile is computed twice (unlike megablox's ``gmm``, whose tiles are
aligned to ``block_m`` and revisit a tile once per group inside it). Triton loads through
pointers, so a tile may start at any row; rows past the group's end are masked. The number of
tiles is at most ``cdiv(M, block_m) + G`` (each group adds at most one partial tile; the zero
tail counts as one more group), which sizes the grid ``(tiles, cdiv(N, block_n))``; programs
past the last real tile return at once. A per-tile table (group, first row, end row) is
computed with ``jnp`` outside the kernel and read as scalars inside it. Each program runs a
``fori_loop`` over ``cdiv(K, block_k)`` blocks of the contraction, accumulating in fp32.

Grid order: Pallas maps grid dimension 0 to Triton's program id 0, the fastest in launch
order, so the grid is ``(N tiles, row tiles)``: the programs of one row tile run together and
read its ``x`` tile from L2 after the first, and consecutive row tiles of a group share
``w[g]`` (a few MB) in L2, instead of streaming all of ``x`` once per N tile.

Fused SwiGLU (:func:`grouped_swiglu_pallas`): with ``w = [W_gate | W_up]`` ``[G, K, 2F]`` (gate
columns first), each program accumulates the gate and the up tile of its columns and writes
``silu(gate) * up`` in the output dtype, so the ``[M, 2F]`` pre-activation never reaches
memory in the forward pass; under differentiation the forward also stores it in the input
dtype for the backward (``dh`` from it, then the two matmul gradients below).

Backward (``jax.custom_vjp``; ``pallas_call`` has no transpose rule):

- ``dx = dy @ w[g]^T`` per row: the same kernel reading ``w`` transposed (no copy of ``w``);
- ``dw[g] = x_g^T dy_g``, a *transposed grouped matmul*: grid ``(cdiv(N, block_n),
  cdiv(K, block_k), G)``, group-major (all tiles of one group run together and share its rows
  of ``x`` and ``dy`` in L2); each program loops over its group's rows in blocks of
  ``block_m``; empty groups write zeros.

Block sizes are powers of two >= 16 (Triton's ``tl.dot`` minimum; interpret mode does not
check this). The in-kernel ``dot_general`` takes ``precision``: the default runs fp32 inputs
as TF32 on GPU, ``jax.lax.Precision.HIGHEST`` asks for IEEE fp32. ``compiler_params`` is
passed explicitly as ``jax.experimental.pallas.triton.CompilerParams`` (same name and fields,
``num_warps`` and ``num_stages``, on jax 0.10.2 and 0.11.2), which selects the Triton backend
on GPU. jax 0.11 warns that the Pallas Triton backend is deprecated in favour of Mosaic GPU.
Blocks left unset in :class:`GmmConfig` come from the shape (:func:`auto_blocks`): ``block_m``
from the mean group size ``M / G`` (16..128: small groups waste less of a tile), ``block_n``
128 and ``block_k`` 64 where the dims allow, 8 warps for 128 x 128 tiles; a choice by tile
occupancy, not yet tuned on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """Static kernel settings (hashable: a ``custom_vjp`` non-differentiable argument); blocks
    and warps left ``None`` are chosen per call by :func:`auto_blocks`."""

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    num_warps: int | None = None
    num_stages: int = 3
    precision: jax.lax.Precision | None = None
    interpret: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            b = getattr(self, name)
            if b is not None and (b < 16 or b & (b - 1)):
                raise ValueError(
                    f"grouped matmul: {name}={b} must be a power of two >= 16 (Triton)"
                )


def auto_blocks(m: int, k: int, n: int, groups: int) -> tuple[int, int, int, int]:
    """``(block_m, block_n, block_k, num_warps)`` for ``[m, k] x [groups, k, n]``."""
    mean_group = max(1, m // max(groups, 1))
    bm = min(128, max(16, pl.next_power_of_2(mean_group)))
    bn = min(128, max(16, pl.next_power_of_2(n)))
    bk = min(64, max(16, pl.next_power_of_2(k)))
    return bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4


def _blocks(cfg: GmmConfig, m: int, k: int, n: int, groups: int) -> tuple[int, int, int, int]:
    """The configured blocks where set (capped at the power of two covering the dim, >= 16),
    else :func:`auto_blocks`."""
    auto = auto_blocks(m, k, n, groups)
    cap = lambda b, dim: max(16, min(b, pl.next_power_of_2(max(dim, 1))))
    chosen = [cap(b if b is not None else a, dim) for b, a, dim in
              zip((cfg.block_m, cfg.block_n, cfg.block_k), auto[:3], (m, n, k), strict=True)]
    return (*chosen, cfg.num_warps or auto[3])


def _compiler_params(cfg: GmmConfig, warps: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


def _tile_table(group_sizes: jax.Array, m: int, bm: int) -> tuple[jax.Array, ...]:
    """Per-tile (group, first row, end row) for ``cdiv(m, bm) + G`` tile slots.

    Group ``G`` is the zero tail ``[sum(group_sizes), m)``. Unused slots get an empty row range.
    """
    g = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    sizes = jnp.concatenate([sizes, jnp.maximum(m - jnp.sum(sizes), 0)[None]])
    starts = jnp.cumsum(sizes) - sizes
    tiles = (sizes + bm - 1) // bm
    tile_end = jnp.cumsum(tiles)
    slots = pl.cdiv(m, bm) + g
    t = jnp.arange(slots, dtype=jnp.int32)
    grp = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), g).astype(jnp.int32)
    used = t < tile_end[-1]
    row0 = starts[grp] + (t - (tile_end[grp] - tiles[grp])) * bm
    row_end = starts[grp] + sizes[grp]
    return grp, jnp.where(used, row0, 0), jnp.where(used, row_end, 0)


def _dot(a, b, a_contract: int, b_contract: int, precision) -> jax.Array:
    """2-D ``dot_general`` contracting one dim of each, accumulated in fp32."""
    dims = (((a_contract,), (b_contract,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _gmm_kernel(
    grp_ref,
    row0_ref,
    row_end_ref,
    x_ref,
    w_ref,
    *out_refs,
    num_groups,
    k_dim,
    n_dim,
    bm,
    bn,
    bk,
    transpose_rhs,
    swiglu,
    precision,
):
    j, t = pl.program_id(0), pl.program_id(1)
    g, row0, row_end = grp_ref[t], row0_ref[t], row_end_ref[t]
    rows, cols = pl.ds(row0, bm), pl.ds(j * bn, bn)
    row_ok = row0 + jnp.arange(bm, dtype=jnp.int32) < row_end
    col_ok = j * bn + jnp.arange(bn, dtype=jnp.int32) < n_dim
    out_mask = row_ok[:, None] & col_ok[None, :]
    o_ref = out_refs[0]
    h_ref = out_refs[1] if len(out_refs) > 1 else None  # swiglu: [gate | up] pre-activations

    def load_w(ks, k_ok, offset):
        if transpose_rhs:  # w [G, N, K]: contract its last dim
            return plgpu.load(w_ref.at[g, cols, ks], mask=col_ok[:, None] & k_ok[None, :], other=0)
        cs = pl.ds(offset + j * bn, bn)
        return plgpu.load(w_ref.at[g, ks, cs], mask=k_ok[:, None] & col_ok[None, :], other=0)

    @pl.when((row_end > row0) & (g < num_groups))
    def _compute():
        def body(i, accs):
            ks = pl.ds(i * bk, bk)
            k_ok = i * bk + jnp.arange(bk, dtype=jnp.int32) < k_dim
            a = plgpu.load(x_ref.at[rows, ks], mask=row_ok[:, None] & k_ok[None, :], other=0)
            contract = 1 if transpose_rhs else 0
            # swiglu: the gate columns [0, F) and the up columns [F, 2F) of the same tile
            return tuple(acc + _dot(a, load_w(ks, k_ok, part * n_dim), 1, contract, precision)
                         for part, acc in enumerate(accs))

        zeros = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in range(2 if swiglu else 1))
        accs = jax.lax.fori_loop(0, pl.cdiv(k_dim, bk), body, zeros)
        if swiglu:
            gate, up = accs
            plgpu.store(o_ref.at[rows, cols], (jax.nn.silu(gate) * up).astype(o_ref.dtype), mask=out_mask)
            if h_ref is not None:
                plgpu.store(h_ref.at[rows, cols], gate.astype(h_ref.dtype), mask=out_mask)
                plgpu.store(h_ref.at[rows, pl.ds(n_dim + j * bn, bn)], up.astype(h_ref.dtype), mask=out_mask)
        else:
            plgpu.store(o_ref.at[rows, cols], accs[0].astype(o_ref.dtype), mask=out_mask)

    @pl.when((row_end > row0) & (g == num_groups))
    def _zero_tail():
        zero = jnp.zeros((bm, bn), o_ref.dtype)
        plgpu.store(o_ref.at[rows, cols], zero, mask=out_mask)
        if h_ref is not None:
            plgpu.store(h_ref.at[rows, cols], zero.astype(h_ref.dtype), mask=out_mask)
            plgpu.store(h_ref.at[rows, pl.ds(n_dim + j * bn, bn)], zero.astype(h_ref.dtype), mask=out_mask)


def _gmm_call(x, w, group_sizes, out_dtype, cfg: GmmConfig, *, transpose_rhs: bool, swiglu: bool = False,
              save_pre_activation: bool = False):
    """``out[m] = x[m] @ w[g(m)]`` (``w [G, K, N]``), or ``x[m] @ w[g(m)].T`` (``w [G, N, K]``);
    ``swiglu``: ``w [G, K, 2F]`` and ``out = silu(x W_gate) * (x W_up)`` ``[M, F]`` (plus the
    ``[M, 2F]`` pre-activation in ``x.dtype`` if ``save_pre_activation``)."""
    m, k_dim = x.shape
    g = w.shape[0]
    n_dim = w.shape[1] if transpose_rhs else w.shape[2]
    if swiglu:
        n_dim //= 2
    bm, bn, bk, warps = _blocks(cfg, m, k_dim, n_dim, g)
    table = _tile_table(group_sizes, m, bm)
    kernel = functools.partial(
        _gmm_kernel,
        num_groups=g,
        k_dim=k_dim,
        n_dim=n_dim,
        bm=bm,
        bn=bn,
        bk=bk,
        transpose_rhs=transpose_rhs,
        swiglu=swiglu,
        precision=cfg.precision,
    )
    out_shape = [jax.ShapeDtypeStruct((m, n_dim), out_dtype)]
    if save_pre_activation:
        out_shape.append(jax.ShapeDtypeStruct((m, 2 * n_dim), x.dtype))
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n_dim, bn), table[0].shape[0]),
        compiler_params=_compiler_params(cfg, warps),
        interpret=cfg.interpret,
        name="grouped_swiglu" if swiglu else "grouped_matmul_t" if transpose_rhs else "grouped_matmul",
    )(*table, x, w)
    return outs if save_pre_activation else outs[0]


def _tgmm_kernel(start_ref, size_ref, x_ref, dy_ref, o_ref, *, k_dim, n_dim, bm, bk, bn, precision):
    c, r, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, size = start_ref[g], size_ref[g]
    ks, cols = pl.ds(r * bk, bk), pl.ds(c * bn, bn)
    k_ok = r * bk + jnp.arange(bk, dtype=jnp.int32) < k_dim
    col_ok = c * bn + jnp.arange(bn, dtype=jnp.int32) < n_dim

    def body(i, acc):
        rows = pl.ds(start + i * bm, bm)
        row_ok = i * bm + jnp.arange(bm, dtype=jnp.int32) < size
        a = plgpu.load(x_ref.at[rows, ks], mask=row_ok[:, None] & k_ok[None, :], other=0)
        b = plgpu.load(dy_ref.at[rows, cols], mask=row_ok[:, None] & col_ok[None, :], other=0)
        return acc + _dot(a, b, 0, 0, precision)

    acc = jax.lax.fori_loop(0, pl.cdiv(size, bm), body, jnp.zeros((bk, bn), jnp.float32))
    plgpu.store(
        o_ref.at[g, ks, cols], acc.astype(o_ref.dtype), mask=k_ok[:, None] & col_ok[None, :]
    )


def transposed_grouped_matmul(x, dy, group_sizes, out_dtype, cfg: GmmConfig) -> jax.Array:
    """``out[g] = x_g^T @ dy_g`` for ``x [M, K]``, ``dy [M, N]`` -> ``[G, K, N]`` (0 if empty)."""
    m, k_dim = x.shape
    n_dim = dy.shape[1]
    g = group_sizes.shape[0]
    bm, bn, bk, warps = _blocks(cfg, m, k_dim, n_dim, g)
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    kernel = functools.partial(
        _tgmm_kernel, k_dim=k_dim, n_dim=n_dim, bm=bm, bk=bk, bn=bn, precision=cfg.precision
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g, k_dim, n_dim), out_dtype),
        grid=(pl.cdiv(n_dim, bn), pl.cdiv(k_dim, bk), g),
        compiler_params=_compiler_params(cfg, warps),
        interpret=cfg.interpret,
        name="transposed_grouped_matmul",
    )(starts, sizes, x, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x, w, group_sizes, out_dtype, cfg):
    return _gmm_call(x, w, group_sizes, out_dtype, cfg, transpose_rhs=False)


def _gmm_fwd(x, w, group_sizes, out_dtype, cfg):
    return _gmm(x, w, group_sizes, out_dtype, cfg), (x, w, group_sizes)


def _gmm_bwd(out_dtype, cfg, res, dy):
    x, w, group_sizes = res
    dy = dy.astype(x.dtype)  # the kernels take one input dtype; accumulation stays fp32
    dx = _gmm_call(dy, w, group_sizes, x.dtype, cfg, transpose_rhs=True)
    dw = transposed_grouped_matmul(x, dy, group_sizes, w.dtype, cfg)
    return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_swiglu(x, w, group_sizes, out_dtype, cfg):
    return _gmm_call(x, w, group_sizes, out_dtype, cfg, transpose_rhs=False, swiglu=True)


def _gmm_swiglu_fwd(x, w, group_sizes, out_dtype, cfg):
    out, h = _gmm_call(x, w, group_sizes, out_dtype, cfg, transpose_rhs=False, swiglu=True,
                       save_pre_activation=True)
    return out, (x, w, group_sizes, h)


def _gmm_swiglu_bwd(out_dtype, cfg, res, da):
    x, w, group_sizes, h = res
    f = h.shape[1] // 2
    gate, up, da = h[:, :f].astype(jnp.float32), h[:, f:].astype(jnp.float32), da.astype(jnp.float32)
    sig = jax.nn.sigmoid(gate)
    dgate = da * up * sig * (1.0 + gate * (1.0 - sig))  # d silu(g) / dg = sig (1 + g (1 - sig))
    dh = jnp.concatenate([dgate, da * gate * sig], axis=1).astype(x.dtype)
    dx = _gmm_call(dh, w, group_sizes, x.dtype, cfg, transpose_rhs=True)
    dw = transposed_grouped_matmul(x, dh, group_sizes, w.dtype, cfg)
    return dx, dw, None


_gmm_swiglu.defvjp(_gmm_swiglu_fwd, _gmm_swiglu_bwd)


def grouped_swiglu_pallas(
    x: jax.Array,
    w_gate_up: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    cfg: GmmConfig = GmmConfig(),
) -> jax.Array:
    """``silu(x[m] @ W_gate[g]) * (x[m] @ W_up[g])`` for ``x [M, K]`` and ``w_gate_up [G, K, 2F]``
    (gate columns first) -> ``[M, F]`` in ``preferred_element_type`` (default ``x.dtype``), fused
    in one kernel (see module doc); rows past ``sum(group_sizes)`` are zero."""
    _check_shapes("grouped swiglu", x, w_gate_up, group_sizes, "2F")
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    if x.shape[0] == 0:
        return jnp.zeros((0, w_gate_up.shape[2] // 2), out_dtype)
    return _gmm_swiglu(x, w_gate_up.astype(x.dtype), group_sizes, out_dtype, cfg)


def grouped_matmul_pallas(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    cfg: GmmConfig = GmmConfig(),
) -> jax.Array:
    """Differentiable Pallas grouped matmul ``x [M, K] @ w[g] [K, N] -> [M, N]`` (see module doc).

    ``x`` and ``w`` are multiplied in ``x.dtype`` with fp32 accumulation; the output has
    ``preferred_element_type`` (default ``x.dtype``). Gradients: ``x`` and ``w`` (none for
    ``group_sizes``). Runs on GPU, or anywhere with ``cfg.interpret=True``.
    """
    _check_shapes("grouped matmul", x, w, group_sizes, "N")
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    if x.shape[0] == 0:
        return jnp.zeros((0, w.shape[2]), out_dtype)
    return _gmm(x, w.astype(x.dtype), group_sizes, out_dtype, cfg)


def _check_shapes(op: str, x, w, group_sizes, cols: str) -> None:
    """``x [M, K]``, ``w [G, K, cols]`` (``2F``: even), ``group_sizes [G]``."""
    odd = cols == "2F" and w.ndim == 3 and w.shape[2] % 2
    if x.ndim != 2 or w.ndim != 3 or odd or group_sizes.shape != (w.shape[0],):
        raise ValueError(
            f"{op}: expected x [M, K], w [G, K, {cols}], group_sizes [G]; got x {x.shape}, "
            f"w {w.shape}, group_sizes {group_sizes.shape}"
        )
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: x has K={x.shape[1]} but w has K={w.shape[1]}")
