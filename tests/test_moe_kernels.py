"""MoE kernels: routing, permutation, grouped matmul (every impl) and moe_ffn vs references.

Tolerances, as max |error| / max |expected|: fp32 forward 1e-5 (1e-4 for Pallas interpret,
whose blocked accumulation order differs); fp32 gradients 1e-5 for moe_ffn and 1e-4 for the
grouped matmul and for interpret; bf16 1e-2 against float64 numpy on the bf16-rounded inputs
(an 8-bit mantissa: one output rounding is <= 2^-9 relative, plus differing accumulation
orders); on GPU 1e-2 / 2e-2, because fp32 Pallas dots run as TF32 there.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax.kernels import moe as moe_mod
from recjax.kernels.grouped_matmul_pallas import GmmConfig, grouped_matmul_pallas
from recjax.kernels.moe import (
    grouped_matmul,
    moe_ffn,
    moe_ffn_flops,
    permute,
    route,
    unpermute,
)
from tests.conftest import run_python

SMALL_BLOCKS = GmmConfig(block_m=16, block_n=16, block_k=16)
on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
# jitted: one compile per shape instead of one per eager op (much faster on 2 cores)
route_j = jax.jit(route, static_argnums=1, static_argnames="gate")
permute_j, unpermute_j = jax.jit(permute), jax.jit(unpermute)


def _rand(rng, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _close(actual, expected, rel):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-6)
    err = np.abs(actual - expected).max() / scale
    assert err <= rel, f"max error {err:.3g} (relative to {scale:.3g}) > {rel}"


# ----------------------------------------------------------------------------------- routing


def test_route_topk_gates_and_group_sizes():
    rng = np.random.default_rng(0)
    logits = _rand(rng, (3, 10, 6))
    r = route_j(logits, 2)
    assert r.weights.shape == r.expert_ids.shape == (3, 10, 2)
    np.testing.assert_array_equal(r.group_sizes.sum(-1), [20, 20, 20])
    counts = np.stack([np.bincount(np.asarray(ids).ravel(), minlength=6) for ids in r.expert_ids])
    np.testing.assert_array_equal(r.group_sizes, counts)
    top = np.sort(np.asarray(logits), -1)[..., ::-1][..., :2]
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(logits), np.asarray(r.expert_ids), -1), top
    )
    np.testing.assert_allclose(
        r.weights, np.exp(top) / np.exp(top).sum(-1, keepdims=True), rtol=1e-6
    )
    np.testing.assert_allclose(route_j(logits, 2, gate="relu").weights, np.maximum(top, 0))
    np.testing.assert_allclose(r.stats["expert_fraction"].sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(r.stats["router_prob"].sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="k=7 must be between 1"):
        route_j(logits, 7)
    with pytest.raises(ValueError, match="gate must be"):
        route_j(logits, 1, gate="sigmoid")


def test_load_balance_loss_hand_computed():
    # token 0: softmax [3/4, 1/4], top-1 expert 0; token 1: [1/2, 1/2], tie -> expert 0
    # f = [1, 0], P = [(3/4 + 1/2)/2, (1/4 + 1/2)/2] = [5/8, 3/8]; loss = 2 * 5/8 = 1.25
    logits = jnp.array([[np.log(3.0), 0.0], [0.0, 0.0]])
    st = route_j(logits, 1).stats
    np.testing.assert_allclose(st["expert_fraction"], [1.0, 0.0])
    np.testing.assert_allclose(st["router_prob"], [0.625, 0.375], rtol=1e-6)
    np.testing.assert_allclose(st["load_balance_loss"], 1.25, rtol=1e-6)
    # balanced assignments and uniform mean probability: exactly 1
    balanced = route_j(jnp.array([[1.0, 0.0], [0.0, 1.0]]), 1).stats["load_balance_loss"]
    np.testing.assert_allclose(balanced, 1.0, rtol=1e-6)
    # P carries the gradient: d loss / d logits[n, e] = E * sum_e' f_e' dP_e'/dlogits[n, e]
    grad = jax.jit(jax.grad(lambda lg: route(lg, 1).stats["load_balance_loss"]))(logits)
    p = np.array([[0.75, 0.25], [0.5, 0.5]])
    expected = 2 * np.array([1.0, 0.0]) @ np.stack([np.diag(q) - np.outer(q, q) for q in p]) / 2
    np.testing.assert_allclose(grad, expected, rtol=1e-5)
    no_grad = jax.jit(jax.grad(lambda lg: route(lg, 1).stats["router_prob"].sum()))(logits)
    np.testing.assert_array_equal(no_grad, 0.0)


# ------------------------------------------------------------------------- permute/unpermute


def test_permute_sorts_by_expert_and_unpermute_inverts():
    rng = np.random.default_rng(1)
    x = _rand(rng, (9, 5))
    r = route_j(_rand(rng, (9, 4)), 3)
    xs, perm = permute_j(x, r.expert_ids)
    sorted_ids = np.asarray(r.expert_ids).ravel()[np.asarray(perm.order)]
    assert np.all(np.diff(sorted_ids) >= 0)
    np.testing.assert_array_equal(np.bincount(sorted_ids, minlength=4), r.group_sizes)
    np.testing.assert_array_equal(xs, np.asarray(x)[np.asarray(perm.order) // 3])
    # each token's 3 copies come back: ones-weights give 3 x; k = 1 is an exact round trip
    np.testing.assert_allclose(
        unpermute_j(xs, perm, jnp.ones((9, 3))), 3 * np.asarray(x), rtol=1e-6
    )
    xs1, perm1 = permute_j(x, r.expert_ids[:, :1])
    np.testing.assert_array_equal(unpermute_j(xs1, perm1, jnp.ones((9, 1))), x)
    with pytest.raises(ValueError, match="expected x \\[N, D\\]"):
        permute(x[None], r.expert_ids)


def test_permute_unpermute_gradients_match_autodiff_of_gathers():
    rng = np.random.default_rng(2)
    x, ids = _rand(rng, (7, 4)), route_j(_rand(rng, (7, 5)), 2).expert_ids
    weights, cot = _rand(rng, (7, 2)), _rand(rng, (7, 4))

    def ours(x, w):
        xs, perm = permute(x, ids)
        return jnp.sum(unpermute(jnp.sin(xs), perm, w) * cot)

    def plain(x, w):
        _, perm = permute(x, ids)
        xs = jnp.sin(x[perm.order // 2])
        return jnp.sum(jnp.einsum("nkd,nk->nd", xs[perm.inverse].reshape(7, 2, 4), w) * cot)

    grads = [jax.jit(jax.grad(fn, (0, 1)))(x, weights) for fn in (ours, plain)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- grouped matmul


def _np_gmm(x, w, sizes):
    x, w = (
        np.asarray(jnp.asarray(x, jnp.float32), np.float64),
        np.asarray(jnp.asarray(w, jnp.float32), np.float64),
    )
    out, start = np.zeros((x.shape[0], w.shape[2])), 0
    for g, s in enumerate(sizes):
        out[start : start + s] = x[start : start + s] @ w[g]
        start += s
    return out


def _random_gmm_case(seed):
    """Random (M, K, N, sizes): 1-6 groups, about a third of them empty, a zero tail at times."""
    rng = np.random.default_rng(seed)
    g = int(rng.integers(1, 7))
    sizes = rng.integers(0, 30, g) * (rng.random(g) > 0.35)
    m = int(sizes.sum() + rng.integers(0, 2) * rng.integers(1, 9))
    return max(m, 1), int(rng.integers(1, 50)), int(rng.integers(1, 50)), sizes.tolist()


GMM_CASES = [  # (M, K, N, group sizes): empty groups, sizes off the block, a zero tail
    (37, 24, 40, [0, 10, 0, 27]),
    (50, 33, 17, [5, 0, 0, 20, 13]),
    _random_gmm_case(11),
    _random_gmm_case(13),
]
GMM_IMPLS = ["reference", "xla", "tokamax", "interpret"]  # tokamax: its XLA path on CPU


@pytest.mark.parametrize("impl", GMM_IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_matmul_matches_per_expert_loop(impl, dtype):
    rng = np.random.default_rng(3)
    for m, k, n, sizes in GMM_CASES:
        x, w = _rand(rng, (m, k), dtype), _rand(rng, (len(sizes), k, n), dtype)
        gs = jnp.asarray(sizes, jnp.int32)
        out = jax.jit(functools.partial(grouped_matmul, impl=impl, cfg=SMALL_BLOCKS))(x, w, gs)
        assert out.dtype == jnp.dtype(dtype) and out.shape == (m, n)
        rel = {"float32": 1e-4 if impl == "interpret" else 1e-5, "bfloat16": 1e-2}[dtype]
        _close(out, _np_gmm(x, w, sizes), rel)


@pytest.mark.parametrize("impl", GMM_IMPLS)
def test_grouped_matmul_gradients(impl):
    rng = np.random.default_rng(4)
    m, k, n, sizes = GMM_CASES[1]
    x, w, cot = _rand(rng, (m, k)), _rand(rng, (len(sizes), k, n)), _rand(rng, (m, n))
    gs = jnp.asarray(sizes, jnp.int32)
    loss = lambda x, w: jnp.sum(grouped_matmul(x, w, gs, impl=impl, cfg=SMALL_BLOCKS) * cot)
    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    # dx = cot @ w[g]^T per row (zero on the tail); dw[g] = x_g^T cot_g (zero for empty groups)
    exp_dx = _np_gmm(cot, np.swapaxes(np.asarray(w), 1, 2), sizes)
    ends = np.cumsum(sizes)
    exp_dw = np.stack(
        [
            np.asarray(x, np.float64)[e - s : e].T @ np.asarray(cot, np.float64)[e - s : e]
            for s, e in zip(sizes, ends, strict=True)
        ]
    )
    _close(dx, exp_dx, 1e-4)
    _close(dw, exp_dw, 1e-4)
    np.testing.assert_array_equal(dw[1], 0.0)


def test_pallas_kernels_lower_to_triton():
    """The real (non-interpret) kernels lower to Triton custom calls for a CUDA target."""
    sds = jax.ShapeDtypeStruct
    gmm_args = (sds((300, 96), jnp.bfloat16), sds((5, 96, 200), jnp.bfloat16), sds((5,), jnp.int32))
    fwd = lambda x, w, g: grouped_matmul_pallas(x, w, g, preferred_element_type=jnp.float32)
    bwd = jax.grad(lambda x, w, g: fwd(x, w, g).sum(), (0, 1))
    # moe_ffn on bf16 tokens with fp32 parameters, P=4 sets folded into 4*8 groups
    params = [(4, 32, 8), (4, 8, 32, 2, 48), (4, 8, 48, 32)]
    moe_args = [sds((4, 64, 32), jnp.bfloat16), *(sds(s, jnp.float32) for s in params)]
    moe = lambda *a: moe_ffn(*a, 2, impl="pallas")[0].astype(jnp.float32).sum()
    moe_grad = jax.grad(moe, argnums=tuple(range(4)))
    ctx = contextlib.nullcontext()
    if hasattr(jax.sharding, "AbstractDevice"):  # jax >= 0.11: name the GPU to lower for
        dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
        ctx = jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
        )
    # backward of one grouped matmul: dx kernel + transposed (dw) kernel; moe_ffn: the fused
    # gate/up SwiGLU kernel and the down grouped matmul forward; with the backward, the fused
    # kernel (also saving its pre-activation), the down matmul, and dx + dw kernels for each
    cases = ((fwd, gmm_args, 1), (bwd, gmm_args, 2), (moe, moe_args, 2), (moe_grad, moe_args, 6))
    with ctx:
        for fn, args, calls in cases:
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("__gpu$xla.gpu.triton") == calls


def test_grouped_matmul_with_one_implementation_per_pass():
    """impl=(forward, dx, dw): the forward of one implementation and each gradient from another
    give the single-implementation results."""
    rng = np.random.default_rng(5)
    m, k, n, sizes = GMM_CASES[0]
    x, w, cot = _rand(rng, (m, k)), _rand(rng, (len(sizes), k, n)), _rand(rng, (m, n))
    gs = jnp.asarray(sizes, jnp.int32)

    def grads(impl):
        loss = lambda x, w: jnp.sum(grouped_matmul(x, w, gs, impl=impl, cfg=SMALL_BLOCKS) * cot)
        return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)

    (l0, (dx0, dw0)), (l1, (dx1, dw1)) = grads("reference"), grads(("xla", "interpret", "tokamax"))
    _close(l1, l0, 1e-5)
    _close(dx1, dx0, 1e-4)
    _close(dw1, dw0, 1e-4)
    with pytest.raises(ValueError, match="per-pass impl"):
        grouped_matmul(x, w, gs, impl=("xla", "xla"))


def test_auto_blocks_follow_the_mean_group_size():
    from recjax.kernels.grouped_matmul_pallas import auto_blocks

    assert auto_blocks(16384 * 2, 512, 1024, 8) == (128, 128, 64, 8)  # large groups: big tiles
    assert auto_blocks(4096, 512, 1024, 256) == (16, 128, 64, 4)  # 16 rows per group
    assert auto_blocks(100, 24, 40, 4) == (32, 64, 32, 4)  # capped at the dims' powers of two


def test_grouped_matmul_rejects_bad_input():
    with pytest.raises(ValueError, match="expected x \\[M, K\\], w \\[G, K, N\\]"):
        grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 3)), jnp.ones(2, jnp.int32), impl="interpret")
    with pytest.raises(ValueError, match="power of two >= 16"):
        GmmConfig(block_m=24)
    with pytest.raises(ValueError, match="impl must be one of"):
        grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.ones(2, jnp.int32), impl="dense")


# ---------------------------------------------------------------------------------- moe_ffn


def _moe_inputs(rng, p, n, d, e, f, dtype=jnp.float32):
    shapes = [(n, d), (d, e), (e, d, 2, f), (e, f, d)]
    return [_rand(rng, (p, *s) if p else s, dtype, 0.5) for s in shapes]


def _moe_loss(impl, k, gate="softmax"):
    def loss(x, *params):
        y, stats = moe_ffn(x, *params, k, gate=gate, scale=2.0, impl=impl)
        cot = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y.astype(jnp.float32) * cot) + stats["load_balance_loss"], (y, stats)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(4)), has_aux=True))


MOE_CASES = [(3, "softmax"), (None, "relu")]  # batched [P, ...] and unbatched forms


@functools.lru_cache
def _moe_case(case: int, impl: str):
    p, gate = MOE_CASES[case]
    args = _moe_inputs(np.random.default_rng(5 + case), p, n=12, d=16, e=5, f=24)
    (_, (y, stats)), grads = _moe_loss(impl, 2, gate)(*args)
    return args, y, stats, grads


@pytest.mark.parametrize(
    "impl,case", [("dense", 0), ("dense", 1), ("xla", 0), ("xla", 1), ("interpret", 0), ("tokamax", 0)]
)
def test_moe_ffn_matches_reference_forward_and_backward(impl, case):
    args, y, st, grads = _moe_case(case, impl)
    _, y0, st0, grads0 = _moe_case(case, "reference")
    assert y.shape == y0.shape == args[0].shape and y.dtype == jnp.float32
    _close(y, y0, 1e-5)
    per_expert = (3, 5) if MOE_CASES[case][0] else (5,)
    for key in st0:
        assert st[key].shape == st0[key].shape == (per_expert if key != "load_balance_loss" else ())
        _close(st[key], st0[key], 1e-6)
    for g, g0 in zip(grads, grads0, strict=True):  # x, router, gate|up, down
        _close(g, g0, 1e-4 if impl == "interpret" else 1e-5)
    assert np.abs(np.asarray(grads0[1])).max() > 0  # the router gets a gradient


def test_auto_impl_per_backend():
    backend = jax.default_backend()
    for k, cpu_choice in ((1, "xla"), (2, "dense")):
        expected = {"gpu": "pallas", "tpu": "xla"}.get(backend, cpu_choice)
        assert moe_mod.resolve_moe_impl("auto", k) == expected


def test_moe_ffn_bfloat16_matches_float64():
    rng = np.random.default_rng(6)
    args = _moe_inputs(rng, 2, n=16, d=32, e=4, f=32, dtype=jnp.bfloat16)
    y0 = _np_moe(*(np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in args), k=2)
    for impl in ("reference", "dense", "xla"):
        y, _ = jax.jit(functools.partial(moe_ffn, k=2, impl=impl))(*args)
        assert y.dtype == jnp.bfloat16
        _close(y, y0, 1e-2)


def _np_moe(x, router_w, w_gate_up, w_down, k):
    """float64 numpy SwiGLU MoE with softmax-over-selected gates, batched over P."""
    logits = np.einsum("pnd,pde->pne", x, router_w)
    ids = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(logits, ids, -1)
    g = np.exp(top - top.max(-1, keepdims=True))
    g /= g.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    for p, n, j in np.ndindex(*ids.shape):
        e = ids[p, n, j]
        hg, hu = x[p, n] @ w_gate_up[p, e, :, 0], x[p, n] @ w_gate_up[p, e, :, 1]
        y[p, n] += g[p, n, j] * ((hg / (1 + np.exp(-hg)) * hu) @ w_down[p, e])
    return y


@pytest.mark.parametrize("impl", ["dense", "xla"])
def test_moe_ffn_with_all_experts_is_the_dense_softmax_mixture(impl):
    rng = np.random.default_rng(7)
    x, rw, wgu, wd = (
        np.asarray(a, np.float64) for a in _moe_inputs(rng, 2, n=8, d=8, e=4, f=16)
    )
    wg, wu = wgu[..., 0, :], wgu[..., 1, :]
    logits = np.einsum("pnd,pde->pne", x, rw)
    soft = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    hg, hu = np.einsum("pnd,pedf->pnef", x, wg), np.einsum("pnd,pedf->pnef", x, wu)
    experts = np.einsum("pnef,pefd->pned", hg / (1 + np.exp(-hg)) * hu, wd)
    y, _ = jax.jit(functools.partial(moe_ffn, k=4, impl=impl))(
        *(jnp.asarray(a, jnp.float32) for a in (x, rw, wgu, wd))
    )
    _close(y, np.einsum("pne,pned->pnd", soft, experts), 1e-5)


def test_moe_ffn_rejects_bad_shapes():
    rng = np.random.default_rng(8)
    x, rw, wgu, wd = _moe_inputs(rng, 2, n=4, d=8, e=3, f=4)
    with pytest.raises(ValueError, match="w_down does not fit"):
        moe_ffn(x, rw, wgu, wd[:, :, :, :4], 1)
    with pytest.raises(ValueError, match="w_gate_up does not fit"):
        moe_ffn(x, rw, wgu.reshape(2, 3, 8, 8), wd, 1)
    with pytest.raises(ValueError, match="impl must be one of"):
        moe_ffn(x, rw, wgu, wd, 1, impl="triton")


def test_moe_ffn_flops_and_xla_cost_analysis():
    n, d, f, e, k = 64, 16, 32, 8, 2
    active, dense = moe_ffn_flops(n, d, f, e, k), moe_ffn_flops(n, d, f, e, k, impl="dense")
    assert active == n * (2 * d * e + k * 3 * 2 * d * f)
    assert dense == n * (2 * d * e + e * 3 * 2 * d * f)
    args = _moe_inputs(np.random.default_rng(9), None, n=n, d=d, e=e, f=f)

    def xla_flops(impl):
        fn = jax.jit(lambda *a: moe_ffn(*a, k, impl=impl)[0])
        return fn.lower(*args).compile().cost_analysis()["flops"]

    # matmuls dominate; the rest (softmax, silu, sort, gathers) adds a few percent
    assert dense <= xla_flops("dense") <= 1.1 * dense
    # CPU ragged_dot is a dense masked product: E x the expert FLOPs of the N*k sorted rows
    if jax.default_backend() == "cpu":
        expected = n * 2 * d * e + e * (active - n * 2 * d * e)
        assert expected <= xla_flops("xla") <= 1.1 * expected


def test_moe_ffn_sharded_equals_unsharded():
    """P over the "tensor" mesh axis, N over "data" (4 CPU devices, GSPMD): same values."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as PS
