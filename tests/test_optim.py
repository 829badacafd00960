"""Schedules, row-wise Adagrad, dense/embedding groups (by variable type), clipping,
weight-decay masking."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recjax.config import DenseOptimConfig, EmbeddingOptimConfig, OptimConfig, load_config
from recjax.tasks import get_task
from recjax.train import optim
from recjax.train.state import abstract_model, param_groups


def cfg(**kw) -> OptimConfig:
    dense = kw.pop("dense", DenseOptimConfig())
    emb = kw.pop("embedding", EmbeddingOptimConfig())
    return OptimConfig(dense=dense, embedding=emb, **kw)


def params() -> dict:
    return {
        "tables": {"C1": {"embedding": jnp.ones((6, 4))}},
        "bottom": {"layers": {0: {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))}}},
    }


def labels() -> dict:
    """The optimizer groups of :func:`params` (as ``param_groups`` labels a model's tree)."""
    return {
        "tables": {"C1": {"embedding": "embedding"}},
        "bottom": {"layers": {0: {"kernel": "dense", "bias": "dense"}}},
    }


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule_key_steps(decay):
    c = cfg(warmup_steps=10, decay=decay, min_lr_ratio=0.1)
    s = optim.learning_rate_schedule(c, 2.0, 110)
    np.testing.assert_allclose(float(s(0)), 0.0)
    np.testing.assert_allclose(float(s(5)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 2.0, rtol=1e-6)
    end = {"cosine": 0.2, "linear": 0.2, "constant": 2.0}[decay]
    mid = {"cosine": 0.2 + 1.8 * 0.5, "linear": 2.0 - 1.8 * 0.5, "constant": 2.0}[decay]
    np.testing.assert_allclose(float(s(60)), mid, rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), end, rtol=1e-5)
    np.testing.assert_allclose(float(s(500)), end, rtol=1e-5)  # held after total_steps
    q = 0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.25))
    if decay == "cosine":
        np.testing.assert_allclose(float(s(35)), q, rtol=1e-5)


def test_schedule_no_warmup_and_lrs():
    c = cfg(warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    s = optim.learning_rate_schedule(c, 1.0, 100)
    assert float(s(0)) == pytest.approx(1.0)
    assert float(s(50)) == pytest.approx(0.5)
    lrs = optim.optimizer_lrs(c, 100)(50)
    assert lrs["lr_dense"] == pytest.approx(0.5 * c.dense.lr)
    assert lrs["lr_embedding"] == pytest.approx(0.5 * c.embedding.lr)


# ----------------------------------------------------------------------------- rowwise adagrad


def test_rowwise_adagrad_matches_numpy():
    lr, eps, init = 0.1, 1e-8, 0.5
    rng = np.random.default_rng(0)
    table = rng.normal(size=(5, 3)).astype(np.float32)
    bias = rng.normal(size=(3,)).astype(np.float32)
    tx = optim.rowwise_adagrad(lr, eps, init)
    p = {"t": jnp.asarray(table), "b": jnp.asarray(bias)}
    state = tx.init(p)
    assert state.acc["t"].shape == (5,) and state.acc["t"].dtype == jnp.float32
    assert state.acc["b"].shape == (3,)

    acc_t = np.full(5, init)
    acc_b = np.full(3, init)
    w, b = table.astype(np.float64), bias.astype(np.float64)
    ids_per_step = [np.array([0, 0, 2]), np.array([2, 4, 4, 4])]  # row 1 and 3 never touched
    for ids in ids_per_step:
        g = np.zeros((5, 3))
        np.add.at(g, ids, rng.normal(size=(len(ids), 3)))  # repeated rows accumulate
        gb = rng.normal(size=3)
        acc_t += (g**2).mean(axis=1)
        acc_b += gb**2
        w_new = w - lr * g / (np.sqrt(acc_t) + eps)[:, None]
        b_new = b - lr * gb / (np.sqrt(acc_b) + eps)
        grads = {"t": jnp.asarray(g, jnp.float32), "b": jnp.asarray(gb, jnp.float32)}
        upd, state = jax.jit(tx.update)(grads, state)
        p = optax.apply_updates(p, upd)
        np.testing.assert_allclose(np.asarray(p["t"]), w_new, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(p["b"]), b_new, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.acc["t"]), acc_t, rtol=1e-5)
        w, b = w_new, b_new
    np.testing.assert_array_equal(np.asarray(p["t"])[[1, 3]], table[[1, 3]])  # untouched rows
    assert int(state.count) == 2


