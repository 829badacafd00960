"""Sequential recommenders: attention masking, padding invariance, Cotten4Rec's m_h, losses,
early stopping, and end-to-end training / resume on the synthetic sequences."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.config import load_config
from recjax.kernels.linear_attention import linear_attention_reference
from recjax.models.seqrec import build_seqrec
from recjax.train import seqrec_loop as sl

NUM_ITEMS, MAX_LEN = 30, 12


def tiny_cfg(*overrides: str):
    base = [
        "model.name=seqrec", "model.hidden=16", "model.num_heads=2", "model.inner=32",
        "data.source=sequences", f"data.sequences.max_len={MAX_LEN}",
        "train.tensorboard=false",
    ]
    keys = {o.split("=", 1)[0] for o in overrides}
    return load_config(None, [b for b in base if b.split("=", 1)[0] not in keys] + list(overrides))


def make_params(*overrides: str):
    """(cfg, graphdef, params) of a tiny model. Initialised eagerly: on CPU the per-op
    compiles of the random initialisers are cached across tests, a jitted init is not."""
    cfg = tiny_cfg(*overrides)
    graphdef, state = nnx.split(build_seqrec(cfg, NUM_ITEMS, nnx.Rngs(params=jax.random.PRNGKey(0))))
    return cfg, graphdef, nnx.to_pure_dict(state)


def random_batch(seed: int, lengths=(5, MAX_LEN, 1, 0)):
    rng = np.random.default_rng(seed)
    lengths = np.array(lengths, np.int32)
    inputs = rng.integers(1, NUM_ITEMS + 1, (len(lengths), MAX_LEN)).astype(np.int32)
    inputs[np.arange(MAX_LEN)[None, :] >= lengths[:, None]] = 0
    return inputs, lengths


TYPES = [("softmax", True), ("softmax", False), ("elu_l2", True), ("elu_l2", False),
         ("cosine", True), ("cosine", False)]


@pytest.mark.parametrize("attention,causal", TYPES)
def test_causality_and_padding(attention, causal):
    _, graphdef, params = make_params(f"model.attention={attention}", f"model.causal={str(causal).lower()}")

    with_dropout = attention == "softmax" and causal  # train mode once: its compile is slow

    @jax.jit
    def run(params, inputs, lengths, rng):
        model = nnx.merge(graphdef, params)
        h = model.encode(inputs, lengths, train=False)
        return h, model.item_logits(h), model.encode(inputs, lengths, train=with_dropout, rng=rng)

    inputs, lengths = random_batch(0)
    valid = np.arange(MAX_LEN)[None, :] < lengths[:, None]
    # the same rows with other ids at padded positions, and row 1 changed after position t
    noise = np.random.default_rng(1).integers(1, NUM_ITEMS + 2, inputs.shape).astype(np.int32)
    t = 4
    future = inputs.copy()
    future[1, t + 1:] = future[1, t + 1:] % NUM_ITEMS + 1
    padded = np.where(valid, inputs, noise)
    key = jax.random.key(1, impl="rbg")
    stacked = np.concatenate([inputs, padded, future])
    h_all, logits, h_train = (np.asarray(x) for x in run(params, stacked, np.tile(lengths, 3), key))
    h, h_pad, h_future = np.split(h_all, 3)
    assert h.shape == (4, MAX_LEN, 16) and logits.shape == (12, MAX_LEN, NUM_ITEMS + 2)
    assert np.all(h[~valid] == 0) and np.all(np.isfinite(h))
    np.testing.assert_array_equal(h_pad, h)  # padding invariance, eval
    if with_dropout:  # train mode: the same rows in the same batch slots get the same masks
        h_train_pad = np.asarray(run(params, np.concatenate([padded, padded, future]), np.tile(lengths, 3), key)[2])
        np.testing.assert_array_equal(h_train_pad[:4], h_train[:4])
        assert np.all(h_train[:4][~valid] == 0)
        assert np.max(np.abs(h_train[:4] - h)) > 1e-3  # dropout is active
        other = np.asarray(run(params, stacked, np.tile(lengths, 3), jax.random.key(2, impl="rbg"))[2])
        assert np.max(np.abs(other[:4] - h_train[:4])) > 1e-3  # and depends on the key
    diff = np.max(np.abs(h_future[1, : t + 1] - h[1, : t + 1]))
    if causal:
        assert diff < 1e-6, diff
    else:
        assert diff > 1e-4, diff
    assert np.max(np.abs(h_future[1, t + 1:] - h[1, t + 1:])) > 1e-4


@pytest.mark.parametrize("attention,causal", [("elu_l2", True), ("cosine", False)])
def test_linear_attention_layer_matches_the_reference(attention, causal):
    _, graphdef, params = make_params(f"model.attention={attention}", f"model.causal={str(causal).lower()}",
                                      "model.length_scale_init=0.3")

    @jax.jit
    def run(params, x, lengths):
        attn = nnx.merge(graphdef, params).blocks[0].attn
        q, k, v = (f(x).reshape(3, MAX_LEN, 2, 8) for f in (attn.q, attn.k, attn.v))
        scale = attn.length_scale[...] if attention == "cosine" else None
        ref = linear_attention_reference(q, k, v, causal=causal, feature_map=attention,
                                         length_scale=scale, lengths=lengths)
        return attn(x, lengths, None), attn.o(ref.reshape(3, MAX_LEN, 16))

    x = jax.random.normal(jax.random.PRNGKey(3), (3, MAX_LEN, 16))
    got, expect = run(params, x, jnp.array([MAX_LEN, 7, 2], jnp.int32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expect), atol=2e-5)
    if attention == "cosine":
        np.testing.assert_allclose(np.asarray(params["blocks"][0]["attn"]["length_scale"]), [0.3, 0.3])


def test_cotten4rec_length_scale_receives_gradient():
    cfg, graphdef, params = make_params("model.attention=cosine", "model.causal=false",
                                        "model.objective=cloze")
    inputs, lengths = random_batch(4, lengths=(6, MAX_LEN, 3, 9))
    targets = np.where(np.arange(MAX_LEN)[None, :] % 3 == 0, inputs, 0)
    batch = {"inputs": np.where(targets > 0, NUM_ITEMS + 1, inputs), "targets": targets, "lengths": lengths}

    @jax.jit
    def grad(p):
        return jax.grad(lambda p: sl.sequence_loss(
            nnx.merge(graphdef, p), batch, jax.random.key(0, impl="rbg"), cfg.model, False)[0])(p)

    for block in grad(params)["blocks"].values():
        g = np.asarray(block["attn"]["length_scale"])
        assert g.shape == (2,) and np.all(np.isfinite(g)) and np.all(np.abs(g) > 1e-7), g


def test_sampled_and_full_losses_agree_with_a_direct_computation():
    cfg, graphdef, params = make_params("model.dropout=0.0", "model.attn_dropout=0.0")
    sampled = {k: tiny_cfg("model.loss=sampled", f"model.sampled_loss={k}", "model.num_sampled=8").model
               for k in ("ce", "bce")}
    inputs, lengths = random_batch(5, lengths=(6, MAX_LEN))
    targets = np.where(inputs > 0, inputs % NUM_ITEMS + 1, 0)
    batch = {"inputs": inputs, "targets": targets, "lengths": lengths}

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        key = jax.random.key(0, impl="rbg")
        out = {"full": sl.sequence_loss(model, batch, key, cfg.model, False),
               "last": sl.sequence_loss(model, batch, key, cfg.model, True)}
        out.update({k: sl.sequence_loss(model, batch, key, m, False) for k, m in sampled.items()})
        return out, model.item_logits(model.encode(inputs, lengths, train=False))

    out, logits = run(params)
    logits = np.asarray(logits, np.float64)[..., 1:NUM_ITEMS + 1]
    per = np.log(np.exp(logits).sum(-1)) - np.take_along_axis(logits, np.maximum(targets - 1, 0)[..., None], -1)[..., 0]
    loss, count = out["full"]
    assert int(count) == int((targets > 0).sum())
    assert float(loss) == pytest.approx(per[targets > 0].mean(), rel=1e-5)
    loss, count = out["last"]  # prefix rows: only position lengths - 1 is scored
    assert int(count) == 2
    assert float(loss) == pytest.approx(np.mean([per[0, 5], per[1, MAX_LEN - 1]]), rel=1e-5)
    for kind in ("ce", "bce"):
        assert math.isfinite(float(out[kind][0])) and float(out[kind][0]) > 0
    # uniform sampled CE over 8 negatives is far below the full softmax over 30 items at init
    assert float(out["ce"][0]) < float(out["full"][0])


def test_early_stopping_stops_after_patience_non_improving_validations():
    es = sl.EarlyStopping(patience=2)
    seen = []
    for epoch, value in enumerate([0.1, 0.3, 0.3, 0.2, 0.5, 0.4, 0.4], start=1):
        seen.append((es.update(epoch, value), es.stop))
        if es.stop:
            break
    # 0.3 at epoch 2 is the best; 0.3 (equal, not better) and 0.2 are two misses -> stop at 4
    assert seen == [(True, False), (True, False), (False, False), (False, True)]
    assert (es.best, es.best_epoch, es.bad) == (0.3, 2, 2)
    restored = sl.EarlyStopping.from_state(json.loads(json.dumps(es.state())), patience=2)
    assert (restored.best, restored.best_epoch, restored.bad, restored.stop) == (0.3, 2, 2, True)
    never = sl.EarlyStopping(patience=0)
    for epoch in range(1, 50):
        never.update(epoch, 0.0)
    assert not never.stop


# ----------------------------------------------------------------------------- training

# Tiny synthetic sequences and model; adam at a constant rate, no dropout (dropout's random
# bits dominate compile time on CPU and are covered above).
E2E = [
    "model.name=seqrec", "model.hidden=16", "model.inner=32", "model.num_heads=2",
    "model.num_layers=1", "model.dropout=0.0", "model.attn_dropout=0.0",
    "data.source=sequences", "data.sequences.max_len=10", "data.global_batch=64",
    "data.sequences.synthetic.num_users=300", "data.sequences.synthetic.num_items=100",
    "data.sequences.synthetic.min_length=8", "data.sequences.synthetic.max_length=30",
    "optim.dense.name=adam", "optim.dense.lr=0.01", "optim.warmup_steps=0",
    "optim.decay=constant", "optim.grad_clip_norm=0", "train.epochs=4",
    "train.tensorboard=false", "train.async_checkpoint=false", "ranking.ks=[5,10]",
]
REPORT_KEYS = {
    "protocol", "model", "data", "best_epoch", "epochs_run", "stopped_early", "valid", "test",
    "popularity_baseline", "train_sequences_per_s", "train_time_s", "train_time_to_best_s",
    "wall_time_to_best_s", "wall_time_total_s", "device", "versions",
}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Share compiled steps between the runs below (same config -> same program)."""
    keys = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
            "jax_persistent_cache_min_compile_time_secs": 0.0,
            "jax_persistent_cache_min_entry_size_bytes": 0}
    old = {k: getattr(jax.config, k) for k in keys}
    for k, v in keys.items():
        jax.config.update(k, v)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def e2e_cfg(run_dir: pathlib.Path, *extra: str):
    keys = {e.split("=", 1)[0] for e in extra}
    return load_config(None, [o for o in E2E if o.split("=", 1)[0] not in keys] + [*extra, f"run_dir={run_dir}"])


