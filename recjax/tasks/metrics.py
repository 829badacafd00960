"""Evaluation metrics on host numpy: logloss, NE, exact AUC, GAUC, calibration, Bayes logloss,
excess KL.

Conventions (``p`` predicted probabilities, ``y`` labels in {0, 1}, ``n`` examples)::

    logloss = -mean(y log p + (1 - y) log(1 - p))      p clipped to [1e-7, 1 - 1e-7]
    H(q)    = -(q log q + (1 - q) log(1 - q))          binary entropy
    ne      = logloss / H(mean(y))                     1.0 = predicting the base rate
    auc     = P(p_pos > p_neg) + 0.5 P(p_pos = p_neg)  exact, average ranks for ties
    gauc    = sum_u n_u auc_u / sum_u n_u              over users with both classes
    bayes_logloss = mean H(q_i)                        q_i: the teacher's true P(y_i = 1)
    excess_kl = mean KL(q_i || p_i)                    = E_y[logloss] - bayes_logloss
              = mean[q log(q / p) + (1 - q) log((1 - q) / (1 - p))]   (no label noise)

AUC and GAUC are rank statistics computed with one sort (O(n log n)); labels are
binarised as ``y > 0.5`` for them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-7


def _clip(p: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(p, np.float64), EPS, 1.0 - EPS)


def binary_entropy(q: np.ndarray | float) -> np.ndarray:
    """``H(q)`` in nats, elementwise, with ``q`` clipped to ``[1e-7, 1 - 1e-7]``."""
    q = _clip(q)
    return -(q * np.log(q) + (1.0 - q) * np.log1p(-q))


def excess_kl(probs: np.ndarray, label_prob: np.ndarray) -> float:
    """``mean KL(q || p)`` in nats of the predictions ``p`` from the teacher's ``q``, both clipped
    as in :func:`logloss`: the part of the expected logloss above the Bayes loss, without the
    noise of sampled labels. Each term is >= 0 (Gibbs); float rounding below 0 is cut to 0."""
    p, q = _clip(probs), _clip(label_prob)
    kl = q * (np.log(q) - np.log(p)) + (1.0 - q) * (np.log1p(-q) - np.log1p(-p))
    return float(np.mean(np.maximum(kl, 0.0)))


def logloss(probs: np.ndarray, labels: np.ndarray) -> float:
    p = _clip(probs)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _tie_avg_ranks(sorted_keys: list[np.ndarray]) -> np.ndarray:
    """1-based ranks of already-sorted rows, ties (equal in every key) sharing their mean rank."""
    n = len(sorted_keys[0])
    diff = np.zeros(max(n - 1, 0), bool)
    for k in sorted_keys:
        diff |= k[1:] != k[:-1]
    starts = np.flatnonzero(np.concatenate([[True], diff]))
    ends = np.append(starts[1:], n)  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    return np.repeat(avg, ends - starts)


def auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with average ranks for ties); NaN if one class is absent.

    ``auc = (sum of positive ranks - P (P + 1) / 2) / (P N)``.
    """
    p = np.asarray(probs, np.float64).ravel()
    pos = np.asarray(labels).ravel() > 0.5
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="stable")
    ranks = _tie_avg_ranks([p[order]])
    r_pos = ranks[pos[order]].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(probs: np.ndarray, labels: np.ndarray, user_ids: np.ndarray) -> tuple[float, int]:
    """Impression-weighted per-user AUC and the number of users it averages over.

    Users with only one class are skipped. One lexsort by (user, prob), then per-user
    sums with ``np.add.reduceat``; NaN (and 0 users) if no user has both classes.
    """
    p = np.asarray(probs, np.float64).ravel()
    pos = (np.asarray(labels).ravel() > 0.5).astype(np.float64)
    u = np.asarray(user_ids).ravel()
    if p.size == 0:
        return float("nan"), 0
    order = np.lexsort((p, u))
    p, pos, u = p[order], pos[order], u[order]
    ranks = _tie_avg_ranks([u, p])  # ranks within the whole array; ties never cross users
    starts = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]]))
    n_u = np.diff(np.append(starts, p.size)).astype(np.float64)
    # rank within the user = global rank - number of rows before the user's block
    offset = np.repeat(starts.astype(np.float64), n_u.astype(np.int64))
    r_pos = np.add.reduceat(pos * (ranks - offset), starts)
    n_pos = np.add.reduceat(pos, starts)
    n_neg = n_u - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan"), 0
    auc_u = (r_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    w = n_u[ok]
    return float(np.sum(w * auc_u) / np.sum(w)), int(ok.sum())


class StreamingEval:
    """Accumulate eval batches on the host, compute every metric once in ``result()``.

    Stores the concatenated arrays (eval sets are bounded). GAUC is reported only if
    every ``update`` had ``user_ids``; the Bayes fields only if every one had ``label_prob``.
    """

    def __init__(self) -> None:
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._users: list[np.ndarray] | None = []
        self._label_prob: list[np.ndarray] | None = []

    def update(
        self,
        probs: Any,
        labels: Any,
        user_ids: Any | None = None,
        label_prob: Any | None = None,
    ) -> None:
        p = np.asarray(probs, np.float64).ravel()
        y = np.asarray(labels, np.float64).ravel()
        if p.shape != y.shape:
            raise ValueError(f"probs {p.shape} and labels {y.shape} differ in size")
        self._probs.append(p)
        self._labels.append(y)
        if user_ids is None:
            self._users = None
        elif self._users is not None:
            self._users.append(np.asarray(user_ids).ravel())
        if label_prob is None:
            self._label_prob = None
        elif self._label_prob is not None:
            self._label_prob.append(np.asarray(label_prob, np.float64).ravel())

    def result(self) -> dict[str, float]:
        if not self._probs:
            return {"count": 0.0}
        p = np.concatenate(self._probs)
        y = np.concatenate(self._labels)
        ctr = float(y.mean())
        pred_ctr = float(p.mean())
        base_h = float(binary_entropy(ctr)) if 0.0 < ctr < 1.0 else float("nan")
        out = {
            "count": float(p.size),
            "logloss": logloss(p, y),
            "auc": auc(p, y),
            "ctr": ctr,
            "pred_ctr": pred_ctr,
            "calibration": pred_ctr / ctr if ctr > 0 else float("nan"),
        }
        out["ne"] = out["logloss"] / base_h
        if self._users:
            out["gauc"], users = gauc(p, y, np.concatenate(self._users))
            out["gauc_users"] = float(users)
        if self._label_prob:
            q = np.concatenate(self._label_prob)
            out["bayes_logloss"] = float(np.mean(binary_entropy(q)))
            out["bayes_ne"] = out["bayes_logloss"] / base_h
            out["excess_kl"] = excess_kl(p, q)
        return out
