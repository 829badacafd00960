"""Linear attention: every impl against the quadratic reference, forward and gradients.

Errors are measured as ``max|impl - ref| / max|ref|`` per output (the output, and the
gradients of ``sum(out * w)`` w.r.t. q, k, v and length_scale). Tolerances:

- float32: 1e-5 (CPU; the largest error measured over the cases below was 4e-7). On GPU
  the kernels' fp32 products run on TF32 tensor cores (10-bit mantissa): the GPU test
  allows 2e-2.
- bfloat16: 1e-2 (every impl computes in fp32 from the same bf16 inputs and rounds the
  output and gradients to bf16 once, a relative step of 2**-8 = 3.9e-3 per element; the
  largest error measured was 1.4e-3, in dv and in the length_scale gradient, which the
  kernels compute from the bf16 output).

The Pallas kernels run in interpret mode on CPU (small shapes: interpret mode is slow); a
``gpu``-marked test runs impl="pallas" where a GPU exists, and the kernels' Triton lowering
is checked on CPU where this JAX can lower for CUDA without a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recjax.kernels.linear_attention import linear_attention

TOL = {"float32": 1e-5, "bfloat16": 1e-2}
ON_GPU = jax.default_backend() == "gpu"


def _inputs(seed, batch, seq, heads, d, dv, dtype, with_lengths, with_scale):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=(batch, seq, heads, d)), dtype) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(batch, seq, heads, dv)), dtype)
    w = jnp.asarray(rng.normal(size=(batch, seq, heads, dv)), jnp.float32)
    scale = jnp.asarray(rng.normal(size=(heads,)), jnp.float32) if with_scale else None
    lengths = None
    if with_lengths:  # one full row, one empty row when batch > 2, the rest random
        lens = rng.integers(1, seq + 1, size=batch)
        lens[0] = seq
        if batch > 2:
            lens[1] = 0
        lengths = jnp.asarray(lens, jnp.int32)
    return q, k, v, w, scale, lengths


def _out_and_grads(impl, q, k, v, w, scale, lengths, **kw):
    """``out`` and the gradients of ``sum(out * w)`` w.r.t. q, k, v (and length_scale)."""
    fn = _grad_fn(impl, scale is not None, **kw)
    (_, out), grads = fn(q, k, v, w, scale, lengths)
    return out, grads


@functools.cache
def _grad_fn(impl, with_scale, **kw):
    def loss(q, k, v, w, scale, lengths):
        out = linear_attention(q, k, v, length_scale=scale, lengths=lengths, impl=impl, **kw)
        return jnp.sum(out.astype(jnp.float32) * w), out

    argnums = (0, 1, 2, 4) if with_scale else (0, 1, 2)
    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


def _rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _assert_matches_reference(impl, case, tol):
    dtype, causal, fmap, batch, seq, d, dv, with_lengths, with_scale = case
    q, k, v, w, scale, lengths = _inputs(
        0, batch, seq, 2, d, dv, jnp.dtype(dtype), with_lengths, with_scale
    )
    kw = dict(causal=causal, feature_map=fmap)
    block = {} if impl == "reference" else {"block_size": 16}
    ref, ref_grads = _out_and_grads("reference", q, k, v, w, scale, lengths, **kw)
    out, grads = _out_and_grads(impl, q, k, v, w, scale, lengths, **kw, **block)
    assert out.shape == v.shape and out.dtype == v.dtype
    names = ["out", "dq", "dk", "dv", "dlength_scale"][: 1 + len(grads)]
    pairs = zip(names, [out, *grads], [ref, *ref_grads], strict=True)
    errs = {n: _rel_err(a, b) for n, a, b in pairs}
    assert max(errs.values()) < tol, f"{impl} {case}: {errs}"


# (dtype, causal, feature_map, batch, seq, head_dim, dv, lengths, length_scale); block 16, so
# seq 37, 50, 45, 29 are not multiples of it and head_dim 24 is not a power of two.
CASES = [
    ("float32", True, "cosine", 3, 37, 16, 16, True, True),
    ("float32", False, "elu_l2", 2, 50, 24, 8, False, True),
    ("float32", True, "identity", 2, 32, 16, 32, False, False),
    ("bfloat16", True, "elu_l2", 2, 45, 32, 16, True, False),
    ("bfloat16", False, "cosine", 3, 29, 16, 16, True, True),
]


@pytest.mark.parametrize("impl", ["xla", "interpret"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(impl, case):
    _assert_matches_reference(impl, case, TOL[case[0]])


@settings(max_examples=5, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "bfloat16"]),
    causal=st.booleans(),
    fmap=st.sampled_from(["cosine", "elu_l2", "identity"]),
    batch=st.integers(1, 3),
    seq=st.integers(1, 70),
    d=st.sampled_from([8, 16, 20]),
    dv=st.sampled_from([4, 16]),
    with_lengths=st.booleans(),
    with_scale=st.booleans(),
)
def test_xla_matches_reference_random_shapes(
    dtype, causal, fmap, batch, seq, d, dv, with_lengths, with_scale
):
    case = (dtype, causal, fmap, batch, seq, d, dv, with_lengths, with_scale)
    _assert_matches_reference("xla", case, TOL[dtype])


@pytest.mark.parametrize("impl", ["xla", "interpret"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_is_inert(impl, causal):
    """Padding rows give zero outputs and gradients; their contents change nothing valid."""
    q, k, v, w, scale, lengths = _inputs(1, 3, 21, 2, 16, 16, jnp.float32, True, True)
    valid = (jnp.arange(21)[None, :] < lengths[:, None])[:, :, None, None]
    rng = np.random.default_rng(2)
    other = [jnp.where(valid, x, 50.0 * rng.normal(size=x.shape)) for x in (q, k, v)]
    kw = dict(causal=causal, block_size=16)
    out, grads = _out_and_grads(impl, q, k, v, w, scale, lengths, **kw)
    out2, grads2 = _out_and_grads(impl, *other, w, scale, lengths, **kw)
    for a in [out, *grads[:3]]:
        assert float(jnp.max(jnp.abs(jnp.where(valid, 0.0, a)))) == 0.0
    for a, b in zip([out, *grads], [out2, *grads2], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_length_scale_divides_by_length_power():
    """out = unscaled out / max(n ** sigmoid(m), 1), per row n and head m."""
    q, k, v, _, scale, lengths = _inputs(3, 3, 12, 2, 16, 8, jnp.float32, True, True)
    base = linear_attention(q, k, v, lengths=lengths, impl="reference")
    out = linear_attention(q, k, v, lengths=lengths, length_scale=scale, impl="xla")
    g = np.maximum(np.asarray(lengths, np.float32)[:, None] ** (1 / (1 + np.exp(-scale))), 1)
    np.testing.assert_allclose(out, base / g[:, None, :, None], rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    q = jnp.zeros((2, 8, 2, 16))
    with pytest.raises(ValueError, match="same batch, seq and heads"):
        linear_attention(q, q, jnp.zeros((2, 9, 2, 16)))
    with pytest.raises(ValueError, match="unknown feature_map 'relu'"):
        linear_attention(q, q, q, feature_map="relu")
    with pytest.raises(ValueError, match="unknown impl"):
        linear_attention(q, q, q, impl="triton")
    with pytest.raises(ValueError, match=r"length_scale must have shape \[heads\]"):
        linear_attention(q, q, q, length_scale=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"lengths must be an integer array of shape \[batch\]"):
        linear_attention(q, q, q, lengths=jnp.zeros(2))
    with pytest.raises(ValueError, match="power of two >= 16"):
        linear_attention(q, q, q, block_size=24)


@pytest.mark.skipif(ON_GPU, reason="checks the error raised without a GPU")
def test_pallas_without_gpu_says_what_to_do():
    q = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(RuntimeError, match="needs a GPU.*impl='interpret'"):
        linear_attention(q, q, q, impl="pallas")


def test_kernels_lower_to_triton():
    """Forward and backward lower to Triton (3 kernels: forward, dq, dk/dv) for CUDA, without a
    GPU where possible."""
    from recjax.kernels.linear_attention_pallas import linear_attention_pallas

    q = jax.ShapeDtypeStruct((2, 100, 2, 48), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((2, 100, 2, 64), jnp.bfloat16)
    n = jax.ShapeDtypeStruct((2,), jnp.int32)
    s = jax.ShapeDtypeStruct((2, 2), jnp.float32)

    def loss(q, k, v, n, s):
        out = linear_attention_pallas(q, k, v, n, s, causal=True, feature_map="elu_l2")
        return jnp.sum(out.astype(jnp.float32))

    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4))).trace(q, q, v, n, s)
    try:
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:
        if "No supported GPU" not in str(e):
            raise
        pytest.skip("this JAX lowers Triton kernels only with a GPU present")
    assert text.count("xla.gpu.triton") == 3


def _kernel_dots(fn, *args) -> set[tuple[str, tuple[str, ...], str]]:
    """(kernel name, operand dtypes, result dtype) of every dot inside a ``pallas_call``."""
    found = set()

    def walk(jaxpr, kernel):
        for e in jaxpr.eqns:
            inner = str(e.params["name"]).split()[0] if e.primitive.name == "pallas_call" else kernel
            if e.primitive.name == "dot_general" and kernel:
                found.add((kernel, tuple(str(x.aval.dtype) for x in e.invars), str(e.outvars[0].aval.dtype)))
            for p in e.params.values():
                for c in p if isinstance(p, (list, tuple)) else [p]:
                    sub = c if hasattr(c, "eqns") else getattr(c, "jaxpr", None)
                    if hasattr(sub, "eqns"):
                        walk(sub, inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr, None)
    return found


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_kernels_feed_bf16_tiles_to_their_dots(causal):
    """Every dot of the three kernels takes bf16 operands and accumulates in fp32 (tensor cores
    at the bf16 rate, not TF32), forward and backward."""
    from recjax.kernels.linear_attention_pallas import linear_attention_pallas

    q, v = jnp.zeros((2, 100, 2, 48), jnp.bfloat16), jnp.zeros((2, 100, 2, 64), jnp.bfloat16)
    n, s = jnp.array([100, 30], jnp.int32), jnp.ones((2, 2), jnp.float32)

    def loss(q, k, v, s):
        out = linear_attention_pallas(q, k, v, n, s, causal=causal, feature_map="elu_l2", interpret=True)
        return jnp.sum(out.astype(jnp.float32))

    dots = _kernel_dots(jax.grad(loss, argnums=(0, 1, 2, 3)), q, q, v, s)
    assert {kernel for kernel, _, _ in dots} == {"linear_attention_fwd", "linear_attention_dq", "linear_attention_dkv"}
    assert {(ops, out) for _, ops, out in dots} == {(("bfloat16", "bfloat16"), "float32")}


def test_hbm_bytes_of_the_sequential_design():
    """The analytic traffic: B1 H1 S128 d16 bf16, 64-row chunks (2 states of 16 x 16), one
    value tile; the earlier chunked design moves more (fp32 states re-read by the XLA scans)."""
    from recjax.kernels.linear_attention_pallas import hbm_bytes

    act, states = 128 * 16 * 2, 2 * 16 * 16 * 2
    got = hbm_bytes(1, 128, 1, 16)
    assert got["forward"] == 3 * act + act + states  # read q, k, v; write o and the states
    assert got["backward"] == (4 * act + states + act) + (4 * act + 2 * act) + 2 * act
    big = {d: hbm_bytes(8, 4096, 8, 64, design=d)["total"] for d in ("sequential", "chunked")}
    assert big["sequential"] < 0.5 * big["chunked"]


def test_bench_attention_rows():
    """Measured rows carry time and memory; over-cap and GPU-only configs are marked skipped."""
    from recjax.bench.attention import bench_attention

    rows = bench_attention(
        seqs=(32,), head_dims=(16,), batch=1, heads=2, impls=("softmax", "xla", "pallas"),
        warmup=1, repeats=1, dtype="float32", causal=(True,), memory_cap_bytes=1,
    )
    assert [(r["impl"], r["mode"]) for r in rows] == [
        (impl, mode) for impl in ("xla", "xla", "pallas") for mode in ("fwd", "fwd+bwd")
    ]
    softmax, linear, pallas = rows[:2], rows[2:4], rows[4:]
    assert all(r["op"] == "softmax_attention" and "memory cap" in r["skipped"] for r in softmax)
    assert all(r["median_ms"] > 0 and r["memory_bytes"] > 0 for r in linear)
    assert all("skipped" not in r and "error" not in r for r in linear)
    if not ON_GPU:
        assert all(r["skipped"] == "pallas needs a GPU" for r in pallas)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_pallas_gpu_matches_reference(case):
    _assert_matches_reference("pallas", case, 2e-2)


SHARDED_EQUALS_REFERENCE = r"""
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import AxisType
from recjax.config import load_config
from recjax.kernels.linear_attention import linear_attention_reference
from recjax.kernels.linear_attention_parallel import linear_attention_sharded
from recjax.parallel import sharding as shd

