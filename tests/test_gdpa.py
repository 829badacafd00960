"""GDPA: every impl against the quadratic reference, forward and gradients.

Errors are ``max|impl - ref| / max|ref|`` per output (the output and the gradients of
``sum(out * w)`` w.r.t. q, k, v). float32 tolerance 1e-5 on CPU (the kernels' erf is a
polynomial with absolute error 5e-7); bfloat16 1e-2 (inputs rounded once, fp32 math, outputs
rounded once). The Pallas kernels run in interpret mode on small shapes; their CUDA lowering is
checked on CPU; a ``gpu``-marked test runs impl="pallas" where a GPU exists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recjax.kernels.gdpa import ACTIVATIONS, activation, activation_grad, gdpa, gdpa_flops
from tests.test_linear_attention import _kernel_dots

TOL = {"float32": 1e-5, "bfloat16": 1e-2}
ON_GPU = jax.default_backend() == "gpu"


def _inputs(seed, batch, tq, tk, hq, hkv, d, dv, dtype, jagged):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, tq, hq, d)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, tk, hkv, d)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, tk, hkv, dv)), dtype)
    w = jnp.asarray(rng.normal(size=(batch, tq, hq, dv)), jnp.float32)
    lengths = {}
    if jagged:  # one full row, one empty query row when batch > 2, the rest random
        nq, nkv = rng.integers(1, tq + 1, size=batch), rng.integers(1, tk + 1, size=batch)
        nq[0], nkv[0] = tq, tk
        if batch > 2:
            nq[1] = 0
        lengths = {"q_lengths": jnp.asarray(nq, jnp.int32), "kv_lengths": jnp.asarray(nkv, jnp.int32)}
    return q, k, v, w, lengths


@functools.cache
def _grad_fn(impl, **kw):
    def loss(q, k, v, w, lengths):
        out = gdpa(q, k, v, **lengths, impl=impl, **kw)
        return jnp.sum(out.astype(jnp.float32) * w), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _errors(impl, case, **blocks):
    dtype, act, window, causal, batch, tq, tk, hq, hkv, d, dv, jagged = case
    q, k, v, w, lengths = _inputs(0, batch, tq, tk, hq, hkv, d, dv, jnp.dtype(dtype), jagged)
    kw = dict(activation=act, window=window, causal=causal, scale=0.7)
    (_, ref), ref_grads = _grad_fn("reference", **kw)(q, k, v, w, lengths)
    (_, out), grads = _grad_fn(impl, **kw, **blocks)(q, k, v, w, lengths)
    assert out.shape == (batch, tq, hq, dv) and out.dtype == v.dtype
    names = ("out", "dq", "dk", "dv")
    return {n: _rel_err(a, b) for n, a, b in zip(names, [out, *grads], [ref, *ref_grads], strict=True)}


# (dtype, activation, window, causal, batch, tq, tk, hq, hkv, d, dv, jagged); blocks of 16, so
# 37, 45 and 50 are not multiples of them and head dims 24 and 8 are not powers of two >= 16.
CASES = [
    ("float32", "gelu", None, False, 2, 37, 50, 2, 2, 16, 8, True),  # cross-attention, MHA
    ("float32", "silu", 5, False, 3, 45, 45, 4, 2, 24, 16, True),  # window, GQA, jagged
    ("float32", "relu2", 9, True, 2, 40, 40, 4, 1, 16, 16, False),  # window + causal, MQA
    ("float32", "hardswish", None, True, 2, 33, 33, 2, 2, 16, 16, True),
    ("bfloat16", "gelu_approx", 7, False, 2, 45, 45, 2, 1, 32, 16, True),
]


@pytest.mark.parametrize("impl", ["xla", "interpret"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(impl, case):
    errs = _errors(impl, case, block_q=16, block_k=16)
    assert max(errs.values()) < TOL[case[0]], f"{impl} {case}: {errs}"


@settings(max_examples=6, deadline=None)
@given(
    act=st.sampled_from(ACTIVATIONS),
    window=st.one_of(st.none(), st.integers(0, 20)),
    causal=st.booleans(),
    batch=st.integers(1, 3),
    seq=st.integers(1, 70),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    d=st.sampled_from([8, 16]),
    jagged=st.booleans(),
)
def test_xla_matches_reference_random_shapes(act, window, causal, batch, seq, heads, d, jagged):
    case = ("float32", act, window, causal, batch, seq, seq, *heads, d, 8, jagged)
    errs = _errors("xla", case, block_q=16)
    assert max(errs.values()) < 1e-5, f"{case}: {errs}"


@settings(max_examples=3, deadline=None)
@given(
    act=st.sampled_from(ACTIVATIONS),
    window=st.one_of(st.none(), st.integers(0, 20)),
    seq=st.integers(1, 40),
    heads=st.sampled_from([(2, 1), (2, 2)]),
)
def test_interpret_matches_reference_random_shapes(act, window, seq, heads):
    case = ("float32", act, window, False, 2, seq, seq, *heads, 16, 16, True)
    errs = _errors("interpret", case, block_q=16, block_k=16)
    assert max(errs.values()) < 1e-5, f"{case}: {errs}"


def test_activation_gradients_match_autodiff():
    x = jnp.asarray(np.random.default_rng(0).normal(scale=3.0, size=4096), jnp.float32)
    for kind in ACTIVATIONS:
        auto = jax.vmap(jax.grad(lambda y, kind=kind: activation(y, kind)))(x)
        np.testing.assert_allclose(activation_grad(x, kind), auto, atol=1e-6, err_msg=kind)
        assert float(activation(jnp.zeros(()), kind)) == 0.0, kind  # masked score 0 adds nothing


def test_masks_by_hand():
    """One head, identity activation, scale 1: out[t] = sum over kept s of (q_t . k_s) v_s."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 1, 4)), jnp.float32) for _ in range(3))
    out = gdpa(q, k, v, activation="identity", window=1, causal=True, q_lengths=jnp.array([5]),
               kv_lengths=jnp.array([4]), impl="xla")
    scores = np.einsum("td,sd->ts", q[0, :, 0], k[0, :, 0])
    keep = np.array([[s <= t and t - s <= 1 and t < 5 and s < 4 for s in range(6)] for t in range(6)])
    np.testing.assert_allclose(out[0, :, 0], (scores * keep) @ np.asarray(v[0, :, 0]), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(out[0, 5:]).max()) == 0.0


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_padding_is_inert(impl):
    """Positions past the lengths give zero outputs and gradients; their values change nothing."""
    case = ("float32", "gelu", 4, False, 3, 21, 21, 2, 1, 16, 16, True)
    q, k, v, w, lengths = _inputs(1, *case[4:11], jnp.float32, True)
    fn = _grad_fn(impl, activation="gelu", window=4, block_q=16)
    (_, out), grads = fn(q, k, v, w, lengths)
    rows = (jnp.arange(21)[None, :] < lengths["q_lengths"][:, None])[:, :, None, None]
    cols = (jnp.arange(21)[None, :] < lengths["kv_lengths"][:, None])[:, :, None, None]
    rng = np.random.default_rng(2)
    noisy = [jnp.where(m, x, 50.0 * rng.normal(size=x.shape)) for x, m in ((q, rows), (k, cols), (v, cols))]
    (_, out2), grads2 = fn(*noisy, w, lengths)
    assert float(jnp.abs(jnp.where(rows, 0.0, out)).max()) == 0.0
    for g, m in zip(grads, (rows, cols, cols), strict=True):
        assert float(jnp.abs(jnp.where(m, 0.0, g)).max()) == 0.0
    for a, b in zip([out, *grads], [out2, *grads2], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_banded_xla_flops_follow_the_window():
    """XLA's cost analysis of the banded path scales with the window, not the sequence."""
    batch, seq, heads, d = 1, 1024, 2, 16
    x = jax.ShapeDtypeStruct((batch, seq, heads, d), jnp.float32)

    def flops(window):
        fn = jax.jit(functools.partial(gdpa, activation="relu", window=window, impl="xla", block_q=64))
        return fn.lower(x, x, x).compile().cost_analysis()["flops"]

    full, banded = flops(None), flops(32)
    dots = lambda window: gdpa_flops(batch, seq, seq, heads, d, d, window=window)
    assert dots(32) / dots(None) < 0.07
    # the band computes chunk + 2 window = 128 keys per query: 1/8 of the full product's dots
    assert banded < 0.2 * full
    assert banded > 2.0 * batch * heads * seq * 128 * 2 * d


def test_bad_inputs_raise_clear_errors():
    q = jnp.zeros((2, 8, 4, 16))
    with pytest.raises(ValueError, match="hq a multiple of hkv"):
        gdpa(q, jnp.zeros((2, 8, 3, 16)), jnp.zeros((2, 8, 3, 16)))
    with pytest.raises(ValueError, match="unknown activation 'softmax'"):
        gdpa(q, q, q, activation="softmax")
    with pytest.raises(ValueError, match="need tq == tk"):
        gdpa(q, q[:, :4], q[:, :4], window=2)
    with pytest.raises(ValueError, match=r"kv_lengths must be an integer array of shape \[batch\]"):
        gdpa(q, q, q, kv_lengths=jnp.zeros(2))
    with pytest.raises(ValueError, match="power of two >= 16"):
        gdpa(q, q, q, block_k=24)
    with pytest.raises(ValueError, match="unknown impl"):
        gdpa(q, q, q, impl="triton")


@pytest.mark.skipif(ON_GPU, reason="checks the error raised without a GPU")
def test_pallas_without_gpu_says_what_to_do():
    q = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(RuntimeError, match="needs a GPU.*impl='interpret'"):
        gdpa(q, q, q, impl="pallas")


def _pallas_loss(activation_kind, window, causal, interpret=False):
    from recjax.kernels.gdpa_pallas import gdpa_pallas

    def loss(q, k, v, n, m):
        out = gdpa_pallas(q, k, v, n, m, activation=activation_kind, scale=0.5, window=window,
                          causal=causal, interpret=interpret)
        return jnp.sum(out.astype(jnp.float32))

    return loss


def test_kernels_lower_to_triton():
    """Forward and backward lower to three Triton kernels for CUDA (GQA, window, causal)."""
    q = jax.ShapeDtypeStruct((2, 100, 4, 48), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 100, 1, 48), jnp.bfloat16)
    n = jax.ShapeDtypeStruct((2,), jnp.int32)
    traced = jax.jit(jax.grad(_pallas_loss("gelu", 16, True), argnums=(0, 1, 2))).trace(q, kv, kv, n, n)
    try:
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:
        if "No supported GPU" not in str(e):
            raise
        pytest.skip("this JAX lowers Triton kernels only with a GPU present")
    assert text.count("xla.gpu.triton") == 3


def test_bf16_kernels_feed_bf16_tiles_to_their_dots():
    q, kv = jnp.zeros((2, 40, 2, 16), jnp.bfloat16), jnp.zeros((2, 40, 1, 16), jnp.bfloat16)
    n = jnp.array([40, 17], jnp.int32)
    loss = _pallas_loss("silu", 8, False, interpret=True)
    dots = _kernel_dots(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, n, n)
    assert {kernel for kernel, _, _ in dots} == {"gdpa_fwd", "gdpa_dq", "gdpa_dkv"}
    assert {(ops, out) for _, ops, out in dots} == {(("bfloat16", "bfloat16"), "float32")}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_pallas_gpu_matches_reference(case):
    errs = _errors("pallas", case)
    assert max(errs.values()) < 2e-2, f"{case}: {errs}"  # TF32 products for fp32 inputs
