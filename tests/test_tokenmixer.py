"""TokenMixer-Large and RankMixer: token mixing, per-token weights, SP-MoE, FLOPs, presets, sharding."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from optax import sigmoid_binary_cross_entropy as optax_bce

from recjax.config import CONFIG_DIR, load_config
from recjax.errors import ConfigError
from recjax.kernels import moe as moe_kernels
from recjax.layers.token_mixing import mix, revert, rms_norm, swiglu
from recjax.models import tokenmixer_large as tml
from recjax.train.state import describe_config
from tests.conftest import read_losses, run_python, tiny
from tests.test_models import build as build_eager
from tests.test_models import (
    build_abstract,
    features,
    make_batch,
    make_cfg,
    model_flops,
)


def build(cfg, fs, seed: int = 0) -> nnx.Module:
    """The model initialised by one jitted program (eager init compiles every initializer)."""
    graphdef = nnx.graphdef(build_abstract(cfg, fs))
    params = jax.jit(lambda: nnx.split(build_eager(cfg, fs, seed=seed))[1])()
    return nnx.merge(graphdef, params)


def jit_forward(model: nnx.Module):
    """``(batch, train) -> (logits, aux)`` of ``model``, jitted (eager NNX calls are slow)."""
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda params, batch, train: nnx.merge(graphdef, params)(batch, train=train), static_argnums=2)
    return lambda batch, train=True: fn(params, batch, train)


TM_SMALL = {"name": "tokenmixer_large", "num_tokens": 4, "dim": 16, "num_layers": 2, "num_heads": 4,
            "head_hidden": [16], "aux_layer": 1}


# ----------------------------------------------------------------------------- token mixing


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 6), h=st.integers(1, 6), dh=st.integers(1, 4))
def test_mix_then_revert_is_identity(b, t, h, dh):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(b, t, h * dh)), jnp.float32)
    y = mix(x, h)
    assert y.shape == (b, h, t * dh)
    np.testing.assert_array_equal(revert(y, t), x)


def test_mix_layout_takes_head_h_of_every_token():
    t, h, dh = 3, 2, 2
    x = jnp.arange(t * h * dh, dtype=jnp.float32).reshape(1, t, h * dh)
    y = mix(x, h)
    for head in range(h):  # new token `head` = [x_0[head], x_1[head], ...]
        expected = np.concatenate([np.asarray(x[0, tok, head * dh:(head + 1) * dh]) for tok in range(t)])
        np.testing.assert_array_equal(y[0, head], expected)


def test_per_token_weights_get_gradient_only_from_their_token():
    rng = np.random.default_rng(1)
    b, t, d, f = 5, 4, 6, 8
    x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    ws = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((t, d, f), (t, d, f), (t, f, d))]
    jac = jax.jacrev(lambda *w: swiglu(x, *w).sum(axis=(0, 2)), argnums=(0, 1, 2))(*ws)
    for g in jac:  # [output token, param token, ...]
        norms = np.abs(np.asarray(g)).sum(axis=(2, 3))
        np.testing.assert_array_equal(norms == 0, ~np.eye(t, dtype=bool))


def test_sp_moe_per_token_experts_get_gradient_only_from_their_token():
    cfg = make_cfg({**TM_SMALL, "moe_experts": 4, "moe_top_k": 3, "moe_impl": "reference"})
    s = tml.shapes_of(cfg)
    p = {k: v[...][0] for k, v in tml.layer_params(s, nnx.Rngs(0)).items()}
    xn = jnp.asarray(np.random.default_rng(2).normal(size=(3, s.tokens, s.dim)), jnp.float32)
    # jac[name][o] = d(sum of output token o) / d(param): one reverse pass per output token
    jac = jax.jit(jax.jacrev(lambda p: tml._sp_moe(s, p, xn)[0].sum(axis=(0, 2))))(p)
    for name in ("router", "expert_gate_up", "expert_down", "shared_gate"):
        norms = np.abs(np.asarray(jac[name])).reshape(s.tokens, s.tokens, -1).sum(-1)  # [out, param token]
        np.testing.assert_array_equal(norms == 0, ~np.eye(s.tokens, dtype=bool), err_msg=name)


# ----------------------------------------------------------------------------- SP-MoE


def test_moe_with_k_equal_e_is_the_dense_softmax_mixture():
    """All E routed (k = E + 1 with the shared expert, alpha = E/(k-1) = 1): SP-MoE = sum_e
    softmax(x R)_e SwiGLU_e(x) + Shared(x), per token."""
    e = 4
    cfg = make_cfg({**TM_SMALL, "moe_experts": e, "moe_top_k": e + 1})
    s = tml.shapes_of(cfg)
    assert s.alpha == 1.0
    p = {k: v[...][0] for k, v in tml.layer_params(s, nnx.Rngs(3)).items()}
    xn = jnp.asarray(np.random.default_rng(4).normal(size=(6, s.tokens, s.dim)), jnp.float32)
    probs = jax.nn.softmax(jnp.einsum("btd,tde->bte", xn, p["router"]), axis=-1)
    gate_up = jnp.einsum("btd,tedcf->btecf", xn, p["expert_gate_up"])
    hidden = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
    experts = jnp.einsum("btef,tefd->bted", hidden, p["expert_down"])
    dense = jnp.einsum("bte,bted->btd", probs, experts)
    dense = dense + swiglu(xn, p["shared_gate"], p["shared_up"], p["shared_down"])
    for impl in ("dense", "reference", "xla"):
        got, _ = tml._sp_moe(tml.Shapes(**{**s.__dict__, "moe_impl": impl}), p, xn)
        np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_hand_computed():
    """4 tokens, 2 experts, top-1, logits chosen so tokens 0-2 pick expert 0 and token 3 expert 1.

    f = (3/4, 1/4); P = mean softmax = (0.625814, 0.374186) from sigmoid(2, 1, 0.5, -1);
    loss = E * sum_e f_e P_e = 2 * (0.75 * 0.625814 + 0.25 * 0.374186) = 1.125814.
    """
    logits = jnp.asarray([[2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [0.0, 1.0]])
    d, f = 2, 4
    w = jnp.ones((2, d, 2, f)), jnp.ones((2, f, d))
    _, stats = moe_kernels.moe_ffn(logits, jnp.eye(2), *w, 1, impl="reference")
    np.testing.assert_allclose(stats["expert_fraction"], [0.75, 0.25])
    sig = 1 / (1 + np.exp(-np.array([2.0, 1.0, 0.5, -1.0])))
    np.testing.assert_allclose(stats["router_prob"], [sig.mean(), 1 - sig.mean()], rtol=1e-6)
    assert float(stats["load_balance_loss"]) == pytest.approx(1.125814, abs=1e-6)


def test_model_logs_expert_load_and_adds_balancing_loss():
    fs = features()
    cfg = make_cfg({**TM_SMALL, "moe_experts": 4, "moe_top_k": 2, "moe_load_balance_weight": 0.5,
                    "aux_loss_weight": 0.0})
    logits, aux = jit_forward(build(cfg, fs))(make_batch(fs, 16))
    assert logits.shape == (16,)
    frac = np.asarray(aux["moe_expert_fraction"])
    assert frac.shape == (4,) and frac.sum() == pytest.approx(1.0)  # top-(k-1) = top-1 routed
    assert float(aux["moe_load_max_over_mean"]) >= 1.0
    assert float(aux["aux_loss"]) == pytest.approx(0.5 * float(aux["moe_load_balance_loss"]))


# ----------------------------------------------------------------------------- ablations


def test_routed_set_is_top_k_minus_one_with_the_shared_expert(monkeypatch):
    """moe_top_k counts the shared expert: k = 3 routes 2 experts per token with it, 3 without;
    alpha is the routed inverse sparsity E / routed."""
    fs = features()
    calls = []
    moe_ffn = moe_kernels.moe_ffn
    monkeypatch.setattr(moe_kernels, "moe_ffn", lambda *a, **k: calls.append((a[4], k["scale"])) or moe_ffn(*a, **k))
    for shared, routed in ((True, 2), (False, 3)):
        cfg = make_cfg({**TM_SMALL, "moe_experts": 4, "moe_top_k": 3, "moe_shared_expert": shared})
        s = tml.shapes_of(cfg)
        calls.clear()
        logits, _ = jit_forward(build(cfg, fs))(make_batch(fs, 16))
        assert np.isfinite(np.asarray(logits)).all()
        assert set(calls) == {(routed, 4 / routed)}
        assert describe_config(cfg)["params_dense"] - describe_config(cfg)["params_active"] == (
            s.layers * s.tokens * (4 - routed) * 3 * s.dim * s.expert_hidden)
    with pytest.raises(ConfigError, match="shared expert counts as one"):
        tml.shapes_of(make_cfg({**TM_SMALL, "moe_experts": 4, "moe_top_k": 1}))


# ----------------------------------------------------------------------------- block


def _block_case(seed: int, **overrides):
    cfg = make_cfg({**TM_SMALL, **overrides})
    s = tml.shapes_of(cfg)
    rng = np.random.default_rng(seed)
    p = {k: jnp.asarray(rng.normal(size=v[...].shape[1:]) * 0.3 + (1.0 if "norm" in k else 0.0), jnp.float32)
         for k, v in tml.layer_params(s, nnx.Rngs(seed)).items()}
    x = jnp.asarray(rng.normal(size=(5, s.tokens, s.dim)), jnp.float32)
    return s, p, x


def test_paper_block_residual_paths():
    """X' = X + revert(pSwiGLU_mixed(mix(RMSNorm(X)))) and X_next = X' + pSwiGLU_token(RMSNorm(X')):
    with the token sub-block zeroed the block returns X' (so the mixed branch is in the residual
    stream); with the mixed sub-block zeroed it returns X + pSwiGLU_token(RMSNorm(X))."""
    s, p, x = _block_case(7)
    assert s.block_layout == "paper" and p["mix_norm"].shape == (s.tokens, s.dim)
    x1 = x + revert(swiglu(mix(rms_norm(x, p["mix_norm"]), s.banks), p["mix_gate"], p["mix_up"], p["mix_down"]),
                    s.tokens)
    assert float(jnp.abs(x1 - x).max()) > 0.1
    out, _ = tml.block(s, {**p, "tok_down": jnp.zeros_like(p["tok_down"])}, x)
    np.testing.assert_allclose(out, x1, rtol=1e-6, atol=1e-6)
    full, _ = tml.block(s, p, x)
    token = swiglu(rms_norm(x1, p["tok_norm"]), p["tok_gate"], p["tok_up"], p["tok_down"])
    np.testing.assert_allclose(full, x1 + token, rtol=1e-5, atol=1e-5)
    out, _ = tml.block(s, {**p, "mix_down": jnp.zeros_like(p["mix_down"])}, x)
    token0 = swiglu(rms_norm(x, p["tok_norm"]), p["tok_gate"], p["tok_up"], p["tok_down"])
    np.testing.assert_allclose(out, x + token0, rtol=1e-5, atol=1e-5)


def test_mixed_residual_block_drops_the_mixed_branch_from_the_residual_stream():
    """The earlier block (block_layout: mixed_residual): H' = mix(X) + f(RMSNorm(mix(X))), X_next
    = X + g(RMSNorm(revert(H'))): with g zeroed it returns X itself, whatever f computes."""
    s, p, x = _block_case(8, block_layout="mixed_residual")
    assert p["mix_norm"].shape == (s.banks, s.bank_width)
    out, _ = tml.block(s, {**p, "tok_down": jnp.zeros_like(p["tok_down"])}, x)
    np.testing.assert_allclose(out, x, rtol=0, atol=0)
    hm = mix(x, s.banks)
    h = hm + swiglu(rms_norm(hm, p["mix_norm"]), p["mix_gate"], p["mix_up"], p["mix_down"])
    g = swiglu(rms_norm(revert(h, s.tokens), p["tok_norm"]), p["tok_gate"], p["tok_up"], p["tok_down"])
    np.testing.assert_allclose(tml.block(s, p, x)[0], x + g, rtol=1e-5, atol=1e-5)


def test_swiglu_init_is_xavier_with_small_down_projections():
    """W_gate, W_up ~ Xavier-uniform (std sqrt(2 / (fan_in + fan_out))); W_down = 0.01 x that."""
    cfg = make_cfg({**TM_SMALL, "num_tokens": 8, "dim": 64, "num_heads": 8, "moe_experts": 4, "moe_top_k": 2})
    s = tml.shapes_of(cfg)
    p = {k: np.asarray(v[...]) for k, v in tml.layer_params(s, nnx.Rngs(0)).items()}
    p["expert_gate"], p["expert_up"] = p["expert_gate_up"][..., 0, :], p["expert_gate_up"][..., 1, :]
    for name in ("mix", "expert", "shared"):
        for part, scale in (("gate", 1.0), ("up", 1.0), ("down", 0.01)):
            w = p[f"{name}_{part}"]
            xavier = (2.0 / (w.shape[-2] + w.shape[-1])) ** 0.5
            assert w.std() == pytest.approx(scale * xavier, rel=0.05), (name, part)
            assert np.abs(w).max() <= scale * xavier * 3**0.5 * (1 + 1e-6)


ABLATIONS = {
    "mixed_residual_block": {"block_layout": "mixed_residual"},
    "mix_revert": {"mix_revert": False},
    "shared_swiglu": {"per_token": False},
    "no_residuals": {"residuals": False},
    "no_inter_layer_residual": {"residual_every": 0},
    "no_aux_loss": {"aux_loss_weight": 0.0},
    "no_global_token": {"global_token": False},
    "standard_moe": {"moe_experts": 4, "moe_per_token": False},
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_switches(name):
    fs = features()
    small = {**TM_SMALL, "num_layers": 3}  # layer 2 of 3 takes an inter-layer residual
    base = make_cfg({**small, **({"moe_experts": 4} if name == "standard_moe" else {})})
    cfg = make_cfg({**small, **ABLATIONS[name]})
    batch = make_batch(fs, 8)
    model = build(cfg, fs)
    logits, aux = jit_forward(model)(batch)
    assert np.isfinite(np.asarray(logits)).all()
    shapes = {k: v[...].shape for k, v in model.layers.items()}
    ref = {k: v[...].shape for k, v in build(base, fs).layers.items()}
    if name == "mix_revert":  # T banks of width D instead of H banks of width T*D/H
        assert shapes["mix_gate"][1:3] == (4, 16)
    elif name in ("shared_swiglu", "standard_moe"):
        key = "tok_gate" if name == "shared_swiglu" else "expert_gate_up"
        assert len(shapes[key]) == len(ref[key]) - 1  # no token axis
    elif name == "no_aux_loss":  # no auxiliary head, so nothing for the task to score
        assert "aux_logits" not in aux and "aux_logits_weight" not in aux and not hasattr(model, "aux_head")
        assert "aux_logits" in jit_forward(build(base, fs))(batch)[1]
    elif name == "no_global_token":
        assert len(model.tokenizer.global_w) == 0
    else:  # same parameters, different function
        assert shapes == ref
        assert not np.allclose(logits, jit_forward(build(base, fs))(batch)[0])


def test_ctr_task_adds_the_weighted_aux_head_bce_to_the_loss():
    """The model returns the auxiliary head's logits and weight; the ctr task scores them with
    the same BCE: total = BCE(logits) + w BCE(aux_logits) + aux_loss (here with MoE balance)."""
    from recjax.tasks.ctr import CTRTask

    fs = features()
    cfg = make_cfg({**TM_SMALL, "aux_loss_weight": 0.3, "moe_experts": 4, "moe_top_k": 2,
                    "moe_load_balance_weight": 0.5})
    graphdef, params = nnx.split(build(cfg, fs))
    batch = make_batch(fs, 16)
    task = CTRTask(cfg)

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        return model(batch, train=True), task.loss(model, batch, jax.random.key(0))

    (logits, aux), (total, metrics) = run(params)
    bce = lambda z: float(np.mean(np.asarray(optax_bce(z, batch["label"]))))
    assert float(aux["aux_logits_weight"]) == pytest.approx(0.3)
    head = bce(aux["aux_logits"])
    assert float(metrics["loss"]) == pytest.approx(bce(logits), rel=1e-6)
    assert float(metrics["aux_head_loss"]) == pytest.approx(head, rel=1e-6)
    assert float(aux["aux_loss"]) == pytest.approx(0.5 * float(aux["moe_load_balance_loss"]))
    assert float(aux["aux_loss"]) > 0
    expected = bce(logits) + 0.3 * head + float(aux["aux_loss"])
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["total_loss"]) == pytest.approx(expected, rel=1e-6)
    assert "aux_logits" not in metrics and "aux_logits_weight" not in metrics  # not logged as metrics
    assert metrics["moe_expert_fraction/0"].shape == ()  # [E] diagnostics logged per entry


def test_inter_layer_residual_adds_the_output_k_layers_back():
    """With 4 layers and k=2: x2 += x0 (input), x4 is the last layer: no residual."""
    fs = features()
    cfg = make_cfg({**TM_SMALL, "num_layers": 4, "residual_every": 2, "aux_loss_weight": 0.0})
    model = build(cfg, fs)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4, 16)), jnp.float32)
    params = {k: v[...] for k, v in model.layers.items()}
    s = model.s
    h = x
    for layer in range(4):
        h, _ = tml.block(s, {k: v[layer] for k, v in params.items()}, h)
        if layer == 1:
            h = h + x
    top, _, _ = model._layers(x)
    np.testing.assert_allclose(top, h, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- RankMixer


def test_rankmixer_dense_train_sparse_infer_routers():
    fs = features()
    cfg = make_cfg({"name": "rankmixer", "num_tokens": 4, "dim": 16, "num_layers": 1, "experts": 4,
                    "head_hidden": [16]})
    graphdef, params = nnx.split(build(cfg, fs))
    batch = make_batch(fs, 8)
    fwd = jax.jit(lambda params, train: nnx.merge(graphdef, params)(batch, train=train), static_argnums=1)
    train_out, aux = fwd(params, True)
    infer_out, _ = fwd(params, False)
    assert 0 < float(aux["router_active_ratio"]) <= 1
    assert float(aux["aux_loss"]) == pytest.approx(1e-3 * float(aux["router_l1"]))
    # the training router changes training outputs only
    scaled = jax.tree.map(lambda a: a, params)
    scaled["layers"]["router_train"] = jax.tree.map(lambda a: 3.0 * a, scaled["layers"]["router_train"])
    assert not np.allclose(fwd(scaled, True)[0], train_out)
    np.testing.assert_array_equal(fwd(scaled, False)[0], infer_out)
    # the L1 penalty reaches the inference router only (one layer: nothing downstream of it)
    g = jax.jit(jax.grad(lambda params: fwd(params, True)[1]["aux_loss"]))(params)
    assert float(jnp.abs(g["layers"]["router_infer"]).sum()) > 0
    assert float(jnp.abs(g["layers"]["router_train"]).sum()) == 0


# ----------------------------------------------------------------------------- FLOPs vs XLA


FLOPS_CASES = {
    "tokenmixer_large": {**TM_SMALL, "num_tokens": 8, "dim": 64, "num_heads": 8, "tokenizer_hidden": [64],
                         "head_hidden": [64], "scan_layers": False},
    "tokenmixer_large-spmoe": {**TM_SMALL, "num_tokens": 8, "dim": 64, "num_heads": 8, "head_hidden": [64],
                               "token_ffn_mult": 4.0, "moe_experts": 8, "moe_top_k": 2,
                               "moe_impl": "reference", "scan_layers": False},
    # D = 128: GELU and LayerNorm (elementwise, counted by XLA only) stay a few % of the matmuls
    "rankmixer": {"name": "rankmixer", "num_tokens": 8, "dim": 128, "head_hidden": [64]},
    "rankmixer-sparse": {"name": "rankmixer", "num_tokens": 8, "dim": 128, "head_hidden": [64], "experts": 4},
}


@pytest.mark.parametrize("case", list(FLOPS_CASES))
def test_analytic_flops_match_xla(case):
    """Analytic forward (MoE: active experts) within 5% of XLA's cost analysis, unrolled layers.

    Training (3 x forward) is also within 5%, except for the SP-MoE reference path: its
    backward scatter-adds the gathered per-token expert weights ``[N, k, D, F]`` back into
    ``[E, D, F]``, elementwise adds XLA counts (~5% more), which the matmul count omits.
    """
    cfg = make_cfg(FLOPS_CASES[case], dim=32)
    xla_fwd, xla_train, analytic = model_flops(cfg, features(num_sparse=8, num_dense=13, vocab=1000), 32)
    ratio_fwd = xla_fwd / analytic
    ratio_train = xla_train / (3 * analytic)
    print(f"{case}: xla/analytic forward {ratio_fwd:.4f}, train {ratio_train:.4f}")
    assert 0.95 < ratio_fwd < 1.05
    assert 0.95 < ratio_train < (1.08 if "spmoe" in case else 1.05)


# ----------------------------------------------------------------------------- presets


PRESETS = {
    "tokenmixer_large_100m": 100e6, "tokenmixer_large_500m": 500e6, "tokenmixer_large_1b": 1e9,
    "tokenmixer_large_4b": 4e9, "tokenmixer_large_7b": 7e9, "tokenmixer_large_15b": 15e9,
    "rankmixer_100m": 100e6, "rankmixer_1b": 1e9,
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_match_their_names(preset):
    info = describe_config(load_config(pathlib.Path(CONFIG_DIR) / "models" / f"{preset}.yaml"))
    assert info["params_dense"] == pytest.approx(PRESETS[preset], rel=0.1), info


def test_spmoe_preset_active_and_total():
    info = describe_config(load_config(pathlib.Path(CONFIG_DIR) / "models" / "tokenmixer_large_4b_spmoe.yaml"))
    assert info["params_dense"] == pytest.approx(4.6e9, rel=0.1)
    assert info["params_active"] == pytest.approx(2.3e9, rel=0.1)


# ----------------------------------------------------------------------------- sharding


def _train_code(run_dir: pathlib.Path, overrides: list[str]) -> str:
    return f"""
from recjax.config import load_config
from recjax.train.trainer import train
cfg = load_config("configs/models/tokenmixer_large_tiny.yaml", {tiny(*overrides) + [f"run_dir={run_dir}"]!r})
train(cfg)
"""


def test_eight_device_token_and_expert_parallel_matches_one_device(tmp_path: pathlib.Path):
    """SP-MoE TokenMixer-Large on data=2 x tensor=2 x expert=2 (tokens over `tensor`) = 1 device."""
    common = ["train.steps=10", "train.eval_every=0", "train.checkpoint_every=0", "model.moe_experts=4",
              "model.moe_top_k=2", "model.moe_load_balance_weight=0.01", "mesh.rules.tokens=[tensor]"]
    run_python(_train_code(tmp_path / "one", [*common, "mesh.data=1"]), devices=1)
    out = run_python(_train_code(tmp_path / "eight", [*common, "mesh.data=2", "mesh.tensor=2", "mesh.expert=2"]),
                     devices=8)
    assert "'data': 2" in out and "'tensor': 2" in out and "'expert': 2" in out
    one, eight = read_losses(tmp_path / "one"), read_losses(tmp_path / "eight")
    assert sorted(one) == list(range(1, 11)) == sorted(eight)
    diffs = [abs(one[s] - eight[s]) for s in one]
    print(f"max |loss_8dev - loss_1dev| over 10 steps: {max(diffs):.3g}")
    assert max(diffs) < 1e-5, diffs
    code = """
from recjax.config import load_config
from recjax.train.state import build_setup
cfg = load_config("configs/models/tokenmixer_large_tiny.yaml", ["mesh.data=2", "mesh.tensor=2", "mesh.expert=2",
                  "mesh.rules.tokens=[tensor]", "model.moe_experts=4"])
s = build_setup(cfg).state_shardings["params"]["layers"]
print(tuple(s["expert_gate_up"].spec), tuple(s["tok_norm"].spec))
"""
    out = run_python(code, devices=8)
    assert "(None, 'tensor', 'expert', None, None, None) (None, 'tensor', None)" in out
