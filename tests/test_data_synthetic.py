from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from recjax.config import SyntheticDataConfig
from recjax.data.synthetic import (
    EVAL_OFFSET,
    SyntheticCTR,
    bayes_logloss,
    rare_id_fraction,
    zipf_ids,
    zipf_probs,
    zipf_top_share,
)
from recjax.errors import ConfigError
from recjax.tasks.metrics import excess_kl

CFG = SyntheticDataConfig()


@pytest.fixture(scope="module")
def gen() -> SyntheticCTR:
    return SyntheticCTR(CFG)


@pytest.fixture(scope="module")
def big(gen: SyntheticCTR) -> dict[str, np.ndarray]:
    return gen.examples(np.arange(100_000, dtype=np.int64))


def _assert_batches_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_contract(gen: SyntheticCTR):
    b = gen.examples(np.arange(10, 42, dtype=np.int64))
    assert list(b) == ["dense", "sparse", "label", "user_id", "example_id", "label_prob"]
    assert b["dense"].shape == (32, CFG.num_dense) and b["dense"].dtype == np.float32
    assert b["sparse"].shape == (32, CFG.num_sparse + 1) and b["sparse"].dtype == np.int32
    assert b["label"].dtype == np.float32 and set(np.unique(b["label"])) <= {0.0, 1.0}
    assert b["user_id"].dtype == np.int32
    np.testing.assert_array_equal(b["user_id"], b["sparse"][:, -1])
    np.testing.assert_array_equal(b["example_id"], np.arange(10, 42))
    assert b["label_prob"].dtype == np.float32 and ((b["label_prob"] > 0) & (b["label_prob"] < 1)).all()

    no_user = SyntheticCTR(dataclasses.replace(CFG, user_id=False, num_sparse=3, num_dense=3))
    b = no_user.examples(np.arange(5, dtype=np.int64))
    assert "user_id" not in b and b["sparse"].shape == (5, 3) and b["dense"].shape == (5, 3)


def test_deterministic_and_independent_of_split(gen: SyntheticCTR):
    ids = np.arange(1000, 1500, dtype=np.int64)
    ref = gen.examples(ids)
    _assert_batches_equal(ref, SyntheticCTR(CFG).examples(ids))  # fresh instance, same seed
    parts = [gen.examples(ids[:123]), gen.examples(ids[123:])]
    _assert_batches_equal(ref, {k: np.concatenate([p[k] for p in parts]) for k in ref})
    perm = np.random.default_rng(0).permutation(len(ids))
    _assert_batches_equal({k: v[perm] for k, v in ref.items()}, gen.examples(ids[perm]))
    other = SyntheticCTR(dataclasses.replace(CFG, seed=CFG.seed + 1)).examples(ids)
    assert not np.array_equal(other["sparse"], ref["sparse"])
    assert not np.array_equal(other["label_prob"], ref["label_prob"])


def test_zipf_frequencies_and_range(big: dict[str, np.ndarray]):
    s = CFG.zipf_exponent
    vocab = CFG.vocab_sizes[0]
    sparse = big["sparse"]
    assert sparse.min() >= 0 and sparse[:, :-1].max() < vocab and big["user_id"].max() < CFG.num_users
    for col, v in [(0, vocab), (CFG.num_sparse - 1, vocab), (CFG.num_sparse, CFG.num_users)]:
        share = np.mean(sparse[:, col] == 0)
        assert share == pytest.approx(zipf_top_share(v, s), abs=0.005)
        counts = np.bincount(sparse[:, col], minlength=v)
        assert counts[0] > counts[1] > counts[3] > counts[10]  # decreasing in rank


def test_zipf_ids_large_vocab_and_edge_exponents():
    u = np.random.default_rng(0).random(200_000)
    ids = zipf_ids(u, 10**9, 1.05)
    assert ids.min() >= 0 and ids.max() < 10**9 and ids.max() > 10**8
    assert np.mean(ids == 0) == pytest.approx(zipf_top_share(10**9, 1.05), abs=0.005)
    uniform = zipf_ids(u, 10, 0.0)
    assert np.bincount(uniform, minlength=10).min() > 19_000  # s = 0 is uniform
    harmonic = zipf_ids(u, 1000, 1.0)  # the s = 1 limit
    assert np.mean(harmonic == 0) == pytest.approx(np.log(2) / np.log(1001), abs=0.005)
    assert zipf_ids(np.array([0.0, 1.0 - 2**-53]), 7, 2.0).tolist() == [0, 6]