from recjax.config import MeshConfig
from recjax.parallel.mesh import make_mesh
from recjax.kernels.moe import moe_ffn

mesh = make_mesh(MeshConfig(data=2, tensor=2))
rng = np.random.default_rng(0)
P, N, D, E, F, k = 4, 16, 8, 4, 8, 2
shapes = [(P, N, D), (P, D, E), (P, E, D, 2, F), (P, E, F, D)]
args = [jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32) for s in shapes]
specs = [PS("tensor", "data")] + [PS("tensor")] * 3
sharded = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
for impl in ("dense", "xla"):
    def loss(x, *p):
        y, st = moe_ffn(x, *p, k, impl=impl)
        return jnp.sum(y * jnp.cos(jnp.arange(D))) + st["load_balance_loss"], y
    f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(4)), has_aux=True))
    (l0, y0), g0 = f(*args)
    (l1, y1), g1 = f(*sharded)
    assert not y1.sharding.is_fully_replicated, y1.sharding
    if impl == "dense":  # routing and experts stay local: only the expert counts are summed
        assert "all-gather" not in f.lower(*sharded).compile().as_text()
    err = max(float(jnp.abs(a - b).max()) for a, b in zip((l0, y0, *g0), (l1, y1, *g1)))
    assert err <= 1e-5, (impl, err)
    print(impl, "ok", err)
