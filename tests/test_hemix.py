"""HeMix: the HeteroMixer block and the query cross-attention against numpy, the model's
switches (sequence pooling, no fixed queries, multi-task towers), FLOPs against XLA, and a
short training run of the tiny preset."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.config import load_config
from recjax.data.spec import feature_spec
from recjax.data.synthetic import SyntheticCTR
from recjax.layers.hemix import HeteroMixerBlock, QueryCrossAttention
from recjax.models import registry
from tests.conftest import (
    assert_adam_lowers_loss,
    model_logits,
    run_cli,
    tiny,
    with_overrides,
    xla_over_analytic_forward_flops,
)

CONFIG = "configs/experiments/hemix_events.yaml"
SMALL = ["data.synthetic.events=24", "data.synthetic.event_min=2", "data.synthetic.vocab_sizes=[500]",
         "data.synthetic.num_sparse=4", "data.synthetic.capacity_width=64", "model.long_length=16",
         "model.realtime_length=4", "model.query_mlp=[32]", "model.dense_mlp=[16]", "model.ffn_hidden=32"]


@pytest.fixture(autouse=True)
def _lazy_sharding():
    with nnx.use_eager_sharding(False):
        yield


def _rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * w


def test_hetero_mixer_block_by_hand():
    n, d, h, r, f = 3, 8, 4, 2, 5
    block = HeteroMixerBlock(n, d, h, r, f, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, n, d))
    out = np.asarray(block(jnp.asarray(x, jnp.float32)))
    p = {k: np.asarray(getattr(block, k)[...], np.float64) for k in ("mix_norm", "w_l", "w_r", "ffn_norm", "w_1", "w_2")}
    want = np.empty_like(x)
    for b in range(2):
        g = _rms(x[b], p["mix_norm"])  # [N, D]
        mixed = np.zeros_like(g)
        for head in range(h):
            cols = slice(head * d // h, (head + 1) * d // h)
            token = g[:, cols].reshape(-1)  # concat over tokens of head `head`
            y = np.maximum(token @ p["w_l"][head], 0) @ p["w_r"][head]
            mixed[:, cols] = y.reshape(n, d // h)
        x1 = x[b] + mixed
        y = _rms(x1, p["ffn_norm"])
        want[b] = x1 + np.stack([np.maximum(y[i] @ p["w_1"][i], 0) @ p["w_2"][i] for i in range(n)])
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_query_cross_attention_by_hand():
    q, d, heads, length = 3, 8, 2, 5
    layer = QueryCrossAttention(q, d, heads, dtype=jnp.float32, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    x, s, n = rng.normal(size=(2, q, d)), rng.normal(size=(2, length, d)), np.array([3, 0])
    out = np.asarray(layer(jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32), jnp.asarray(n)))
    wq, wkv, wo = (np.asarray(p[...], np.float64) for p in (layer.w_q, layer.w_kv, layer.w_o))
    e = d // heads
    for j in range(q):  # example 0: three valid events, query token j with its own W_Q
        qj = x[0, j] @ wq[j]
        k, v = s[0, :3] @ wkv[:, 0], s[0, :3] @ wkv[:, 1]
        heads_out = []
        for hh in range(heads):
            sc = k[:, hh * e:(hh + 1) * e] @ qj[hh * e:(hh + 1) * e] / np.sqrt(e)
            a = np.exp(sc - sc.max())
            heads_out.append((a / a.sum()) @ v[:, hh * e:(hh + 1) * e])
        np.testing.assert_allclose(out[0, j], np.concatenate(heads_out) @ wo, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[1], 0.0, atol=1e-7)  # no events, no interest


def _setup(*overrides):
    cfg = load_config(CONFIG, [*SMALL, *overrides])
    fs = feature_spec(cfg.data)
    model = registry.build_model(cfg, fs, nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in SyntheticCTR(cfg.data.synthetic).examples(np.arange(48)).items()
             if k not in ("example_id", "label_prob")}
    return cfg, fs, model, batch


@pytest.mark.parametrize("variant", [None, "model.interest=pool", "model.fixed_queries=0", "model.dynamic_queries=0"])
def test_variants_build_train_and_read_the_events(variant):
    _, _, model, batch = _setup(*([variant] if variant else []))
    out = model_logits(model, batch)
    assert out.shape == (48,)
    valid = batch["event_type"] >= 0
    moved = {**batch, "event_item": jnp.where(valid, (batch["event_item"] + 7) % 500, -1)}
    assert not np.allclose(out, model_logits(model, moved))
    padded = {**batch, "event_item": jnp.where(valid, batch["event_item"], 3),
              "event_age": jnp.where(valid, batch["event_age"], 99.0)}  # padding keeps type -1
    np.testing.assert_allclose(out, model_logits(model, padded), rtol=1e-5, atol=1e-6)
    if variant == "model.interest=pool":
        assert not len(model.interests) and model.pool_proj.shape == (2, 32, 4 * 32)
    elif variant == "model.fixed_queries=0":
        assert model.fixed is None
    assert_adam_lowers_loss(model, batch)


def test_multi_task_data_gives_one_logit_per_task():
    _, _, model, batch = _setup("data.synthetic.tasks=3")
    assert batch["label"].shape == (48, 3)
    assert model_logits(model, batch).shape == (48, 3)


@pytest.mark.parametrize("variant", [None, "model.interest=pool"])
def test_forward_flops_match_xla(variant):
    cfg = load_config(CONFIG, with_overrides(SMALL, "model.dim=64", "model.ffn_hidden=128", "model.rank=16",
                                             *([variant] if variant else [])))
    assert 0.97 < xla_over_analytic_forward_flops(cfg) < 1.05


def test_tiny_preset_trains(tmp_path: pathlib.Path):
    run_dir = tmp_path / "hemix"
    run_cli(["train", "--config", CONFIG, *tiny("train.steps=30", "train.eval_every=30", "train.checkpoint_every=0",
                                                "data.synthetic.vocab_sizes=[2000]"), f"run_dir={run_dir}"])
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30] and evals[1]["logloss"] < evals[0]["logloss"]


def test_1b_preset_size():
    """configs/models/hemix_1b.yaml: about 1B dense parameters on a 1024-event stream."""
    cfg = load_config("configs/models/hemix_1b.yaml", ["data.synthetic.events=1024", "data.synthetic.event_types=3"])
    fs = feature_spec(cfg.data)
    params = nnx.state(nnx.eval_shape(lambda: registry.build_model(cfg, fs, nnx.Rngs(0))), nnx.Param)
    leaves = jax.tree.leaves_with_path(params)
    dense = sum(leaf.size for path, leaf in leaves if "embedding" not in jax.tree_util.keystr(path))
    assert 0.95e9 < dense < 1.1e9
    assert 4e9 < registry.forward_flops_per_example(cfg, fs) < 6e9