def test_rowwise_adagrad_zero_acc_zero_eps_is_finite():
    tx = optim.rowwise_adagrad(1.0, eps=0.0, initial_accumulator=0.0)
    p = {"t": jnp.ones((3, 2))}
    g = {"t": jnp.zeros((3, 2)).at[0].set(1.0)}
    upd, _ = tx.update(g, tx.init(p))
    np.testing.assert_allclose(np.asarray(upd["t"]), [[-1, -1], [0, 0], [0, 0]])


def test_rowwise_adagrad_uses_schedule_count():
    tx = optim.rowwise_adagrad(lambda c: 0.5 * c, eps=0.0, initial_accumulator=1e-30)
    p = {"t": jnp.ones((2, 2))}
    state = tx.init(p)
    g = {"t": jnp.ones((2, 2))}
    upd, state = tx.update(g, state)  # count 0 -> lr 0
    assert float(jnp.abs(upd["t"]).max()) == 0.0
    upd, state = tx.update(g, state)  # count 1 -> lr 0.5, acc = 2 -> 1/sqrt(2)
    np.testing.assert_allclose(np.asarray(upd["t"]), -0.5 / np.sqrt(2.0), rtol=1e-5)


# ----------------------------------------------------------------------------- labels / builder


def _groups(*overrides: str, config: str | None = None) -> dict[str, str]:
    """``param_groups`` of the (abstract) model of a config, flattened to ``{"a.b.c": group}``."""
    cfg = load_config(config, list(overrides))
    groups = param_groups(abstract_model(cfg, get_task(cfg)))
    flat = jax.tree_util.tree_flatten_with_path(groups)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): g for p, g in flat}


def test_param_groups_label_embedding_tables_by_type():
    # DLRM: every table of the embedding collection (the features' and the user table) is
    # "embedding", every MLP kernel and bias "dense"
    dlrm = _groups("data.synthetic.num_sparse=2", "data.synthetic.vocab_sizes=[50]")
    tables = {k for k, g in dlrm.items() if g == "embedding"}
    assert tables == {"embedding.tables.C1", "embedding.tables.C2", "embedding.tables.user"}, dlrm
    assert dlrm["bottom.layers.0.kernel"] == dlrm["top.layers.0.kernel"] == "dense"
    assert dlrm["bottom.layers.0.bias"] == "dense"
    assert set(dlrm.values()) == {"embedding", "dense"}
    # the sequential model: the item table (and a separate output table) by their type, not
    # their name; the position table is a plain Param and stays dense, as do the blocks
    seq = _groups("data.sequences.synthetic.num_users=50", "data.sequences.synthetic.num_items=40",
                  "model.tie_embeddings=false", config="configs/models/sasrec.yaml")
    assert {k for k, g in seq.items() if g == "embedding"} == {"item_embedding", "output_embedding"}
    assert seq["position_embedding"] == seq["output_bias"] == "dense"
    assert seq["blocks.0.ffn_in.kernel"] == seq["blocks.0.attn.q.kernel"] == "dense"
    tied = _groups("data.sequences.synthetic.num_users=50", "data.sequences.synthetic.num_items=40",
                   config="configs/models/sasrec.yaml")
    assert {k for k, g in tied.items() if g == "embedding"} == {"item_embedding"}


def test_param_groups_route_a_real_model_to_its_optimizers():
    # sgd on both groups at different rates: a DLRM's tables move by -lr_emb, its MLPs by -lr_dense
    cfg = load_config(None, ["data.synthetic.num_sparse=2", "data.synthetic.vocab_sizes=[50]",
                             "optim.dense.name=sgd", "optim.dense.lr=0.1", "optim.embedding.name=sgd",
                             "optim.embedding.lr=2.0", "optim.warmup_steps=0", "optim.decay=constant",
                             "optim.grad_clip_norm=0"])
    model = abstract_model(cfg, get_task(cfg))
    groups = param_groups(model)
    p = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), nnx.to_pure_dict(nnx.state(model)))
    tx = optim.make_optimizer(cfg.optim, 10, groups)
    upd, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
    np.testing.assert_allclose(np.asarray(upd["embedding"]["tables"]["C1"]), -2.0)
    np.testing.assert_allclose(np.asarray(upd["embedding"]["tables"]["user"]), -2.0)
    np.testing.assert_allclose(np.asarray(upd["top"]["layers"][0]["kernel"]), -0.1)
    np.testing.assert_allclose(np.asarray(upd["bottom"]["layers"][0]["bias"]), -0.1)