def test_ctr_and_bayes_logloss(big: dict[str, np.ndarray]):
    label, prob = big["label"], big["label_prob"].astype(np.float64)
    assert label.mean() == pytest.approx(CFG.base_ctr, abs=0.03)
    assert label.mean() == pytest.approx(prob.mean(), abs=0.01)
    h_base = -(CFG.base_ctr * np.log(CFG.base_ctr) + (1 - CFG.base_ctr) * np.log(1 - CFG.base_ctr))
    bayes = bayes_logloss(prob)
    assert 0.3 < bayes < h_base - 0.03
    realised = -np.mean(label * np.log(prob) + (1 - label) * np.log(1 - prob))
    assert realised == pytest.approx(bayes, abs=0.01)  # labels really are Bernoulli(label_prob)
    assert bayes_logloss(np.array([0.5])) == pytest.approx(np.log(2))


@pytest.mark.parametrize("scale,ctr", [(0.5, 0.05), (2.0, 0.25)])
def test_logit_scale_and_base_ctr(scale: float, ctr: float):
    g = SyntheticCTR(dataclasses.replace(CFG, teacher_logit_scale=scale, base_ctr=ctr))
    p = g.examples(np.arange(30_000, dtype=np.int64))["label_prob"].astype(np.float64)
    assert np.log(p / (1 - p)).std() == pytest.approx(scale, rel=0.15)
    assert p.mean() == pytest.approx(ctr, abs=0.01)


def test_eval_ids_disjoint_same_teacher(gen: SyntheticCTR):
    ev = gen.examples(EVAL_OFFSET + np.arange(20_000, dtype=np.int64))
    tr = gen.examples(np.arange(20_000, dtype=np.int64))
    assert not np.array_equal(ev["sparse"], tr["sparse"])
    assert ev["label_prob"].mean() == pytest.approx(tr["label_prob"].mean(), abs=0.01)


def test_eval_uses_the_same_teacher():
    # without dense features the probability is a function of the sparse ids alone
    g = SyntheticCTR(dataclasses.replace(CFG, num_sparse=2, vocab_sizes=[5], user_id=False, num_dense=0))
    tr = g.examples(np.arange(2000, dtype=np.int64))
    ev = g.examples(EVAL_OFFSET + np.arange(2000, dtype=np.int64))
    table = {tuple(r): p for r, p in zip(tr["sparse"].tolist(), tr["label_prob"].tolist(), strict=True)}
    matched = [(table[tuple(r)], p) for r, p in zip(ev["sparse"].tolist(), ev["label_prob"].tolist(), strict=True)
               if tuple(r) in table]
    assert len(matched) > 1900 and all(a == b for a, b in matched)
    assert len(set(table.values())) > 10


def test_bad_config():
    with pytest.raises(ConfigError, match="vocab"):
        SyntheticCTR(dataclasses.replace(CFG, vocab_sizes=[10, 20]))
    with pytest.raises(ConfigError, match="base_ctr"):
        SyntheticCTR(dataclasses.replace(CFG, base_ctr=1.5))
    with pytest.raises(ConfigError, match="int32"):
        SyntheticCTR(dataclasses.replace(CFG, vocab_sizes=[2**31]))
    with pytest.raises(ConfigError, match="teacher_terms"):
        SyntheticCTR(dataclasses.replace(CFG, teacher_terms=["linear", "cubic"]))


def test_deep_teacher_term_is_an_interaction(gen: SyntheticCTR):
    """The ``deep`` term is not additive in the feature ids; it keeps examples, scale and CTR.

    Two features of 8 ids, no dense features: the best additive model (per-id mean logits)
    explains all of a ``linear`` teacher's logit variance, and clearly less of a ``deep`` one.
    """
    base = dataclasses.replace(CFG, num_sparse=2, vocab_sizes=[8], user_id=False, num_dense=0)
    explained = {}
    for terms in (["linear"], ["deep"]):
        g = SyntheticCTR(dataclasses.replace(base, teacher_terms=terms))
        ex = g.examples(np.arange(20_000, dtype=np.int64))
        p = ex["label_prob"].astype(np.float64)
        logit = np.log(p / (1 - p))
        fit = np.zeros_like(logit)
        for col in range(2):
            ids = ex["sparse"][:, col]
            means = np.bincount(ids, logit - logit.mean(), minlength=8) / np.maximum(np.bincount(ids, minlength=8), 1)
            fit += means[ids]
        explained[terms[0]] = 1 - np.var(logit - logit.mean() - fit) / np.var(logit)
    assert explained["linear"] > 0.99
    assert explained["deep"] < 0.95
    deep = SyntheticCTR(dataclasses.replace(CFG, teacher_terms=["linear", "fm", "dense_mlp", "deep"]))
    a, b = gen.examples(np.arange(5000, dtype=np.int64)), deep.examples(np.arange(5000, dtype=np.int64))
    np.testing.assert_array_equal(a["sparse"], b["sparse"])
    assert not np.allclose(a["label_prob"], b["label_prob"])
    assert b["label"].mean() == pytest.approx(CFG.base_ctr, abs=0.03)