"""
    out = run_python(code, devices=4)
    assert "dense ok" in out and "xla ok" in out


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_on_gpu_matches_reference(dtype):
    # fp32 Pallas dots run in TF32 on GPU: compare at bf16-level tolerance
    rng = np.random.default_rng(10)
    m, k, n, sizes = 300, 96, 200, [0, 130, 7, 0, 150]
    x, w = _rand(rng, (m, k), dtype), _rand(rng, (len(sizes), k, n), dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    _close(grouped_matmul(x, w, gs, impl="pallas"), _np_gmm(x, w, sizes), 1e-2)
    cot = _rand(rng, (m, n))
    loss = lambda impl: (
        lambda x, w: jnp.sum(grouped_matmul(x, w, gs, impl=impl).astype(jnp.float32) * cot)
    )
    for g, g0 in zip(
        jax.grad(loss("pallas"), (0, 1))(x, w),
        jax.grad(loss("reference"), (0, 1))(x, w),
        strict=True,
    ):
        _close(g, g0.astype(jnp.float32), 2e-2)
    args = _moe_inputs(rng, 4, n=64, d=64, e=8, f=128, dtype=dtype)
    (_, (y, _)), grads = _moe_loss("pallas", 2)(*args)
    (_, (y0, _)), grads0 = _moe_loss("reference", 2)(*args)
    _close(y, y0, 2e-2)
    for g, g0 in zip(grads, grads0, strict=True):
        _close(g, g0, 2e-2)


def test_bench_moe_rows():
    from recjax.bench.moe import bench_moe

    rows = bench_moe((4,), (2,), tokens=32, d=16, f=16, impls=("dense",), warmup=1, repeats=1)
    assert [(r["op"], r["impl"], r["mode"]) for r in rows] == [
        (op, impl, mode)
        for op, impl in (("dense_matmul", "xla"), ("moe_ffn", "dense"))
        for mode in ("fwd", "fwd+bwd")
    ]
    for r in rows:
        assert r["median_ms"] > 0 and r["memory_bytes"] > 0
        fwd = moe_ffn_flops(32, 16, 16, 4, 2) if r["op"] == "moe_ffn" else 2 * 32 * 2 * 16 * 16
        assert r["active_flops"] == fwd * (1 if r["mode"] == "fwd" else 3)
        assert r["tflops_per_s"] == pytest.approx(r["active_flops"] / r["median_ms"] / 1e9)