mesh = jax.make_mesh((2, 2, 2), ("data", "tensor", "seq"), axis_types=(AxisType.Auto,) * 3)
B, S, H, D = 4, 64, 4, 16
ks = jax.random.split(jax.random.PRNGKey(1), 5)
q, k, v, w = (jax.random.normal(kk, (B, S, H, D)) for kk in ks[:4])
ls = jax.random.normal(ks[4], (H,))
lengths = jnp.array([64, 50, 17, 1], jnp.int32)

def error(got, ref):
    return float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))

worst = 0.0
layouts = [(("data",), ("tensor",), ()), (("data",), ("tensor",), ("seq",)), ((), (), ("data", "seq"))]
cases = [(True, "cosine", layout) for layout in layouts] + [(False, "elu_l2", layouts[1]), (False, "cosine", layouts[2])]
cases = [("xla", *case) for case in cases] + [("interpret", *case) for case in (cases[1], cases[3])]
for impl, causal, fmap, (bx, hx, sx) in cases:
    scale = (lambda s: s) if fmap == "cosine" else (lambda s: None)
    def ref(q, k, v, s):
        return linear_attention_reference(q, k, v, causal=causal, feature_map=fmap, length_scale=scale(s), lengths=lengths)
    def sharded(q, k, v, s):
        return linear_attention_sharded(q, k, v, mesh=mesh, batch_axes=bx, head_axes=hx, seq_axes=sx, causal=causal,
                                        feature_map=fmap, length_scale=scale(s), lengths=lengths, impl=impl, block_size=16)
    outs = []
    for f in (ref, jax.jit(sharded)):
        loss = lambda *a, f=f: jnp.sum(f(*a) * w)
        outs.append((f(q, k, v, ls), *jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, ls)))
    errs = [error(a, b) for a, b in zip(outs[1], outs[0]) if float(jnp.max(jnp.abs(b))) > 0]
    assert max(errs) < 1e-5, (impl, causal, fmap, bx, hx, sx, errs)
    worst = max(worst, max(errs))

