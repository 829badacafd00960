"""DLRM and DCN-V2: shapes/dtypes, interaction math, training signal, FLOPs vs XLA, configs."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

from recjax.config import CONFIG_DIR, Config, config_from_dict, load_config
from recjax.data.spec import FeatureSpec, SparseFeature
from recjax.errors import ConfigError
from recjax.models import registry


@pytest.fixture(autouse=True)
def _lazy_sharding():
    with nnx.use_eager_sharding(False):
        yield


def features(num_sparse: int = 4, num_dense: int = 3, vocab: int = 50) -> FeatureSpec:
    return FeatureSpec(
        tuple(SparseFeature(f"C{i + 1}", vocab) for i in range(num_sparse)), num_dense
    )


def make_cfg(model: dict, dim: int = 8, **embedding) -> Config:
    return config_from_dict({"model": model, "embedding": {"dim": dim, **embedding}})


def make_batch(fs: FeatureSpec, b: int, seed: int = 0, hot: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    vocab = fs.sparse[0].vocab_size
    shape = (b, fs.num_sparse, hot) if hot else (b, fs.num_sparse)
    return {
        "dense": jnp.asarray(rng.normal(size=(b, fs.num_dense)), jnp.float32),
        "sparse": jnp.asarray(rng.integers(-1, vocab + 5, size=shape), jnp.int32),
        "label": jnp.asarray(rng.integers(0, 2, size=(b,)), jnp.float32),
    }


def build(cfg: Config, fs: FeatureSpec, dtype=jnp.float32, seed: int = 0) -> nnx.Module:
    return registry.get(cfg.model.name).build(cfg, fs, dtype, nnx.Rngs(seed))


def build_abstract(cfg: Config, fs: FeatureSpec, dtype=jnp.float32) -> nnx.Module:
    """The model with ``ShapeDtypeStruct`` params: no initialisation is compiled or run."""
    return nnx.eval_shape(lambda: build(cfg, fs, dtype))


def abstract_batch(fs: FeatureSpec, b: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {
        "dense": jax.ShapeDtypeStruct((b, fs.num_dense), jnp.float32),
        "sparse": jax.ShapeDtypeStruct((b, fs.num_sparse), jnp.int32),
        "label": jax.ShapeDtypeStruct((b,), jnp.float32),
    }


def apply(model: nnx.Module, fn, *args):
    """``fn(model, *args)`` under one jit (a single compile beats eager op-by-op dispatch)."""
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p, *a: fn(nnx.merge(graphdef, p), *a))(params, *args)


def bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))


# Small models share layer shapes so eager initialisation compiles each random op once.
SMALL = {
    "dlrm": {"name": "dlrm", "bottom_mlp": [16, 8], "top_mlp": [16, 8]},
    "dlrm-self": {
        "name": "dlrm",
        "bottom_mlp": [16, 8],
        "top_mlp": [16, 8],
        "self_interaction": True,
    },
    "dcnv2": {"name": "dcnv2", "num_cross_layers": 2, "deep_mlp": [16, 8]},
    "dcnv2-lowrank-parallel": {
        "name": "dcnv2",
        "num_cross_layers": 2,
        "low_rank": 4,
        "deep_mlp": [16, 8],
        "structure": "parallel",
    },
}
BATCHES = (
    make_batch(features(), 5, hot=0),
    make_batch(features(), 5, seed=1, hot=3),
)  # one-/multi-hot


@functools.cache
def small_model(name: str, dtype=jnp.float32) -> nnx.Module:
    """Built once per (name, dtype); tests only read it (training works on split copies)."""
    with nnx.use_eager_sharding(False):
        return build(make_cfg(SMALL[name]), features(), dtype)


@functools.cache
def small_outputs(name: str, dtype=jnp.float32):
    return apply(small_model(name, dtype), lambda m, bs: [m(b) for b in bs], BATCHES)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_shapes_dtypes_and_state(name, dtype):
    graphdef, params, *rest = nnx.split(small_model(name, dtype))
    assert not rest, "models hold only nnx.Param state"
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        assert leaf.dtype == jnp.float32, keys  # params stay fp32 whatever the compute dtype
        assert ("tables" in keys) == (keys[:2] == ["embedding", "tables"]), keys
    outs = small_outputs(name, dtype)
    for batch, (logits, aux) in zip(BATCHES, outs, strict=True):
        assert logits.shape == (5,) and logits.dtype == jnp.float32
        assert np.isfinite(np.asarray(logits)).all()
        assert aux["oov_ids"].dtype == jnp.int32 and aux["oov_ids"].shape == ()
        # the OOV count is exact: ids are drawn from [-1, vocab + 5) with vocab 50
        assert int(aux["oov_ids"]) == int((np.asarray(batch["sparse"]) >= 50).sum())
    if dtype == jnp.bfloat16:  # same seed -> same params: bf16 compute tracks fp32
        for (b16, _), (f32, _) in zip(outs, small_outputs(name), strict=True):
            np.testing.assert_allclose(np.asarray(b16), np.asarray(f32), atol=0.1, rtol=0.1)


@pytest.mark.parametrize("name", ["dlrm", "dlrm-self"])
def test_dlrm_interaction_matches_numpy(name):
    self_interaction = SMALL[name].get("self_interaction", False)
    batch = BATCHES[0]

    def pieces(m, batch):
        emb, _ = m.embedding(batch["sparse"])
        z = m.bottom(batch["dense"])
        vectors = jnp.concatenate([z[:, None], emb], axis=1)  # [B, 5, 8]
        pairs = m.interact(vectors)
        return vectors, pairs, m(batch)[0], m.top(jnp.concatenate([z, pairs], axis=1))[:, 0]

    vectors, got, logits, top_of_pairs = map(np.asarray, apply(small_model(name), pieces, batch))
    n = vectors.shape[1]
    want = np.array(
        [
            [
                vectors[b, i] @ vectors[b, j]
                for i in range(n)
                for j in range(n)
                if j > i or (self_interaction and j == i)
            ]
            for b in range(vectors.shape[0])
        ]
    )
    assert got.shape == (5, n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # and the model's logit is the top MLP applied to [z, pairs]
    np.testing.assert_allclose(logits, top_of_pairs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dcnv2", "dcnv2-lowrank-parallel"])
def test_dcnv2_cross_layer_equation(name):
    layer = small_model(name).cross[0]
    rng = np.random.default_rng(0)
    x0, x = (jnp.asarray(rng.normal(size=(5, 35)), jnp.float32) for _ in range(2))  # D = 3 + 4 * 8
    got = apply(layer, lambda m, a, b: m(a, b), x0, x)
    w = np.asarray(layer.up.kernel[...])  # [D, D], or U^T [r, D] with V [D, r] in `down`
    if layer.down is not None:
        w = np.asarray(layer.down.kernel[...]) @ w
        assert w.shape == (35, 35) and np.linalg.matrix_rank(w) == 4
    want = np.asarray(x0) * (np.asarray(x) @ w + np.asarray(layer.up.bias[...])) + np.asarray(x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_config_errors():
    fs = features()
    with pytest.raises(
        ConfigError, match=r"bottom_mlp\[-1\] \(16\) must equal the embedding dim \(8\)"
    ):
        build_abstract(make_cfg({"name": "dlrm", "bottom_mlp": [16], "top_mlp": [8]}), fs)
    tables = [
        {"name": "a", "features": ["C1", "C2"]},
        {"name": "b", "dim": 4, "features": ["C3", "C4"]},
    ]
    with pytest.raises(ConfigError, match="one embedding dim"):
        build_abstract(make_cfg(SMALL["dlrm"], tables=tables), fs)
    with pytest.raises(ConfigError, match="one embedding dim"):
        registry.forward_flops_per_example(make_cfg(SMALL["dlrm"], tables=tables), fs)
    with pytest.raises(ConfigError, match="unknown config key 'model.deep_mlp'"):
        make_cfg({"name": "dlrm", "deep_mlp": [4]})


def test_dcnv2_unequal_table_dims():
    fs = features()
    tables = [
        {"name": "a", "features": ["C1", "C2"]},
        {"name": "b", "dim": 4, "features": ["C3", "C4"]},
    ]
    cfg = make_cfg(SMALL["dcnv2"], tables=tables)
    model = build_abstract(cfg, fs)
    d = 3 + 8 + 8 + 4 + 4
    assert model.cross[0].up.kernel.shape == (d, d)
    graphdef, params = nnx.split(model)
    logits, _ = jax.eval_shape(
        lambda p, b: nnx.merge(graphdef, p)(b), params, abstract_batch(fs, 3)
    )
    assert logits.shape == (3,)
    assert (
        registry.forward_flops_per_example(cfg, fs)
        == 2 * (2 * d * d) + 2 * (d * 16 + 16 * 8) + 2 * 8
    )


# ----------------------------------------------------------------------------- training signal


@pytest.mark.parametrize("name", ["dlrm", "dcnv2-lowrank-parallel"])
def test_grads_finite_and_adam_reduces_loss(name):
    graphdef, params = nnx.split(small_model(name))
    batch = make_batch(features(), 32, seed=3)
    opt = optax.adam(1e-2)

    def loss_fn(params):
        return bce(nnx.merge(graphdef, params)(batch)[0], batch["label"])

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    opt_state = opt.init(params)
    losses = []
    for i in range(20):
        params, opt_state, loss, grads = step(params, opt_state)
        if i == 0:
            leaves = jax.tree.leaves(grads)
            assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
            assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
            assert float(jnp.abs(grads["embedding"]["tables"]["C1"][...]).sum()) > 0
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


# ----------------------------------------------------------------------------- FLOPs vs XLA


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def model_flops(cfg: Config, fs: FeatureSpec, b: int) -> tuple[float, float, float]:
    """(XLA forward, XLA forward+backward, analytic forward) FLOPs of a batch of ``b``.

    Compiled on abstract params and batch: nothing is initialised or run.
    """
    graphdef, params = nnx.split(build_abstract(cfg, fs))
    batch = abstract_batch(fs, b)

    def fwd(params, batch):
        return nnx.merge(graphdef, params)(batch)[0]

    def loss(params, batch):
        return bce(fwd(params, batch), batch["label"])

    analytic = registry.forward_flops_per_example(cfg, fs) * b
    return xla_flops(fwd, params, batch), xla_flops(jax.value_and_grad(loss), params, batch), analytic


FLOPS_MODELS = {
    "dlrm": {"name": "dlrm", "bottom_mlp": [256, 256, 32], "top_mlp": [512, 256]},
    "dcnv2": {"name": "dcnv2", "num_cross_layers": 2, "deep_mlp": [512, 256]},
    "dcnv2-lowrank-parallel": {
        "name": "dcnv2",
        "num_cross_layers": 2,
        "low_rank": 64,
        "deep_mlp": [512, 256],
        "structure": "parallel",
    },
}


@pytest.mark.parametrize("name", list(FLOPS_MODELS))
def test_forward_flops_match_xla(name):
    """Analytic forward within 10% of XLA's count (which adds elementwise ops) for fwd and train.

    Training: backward = grads w.r.t. weights (1x forward) + w.r.t. layer inputs (1x forward),
    except the first bottom-MLP layer of DLRM whose input (``dense``) needs no gradient --
    XLA skips that matmul, so the expected train count is ``3 fwd - 2 num_dense w_1`` per
    example. DCN-V2's first cross layer reads ``x0``, which includes the embeddings, so its
    input gradient is computed in full. The embedding gather/scatter counts ~0 either way.
    """
    fs = features(num_sparse=8, num_dense=13, vocab=1000)
    cfg = make_cfg(FLOPS_MODELS[name], dim=32)
    b = 64
    xla_fwd, xla_train, analytic = model_flops(cfg, fs, b)
    ratio_fwd = xla_fwd / analytic
    skipped = 2 * fs.num_dense * cfg.model.bottom_mlp[0] * b if name == "dlrm" else 0.0
    ratio_train = xla_train / (3 * analytic - skipped)
    print(f"{name}: xla/analytic forward {ratio_fwd:.4f}, train {ratio_train:.4f}")
    assert 0.97 < ratio_fwd < 1.1
    assert 0.95 < ratio_train < 1.1


# ----------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", ["dlrm", "dcnv2"])
def test_model_yaml(name):
    path = pathlib.Path(CONFIG_DIR) / "models" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= {"model", "embedding"} and "model" in raw
    assert path.read_text().lstrip().startswith("#")
    cfg = load_config(path)  # layered on configs/base.yaml, as a run would see it
    assert cfg.model.name == name and cfg.embedding.dim == raw["embedding"]["dim"]
    fs = FeatureSpec(tuple(SparseFeature(f"C{i + 1}", 1000) for i in range(26)), 13)
    graphdef, params = nnx.split(build_abstract(cfg, fs))
    emb = params["embedding"]["tables"]
    assert set(emb) == {f.name for f in fs.sparse} and emb["C1"].shape == (
        1000,
        raw["embedding"]["dim"],
    )
    logits, aux = jax.eval_shape(
        lambda p, b: nnx.merge(graphdef, p)(b), params, abstract_batch(fs, 2)
    )
    assert logits.shape == (2,) and logits.dtype == jnp.float32
    assert registry.forward_flops_per_example(cfg, fs) > 0
