"""Sequential recommenders: attention masking, padding invariance, Cotten4Rec's m_h, losses
(over a padded item table), the best-metric / early-stopping hook, and end-to-end training /
resume / evaluation of the seqrec task by the one trainer on the synthetic sequences."""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.config import CONFIG_DIR, load_config
from recjax.errors import ConfigError
from recjax.kernels.linear_attention import linear_attention_reference
from recjax.models import registry as models
from recjax.models.seqrec import SequenceInfo
from recjax.tasks import get_task
from recjax.tasks.seqrec import RankingEvaluator, sequence_loss
from recjax.train import trainer
from recjax.train.checkpoint import Checkpointer
from recjax.train.hooks import BestTracker
from recjax.train.state import build_setup
from recjax.train.step import make_train_step

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
    info = SequenceInfo(NUM_ITEMS, MAX_LEN)
    graphdef, state = nnx.split(models.build_model(cfg, info, nnx.Rngs(params=jax.random.PRNGKey(0))))
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
        return jax.grad(lambda p: sequence_loss(
            nnx.merge(graphdef, p), batch, jax.random.key(0, impl="rbg"), cfg.model, False)[0])(p)

    for block in grad(params)["blocks"].values():
        g = np.asarray(block["attn"]["length_scale"])
        assert g.shape == (2,) and np.all(np.isfinite(g)) and np.all(np.abs(g) > 1e-7), g


def test_sampled_and_full_losses_agree_with_a_direct_computation():
    # the item table padded to 64 rows (0 pad, items 1..30, 31 [MASK], 32..63 padding rows):
    # the padding rows are never classes
    pad = "embedding.pad_rows_to=64"
    cfg, graphdef, params = make_params("model.dropout=0.0", "model.attn_dropout=0.0", pad)
    assert params["item_embedding"].shape == (64, 16) and params["output_bias"].shape == (64,)
    sampled = {k: tiny_cfg("model.loss=sampled", f"model.sampled_loss={k}", "model.num_sampled=8", pad).model
               for k in ("ce", "bce")}
    inputs, lengths = random_batch(5, lengths=(6, MAX_LEN))
    targets = np.where(inputs > 0, inputs % NUM_ITEMS + 1, 0)
    batch = {"inputs": inputs, "targets": targets, "lengths": lengths}

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        key = jax.random.key(0, impl="rbg")
        out = {"full": sequence_loss(model, batch, key, cfg.model, False),
               "last": sequence_loss(model, batch, key, cfg.model, True)}
        out.update({k: sequence_loss(model, batch, key, m, False) for k, m in sampled.items()})
        return out, model.item_logits(model.encode(inputs, lengths, train=False))

    out, logits = run(params)
    assert logits.shape[-1] == 64
    logits = np.asarray(logits, np.float64)[..., 1:NUM_ITEMS + 1]
    per = np.log(np.exp(logits).sum(-1)) - np.take_along_axis(logits, np.maximum(targets - 1, 0)[..., None], -1)[..., 0]
    loss, count, _ = out["full"]
    assert int(count) == int((targets > 0).sum())
    assert float(loss) == pytest.approx(per[targets > 0].mean(), rel=1e-5)
    loss, count, _ = out["last"]  # prefix rows: only position lengths - 1 is scored
    assert int(count) == 2
    assert float(loss) == pytest.approx(np.mean([per[0, 5], per[1, MAX_LEN - 1]]), rel=1e-5)
    for kind in ("ce", "bce"):
        assert math.isfinite(float(out[kind][0])) and float(out[kind][0]) > 0
    # uniform sampled CE over 8 negatives is far below the full softmax over 30 items at init
    assert float(out["ce"][0]) < float(out["full"][0])


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_scored_cap_gathers_the_positions_with_a_target(loss):
    """A cap at or above the batch's target count gives the uncapped loss and gradient; below
    it, the first ``cap`` targets (row-major) are scored and the rest counted as left out."""
    cfg, graphdef, params = make_params("model.dropout=0.0", "model.attn_dropout=0.0", f"model.loss={loss}",
                                        "model.num_sampled=8")
    inputs, lengths = random_batch(6, lengths=(7, MAX_LEN, 3, 0))
    targets = np.where((np.arange(MAX_LEN)[None, :] % 4 == 1) & (inputs > 0), inputs % NUM_ITEMS + 1, 0)
    count = int((targets > 0).sum())
    assert 4 < count < 16 < targets.size

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def run(params, cap, keep):
        kept = np.where(np.cumsum(targets.ravel() > 0).reshape(targets.shape) <= keep, targets, 0)
        batch = {"inputs": inputs, "targets": kept, "lengths": lengths}

        def f(p):
            loss, n, over = sequence_loss(nnx.merge(graphdef, p), batch, jax.random.key(1, impl="rbg"),
                                          cfg.model, False, cap)
            return loss, (n, over)
        return jax.value_and_grad(f, has_aux=True)(params)

    (want, (n, over)), want_grad = run(params, 0, count)
    assert (int(n), int(over)) == (count, 0)
    for cap in (16, count):
        (got, (n, over)), grad = run(params, cap, count)
        assert (int(n), int(over)) == (count, 0)
        assert float(got) == pytest.approx(float(want), rel=1e-6), cap
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grad, want_grad)
    (got, (n, over)), _ = run(params, 3, count)  # = the uncapped loss of the first 3 targets
    (first3, (n3, _)), _ = run(params, 0, 3)
    assert (int(n), int(over), int(n3)) == (3, count - 3, 3)
    assert float(got) == pytest.approx(float(first3), rel=1e-6)