# ----------------------------------------------------------------------------- scaling-stream knobs


def test_zipf_exponent_and_vocab_per_column_set_the_rare_id_fraction():
    """The fraction of held-out examples whose id occurs < 100 times in n training examples
    matches ``rare_id_fraction`` per column, and falls with the exponent and with fewer ids."""
    cfg = dataclasses.replace(CFG, num_sparse=3, vocab_sizes=[20_000, 20_000, 2_000], user_id=False,
                              zipf_exponent=[1.05, 1.5, 1.05])
    g = SyntheticCTR(cfg)
    n = 200_000
    train = g.examples(np.arange(n, dtype=np.int64))["sparse"]
    held_out = g.examples(np.arange(20_000, dtype=np.int64) + EVAL_OFFSET)["sparse"]
    measured = []
    for col, (vocab, s) in enumerate([(20_000, 1.05), (20_000, 1.5), (2_000, 1.05)]):
        counts = np.bincount(train[:, col], minlength=vocab)
        measured.append(float(np.mean(counts[held_out[:, col]] < 100)))
        assert measured[-1] == pytest.approx(rare_id_fraction(vocab, s, n), abs=0.012), col
    assert measured[0] > measured[2] > 0.1 > measured[1]
    same = dataclasses.replace(cfg, zipf_exponent=[1.05, 1.05, 1.05])
    _assert_batches_equal(SyntheticCTR(same).examples(np.arange(500)),
                          SyntheticCTR(dataclasses.replace(same, zipf_exponent=1.05)).examples(np.arange(500)))
    with pytest.raises(ConfigError, match="expected 1 or 3 values"):
        SyntheticCTR(dataclasses.replace(cfg, zipf_exponent=[1.1, 1.2]))


def test_zipf_probs_are_the_law_of_zipf_ids():
    p = zipf_probs(50, 1.3)
    assert p.sum() == pytest.approx(1.0) and p[0] == pytest.approx(zipf_top_share(50, 1.3))
    ids = zipf_ids(np.random.default_rng(0).random(400_000), 50, 1.3)
    np.testing.assert_allclose(np.bincount(ids, minlength=50) / ids.size, p, atol=0.003)


def _capacity_cfg(**kw) -> SyntheticDataConfig:
    return dataclasses.replace(CFG, teacher_terms=["linear", "fm", "dense_mlp", "capacity"], capacity_width=256,
                               teacher_logit_scale=2.0, **kw)


@pytest.mark.parametrize("share", [0.3, 0.8])
def test_capacity_share_is_its_share_of_the_logit_variance(share: float):
    g = SyntheticCTR(_capacity_cfg(capacity_share=share))
    ids = np.arange(20_000, dtype=np.int64) + EVAL_OFFSET
    var = g.logit_terms(ids).var(axis=0)
    assert var[-1] / var.sum() == pytest.approx(share, abs=0.03)
    assert var.sum() == pytest.approx(4.0, rel=0.05)  # teacher_logit_scale ** 2
    np.testing.assert_allclose(g.label_prob(ids), g.examples(ids)["label_prob"], rtol=1e-6)
    np.testing.assert_array_equal(g.label_prob(ids, 256), g.label_prob(ids))


