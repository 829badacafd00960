"""The data-limited floor of the synthetic stream: the excess KL an idealised learner keeps after
``n`` training examples because it has seen each id only so often.

The learner knows the teacher's form and every parameter except the per-id ones, and has the
teacher's prior for those: ``theta [P]`` per (column, id), ``P = teacher_rank + 1`` entries of
variance 1 (:meth:`SyntheticCTR._id_params`). An id of probability ``p`` occurs ``k ~
Poisson(n p)`` times in ``n`` examples. Per column ``c``, with the logit's gradient ``g_e =
d logit_e / d theta_c`` at example ``e`` (central differences of the teacher) and the Fisher
information of one observation in a random context, ``F_c = mean_e w_e g_e g_e^T`` (``w_e = q_e
(1 - q_e)``), scaled to the example's own id by ``w_e / mean(w)`` (an id that pushes q to 0 or
1 is learnt more slowly), the Laplace posterior after ``k`` observations has covariance
``(I + k F_ce)^-1``. The floor is the expected KL of the Bayes predictive,
``1/2 log(1 + q (1 - q) s^2)`` for a logit of posterior variance ``s^2`` (the Gaussian-model
regret; ``1/2 q (1 - q) s^2`` for small ``s``)::

    s_ce^2(k) = g_e^T (I + k F_ce)^-1 g_e,   k ~ Poisson(n p_c(id_ce))
    S_ce^2    = (exp(E_k[log(1 + w_e s_ce^2(k))]) - 1) / w_e
    floor(n)  = mean_e 1/2 log(1 + w_e sum_c S_ce^2)

(``S`` is the variance whose regret is the expected regret over ``k``.) ``E_k`` is exact (a
sum over ``k``) for expected counts below ``_EXACT_BELOW`` and ``k = m`` above. The columns
are treated one at a time (the others known) and every non-id teacher weight is known, so the
floor is the part of the excess loss that data, not model size, limits. Against the exact Bayes estimator of a one-column linear
teacher (``tests/test_data_synthetic.py``) it is -10%, +4% and +12% off at 2, 10 and 50
observations per id (the Laplace approximation ignores the uniform prior's bounds); on the
default stream it gives 0.037 / 0.028 / 0.020 / 0.015 at 0.25M / 0.75M / 2.25M / 5.12M examples
(4,096 held-out examples), and 0.075 with no data (the best constant predictor: 0.077).
"""

from __future__ import annotations

import numpy as np

from recjax.data.synthetic import SyntheticCTR, _sigmoid, zipf_probs

_STEP = 1e-3  # central-difference step on a unit-variance parameter
_EXACT_BELOW = 64.0  # expected counts below this: exact Poisson sum
_MAX_VOCAB = 10_000_000  # zipf_probs materialises the vocabulary


def _poisson_mean_log(m: np.ndarray, w: np.ndarray, a: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """``E_k[log(1 + w sum_j a_j / (1 + k lam_j))]`` for ``k ~ Poisson(m)``: ``m, w [B]``,
    ``a, lam [B, P]`` -> ``[B]``. Exact sum below ``_EXACT_BELOW``, plug-in ``k = m`` above."""
    def f(k: np.ndarray, rows: np.ndarray) -> np.ndarray:  # k [R, K] -> [R, K]
        v = (a[rows][:, None, :] / (1.0 + k[..., None] * lam[rows][:, None, :])).sum(axis=-1)
        return np.log1p(w[rows][:, None] * v)

    out = np.empty(m.shape)
    big = m >= _EXACT_BELOW
    out[big] = f(m[big][:, None], np.flatnonzero(big))[:, 0]
    small = np.flatnonzero(~big)
    if small.size:
        k = np.arange(int(_EXACT_BELOW + 8 * np.sqrt(_EXACT_BELOW) + 20), dtype=np.float64)[None, :]
        ms = m[small][:, None]
        log_pmf = k * np.log(np.maximum(ms, 1e-300)) - ms - np.cumsum(np.log(np.maximum(k, 1.0)))
        pmf = np.where(ms > 0, np.exp(log_pmf), (k == 0).astype(np.float64))
        out[small] = (pmf * f(np.broadcast_to(k, pmf.shape), small)).sum(axis=1)
    return out


class DataLimitedFloor:
    """The floor of one stream on held-out ``example_ids``; :meth:`kl` for any budgets. The
    teacher's gradients (``2 C P`` teacher passes) are computed once, here."""

    def __init__(self, gen: SyntheticCTR, example_ids: np.ndarray):
        if any(int(v) > _MAX_VOCAB for v in gen.vocabs):
            raise ValueError(f"the data-limited floor materialises each column's id probabilities; vocabularies "
                             f"above {_MAX_VOCAB:,} are not supported (got {gen.vocabs.tolist()})")
        feats = gen._features(np.asarray(example_ids, np.int64))
        vals = gen._id_params(feats["sparse"]).astype(np.float64)  # [C, B, P]
        dense = feats["dense"].astype(np.float64)

        def logit(v: np.ndarray) -> np.ndarray:
            return gen._bias + gen._terms_of(v, dense, events=feats) @ gen._norm

        q = _sigmoid(logit(vals))
        self.w = w = q * (1.0 - q)  # [B]
        c, b, p = vals.shape
        self.columns: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (a [B,P], lam [B,P], prob [B])
        for col in range(c):
            g = np.empty((b, p))
            for j in range(p):
                up, down = vals.copy(), vals.copy()
                up[col, :, j] += _STEP
                down[col, :, j] -= _STEP
                g[:, j] = (logit(up) - logit(down)) / (2 * _STEP)
            lam, u = np.linalg.eigh((w[:, None] * g).T @ g / b)  # F_c [P, P]
            lam_e = np.maximum(lam, 0.0)[None, :] * (w / w.mean())[:, None]
            prob = zipf_probs(int(gen.vocabs[col]), gen.zipf_exponents[col])[feats["sparse"][col]]
            self.columns.append(((g @ u) ** 2, lam_e, prob))

    def kl(self, n_train: float | list[float]) -> np.ndarray:
        """float64 ``[len(n_train)]``: the floor after each number of training examples."""
        budgets = np.atleast_1d(np.asarray(n_train, np.float64))
        out = np.empty(budgets.size)
        for i, n in enumerate(budgets):
            var = sum(np.expm1(_poisson_mean_log(n * prob, self.w, a, lam)) / self.w
                      for a, lam, prob in self.columns)
            out[i] = np.mean(0.5 * np.log1p(self.w * var))
        return out


def data_limited_kl(gen: SyntheticCTR, n_train: float | list[float], example_ids: np.ndarray) -> np.ndarray:
    """float64 ``[len(n_train)]``: the floor after each ``n_train`` examples, averaged over the
    held-out ``example_ids`` (a few thousand are enough)."""
    return DataLimitedFloor(gen, example_ids).kl(n_train)
