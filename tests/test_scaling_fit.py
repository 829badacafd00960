"""Scaling-law fitters recover known laws from noisy synthetic data, with honest intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recjax.scaling import fit as F
from recjax.scaling import lbfgs, results

# Epoch AI's refit of the Chinchilla data (Besiroglu et al. 2024)
EPOCH = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
BUDGETS = np.array([6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21])


def chinchilla_grid() -> tuple[np.ndarray, np.ndarray]:
    """Chinchilla-like design: IsoFLOP budgets 6e18..3e21 FLOPs, 25 sizes 40M..16B each,
    D = C / 6N kept within 1B..1T tokens (174 runs)."""
    n, d = [], []
    for c in BUDGETS:
        for size in np.geomspace(4e7, 1.6e10, 25):
            tokens = c / (6 * size)
            if 1e9 <= tokens <= 1e12:
                n.append(size)
                d.append(tokens)
    return np.array(n), np.array(d)


def test_lbfgs_solves_batched_rosenbrock():
    def value_grad(x, rows):
        a, b = x[:, 0], x[:, 1]
        f = (1 - a) ** 2 + 100 * (b - a * a) ** 2
        g = np.stack([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)], axis=1)
        return f, g

    starts = np.array([[-1.2, 1.0], [2.0, -1.0], [0.0, 0.0], [3.0, 3.0]])
    x, f, iters = lbfgs.minimize(value_grad, starts, max_iter=500)
    np.testing.assert_allclose(x, 1.0, atol=1e-5)
    assert np.all(f < 1e-10) and np.all(iters > 5)


def test_lse_objective_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    n, d = chinchilla_grid()
    loss = F.chinchilla_loss(n, d, **EPOCH) * np.exp(rng.normal(0, 0.01, n.size))
    obj = F._LSEObjective(np.log(np.stack([n, d])), np.log(loss), F.HUBER_DELTA, fixed_e=False)
    obj.weights = rng.integers(0, 3, size=(1, n.size)).astype(float) + 0.5
    x = np.array([[6.0, 7.5, 0.6, 0.34, 0.37], [3.0, 12.0, -0.5, 0.2, 0.6]])
    obj.which = np.zeros(len(x), dtype=np.int64)
    f, g = obj(x, np.arange(len(x)))
    eps = 1e-6
    for j in range(x.shape[1]):
        dx = np.zeros_like(x)
        dx[:, j] = eps
        fd = (obj(x + dx, np.arange(len(x)))[0] - obj(x - dx, np.arange(len(x)))[0]) / (2 * eps)
        np.testing.assert_allclose(g[:, j], fd, rtol=1e-4, atol=1e-6)
    assert np.all(f > 0)


def test_chinchilla_approach3_recovers_epoch_refit():
    """0.5% multiplicative noise; exponents within 0.02 and every true value inside its 95%
    bootstrap interval (over seeds 0..7 at this noise: |d alpha|, |d beta| <= 0.011)."""
    n, d = chinchilla_grid()
    loss = F.chinchilla_loss(n, d, **EPOCH) * np.exp(np.random.default_rng(0).normal(0, 0.005, n.size))
    fit = F.fit_chinchilla(n, d, loss, n_boot=200, seed=0)
    assert fit.info["n_starts"] == 4500  # the full grid of SCALING.md
    assert abs(fit.params["alpha"] - EPOCH["alpha"]) < 0.02
    assert abs(fit.params["beta"] - EPOCH["beta"]) < 0.02
    for name, true in EPOCH.items():
        lo, hi = fit.interval(name)
        assert lo <= true <= hi, (name, true, lo, hi)
    a_true = EPOCH["beta"] / (EPOCH["alpha"] + EPOCH["beta"])
    lo, hi = fit.interval("n_opt_exponent")
    assert lo <= a_true <= hi
    assert fit.info["n_boot_failed"] == 0
    doc = fit.to_dict()
    json.dumps(doc)  # serialisable
    assert set(doc["params"]["alpha"]) == {"value", "lo", "hi"}


def test_compute_optimal_allocation_minimises_loss_on_the_budget():
    c = 1e21
    n_opt, d_opt, l_opt = F.compute_optimal(*EPOCH.values(), c, 6.0)
    assert np.isclose(6 * n_opt * d_opt, c)
    for factor in (0.8, 1.25):  # any other split of the same budget is worse
        n = n_opt * factor
        assert F.chinchilla_loss(n, c / (6 * n), **EPOCH) > l_opt


def test_isoflop_minima_within_10_percent():
    """4 budgets, 9 sizes over 1/8..8x the true optimum each, 0.25% noise."""
    budgets = np.array([1e19, 1e20, 1e21, 1e22])
    true_n = F.compute_optimal(*EPOCH.values(), budgets, 6.0)[0]
    rng = np.random.default_rng(0)
    n = np.concatenate([t * np.geomspace(1 / 8, 8, 9) * np.exp(rng.uniform(-0.3, 0.3)) for t in true_n])
    c = np.repeat(budgets, 9)
    loss = F.chinchilla_loss(n, c / (6 * n), **EPOCH) * np.exp(rng.normal(0, 0.0025, n.size))
    fit = F.fit_isoflop(n, loss, c, n_boot=200)
    got = np.array([m["n_opt"] for m in fit.info["minima"]])
    assert np.all(np.abs(got / true_n - 1) < 0.10), got / true_n
    assert all(m["interior"] for m in fit.info["minima"])
    a_true = EPOCH["beta"] / (EPOCH["alpha"] + EPOCH["beta"])
    lo, hi = fit.interval("a")
    assert lo <= a_true <= hi and abs(fit.params["a"] - a_true) < 0.03
    # the interpolating alternative, on the noise-free curves (it follows noise, by design)
    exact = F.chinchilla_loss(n, c / (6 * n), **EPOCH)
    akima = F.fit_isoflop(n, exact, c, method="akima", n_boot=0)
    got = np.array([m["n_opt"] for m in akima.info["minima"]])
    assert np.all(np.abs(got / true_n - 1) < 0.10), got / true_n


def test_power_law_in_compute_recovered():
    true = {"E": 0.44, "A": 30.0, "alpha": 0.15}
    c = np.geomspace(1e12, 1e18, 25)
    loss = F.power_law(c, **true) * np.exp(np.random.default_rng(1).normal(0, 0.005, c.size))
    fit = F.fit_power_law(c, loss, n_boot=200)
    assert abs(fit.params["alpha"] - true["alpha"]) < 0.02
    for name, value in true.items():
        lo, hi = fit.interval(name)
        assert lo <= value <= hi, (name, value, lo, hi)


def test_loglinear_and_scaling_efficiency():
    """Baseline NE = 0.549 - 5.3e-3 ln C (HSTU); target scales twice as fast."""
    rng = np.random.default_rng(2)
    c = np.geomspace(1e15, 1e19, 12)
    base = 0.549 - 5.3e-3 * np.log(c) + rng.normal(0, 2e-4, c.size)
    target = 0.600 - 1.06e-2 * np.log(c) + rng.normal(0, 2e-4, c.size)
    fit = F.fit_loglinear(c, base, n_boot=300)
    assert abs(fit.params["eta"] + 5.3e-3) < 2e-4
    lo, hi = fit.interval("eta")
    assert lo <= -5.3e-3 <= hi
    eff = F.scaling_efficiency(np.concatenate([c, c]), np.concatenate([base, target]),
                               ["hstu"] * c.size + ["new"] * c.size, "new", "hstu", n_boot=300)
    assert abs(eff.params["ratio"] - 2.0) < 0.05
    lo, hi = eff.interval("ratio")
    assert lo <= 2.0 <= hi
    with pytest.raises(ValueError, match="no runs of architecture 'other'"):
        F.scaling_efficiency(c, base, ["hstu"] * c.size, "other", "hstu")


def test_loglinear_with_one_intercept_per_budget_recovers_the_within_budget_slope():
    """Two data budgets: the metric falls 0.002 per e-fold of compute inside each budget but sits
    0.03 lower at the larger budget, whose runs also cost 3x more. Pooled, the budget jump makes
    the slope ~3x steeper; with one intercept per budget the within-budget slope comes back."""
    rng = np.random.default_rng(6)
    c_small = np.geomspace(1e10, 1e12, 10)
    c = np.concatenate([c_small, 3 * c_small])
    budget = np.repeat([1e5, 3e5], 10)
    m = 0.2 - 0.002 * np.log(c) - 0.03 * (budget > 1e5) + rng.normal(0, 1e-4, c.size)
    pooled = F.fit_loglinear(c, m, n_boot=0)
    grouped = F.fit_loglinear(c, m, groups=budget, n_boot=200)
    assert pooled.params["eta"] < -0.004
    lo, hi = grouped.interval("eta")
    assert lo <= -0.002 <= hi and hi - lo < 2e-4
    assert grouped.info["intercepts"]["100000.0"] - grouped.info["intercepts"]["300000.0"] == pytest.approx(
        0.03, abs=1e-3)
    power = F.fit_loglinear(c, np.exp(-0.3 * np.log(c) + 0.1 * (budget > 1e5)), groups=budget,
                            log_metric=True, n_boot=0)
    assert power.params["eta"] == pytest.approx(-0.3)
    with pytest.raises(ValueError, match="two or more compute values"):
        F.fit_loglinear([1e10, 2e10], [0.1, 0.1], groups=[0, 1])


def test_group_budgets_and_input_checks():
    labels = F.group_budgets([1e10, 1.03e10, 3e10, 2.95e10, 1e11], rtol=0.05)
    assert labels.tolist() == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="need >= 6"):
        F.fit_chinchilla([1, 2, 3], [1, 2, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="must be > 0"):
        F.fit_power_law([1.0, -2.0, 3.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="non-finite"):
        F.fit_power_law([1.0, np.nan, 3.0], [1.0, 1.0, 1.0])


def _law_points(true: dict, sizes, budgets, noise: float, rng) -> list[tuple[float, float, float]]:
    """``(N, D, L)`` on the grid ``sizes x budgets`` from the law ``true``, with lognormal noise."""
    return [(n, d, float(F.chinchilla_loss(n, d, **true) * np.exp(rng.normal(0, noise))))
            for n in sizes for d in budgets]


def test_fit_cli_writes_json_and_plots(tmp_path, capsys):
    """`recjax fit` on a table generated from known laws: every law's JSON and PNG."""
    from recjax.cli import main

    rng = np.random.default_rng(3)
    table = tmp_path / "results.csv"
    true = {"E": 0.45, "A": 8.0, "B": 20.0, "alpha": 0.3, "beta": 0.35}
    grid = _law_points(true, np.geomspace(1e4, 1e6, 4), np.geomspace(1e5, 1e7, 4), 0.003, rng)
    for i, (n, d, loss) in enumerate(grid):
        results.upsert_row(table, {
            "run_id": f"r{i}", "model": "dlrm", "status": "ok", "active_params": int(n),
            "examples_seen": int(d), "train_flops_total": 6.0 * n * d, "eval_logloss": loss,
            "eval_ne": loss / 0.6, "bayes_logloss": 0.45, "device_kind": "NVIDIA H100 80GB HBM3",
            "mfu": 0.1 + 0.02 * np.log(n / 1e4) + rng.normal(0, 1e-3),
        })
    for i, (n, d, _) in enumerate(grid[::3]):  # a second architecture whose NE falls faster
        c = 6.0 * n * d
        results.upsert_row(table, {"run_id": f"x{i}", "model": "other", "status": "ok",
                                   "train_flops_total": c, "eval_ne": 12.0 - 0.3 * np.log(c)})
    out = tmp_path / "fits"
    code = main(["fit", str(table), "--model", "dlrm", "--n-boot", "30", "--out", str(out),
                 "--budget-rtol", "0.3"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for law in ("power", "chinchilla", "isoflop", "loglinear", "mfu"):
        doc = json.loads((out / f"fit_{law}.json").read_text())
        assert (out / f"{law}.png").stat().st_size > 1000
        if law != "mfu":
            assert doc["law"] == law and doc["params"]
    chin = json.loads((out / "fit_chinchilla.json").read_text())
    assert abs(chin["params"]["alpha"]["value"] - true["alpha"]) < 0.05
    assert chin["flops_per_param_example"] == pytest.approx(6.0, rel=1e-3)
    mfu = json.loads((out / "fit_mfu.json").read_text())["NVIDIA H100 80GB HBM3"]
    assert mfu["vs_params"]["params"]["eta"]["value"] == pytest.approx(0.02, abs=2e-3)

    assert main(["fit", str(table), "--law", "power", "--model", "dlrm", "--fix-e", "bayes",
                 "--n-boot", "0", "--out", str(out)]) == 0
    assert json.loads((out / "fit_power.json").read_text())["params"]["E"]["value"] == pytest.approx(0.45)
    assert main(["fit", str(table), "--law", "efficiency", "--target", "other", "--baseline", "dlrm",
                 "--n-boot", "30", "--out", str(out)]) == 0
    eff = json.loads((out / "fit_efficiency.json").read_text())["params"]["ratio"]["value"]
    rows = results.read_rows(table)
    api = F.scaling_efficiency(results.column(rows, "train_flops_total"), results.column(rows, "eval_ne"),
                               [r["model"] for r in rows], "other", "dlrm", n_boot=0)
    assert eff == pytest.approx(api.params["ratio"]) and eff > 1
    assert main(["fit", str(table), "--law", "chinchilla", "--out", str(out)]) == 1
    assert "pick one with --model" in capsys.readouterr().out


def test_fit_cli_excess_kl_holds_e_at_zero_and_keeps_the_free_e_check(tmp_path, capsys):
    """``--loss excess_kl``: KL = A/N^alpha + B/D^beta with E = 0 recovers the exponents; the free-E
    fit is stored beside it and finds E near 0."""
    from recjax.cli import main

    true = {"E": 0.0, "A": 3.0, "B": 40.0, "alpha": 0.4, "beta": 0.5}
    table = tmp_path / "results.csv"
    points = _law_points(true, np.geomspace(1e4, 1e6, 5), np.geomspace(1e5, 2e6, 4), 0.02, np.random.default_rng(4))
    for i, (n, d, kl) in enumerate(points):
        results.upsert_row(table, {"run_id": f"r{i}", "model": "m", "status": "ok", "active_params": int(n),
                                   "examples_seen": int(d), "train_flops_total": 6.0 * n * d,
                                   "excess_kl": kl, "eval_logloss": 0.5 + kl, "bayes_logloss": 0.5})
    out = tmp_path / "fits"
    assert main(["fit", str(table), "--law", "chinchilla", "--loss", "excess_kl", "--n-boot", "40",
                 "--out", str(out)]) == 0, capsys.readouterr().out
    doc = json.loads((out / "fit_chinchilla.json").read_text())
    p = doc["params"]
    assert doc["fixed_E"] == 0.0 and p["E"]["value"] == 0.0
    for k in ("alpha", "beta"):
        assert p[k]["lo"] <= true[k] <= p[k]["hi"] and p[k]["hi"] - p[k]["lo"] < 0.2, (k, p[k])
    assert doc["free_E_check"]["E"]["value"] < 0.01 and "alpha" in doc["free_E_check"]
    assert (out / "chinchilla.png").stat().st_size > 1000
    assert doc["delta"] == 1e-3  # Hoffmann et al.'s default; a noise-scaled delta is an option
    assert main(["fit", str(table), "--law", "chinchilla", "--loss", "excess_kl", "--n-boot", "40",
                 "--huber-delta", "0.03", "--out", str(out)]) == 0
    doc = json.loads((out / "fit_chinchilla.json").read_text())
    assert doc["delta"] == 0.03 and doc["free_E_check"]["alpha"]["value"] > 0
    for k in ("alpha", "beta"):
        assert doc["params"][k]["lo"] <= true[k] <= doc["params"][k]["hi"], (k, doc["params"][k])


def test_fit_cli_efficiency_table_of_every_architecture_on_shared_budgets(tmp_path):
    """``--law efficiency --baseline dlrm --metric excess_kl`` without ``--target``: one fit per other
    architecture with eta and the compute exponent alpha_C of ``KL = A C^-alpha_C``; runs at a data
    budget the baseline did not run are left out of that pair."""
    from recjax.cli import main

    rng = np.random.default_rng(5)
    exponents = {"dlrm": 0.10, "dcnv2": 0.15, "tokenmixer_large": 0.20}
    table = tmp_path / "results.csv"
    for arch, a in exponents.items():
        budgets = [1e5, 3e5] + ([1e6] if arch == "tokenmixer_large" else [])
        for i, (n, d) in enumerate((n, d) for n in np.geomspace(1e4, 1e6, 5) for d in budgets):
            c = 6.0 * n * d
            kl = 1e-3 * 1e-3 ** (-a) * (c / 1e12) ** (-a) * np.exp(rng.normal(0, 0.01))
            if d == 1e6:
                kl *= 100.0  # an outlier budget: would wreck the slope if it entered the pair
            results.upsert_row(table, {"run_id": f"{arch}{i}", "model": arch, "status": "ok",
                                       "examples_seen": int(d), "train_flops_total": c, "excess_kl": kl})
    out = tmp_path / "fits"
    assert main(["fit", str(table), "--law", "efficiency", "--baseline", "dlrm", "--metric", "excess_kl",
                 "--n-boot", "100", "--out", str(out)]) == 0
    doc = json.loads((out / "fit_efficiency.json").read_text())
    assert sorted(doc) == ["dcnv2", "tokenmixer_large"]
    for arch in doc:
        p = doc[arch]["params"]
        assert doc[arch]["n_points"] == {arch: 10, "dlrm": 10}
        assert p["alpha_C"]["lo"] <= exponents[arch] <= p["alpha_C"]["hi"], p["alpha_C"]
        assert p["alpha_C_baseline"]["value"] == pytest.approx(0.10, abs=0.01)
        assert p["alpha_C_ratio"]["value"] == pytest.approx(exponents[arch] / 0.10, rel=0.1)
        assert p["eta"]["value"] < p["eta_baseline"]["value"] < 0  # KL falls faster than DLRM's
    assert (out / "efficiency.png").stat().st_size > 1000