def test_state_leaves_mirror_param_paths():
    tx = optim.make_optimizer(cfg(), 100, labels())
    state = tx.init(params())
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    acc = [
        (p, leaf.shape)
        for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if jax.tree_util.keystr(p).endswith("['tables']['C1']['embedding']")
    ]
    assert len(acc) == 1 and acc[0][1] == (6,), paths
    assert any(p.endswith("['bottom']['layers'][0]['kernel']") for p in paths)


def test_groups_use_their_own_optimizer_and_lr():
    # sgd on both groups, no warm-up, constant lr: update = -lr * g per group
    c = cfg(
        dense=DenseOptimConfig(name="sgd", lr=0.1),
        embedding=EmbeddingOptimConfig(name="sgd", lr=2.0),
        warmup_steps=0,
        decay="constant",
        grad_clip_norm=0.0,
    )
    tx = optim.make_optimizer(c, 10, labels())
    p = params()
    g = jax.tree.map(jnp.ones_like, p)
    upd, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(np.asarray(upd["tables"]["C1"]["embedding"]), -2.0)
    np.testing.assert_allclose(np.asarray(upd["bottom"]["layers"][0]["kernel"]), -0.1)
    np.testing.assert_allclose(np.asarray(upd["bottom"]["layers"][0]["bias"]), -0.1)


def test_clipping_over_all_grads():
    c = cfg(
        dense=DenseOptimConfig(name="sgd", lr=1.0),
        embedding=EmbeddingOptimConfig(name="sgd", lr=1.0),
        warmup_steps=0,
        decay="constant",
        grad_clip_norm=1.0,
    )
    tx = optim.make_optimizer(c, 10, labels())
    p = params()
    g = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), p)
    upd, _ = tx.update(g, tx.init(p), p)
    assert float(optax.tree.norm(upd)) == pytest.approx(1.0, rel=1e-5)
    n = sum(x.size for x in jax.tree.leaves(p))
    np.testing.assert_allclose(
        np.asarray(upd["tables"]["C1"]["embedding"]), -3.0 / (3.0 * math.sqrt(n)), rtol=1e-5
    )
    # below the threshold nothing changes
    small = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), p)
    upd, _ = tx.update(small, tx.init(p), p)
    np.testing.assert_allclose(np.asarray(upd["bottom"]["layers"][0]["bias"]), -1e-3, rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_only_on_matrices(name):
    c = cfg(
        dense=DenseOptimConfig(name=name, lr=0.1, weight_decay=0.5),
        warmup_steps=0,
        decay="constant",
        grad_clip_norm=0.0,
    )
    tx = optim.make_optimizer(c, 10, labels())
    p = params()
    zero = jax.tree.map(jnp.zeros_like, p)
    upd, _ = tx.update(zero, tx.init(p), p)
    # zero gradient: only weight decay moves params, and only >= 2-D dense leaves
    np.testing.assert_allclose(
        np.asarray(upd["bottom"]["layers"][0]["kernel"]), -0.1 * 0.5, rtol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(upd["bottom"]["layers"][0]["bias"]), 0.0)
    np.testing.assert_array_equal(np.asarray(upd["tables"]["C1"]["embedding"]), 0.0)


@pytest.mark.parametrize(
    "dense,emb",
    [("adamw", "rowwise_adagrad"), ("adam", "adagrad"), ("sgd", "adam"), ("adagrad", "sgd")],
)
def test_all_combinations_step(dense, emb):
    c = cfg(
        dense=DenseOptimConfig(name=dense), embedding=EmbeddingOptimConfig(name=emb), warmup_steps=0
    )
    tx = optim.make_optimizer(c, 10, labels())
    p = params()
    g = jax.tree.map(jnp.ones_like, p)
    upd, state = jax.jit(tx.update)(g, tx.init(p), p)
    for leaf in jax.tree.leaves(upd):
        assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.max(leaf)) < 0
    jax.tree.map(lambda a, b: None, state, tx.init(p))  # same structure after update