def records(run_dir: pathlib.Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


class Interrupted(Exception):
    pass


def test_train_seqrec_beats_popularity_writes_report_and_resumes_exactly(tmp_path, monkeypatch, compile_cache):
    ref = sl.train_seqrec(e2e_cfg(tmp_path / "a"))
    assert REPORT_KEYS <= ref.keys()
    assert json.loads((tmp_path / "a" / "report.json").read_text()) == json.loads(json.dumps(ref))
    assert ref["protocol"] == "leave-one-out, full ranking over 100 items, history not masked"
    assert ref["data"]["users"] == 300 and ref["data"]["items"] == 100
    assert ref["data"]["interactions"] > 300 * 8 and ref["epochs_run"] == 4
    assert ref["model"]["attention"] == "softmax" and ref["train_sequences_per_s"] > 0
    pop = ref["popularity_baseline"]["valid"]["ndcg@10"]
    print(f"valid NDCG@10: model {ref['valid']['ndcg@10']:.4f}, popularity {pop:.4f}")
    assert ref["valid"]["ndcg@10"] > 1.2 * pop
    assert ref["test"]["ndcg@10"] > ref["popularity_baseline"]["test"]["ndcg@10"]
    train = records(tmp_path / "a", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in records(tmp_path / "a", "valid")] == [1, 2, 3, 4]
    assert records(tmp_path / "a", "test")[0]["ndcg@10"] == ref["test"]["ndcg@10"]
    # `recjax eval` path: the best checkpoint scores the same
    again = sl.evaluate_seqrec(e2e_cfg(tmp_path / "a"))
    assert again["best_epoch"] == ref["best_epoch"]
    assert again["test"]["ndcg@10"] == pytest.approx(ref["test"]["ndcg@10"])

    # the same run killed right after epoch 2's checkpoint, then restarted
    run_b = tmp_path / "b"
    save = sl.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if self.directory == (run_b / "checkpoints").resolve() and step == 2:
            raise Interrupted

    monkeypatch.setattr(sl.Checkpointer, "save", save_then_die)
    with pytest.raises(Interrupted):
        sl.train_seqrec(e2e_cfg(run_b))
    monkeypatch.undo()
    assert [r["step"] for r in records(run_b, "train")] == [1, 2]
    resumed = sl.train_seqrec(e2e_cfg(run_b))
    train_b = records(run_b, "train")
    assert [r["step"] for r in train_b] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in train_b], [r["loss"] for r in train], rtol=1e-6)
    assert resumed["best_epoch"] == ref["best_epoch"] and resumed["epochs_run"] == 4
    assert resumed["test"]["ndcg@10"] == pytest.approx(ref["test"]["ndcg@10"], rel=1e-6)