def test_scored_cap_follows_the_rows_target_counts():
    """The task's cap: stride-10 windows score ~10 positions a row, so the cap is far below B * S
    and above the mean; prefix next-item rows need no cap."""
    base = ["data.source=sequences", "data.sequences.synthetic.num_users=200", "data.global_batch=32",
            "data.sequences.max_len=20", "model.name=seqrec", "model.hidden=16", "model.num_heads=2"]
    task = get_task(load_config(None, [*base, "data.sequences.window_stride=5"]))
    per_row = np.count_nonzero(task.batches.rows.targets, axis=1)
    assert 32 * per_row.mean() < task.scored_cap < 32 * 20 and task.scored_cap % 128 == 0
    assert get_task(load_config(None, [*base, "data.sequences.train_rows=prefixes"])).scored_cap == 0


def test_best_tracker_stops_after_patience_non_improving_evaluations():
    """The trainer's best-metric hook (every task): early stopping, its checkpointed state."""
    best = BestTracker("valid/ndcg@10", "max", patience=2)
    seen = []
    for step, value in enumerate([0.1, 0.3, 0.3, 0.2, 0.5, 0.4, 0.4], start=1):
        seen.append((best.update(10 * step, {"valid": {"ndcg@10": value, "hr@10": 1.0}}), best.stop))
        if best.stop:
            break
    # 0.3 at step 20 is the best; 0.3 (equal, not better) and 0.2 are two misses -> stop at 40
    assert seen == [(True, False), (True, False), (False, False), (False, True)]
    assert (best.best, best.best_step, best.bad, best.last_eval_step) == (0.3, 20, 2, 40)
    assert [h["step"] for h in best.history] == [10, 20, 30, 40]
    restored = BestTracker("valid/ndcg@10", "max", patience=2)
    restored.load(json.loads(json.dumps(best.state())))
    assert (restored.best, restored.best_step, restored.bad, restored.stop) == (0.3, 20, 2, True)
    assert restored.history == best.history and restored.last_eval_step == 40
    never = BestTracker("valid/ndcg@10", "max", patience=0)
    for step in range(1, 50):
        never.update(step, {"valid": {"ndcg@10": 0.0}})
    assert not never.stop
    # mode min (e.g. a loss), and a non-finite value is never a best
    low = BestTracker("eval/logloss", "min", patience=1)
    assert low.update(1, {"eval": {"logloss": 0.5}}) and not low.update(2, {"eval": {"logloss": float("nan")}})
    assert (low.best, low.best_step, low.stop) == (0.5, 1, True)
    # no metric: evaluations are only counted
    plain = BestTracker()
    assert not plain.update(5, {"valid": {"ndcg@10": 1.0}}) and plain.last_eval_step == 5 and not plain.stop
    with pytest.raises(ConfigError, match="valid/ndcg@50"):
        BestTracker("valid/ndcg@50").update(1, {"valid": {"ndcg@10": 0.1}})


