"""Multi-task training: the T-label synthetic stream, SMES routing (expert evaluations, reuse,
balance loss, gradient paths) against numpy, MMoE and PLE by hand, and the models training
through the CTR task with per-task metrics."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.config import SyntheticDataConfig, load_config
from recjax.data.spec import feature_spec
from recjax.data.synthetic import SyntheticCTR, bayes_logloss
from recjax.errors import ConfigError
from recjax.kernels import moe as moe_kernels
from recjax.layers.multitask import PLE, SMES, MMoE, smes_route
from recjax.models import registry
from tests.conftest import cli, run_cli, tiny, xla_over_analytic_forward_flops


@pytest.fixture(autouse=True)
def _lazy_sharding():
    with nnx.use_eager_sharding(False):
        yield


# ------------------------------------------------------------------------------------ stream


def test_stream_has_one_label_per_task_at_its_rate():
    cfg = SyntheticDataConfig(tasks=3, task_ctr=[0.3, 0.05, 0.005], teacher_logit_scale=2.0)
    stream = SyntheticCTR(cfg)
    batch = stream.examples(np.arange(40_000))
    assert batch["label"].shape == batch["label_prob"].shape == (40_000, 3)
    np.testing.assert_allclose(batch["label_prob"].mean(0), [0.3, 0.05, 0.005], rtol=0.1)
    np.testing.assert_allclose(batch["label"].mean(0), [0.3, 0.05, 0.005], rtol=0.15)
    # shared and task-specific parts: the task logits correlate, about task_shared_share
    logit = np.log(batch["label_prob"] / (1 - batch["label_prob"]))
    corr = np.corrcoef(logit.T)[np.triu_indices(3, 1)]
    assert np.all((corr > 0.3) & (corr < 0.7)), corr
    # labels come from separate hash streams: no two tasks share their draws
    assert not np.array_equal(batch["label"][:, 0] > 0, batch["label"][:, 1] > 0)
    np.testing.assert_allclose(stream.label_prob(np.arange(100)), batch["label_prob"][:100], rtol=1e-6)
    assert bayes_logloss(batch["label_prob"][:, 2]) < bayes_logloss(batch["label_prob"][:, 0])


def test_single_label_stream_is_unchanged_by_the_task_knobs():
    ids = np.arange(500)
    one = SyntheticCTR(SyntheticDataConfig()).examples(ids)
    again = SyntheticCTR(SyntheticDataConfig(task_ctr=[0.1], task_shared_share=0.9)).examples(ids)
    assert one["label"].shape == (500,)
    np.testing.assert_array_equal(one["label"], again["label"])
    np.testing.assert_array_equal(one["label_prob"], again["label_prob"])


@pytest.mark.parametrize("bad", [{"tasks": 2, "task_ctr": [0.1, 0.2, 0.3]}, {"tasks": 2, "task_ctr": [1.5]},
                                 {"tasks": 2, "task_shared_share": 1.5}])
def test_stream_rejects_bad_task_settings(bad):
    with pytest.raises(ConfigError, match="task"):
        SyntheticCTR(SyntheticDataConfig(**bad))


# ------------------------------------------------------------------------------------ SMES


def _np_route(z: np.ndarray, w: np.ndarray, ks: int, ka: int):
    """The SMES equations per example in numpy: (sets K_t [T][N], gates g [T, N, E])."""
    t, n, e = z.shape
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    sets, g = [[None] * n for _ in range(t)], np.zeros_like(p)
    for i in range(n):
        s = np.einsum("t,te->e", w, p[:, i])
        shared = sorted(range(e), key=lambda j: (-s[j], j))[:ks]
        for k in range(t):
            rest = [j for j in range(e) if j not in shared]
            private = sorted(rest, key=lambda j: (-z[k, i, j], j))[:ka]
            chosen = set(shared) | set(private)
            sets[k][i] = chosen
            for j in chosen:
                g[k, i, j] = p[k, i, j] / sum(p[k, i, c] for c in chosen)
    return sets, g


@pytest.mark.parametrize("t,e,ks,ka", [(3, 8, 2, 1), (4, 6, 1, 2), (2, 16, 3, 3), (5, 4, 0, 1)])
def test_smes_route_matches_numpy_and_bounds_evaluations(t, e, ks, ka):
    n = 64
    z = np.asarray(jax.random.normal(jax.random.key(t * e + ks), (t, n, e)), np.float64) * 2
    w = np.linspace(1.0, 2.0, t)
    r = smes_route(jnp.asarray(z, jnp.float32), jnp.asarray(w, jnp.float32), ks, ka)
    sets, g = _np_route(z, w, ks, ka)
    ids, gates = np.asarray(r.expert_ids), np.asarray(r.gates)
    assert ids.shape == (n, ks + t * ka)
    union = [set().union(*(sets[k][i] for k in range(t))) for i in range(n)]
    for i in range(n):
        run = [j for j in ids[i] if j < e]
        assert len(run) == len(set(run)) == len(union[i]) <= ks + t * ka  # each expert once
        assert set(run) == union[i]
        for k in range(t):
            dense = np.zeros(e)
            for slot, j in enumerate(ids[i]):
                if j < e:
                    dense[j] += gates[k, i, slot]
            np.testing.assert_allclose(dense, g[k, i], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(r.group_sizes), np.bincount(ids[ids < e], minlength=e))
    assert float(r.stats["expert_evals"]) == pytest.approx(np.mean([len(u) for u in union]))


def test_smes_balance_loss_by_hand():
    """T = 2 tasks, N = 2 examples, E = 4, K_s = K_a = 1 on fixed logits."""
    z = np.array([[[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.5, 0.0]],
                  [[1.0, 2.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    # shared stage, w = (1/2, 1/2): s = mean_t p_t; example 0 picks expert 1, example 1 expert 1
    s = p.mean(0)
    assert list(s.argmax(-1)) == [1, 1]
    # private stage: task 0 -> e0 (ex 0), e2 (ex 1); task 1 -> e0 (ex 0; logits 1.0 > 0 = 0), e3 (ex 1)
    selected = np.zeros((2, 2, 4))
    for task, ex, experts in [(0, 0, [1, 0]), (0, 1, [1, 2]), (1, 0, [1, 0]), (1, 1, [1, 3])]:
        selected[task, ex, experts] = 1
    fbar, pbar = selected.mean((0, 1)), p.mean((0, 1))
    expected = 4 / 2 * np.sum(fbar * pbar)
    r = smes_route(jnp.asarray(z, jnp.float32), jnp.full((2,), 0.5), 1, 1)
    assert float(r.stats["balance_loss"]) == pytest.approx(expected, rel=1e-6)
    # example 0: both tasks chose e0 privately -> one evaluation; 2 experts for ex 0, 3 for ex 1
    assert float(r.stats["expert_evals"]) == pytest.approx(2.5)
    # uniform router probabilities and selections give exactly 1
    flat = smes_route(jnp.zeros((3, 8, 6)), jnp.ones(3), 1, 1)
    assert float(flat.stats["balance_loss"]) == pytest.approx(1.0)


def _smes(t=3, e=8, ks=2, ka=1, d=8, f=16, impl="reference"):
    return SMES(d, f, e, t, ks, ka, [1.0] * t, impl, rngs=nnx.Rngs(0))


def test_smes_runs_each_selected_expert_once(monkeypatch):
    """The grouped matmuls get one row per (example, expert) of the union of the tasks' sets,
    fewer than one per (task, expert) choice, and every task's output is the one computed
    with its experts alone."""
    layer, n = _smes(), 32
    x = jax.random.normal(jax.random.key(1), (n, 8))
    rows = []
    real = moe_kernels.grouped_matmul

    def counting(xs, w, group_sizes, **kw):
        rows.append(int(np.sum(np.asarray(group_sizes))))
        return real(xs, w, group_sizes, **kw)

    monkeypatch.setattr(moe_kernels, "grouped_matmul", counting)
    out, stats = layer(x)
    z = np.einsum("nd,tde->tne", np.asarray(x), np.asarray(layer.routers[...]))
    sets, g = _np_route(z, np.ones(3), 2, 1)
    union = sum(len(set().union(*(sets[k][i] for k in range(3)))) for i in range(n))
    choices = sum(len(sets[k][i]) for k in range(3) for i in range(n))
    assert rows == [union, union] and union < choices  # gate|up and down, one row per evaluation
    assert float(stats["expert_evals"]) * n == pytest.approx(union)
    ref = np.zeros((3, n, 8))
    every = np.asarray(_all_experts_np(np.asarray(x), layer.w_gate_up[...], layer.w_down[...]))  # [N, E, D]
    for k in range(3):
        for i in range(n):
            ref[k, i] = sum(g[k, i, j] * every[i, j] for j in sets[k][i])
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


def _all_experts_np(x, w_gate_up, w_down):
    h = np.einsum("nd,edcf->necf", x, np.asarray(w_gate_up))
    a = h[..., 0, :] / (1 + np.exp(-h[..., 0, :])) * h[..., 1, :]
    return np.einsum("nef,efd->ned", a, np.asarray(w_down))


def test_smes_task_gradients_reach_its_router_and_experts_only():
    """d(task t's output)/d(router t') is 0 for t' != t, and only the experts in K_t (over the
    batch) get a gradient from task t."""
    layer, n = _smes(), 4
    x = jax.random.normal(jax.random.key(2), (n, 8))
    graph, params = nnx.split(layer)
    z = np.einsum("nd,tde->tne", np.asarray(x), np.asarray(layer.routers[...]))
    sets, _ = _np_route(z, np.ones(3), 2, 1)
    cot = jax.random.normal(jax.random.key(3), (n, 8))
    for task in range(3):
        def task_out(p, task=task):
            out, _ = nnx.merge(graph, p)(x)
            return jnp.sum(out[task] * cot)

        grads = jax.grad(task_out)(params)
        router = np.asarray(grads["routers"][...])
        assert np.abs(router[task]).max() > 0
        assert all(np.abs(router[o]).max() == 0 for o in range(3) if o != task)
        used = set().union(*sets[task])
        down = np.abs(np.asarray(grads["w_down"][...])).reshape(8, -1).max(-1)
        assert {j for j in range(8) if down[j] > 0} == used
    # the balance loss is what moves the other routers
    lb = jax.grad(lambda p: nnx.merge(graph, p)(x)[1]["balance_loss"])(params)
    assert all(np.abs(np.asarray(lb["routers"][...])[o]).max() > 0 for o in range(3))


# ------------------------------------------------------------------------------------ MMoE, PLE


def test_mmoe_and_ple_by_hand():
    x = np.asarray(jax.random.normal(jax.random.key(4), (5, 8)))
    mmoe = MMoE(8, 16, 3, 2, rngs=nnx.Rngs(0))
    out, _ = mmoe(jnp.asarray(x))
    y = _all_experts_np(x, mmoe.w_gate_up[...], mmoe.w_down[...])
    logits = np.einsum("nd,tde->tne", x, np.asarray(mmoe.gates[...]))
    g = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out), np.einsum("tne,ned->tnd", g, y), atol=2e-5)

    ple = PLE(8, 16, shared=1, private=2, tasks=2, levels=1, rngs=nnx.Rngs(0))
    out, _ = ple(jnp.asarray(x))
    for k in range(2):
        own = _all_experts_np(x, ple.private_gate_up[0, k], ple.private_down[0, k])  # [N, 2, D]
        shared = _all_experts_np(x, ple.shared_gate_up[0], ple.shared_down[0])  # [N, 1, D]
        lg = x @ np.asarray(ple.task_gates[0, k])
        g = np.exp(lg) / np.exp(lg).sum(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(out[k]), np.einsum("ne,ned->nd", g, np.concatenate([own, shared], 1)),
                                   atol=2e-5)


# ------------------------------------------------------------------------------------ training


def test_smes_trains_with_per_task_metrics(tmp_path: pathlib.Path):
    run_dir = tmp_path / "smes"
    run_cli(["train", "--config", "configs/experiments/smes_multitask.yaml",
             *tiny("train.steps=30", "train.eval_every=30", "train.checkpoint_every=0",
                   "data.synthetic.capacity_width=64", "train.best_metric=eval/t2/auc"),
             f"run_dir={run_dir}"])
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30] and evals[1]["logloss"] < evals[0]["logloss"]
    for t in range(4):
        assert {f"t{t}/auc", f"t{t}/excess_kl", f"t{t}/gauc"} <= set(evals[1])
    assert np.mean([evals[1][f"t{t}/logloss"] for t in range(4)]) == pytest.approx(evals[1]["logloss"])
    train = [r for r in rows if r["split"] == "train"][-1]
    assert 2 <= train["expert_evals"] <= 2 + 4 * 1 and "task_loss/3" in train


def test_single_label_model_refuses_multi_task_data(capsys):
    code, _, err = cli(capsys, "train", "--config", "configs/models/dlrm.yaml", "data.synthetic.tasks=2")
    assert code != 0 and "predicts one label" in err and "smes" in err


@pytest.mark.parametrize("config", ["mmoe", "ple"])
def test_forward_flops_match_xla(config):
    """Analytic forward FLOPs within 5% of XLA's (SMES is not compared: XLA's CPU ragged dot,
    like the reference grouped matmul, multiplies every row by every expert)."""
    cfg = load_config(f"configs/experiments/{config}_multitask.yaml", ["model.dim=64", "model.expert_hidden=128"])
    assert 0.97 < xla_over_analytic_forward_flops(cfg) < 1.05


def test_tokenmixer_large_gives_one_logit_per_task():
    cfg = load_config("configs/experiments/tokenmixer_large_multitask.yaml", ["data.synthetic.capacity_width=64"])
    fs = feature_spec(cfg.data)
    model = registry.build_model(cfg, fs, nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in SyntheticCTR(cfg.data.synthetic).examples(np.arange(32)).items()
             if k not in ("example_id", "label_prob")}
    logits, aux = model(batch)
    assert logits.shape == aux["aux_logits"].shape == (32, 4)