def test_training_stops_after_patience_validations_without_improvement(tmp_path, monkeypatch, compile_cache):
    values = iter([0.3, 0.2, 0.3, 0.9])  # best at epoch 1, then two validations that are not better
    metrics = lambda v: {"hr@5": v, "ndcg@5": v, "hr@10": v, "ndcg@10": v, "mrr": v, "users": 300}
    monkeypatch.setattr(sl, "evaluate_split", lambda *a, **k: metrics(next(values, 0.0)))
    out = sl.train_seqrec(e2e_cfg(tmp_path, "ranking.patience=2"))
    assert (out["best_epoch"], out["epochs_run"], out["stopped_early"]) == (1, 3, True)
    assert out["valid"]["ndcg@10"] == 0.3
    assert [r["step"] for r in records(tmp_path, "train")] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "best" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


@pytest.mark.parametrize("model", ["cotten4rec", "linrec_prefixes_sampled"])
def test_losses_are_finite_and_decrease_on_synthetic_sequences(model):
    from recjax.data import seq_pipeline as sp

    extra = {
        "cotten4rec": ["model.attention=cosine", "model.causal=false", "model.objective=cloze"],
        "linrec_prefixes_sampled": ["model.attention=elu_l2", "model.loss=sampled", "model.num_sampled=20",
                                    "data.sequences.train_rows=prefixes"],
    }[model]
    cfg = e2e_cfg(pathlib.Path("unused"), *extra)
    data = sp.load_for_config(cfg.data.sequences)
    split = sp.leave_one_out(data)
    rows = sp.train_rows(split, 10, cfg.data.sequences.train_rows, cfg.model.objective)
    batches = sp.TrainBatches(rows, 64, seed=0, objective=cfg.model.objective, num_items=100, mask_prob=0.2)
    tx = sl.optim.make_optimizer(cfg.optim, 100)
    graphdef, _, init = sl.init_params(cfg, 100)
    params = init(jax.random.key(0, impl="rbg"))
    opt_state = tx.init(params)
    step = sl.make_train_step(graphdef, tx, cfg)
    batch = next(batches.epoch(1))  # one fixed batch: its loss must fall
    losses = []
    for i in range(12):
        params, opt_state, loss, gnorm = step(params, opt_state, batch, np.int32(i))
        losses.append(float(loss))
        assert math.isfinite(float(gnorm))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.9 * losses[0], losses