def test_capacity_spectrum_sets_how_fast_a_narrower_copy_catches_up():
    """Excess KL of the teacher cut to its first m capacity units falls with m, faster for a
    steeper spectrum (about m^(1 - 2 gamma))."""
    ids = np.arange(10_000, dtype=np.int64) + EVAL_OFFSET
    widths = [4, 16, 64, 128]
    slopes = {}
    for gamma in (0.75, 1.5):
        g = SyntheticCTR(_capacity_cfg(capacity_share=0.7, capacity_spectrum=gamma))
        q = g.label_prob(ids)
        kls = [excess_kl(g.label_prob(ids, m), q) for m in widths]
        assert all(a > b > 0 for a, b in zip(kls, kls[1:], strict=False)), (gamma, kls)
        slopes[gamma] = np.polyfit(np.log(widths), np.log(kls), 1)[0]
    assert slopes[1.5] < slopes[0.75] - 0.7 and slopes[0.75] < -0.25


def test_logit_scale_raises_the_learnable_signal():
    ids = np.arange(20_000, dtype=np.int64) + EVAL_OFFSET
    kl = {}
    for scale in (1.0, 2.0):
        q = SyntheticCTR(dataclasses.replace(CFG, teacher_logit_scale=scale)).label_prob(ids)
        kl[scale] = excess_kl(np.full_like(q, q.mean()), q)
    assert 0.05 < kl[1.0] < 0.1 and kl[2.0] > 2 * kl[1.0]


def test_capacity_knobs_leave_streams_without_the_term_unchanged(gen: SyntheticCTR):
    other = SyntheticCTR(dataclasses.replace(CFG, capacity_width=7, capacity_spectrum=3.0))
    _assert_batches_equal(gen.examples(np.arange(2000)), other.examples(np.arange(2000)))
    with pytest.raises(ConfigError, match="capacity_share"):
        SyntheticCTR(dataclasses.replace(CFG, capacity_share=0.5))
    with pytest.raises(ConfigError, match="capacity_share"):
        SyntheticCTR(_capacity_cfg(capacity_share=1.5))


# ----------------------------------------------------------------------------- data-limited floor


def test_data_limited_floor_matches_the_bayes_estimator_of_a_one_column_teacher():
    """One column of 256 equally likely ids and a linear teacher: the floor against the exact
    posterior-mean predictor (grid posterior under the uniform prior) from simulated Poisson(n p)
    observation counts per id, within 15% (measured: -10%, +4%, +12% at 2, 10, 50 observations per
    id; the Laplace approximation ignores the uniform prior's bounds); and it falls with n."""
    from recjax.data.synthetic_floor import data_limited_kl

    vocab = 256
    cfg = dataclasses.replace(CFG, num_sparse=1, vocab_sizes=[vocab], zipf_exponent=0.0, user_id=False,
                              num_dense=0, teacher_terms=["linear"], teacher_logit_scale=1.5)
    g = SyntheticCTR(cfg)
    ids = np.arange(8000, dtype=np.int64) + EVAL_OFFSET
    budgets = [2.0 * vocab, 10.0 * vocab, 50.0 * vocab]
    floor = data_limited_kl(g, budgets, ids)
    assert floor[0] > floor[1] > floor[2] > 0

    feats = g._features(ids)
    share = np.bincount(feats["sparse"][0], minlength=vocab) / ids.size  # eval weight of each id
    all_ids = np.arange(vocab)[None, :]
    w_true = g._id_params(all_ids)[0, :, -1].astype(np.float64)  # [vocab] first-order weights
    scale, bias = float(g._norm[0]), float(g._bias)
    q = 1 / (1 + np.exp(-(bias + scale * w_true)))
    grid = np.linspace(-np.sqrt(3), np.sqrt(3), 401)  # the uniform prior's support
    p_grid = 1 / (1 + np.exp(-(bias + scale * grid)))
    rng = np.random.default_rng(0)
    for n, want in zip(budgets, floor, strict=True):
        kls = []
        for _ in range(50):
            k = rng.poisson(n / vocab, size=vocab)
            y = rng.binomial(k, q)
            log_post = y[:, None] * np.log(p_grid) + (k - y)[:, None] * np.log1p(-p_grid)  # [vocab, grid]
            post = np.exp(log_post - log_post.max(axis=1, keepdims=True))
            p_hat = (post * p_grid).sum(axis=1) / post.sum(axis=1)
            kl = q * np.log(q / p_hat) + (1 - q) * np.log((1 - q) / (1 - p_hat))
            kls.append(float((share * kl).sum()))
        assert np.mean(kls) == pytest.approx(want, rel=0.15), (n, np.mean(kls), want)