# the model's attention layer under a mesh (batch over data, heads over tensor, sequence over seq)
# runs the sharded op and gives the unsharded layer's output
cfg = load_config(None, ["model.name=seqrec", "model.hidden=16", "model.num_heads=2", "model.inner=32",
                         "model.attention=cosine", "model.attention_impl=interpret", "data.source=sequences",
                         "data.sequences.max_len=16", "mesh.data=2", "mesh.tensor=2", "mesh.rules.batch=[data]",
                         "mesh.rules.seq=[expert]",
                         "mesh.expert=2"])
from recjax.models import registry as models
from recjax.models.seqrec import SequenceInfo
from recjax.parallel.mesh import make_mesh
graphdef, params = nnx.split(models.build_model(cfg, SequenceInfo(30, 16), nnx.Rngs(params=jax.random.PRNGKey(0))))
x = jax.random.normal(jax.random.PRNGKey(3), (4, 16, 16))
lens = jnp.array([16, 9, 3, 0], jnp.int32)
layer = lambda p, x: nnx.merge(graphdef, p).blocks[0].attn(x, lens, None)
plain = jax.jit(layer)(params, x)
model_mesh = make_mesh(cfg.mesh)
def under_mesh(p, x):
    with shd.use_rules(model_mesh, cfg.mesh.rules):
        return layer(p, x)
lowered = jax.jit(under_mesh).lower(params, x)
assert "all-gather" in lowered.compile().as_text()  # the sequence shards' states
np.testing.assert_allclose(np.asarray(jax.jit(under_mesh)(params, x)), np.asarray(plain), atol=1e-5)
print(f"ok worst {worst:.2e}")
"""


def test_sharded_linear_attention_equals_the_reference_forward_and_backward():
    """On 2 x 2 x 2 virtual devices: batch over one axis, heads over another, and the sequence
    over a third (per-shard states combined by an exclusive scan), with the XLA kernels causal
    on every layout and non-causal with the cosine (length scale) and ELU+L2 maps, and the
    Pallas-interpret kernels with the sequence split, causal and not; jagged lengths: output and the gradients of q, k, v and the length scale within 1e-5 (relative) of
    the unsharded reference; the model's attention layer under a mesh equals the unsharded one."""
    from tests.conftest import run_python

    out = run_python(SHARDED_EQUALS_REFERENCE, devices=8)
    print(out)
    assert "ok" in out
