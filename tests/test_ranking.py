"""Leave-one-out ranking metrics against hand-computed rankings (exclusion, ties, sampled)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from recjax.config import RankingConfig
from recjax.tasks import ranking as rk

# 4 items: ids 1..4; column 0 is padding and column 5 the [MASK] token (never candidates)
SCORES = np.array(
    [
        [9.0, 0.5, 0.9, 0.1, 0.7, 10.0],  # target 4 (0.7): only item 2 is higher -> rank 2
        [0.0, 0.3, 0.3, 0.3, 0.1, 0.0],  # target 2 ties items 1 and 3 -> rank 1 (ties favour it)
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.0],  # target 1 is lowest -> rank 4
    ]
)
TARGETS = np.array([4, 2, 1])


def test_ranks_by_hand_ignore_pad_and_mask_columns_and_favour_ties():
    np.testing.assert_array_equal(rk.target_ranks(SCORES, TARGETS), [2, 1, 4])


def test_excluded_history_is_not_ranked_but_the_target_always_is():
    # user 0 saw item 2 before; user 2 saw items 3 and 1 (the target itself: still ranked)
    mask = np.zeros_like(SCORES, bool)
    mask[0, 2] = True
    mask[2, [3, 1]] = True
    np.testing.assert_array_equal(rk.target_ranks(SCORES, TARGETS, mask), [1, 1, 3])
    csr = (np.array([0, 1, 1, 3]), np.array([2, 3, 1]))
    np.testing.assert_array_equal(rk.target_ranks(SCORES, TARGETS, csr), [1, 1, 3])


def test_metrics_by_hand():
    m = rk.ranking_metrics(np.array([1, 2, 5, 11]), [1, 5, 10])
    assert m["hr@1"] == 0.25 and m["hr@5"] == 0.75 and m["hr@10"] == 0.75
    assert m["ndcg@1"] == pytest.approx(0.25)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert m["ndcg@10"] == pytest.approx(m["ndcg@5"])  # rank 11 is outside the top 10
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 11) / 4)
    assert m["users"] == 4
    assert rk.ranking_metrics([1, 3], [10], ties=[0, 2])["tie_frac"] == 0.5
    with pytest.raises(ValueError, match="1-based"):
        rk.ranking_metrics([0, 1], [10])


def test_sampled_ranks_count_strictly_higher_negatives():
    ranks = rk.sampled_ranks(np.array([0.5, 0.5]), np.array([[0.1, 0.6, 0.5], [0.9, 0.8, 0.7]]))
    np.testing.assert_array_equal(ranks, [2, 4])


def test_device_ranks_match_the_spec_with_ties_and_history():
    rng = np.random.default_rng(0)
    u, v = 64, 30
    scores = rng.integers(0, 6, (u, v)).astype(np.float32)  # many ties
    targets = rng.integers(1, v - 1, u)
    hist = [rng.choice(np.arange(1, v - 1), rng.integers(0, 8), replace=False) for _ in range(u)]
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in hist])])
    expect = rk.target_ranks(scores, targets, (offsets, np.concatenate(hist)))
    padded = np.zeros((u, 8), np.int32)
    for i, h in enumerate(hist):
        padded[i, : len(h)] = h
    ranks, ties = rk.full_ranks_jax(jnp.asarray(scores), jnp.asarray(targets), jnp.asarray(padded))
    np.testing.assert_array_equal(np.asarray(ranks), expect)
    excluded = np.zeros((u, v), bool)
    for i, h in enumerate(hist):
        excluded[i, h] = True
    cand = ~excluded
    cand[:, [0, v - 1]] = False
    cand[np.arange(u), targets] = False
    expect_ties = np.sum((scores == scores[np.arange(u), targets][:, None]) & cand, axis=1)
    np.testing.assert_array_equal(np.asarray(ties), expect_ties)
    assert expect_ties.sum() > 0  # the case really has ties

    ranks, _ = rk.full_ranks_jax(jnp.asarray(scores), jnp.asarray(targets))
    np.testing.assert_array_equal(np.asarray(ranks), rk.target_ranks(scores, targets))
    cand = np.concatenate([scores[:, :1], scores[:, 1:11]], axis=1)
    ranks, _ = rk.sampled_ranks_jax(jnp.asarray(cand))
    np.testing.assert_array_equal(np.asarray(ranks), rk.sampled_ranks(cand[:, 0], cand[:, 1:]))


def test_protocol_names():
    assert rk.protocol_name(RankingConfig(), 1682) == (
        "leave-one-out, full ranking over 1682 items, history not masked"
    )
    assert "history masked" in rk.protocol_name(RankingConfig(mask_history=True), 10)
    assert rk.protocol_name(RankingConfig(protocol="sampled", num_negatives=100), 1682) == (
        "leave-one-out, target vs 100 uniform-sampled negatives"
    )


def test_bad_targets_are_reported():
    with pytest.raises(ValueError, match="item ids in 1..4"):
        rk.target_ranks(SCORES, np.array([0, 1, 2]))


def test_device_ranks_ignore_the_padding_rows_of_a_padded_table():
    """A padded item table scores ``R > V`` columns; with ``num_items`` the extra columns
    (here scoring above every item) and the [MASK] column are never candidates."""
    pad = np.full((3, 4), 100.0)  # 4 padding rows after [MASK]: R = 6 + 4
    scores = np.concatenate([SCORES, pad], axis=1)
    ranks, ties = rk.full_ranks_jax(jnp.asarray(scores), jnp.asarray(TARGETS), num_items=4)
    np.testing.assert_array_equal(np.asarray(ranks), [2, 1, 4])
    np.testing.assert_array_equal(np.asarray(ties), [0, 2, 0])
    # without num_items, ids 1..R-2 are candidates: [MASK] (col 5) and padding cols 6-8 count
    ranks, _ = rk.full_ranks_jax(jnp.asarray(scores), jnp.asarray(TARGETS))
    np.testing.assert_array_equal(np.asarray(ranks), [2 + 4, 1 + 3, 4 + 3])
