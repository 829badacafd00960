"""AUC / GAUC against brute force, NE of the base rate, calibration and Bayes fields."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recjax.tasks import metrics as M


def brute_auc(p: np.ndarray, y: np.ndarray) -> float:
    pos, neg = p[y > 0.5], p[y <= 0.5]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg)))


def data(n: int = 600, users: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = np.round(rng.uniform(size=n), 1)  # 11 distinct values: many ties
    y = (rng.uniform(size=n) < p).astype(np.float32)
    u = rng.integers(0, users, size=n) * 7 - 50  # arbitrary, negative ids included
    return p, y, u


def test_auc_matches_pairwise_with_ties():
    for seed in range(3):
        p, y, _ = data(seed=seed)
        assert M.auc(p, y) == pytest.approx(brute_auc(p, y), abs=1e-12)
    assert M.auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert M.auc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == 0.5
    assert np.isnan(M.auc(np.array([0.2, 0.3]), np.array([1, 1])))


def test_gauc_matches_per_user_loop():
    p, y, u = data()
    num = den = 0.0
    users = 0
    for uid in np.unique(u):
        m = u == uid
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * brute_auc(p[m], y[m])
            den += m.sum()
            users += 1
    g, n = M.gauc(p, y, u)
    assert n == users and users > 5
    assert g == pytest.approx(num / den, abs=1e-12)
    g, n = M.gauc(p, np.ones_like(y), u)
    assert np.isnan(g) and n == 0


def test_streaming_eval_fields():
    p, y, u = data(n=1000)
    q = np.clip(p + 0.05, 0.01, 0.99)
    ev = M.StreamingEval()
    for s in (slice(0, 300), slice(300, 1000)):
        ev.update(p[s], y[s], u[s], q[s])
    r = ev.result()
    assert r["count"] == 1000
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    ll = -np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))
    ctr = y.astype(np.float64).mean()
    h = -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr))
    assert r["logloss"] == pytest.approx(ll, rel=1e-10)
    assert r["ne"] == pytest.approx(ll / h, rel=1e-10)
    assert r["auc"] == pytest.approx(brute_auc(p, y), abs=1e-12)
    assert r["gauc"] == pytest.approx(M.gauc(p, y, u)[0]) and r["gauc_users"] > 0
    assert r["ctr"] == pytest.approx(ctr) and r["pred_ctr"] == pytest.approx(p.mean())
    assert r["calibration"] == pytest.approx(p.mean() / ctr)
    hq = -(q * np.log(q) + (1 - q) * np.log(1 - q))
    assert r["bayes_logloss"] == pytest.approx(hq.mean(), rel=1e-10)
    assert r["bayes_ne"] == pytest.approx(hq.mean() / h, rel=1e-10)
    kl = q * np.log(q / pc) + (1 - q) * np.log((1 - q) / (1 - pc))
    assert r["excess_kl"] == pytest.approx(kl.mean(), rel=1e-10)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_excess_kl_is_the_expected_logloss_above_bayes(n, seed):
    """KL(q || p) >= 0, = 0 at p = q, and = E_{y ~ q}[logloss(p, y)] - mean H(q) exactly (the
    expectation over labels is linear, so it is computed in closed form with y = q)."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(1e-4, 1 - 1e-4, n)
    p = np.where(rng.random(n) < 0.2, q, rng.uniform(1e-4, 1 - 1e-4, n))
    kl = M.excess_kl(p, q)
    assert kl >= 0 and M.excess_kl(q, q) == pytest.approx(0.0, abs=1e-15)
    expected_logloss = -np.mean(q * np.log(p) + (1 - q) * np.log1p(-p))
    assert kl == pytest.approx(expected_logloss - np.mean(M.binary_entropy(q)), rel=1e-9, abs=1e-12)


def test_ne_of_base_rate_prediction_is_one():
    y = np.array([1, 0, 0, 0] * 50, np.float32)
    ev = M.StreamingEval()
    ev.update(np.full(200, 0.25), y)
    r = ev.result()
    assert r["ne"] == pytest.approx(1.0, rel=1e-9)
    assert r["auc"] == 0.5 and r["calibration"] == pytest.approx(1.0)
    assert "gauc" not in r and "bayes_logloss" not in r


def test_optional_fields_need_every_batch():
    ev = M.StreamingEval()
    ev.update(np.array([0.2, 0.8]), np.array([0, 1]), np.array([1, 1]), np.array([0.3, 0.7]))
    ev.update(np.array([[0.4], [0.6]]), np.array([[0], [1]]))  # [B, 1] is flattened
    r = ev.result()
    assert r["count"] == 4 and "gauc" not in r and "bayes_ne" not in r
    assert M.StreamingEval().result() == {"count": 0.0}


def test_gauc_large_is_vectorised_fast():
    import time

    rng = np.random.default_rng(1)
    n = 200_000
    p, y, u = rng.uniform(size=n), rng.integers(0, 2, n), rng.integers(0, 50_000, n)
    t = time.perf_counter()
    g, users = M.gauc(p, y, u)
    assert time.perf_counter() - t < 2.0
    assert 0.45 < g < 0.55 and users > 10_000