# ----------------------------------------------------------------------------- training

# Tiny synthetic sequences and model on the task defaults (configs/tasks/seqrec.yaml: item
# table padded to 64 rows, Adam on both groups, validation and a checkpoint every epoch,
# best valid/ndcg@10 kept and tested); adam at a constant rate, no dropout (dropout's random
# bits dominate compile time on CPU and are covered above). 609 training windows in batches
# of 64: 10 steps per epoch, 40 in all.
TASK_CONFIG = CONFIG_DIR / "tasks" / "seqrec.yaml"
E2E = [
    "model.name=seqrec", "model.hidden=16", "model.inner=32", "model.num_heads=2",
    "model.num_layers=1", "model.dropout=0.0", "model.attn_dropout=0.0",
    "data.source=sequences", "data.sequences.max_len=10", "data.global_batch=64",
    "data.sequences.synthetic.num_users=300", "data.sequences.synthetic.num_items=100",
    "data.sequences.synthetic.min_length=8", "data.sequences.synthetic.max_length=30",
    "optim.dense.name=adam", "optim.dense.lr=0.01", "optim.embedding.name=adam", "optim.embedding.lr=0.01",
    "optim.warmup_steps=0", "optim.decay=constant", "optim.grad_clip_norm=0", "train.epochs=4",
    "train.log_every=1", "train.tensorboard=false", "train.async_checkpoint=false", "ranking.ks=[5,10]",
]
SPE = 10  # steps per epoch
REPORT_KEYS = {
    "task", "model", "data", "steps", "epochs", "stopped_early", "best_metric", "best_step",
    "best_value", "train", "eval", "test", "train_examples_per_s", "train_time_s", "eval_time_s",
    "checkpoint_time_s", "train_time_to_best_s", "wall_time_to_best_s", "wall_time_total_s",
    "model_info", "train_step_memory_bytes", "environment",
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
    return load_config(TASK_CONFIG, [o for o in E2E if o.split("=", 1)[0] not in keys] + [*extra, f"run_dir={run_dir}"])


def records(run_dir: pathlib.Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def checkpoint_steps(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


class Interrupted(Exception):
    pass


def test_train_seqrec_beats_popularity_writes_report_and_resumes_exactly(tmp_path, monkeypatch, compile_cache):
    ref = trainer.train(e2e_cfg(tmp_path / "a"))
    assert REPORT_KEYS <= ref.keys()
    assert json.loads((tmp_path / "a" / "report.json").read_text()) == json.loads(json.dumps(ref))
    assert ref["task"] == "seqrec" and ref["best_metric"] == "valid/ndcg@10"
    data = ref["data"]
    assert data["protocol"] == "leave-one-out, full ranking over 100 items, history not masked"
    assert data["users"] == 300 and data["items"] == 100 and data["batches_per_epoch"] == SPE
    assert data["interactions"] > 300 * 8 and ref["epochs"] == 4 and ref["steps"] == 4 * SPE
    assert not ref["stopped_early"]
    assert ref["model"]["attention"] == "softmax" and ref["train_examples_per_s"] > 0
    # parameters over the padded item table: 100 items + pad + [MASK] = 102 rows -> 128 (pad_rows_to
    # 64), d = 16, tied output; dense: position [10, 16], output bias [128], final LayerNorm 2 x 16,
    # one block: 2 LayerNorms 2 x 2 x 16, q/k/v/o 4 x (16 x 16 + 16), FFN 16 x 32 + 32 + 32 x 16 + 16
    info = ref["model_info"]
    assert info["params_embedding"] == 128 * 16
    block = 4 * 16 + 4 * (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16)
    assert info["params_dense"] == info["params_active"] == 10 * 16 + 128 + 2 * 16 + block
    pop = data["popularity_baseline"]["valid"]["ndcg@10"]
    print(f"valid NDCG@10: model {ref['best_value']:.4f}, popularity {pop:.4f}")
    assert ref["best_value"] > 1.2 * pop
    assert ref["test"]["ndcg@10"] > data["popularity_baseline"]["test"]["ndcg@10"]
    train = records(tmp_path / "a", "train")
    assert [r["step"] for r in train] == list(range(1, 4 * SPE + 1))
    assert train[-1]["epoch"] == 4.0 and train[-1]["loss"] < train[0]["loss"]
    valid = records(tmp_path / "a", "valid")
    assert [r["step"] for r in valid] == [0, SPE, 2 * SPE, 3 * SPE, 4 * SPE]  # the curve starts at 0
    assert ref["eval"]["valid"] == {k: v for k, v in valid[-1].items() if k not in ("step", "split", "time")}
    best = max(valid[1:], key=lambda r: r["ndcg@10"])
    assert (ref["best_step"], ref["best_value"]) == (best["step"], best["ndcg@10"])
    (test,) = records(tmp_path / "a", "test")  # once, on the best parameters
    assert test["step"] == ref["best_step"] and test["ndcg@10"] == ref["test"]["ndcg@10"]
    assert checkpoint_steps(tmp_path / "a" / "best" / "checkpoints") == [ref["best_step"]]
    assert checkpoint_steps(tmp_path / "a" / "checkpoints") == [3 * SPE, 4 * SPE]  # keep 2
    # `recjax eval` path: the best checkpoint scores the same
    again = trainer.evaluate(e2e_cfg(tmp_path / "a"))
    assert again["step"] == ref["best_step"]
    assert again["valid"]["ndcg@10"] == pytest.approx(ref["best_value"])
    assert again["test"]["ndcg@10"] == pytest.approx(ref["test"]["ndcg@10"])

    # the same run killed right after epoch 2's checkpoint, then restarted
    run_b = tmp_path / "b"
    save = Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if str(self.directory) == str(run_b / "checkpoints") and step == 2 * SPE:
            raise Interrupted

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Interrupted):
        trainer.train(e2e_cfg(run_b))
    monkeypatch.undo()
    assert [r["step"] for r in records(run_b, "train")] == list(range(1, 2 * SPE + 1))
    resumed = trainer.train(e2e_cfg(run_b))
    train_b = records(run_b, "train")
    assert [r["step"] for r in train_b] == list(range(1, 4 * SPE + 1))
    np.testing.assert_allclose([r["loss"] for r in train_b], [r["loss"] for r in train], rtol=1e-6)
    assert [r["step"] for r in records(run_b, "valid")] == [0, SPE, 2 * SPE, 3 * SPE, 4 * SPE]
    assert resumed["best_step"] == ref["best_step"] and resumed["steps"] == 4 * SPE
    assert resumed["best_value"] == pytest.approx(ref["best_value"], rel=1e-6)
    assert resumed["test"]["ndcg@10"] == pytest.approx(ref["test"]["ndcg@10"], rel=1e-6)


def test_training_stops_after_patience_validations_without_improvement(tmp_path, monkeypatch, compile_cache):
    # the first value is the evaluation at step 0 (the start of the curve; never a best)
    values = iter([0.0, 0.3, 0.2, 0.3, 0.9])  # best at epoch 1, then two validations not better
    metrics = lambda v: {"hr@5": v, "ndcg@5": v, "hr@10": v, "ndcg@10": v, "mrr": v, "users": 300}
    real = RankingEvaluator.__call__
    monkeypatch.setattr(RankingEvaluator, "__call__",
                        lambda self, params: metrics(next(values)) if self.which == "valid" else real(self, params))
    out = trainer.train(e2e_cfg(tmp_path, "train.patience=2"))
    assert (out["best_step"], out["steps"], out["epochs"], out["stopped_early"]) == (SPE, 3 * SPE, 3.0, True)
    assert out["best_value"] == 0.3 and out["eval"]["valid"]["ndcg@10"] == 0.3
    assert [r["step"] for r in records(tmp_path, "train")] == list(range(1, 3 * SPE + 1))
    assert [r["step"] for r in records(tmp_path, "valid")] == [0, SPE, 2 * SPE, 3 * SPE]
    assert checkpoint_steps(tmp_path / "best" / "checkpoints") == [SPE]
    assert checkpoint_steps(tmp_path / "checkpoints")[-1] == 3 * SPE  # saved where it stopped
    (test,) = records(tmp_path, "test")
    assert test["step"] == SPE and out["test"]["ndcg@10"] == test["ndcg@10"]


def test_extending_a_finished_run_keeps_its_clock(tmp_path, monkeypatch, compile_cache):
    """Raising train.epochs of a finished run re-evaluates its last step (saved before that
    evaluation) and trains on; wall time and sequences/s stay those of all its steps."""
    values = iter([0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.5])  # the re-evaluated step 40 is a new best
    metrics = lambda v: {"hr@5": v, "ndcg@5": v, "hr@10": v, "ndcg@10": v, "mrr": v, "users": 300}
    real = RankingEvaluator.__call__
    monkeypatch.setattr(RankingEvaluator, "__call__",
                        lambda self, params: metrics(next(values)) if self.which == "valid" else real(self, params))
    first = trainer.train(e2e_cfg(tmp_path))
    t0 = time.perf_counter()
    more = trainer.train(e2e_cfg(tmp_path, "train.epochs=5"), accept_config_changes=True)
    elapsed = time.perf_counter() - t0
    assert (first["best_step"], more["best_step"], more["steps"]) == (4 * SPE, 5 * SPE, 5 * SPE)
    # the clock resumes from the last checkpoint, saved before the first run's final evaluation:
    # that evaluation's time is not carried over (the extension re-evaluates the step), its
    # training time is
    assert first["train_time_s"] < more["train_time_s"] < more["wall_time_total_s"]
    assert more["wall_time_total_s"] <= first["wall_time_total_s"] + elapsed
    assert first["wall_time_to_best_s"] < more["wall_time_to_best_s"] <= more["wall_time_total_s"]
    assert more["train_examples_per_s"] == pytest.approx(64 * 5 * SPE / more["train_time_s"])


@pytest.mark.parametrize("model", ["cotten4rec", "linrec_prefixes_sampled"])
def test_losses_are_finite_and_decrease_on_synthetic_sequences(model):
    extra = {
        "cotten4rec": ["model.attention=cosine", "model.causal=false", "model.objective=cloze"],
        "linrec_prefixes_sampled": ["model.attention=elu_l2", "model.loss=sampled", "model.num_sampled=20",
                                    "data.sequences.train_rows=prefixes"],
    }[model]
    cfg = e2e_cfg(pathlib.Path("unused"), *extra)
    setup = build_setup(cfg)
    state = setup.init_state()
    step = make_train_step(setup)
    local = next(setup.task.train_iterator(0, 1))  # one fixed batch: its loss must fall
    batch = setup.global_batch(local)
    losses = []
    for _ in range(12):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        assert math.isfinite(float(m["grad_norm"]))
        assert float(m["targets"]) == float(np.count_nonzero(
            local["targets"] if model == "cotten4rec"
            else local["targets"][np.arange(64), np.maximum(local["lengths"] - 1, 0)]))
    assert int(state["step"]) == 12 and int(state["nonfinite_step"]) == -1
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.9 * losses[0], losses


@functools.partial(jax.jit, static_argnums=0)
def last_scores(graphdef, params, inputs, lengths):
    """Scores ``[U, R]`` of every table row at each user's last input position."""
    model = nnx.merge(graphdef, params)
    h = model.encode(inputs, lengths, train=False)
    return model.item_logits(h[jnp.arange(h.shape[0]), lengths - 1])


def test_evaluation_ranks_match_the_numpy_spec_for_every_protocol():
    from recjax.tasks import ranking as rk

    for protocol, extra in (("full", ["ranking.mask_history=true"]), ("sampled", ["ranking.num_negatives=20"])):
        c = e2e_cfg(pathlib.Path("unused"), f"ranking.protocol={protocol}", "ranking.batch=128", *extra)
        task = get_task(c)
        setup = build_setup(c, task)
        params = setup.init_state()["params"]
        ev = task.eval_split("test")
        assert len(ev.rows) == 300  # not a multiple of the batch: the last batch is padded
        evaluator = RankingEvaluator(task, setup, "test")
        got, ties = (np.concatenate(x) for x in zip(*[
            [np.asarray(a)[:n] for a in evaluator.step(params, *setup.replicated_batch(arrays))]
            for n, arrays in evaluator._batches(ev)], strict=True))
        s = np.asarray(last_scores(setup.graphdef, params, ev.rows.inputs, ev.rows.lengths))
        assert s.shape == (300, 128)  # the padded table's rows: 102 ids -> 128
        s = s[:, :100 + 2]  # the spec's columns: pad, items 1..100, [MASK]
        t = ev.rows.targets
        if protocol == "full":
            want = rk.target_ranks(s, t, (ev.rows.history_offsets, ev.rows.history_items))
            assert not np.array_equal(want, rk.target_ranks(s, t))  # masking mattered
        else:
            assert ev.negatives.shape == (300, 20)
            want = rk.sampled_ranks(s[np.arange(300), t], np.take_along_axis(s, ev.negatives, axis=1))
        np.testing.assert_array_equal(got, want)
        assert evaluator(params) == rk.ranking_metrics(got, c.ranking.ks, ties)
        pop = task.popularity("test")
        assert 0 < pop["ndcg@10"] < pop["hr@10"] <= 1


def test_recbole_post_ln_backbone_matches_its_equations():
    """norm=post: x_0 = LN(E + P); a = LN(x + Attn(x)); x' = LN(a + FFN(a)) (RecBole's
    TransformerEncoder, dropout off); output_head=ffn: h = LN(gelu(W x_L + b)); no output bias."""
    _, graphdef, params = make_params("model.norm=post", "model.output_head=ffn", "model.output_bias=false",
                                      "model.dropout=0.0", "model.attn_dropout=0.0")
    assert "final_norm" not in params and "output_bias" not in params
    inputs, lengths = random_batch(6, lengths=(5, MAX_LEN))

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        h = model.encode(inputs, lengths, train=False)
        x = model.embed_norm(model.item_embedding[...][inputs] + model.position_embedding[...][None])
        for block in model.blocks:
            a = block.norm_attn(x + block.attn(x, lengths, None))
            ffn = block.ffn_out(jax.nn.gelu(block.ffn_in(a), approximate=False))
            x = block.norm_ffn(a + ffn)
        expect = model.head_norm(jax.nn.gelu(model.head(x), approximate=False))
        vecs, bias = model.output_rows(jnp.asarray(inputs))
        return h, expect, model.item_logits(h), h @ model.item_embedding[...].T, bias

    h, expect, logits, manual, bias = (np.asarray(a) for a in run(params))
    valid = np.arange(MAX_LEN)[None, :] < lengths[:, None]
    np.testing.assert_allclose(h[valid], expect[valid], atol=1e-5)
    np.testing.assert_allclose(logits, manual, atol=1e-5)  # no output bias
    assert np.all(bias == 0)