def test_evaluation_ranks_match_the_numpy_spec_for_every_protocol():
    from recjax.data import seq_pipeline as sp
    from recjax.train import ranking as rk

    cfg = e2e_cfg(pathlib.Path("unused"))
    split = sp.leave_one_out(sp.load_for_config(cfg.data.sequences))
    graphdef, _, init = sl.init_params(cfg, 100)
    params = init(jax.random.key(0, impl="rbg"))

    @jax.jit
    def scores(params, inputs, lengths):
        model = nnx.merge(graphdef, params)
        h = model.encode(inputs, lengths, train=False)
        return model.item_logits(h[jnp.arange(h.shape[0]), lengths - 1])

    for protocol, extra in (("full", ["ranking.mask_history=true"]), ("sampled", ["ranking.num_negatives=20"])):
        c = e2e_cfg(pathlib.Path("unused"), f"ranking.protocol={protocol}", "ranking.batch=128", *extra)
        ev = sl._eval_split(c, split, "test")
        assert len(ev.rows) == 300  # not a multiple of the batch: the last batch is padded
        got, _ = sl.rank_split(sl.make_eval_step(graphdef, protocol), params, ev, c.ranking.batch)
        s = np.asarray(scores(params, ev.rows.inputs, ev.rows.lengths))
        t = ev.rows.targets
        if protocol == "full":
            want = rk.target_ranks(s, t, (ev.rows.history_offsets, ev.rows.history_items))
            assert not np.array_equal(want, rk.target_ranks(s, t))  # masking mattered
        else:
            assert ev.negatives.shape == (300, 20)
            want = rk.sampled_ranks(s[np.arange(300), t], np.take_along_axis(s, ev.negatives, axis=1))
        np.testing.assert_array_equal(got, want)
        pop = sl.popularity_metrics(sl.Prepared(split.data, split, None, None, ev, ev), ev, c)
        assert 0 < pop["ndcg@10"] < pop["hr@10"] <= 1
