"""Kunlun and the event-sequence stream: the stream's events and teacher, the event selection,
every baseline switch (it builds, trains and changes what it should), padding, FLOPs against
XLA, and the tiny preset trained through the CLI."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.config import SyntheticDataConfig, load_config
from recjax.data.spec import feature_spec
from recjax.data.synthetic import SyntheticCTR
from recjax.layers.events import most_recent
from recjax.models import registry
from recjax.models.kunlun import component_flops
from tests.conftest import (
    assert_adam_lowers_loss,
    model_logits,
    run_cli,
    tiny,
    xla_over_analytic_forward_flops,
)

CONFIG = "configs/experiments/kunlun_events.yaml"
SMALL = [  # a small event stream and model, so each variant compiles in seconds
    "data.synthetic.events=40", "data.synthetic.event_min=2", "data.synthetic.vocab_sizes=[500]",
    "data.synthetic.num_sparse=4", "data.synthetic.capacity_width=64", "model.keys=8", "model.seeds=4",
    "model.wukong_mlp=[16]", "model.top_mlp=[16]", "model.dense_mlp=[16]",
    "model.towers=[{width: 16, heads: 2, tokens: 2, layers: 2, window: 2, length: 40},"
    "{width: 16, heads: 2, tokens: 1, layers: 1, window: 2, length: 8},"
    "{width: 16, heads: 2, tokens: 1, layers: 1, window: 0, length: 4}]",
]


@pytest.fixture(autouse=True)
def _lazy_sharding():
    with nnx.use_eager_sharding(False):
        yield


def _stream(**kw) -> SyntheticCTR:
    base = dict(teacher_terms=["linear", "fm", "capacity", "sequence"], capacity_share=0.3, sequence_share=0.5,
                events=16, event_min=4, vocab_sizes=[200], capacity_width=32)
    return SyntheticCTR(SyntheticDataConfig(**{**base, **kw}))


def test_event_stream_layout_and_teacher():
    gen = _stream()
    batch = gen.examples(np.arange(4000))
    item, kind, age = batch["event_item"], batch["event_type"], batch["event_age"]
    n = (kind >= 0).sum(1)
    assert item.shape == kind.shape == age.shape == (4000, 16) and n.min() >= 4 and n.max() == 16
    valid = np.arange(16)[None, :] < n[:, None]  # valid events first, then padding
    assert np.array_equal(kind >= 0, valid) and np.all(item[~valid] == -1) and np.all(age[~valid] == 0)
    assert np.all(np.diff(np.where(valid, age, 0), axis=1)[valid[:, 1:]] < 0)  # oldest first
    assert np.bincount(kind[valid]).argmax() == 0 and set(np.unique(kind[valid])) == {0, 1, 2}
    match = (item == batch["sparse"][:, :1]) & valid
    assert 0.15 < match.sum() / valid.sum() < 0.3  # event_match_prob 0.2, plus chance draws
    np.testing.assert_array_equal(gen.examples(np.arange(4000))["event_item"], item)  # a pure function of ids
    # the sequence term follows recent matches of heavy types, and holds its share of the variance
    terms = gen.logit_terms(np.arange(4000))
    alpha = 4.0 ** (np.maximum(kind, 0) - 2.0)
    recent = np.sum(match * alpha * np.exp(-age / (48.0 * 2.0 ** np.maximum(kind, 0))), axis=1)
    assert np.corrcoef(terms[:, -1], recent)[0, 1] > 0.7
    share = terms.var(0) / terms.var(0).sum()
    assert share[-1] == pytest.approx(0.5, abs=0.06)
    np.testing.assert_allclose(batch["label_prob"], gen.label_prob(np.arange(4000)), rtol=1e-6)


def test_sequence_term_needs_events():
    with pytest.raises(Exception, match="'sequence' needs events > 0"):
        _stream(events=0)


def test_select_keeps_the_most_recent_events_of_a_type():
    kinds = jnp.array([[0, 1, 0, 2, 0, -1]])
    pos = jnp.arange(6)[None, :]
    (picked, n) = most_recent(kinds == 0, 2, pos)
    assert picked.tolist() == [[4, 2]] and n.tolist() == [2]
    (picked, n) = most_recent(kinds == 2, 3, pos)
    assert picked[0, 0] == 3 and n.tolist() == [1]


def _setup(*overrides):
    cfg = load_config(CONFIG, [*SMALL, *overrides])
    fs = feature_spec(cfg.data)
    model = registry.build_model(cfg, fs, nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in SyntheticCTR(cfg.data.synthetic).examples(np.arange(64)).items()
             if k not in ("example_id", "label_prob")}
    return cfg, fs, model, batch


SWITCHES = ["model.interaction=pffn", "model.pooling=pma", "model.sliding_window=false", "model.compskip=false",
            "model.personalization=false", "model.rote=false", "model.global_experts=1", "model.use_sequence=false"]


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_builds_trains_and_changes_what_it_should(switch):
    cfg, fs, model, batch = _setup(switch)
    base_cfg = load_config(CONFIG, SMALL)
    flops, base = component_flops(cfg, fs), component_flops(base_cfg, fs)
    tower = model.towers[0] if len(model.towers) else None
    if switch == "model.interaction=pffn":
        assert not hasattr(tower.interaction[0], "query") and flops["interaction"] < base["interaction"]
    elif switch == "model.pooling=pma":
        assert not hasattr(tower.pooling[0], "compress") and tower.pooling[0].seeds.shape[0] == 2
    elif switch == "model.sliding_window=false":
        assert tower.attention[1].window is None and flops["attention"] > base["attention"]
    elif switch == "model.compskip=false":
        assert all(m is not None for m in [*tower.interaction, *tower.attention])
        assert flops["interaction"] == pytest.approx(2 * base["interaction"] - 0.0, rel=0.35)
    elif switch == "model.personalization=false":
        assert len(model.towers) == 1 and tower.pooling[1].seeds.shape[0] == 4
    elif switch == "model.rote=false":  # ages then reach the model only through the event rows
        assert not any(a.use_rote for t in model.towers for a in t.attention if a is not None)
        for t in model.towers:
            t.events.age_proj.set_value(jnp.zeros_like(t.events.age_proj[...]))
        older = {**batch, "event_age": batch["event_age"] * 3.0 + 1.0}
        np.testing.assert_array_equal(model_logits(model, batch), model_logits(model, older))
    elif switch == "model.global_experts=1":
        assert all(len(m.experts) == 1 for m in model.mixtures)
    elif switch == "model.use_sequence=false":
        other = {**batch, "event_item": (batch["event_item"] + 7) % 500}
        np.testing.assert_array_equal(model_logits(model, batch), model_logits(model, other))
        assert flops["attention"] == flops["interaction"] == 0
    assert_adam_lowers_loss(model, batch)


def test_sequence_model_reads_ages_and_items_but_not_padding():
    _, _, model, batch = _setup()
    out = model_logits(model, batch)
    older = {**batch, "event_age": batch["event_age"] * 3.0 + 1.0}
    assert not np.allclose(out, model_logits(model, older))
    for t in model.towers:  # through the event rows' age feature and through ROTE
        t.events.age_proj.set_value(jnp.zeros_like(t.events.age_proj[...]))
    assert not np.allclose(model_logits(model, batch), model_logits(model, older))
    out = model_logits(model, batch)
    valid = batch["event_type"] >= 0
    assert not np.allclose(out, model_logits(model, {**batch, "event_item": jnp.where(valid, (batch["event_item"] + 7) % 500, -1)}))
    padded = {**batch, "event_item": jnp.where(valid, batch["event_item"], 3),
              "event_age": jnp.where(valid, batch["event_age"], 99.0)}  # padding still has type -1
    np.testing.assert_allclose(out, model_logits(model, padded), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("switch", [None, "model.compskip=false"])
def test_forward_flops_match_xla(switch):
    """Analytic forward FLOPs within 5% of XLA's cost analysis (towers and layers are Python
    loops, so nothing is rolled); the XLA path's windowed attention is banded."""
    over = [
        "model.dim=64", "model.keys=32", "model.wukong_mlp=[256]", "model.top_mlp=[256]",
        "model.towers=[{width: 64, heads: 2, tokens: 2, layers: 2, window: 4, length: 64},"
        "{width: 64, heads: 2, tokens: 2, layers: 2, window: 4, length: 32},"
        "{width: 64, heads: 2, tokens: 2, layers: 2, window: 0, length: 16}]",
    ]
    cfg = load_config(CONFIG, over + ([switch] if switch else []))
    assert 0.97 < xla_over_analytic_forward_flops(cfg) < 1.05


def test_tiny_preset_trains(tmp_path: pathlib.Path):
    run_dir = tmp_path / "kunlun"
    run_cli(["train", "--config", CONFIG, *tiny("train.steps=30", "train.eval_every=30", "train.checkpoint_every=0",
                                                "data.synthetic.vocab_sizes=[2000]"), f"run_dir={run_dir}"])
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30] and evals[1]["excess_kl"] < evals[0]["excess_kl"]
