"""Wukong: the layer's equations by hand, its ablations, FLOPs and parameters against XLA and
the built model, the presets' sizes, and a short training run of the tiny preset."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.config import CONFIG_DIR, config_from_dict, load_config
from recjax.data.spec import FeatureSpec, SparseFeature
from recjax.layers.wukong import WukongLayer, WukongMixture
from recjax.models import registry
from recjax.models.wukong import dense_params
from tests.conftest import run_cli, tiny


@pytest.fixture(autouse=True)
def _lazy_sharding():
    with nnx.use_eager_sharding(False):
        yield


def _ln(x, eps=1e-6):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps)


def test_layer_equations_by_hand():
    """LN(concat(FMB(X), LCB(X)) + W_R X) with FMB = MLP(LN(flatten(X X^T Y))), in numpy."""
    layer = WukongLayer(6, 4, 3, 2, 5, [7], dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 6, 4))
    out = np.asarray(layer(jnp.asarray(x, jnp.float32)))
    y, w_l, w_r = (np.asarray(p[...], np.float64) for p in (layer.fm_proj, layer.lcb, layer.residual))
    fm = _ln(np.einsum("bnd,bmd,mk->bnk", x, x, y).reshape(2, -1))
    (k1, b1), (k2, b2) = ((np.asarray(a.kernel[...]), np.asarray(a.bias[...])) for a in layer.fmb.layers)
    fmb = (np.maximum(fm @ k1 + b1, 0) @ k2 + b2).reshape(2, 3, 4)
    lcb = np.einsum("ln,bnd->bld", w_l, x)
    want = _ln(np.concatenate([fmb, lcb], axis=1) + np.einsum("mn,bnd->bmd", w_r, x))
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    # n_in == n_f + n_l: the residual is X itself
    assert WukongLayer(5, 4, 3, 2, 5, [7], dtype=jnp.float32, rngs=nnx.Rngs(0)).residual is None


def test_mixture_is_the_gated_sum_of_its_experts():
    mix = WukongMixture(3, 6, 4, 3, 3, 5, [8], dtype=jnp.float32, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 4)), jnp.float32)
    gates = jax.nn.softmax(jnp.mean(x, axis=1) @ mix.gate[...], axis=-1)
    want = sum(gates[:, e, None, None] * mix.experts[e](x) for e in range(3))
    np.testing.assert_allclose(mix(x), want, rtol=1e-5, atol=1e-6)


def _features(num_sparse=8, num_dense=13):
    return FeatureSpec(tuple(SparseFeature(f"C{i + 1}", 1000) for i in range(num_sparse)), num_dense)


def test_forward_flops_and_parameters_match_xla_and_the_model():
    """Analytic forward FLOPs within 5% of XLA's cost analysis (layers unrolled: a Python loop);
    training within 5% of 3x forward; the parameter count equals the built model's."""
    fs = _features()
    model = dict(name="wukong", num_layers=3, fm_tokens=16, lc_tokens=8, rank=32, fmb_mlp=[512, 256],
                 dense_mlp=[128], dense_tokens=2, top_mlp=[256])
    cfg = config_from_dict({"model": model, "embedding": {"dim": 64}})
    graphdef, params = nnx.split(nnx.eval_shape(lambda: registry.build_model(cfg, fs, nnx.Rngs(0))))
    counted = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                  if "embedding" not in jax.tree_util.keystr(path))
    assert counted == dense_params(cfg, fs)
    b = 64
    batch = {"dense": jax.ShapeDtypeStruct((b, 13), jnp.float32), "sparse": jax.ShapeDtypeStruct((b, 8), jnp.int32),
             "label": jax.ShapeDtypeStruct((b,), jnp.float32)}
    fwd = lambda p, x: nnx.merge(graphdef, p)(x)[0]
    loss = lambda p, x: jnp.mean(fwd(p, x))
    flops = lambda f: jax.jit(f).lower(params, batch).compile().cost_analysis()["flops"]
    analytic = registry.forward_flops_per_example(cfg, fs) * b
    assert 0.98 < flops(fwd) / analytic < 1.05
    assert 0.95 < flops(jax.grad(loss)) / (3 * analytic) < 1.05


@pytest.mark.parametrize("name,low,high", [("wukong_100m", 50e6, 150e6), ("wukong_600m", 400e6, 900e6),
                                           ("wukong_3b", 2e9, 4e9)])
def test_presets_build_abstractly_at_their_sizes(name, low, high):
    cfg = load_config(pathlib.Path(CONFIG_DIR) / "models" / f"{name}.yaml")
    fs = _features(26, 13)
    assert low < dense_params(cfg, fs) < high
    graphdef, params = nnx.split(nnx.eval_shape(lambda: registry.build_model(cfg, fs, nnx.Rngs(0))))
    b = 2
    batch = {"dense": jax.ShapeDtypeStruct((b, 13), jnp.float32), "sparse": jax.ShapeDtypeStruct((b, 26), jnp.int32)}
    logits, _ = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x), params, batch)
    assert logits.shape == (b,) and logits.dtype == jnp.float32


def test_mismatched_table_widths_are_refused():
    fs = _features(2, 0)
    cfg = config_from_dict({"model": {"name": "wukong"},
                            "embedding": {"dim": 8, "tables": [
                                {"name": "a", "features": ["C1"], "dim": 16, "vocab_size": 1000},
                                {"name": "b", "features": ["C2"], "vocab_size": 1000}]}})
    with pytest.raises(Exception, match="one width"):
        registry.build_model(cfg, fs, nnx.Rngs(0))


def test_tiny_preset_trains(tmp_path: pathlib.Path):
    run_dir = tmp_path / "wukong"
    run_cli(["train", "--config", "configs/models/wukong_tiny.yaml",
             *tiny("train.steps=40", "train.eval_every=40", "train.checkpoint_every=0"), f"run_dir={run_dir}"])
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 40] and evals[1]["logloss"] < evals[0]["logloss"]
