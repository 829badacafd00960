"""Several labels per example: the CTR task's loss and evaluation for ``label [B, T]``.

With ``T`` tasks (``data.synthetic.tasks``), logits and labels are ``[B, T]`` and::

    loss_t = mean_b BCE(z_bt, y_bt)           (logged as task_loss/t)
    loss   = sum_t w_t loss_t                 w = train.task_weights (default all 1)

Evaluation scores each task on its own (:class:`MultiTaskEval`): ``t{i}/<metric>`` for every
metric of :class:`~recjax.tasks.metrics.StreamingEval` (logloss, NE, AUC, GAUC, and the Bayes
logloss and ``excess_kl`` on synthetic data), so ``train.best_metric: eval/t2/auc`` early-stops
on one task; the unprefixed names hold the mean over tasks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recjax.config import Config
from recjax.errors import ConfigError
from recjax.tasks.metrics import StreamingEval

# averaged over tasks under the plain name (count and gauc_users are per-task sizes)
_MEAN_KEYS = ("logloss", "ne", "auc", "gauc", "ctr", "pred_ctr", "calibration", "bayes_logloss", "bayes_ne",
              "excess_kl")


def task_weights(cfg: Config, tasks: int) -> tuple[float, ...]:
    """``train.task_weights`` checked against ``tasks`` (``[]``: 1 for every task)."""
    w = cfg.train.task_weights
    if not w:
        return (1.0,) * tasks
    if len(w) != tasks or min(w) < 0:
        raise ConfigError(f"train.task_weights: {tasks} non-negative weights (one per task) or [], got {w}")
    return tuple(float(v) for v in w)


def bce(logits: jax.Array, labels: jax.Array, weights: tuple[float, ...]) -> tuple[jax.Array, jax.Array | None]:
    """``(loss, per-task losses [T] or None)`` for logits and labels ``[B]`` or ``[B, T]``."""
    per = optax.sigmoid_binary_cross_entropy(logits, labels)
    if per.ndim == 1:
        return per.mean(), None
    per_task = per.mean(axis=0)
    return jnp.sum(per_task * jnp.asarray(weights, jnp.float32)), per_task


class MultiTaskEval:
    """:class:`StreamingEval` per task over ``probs``/``labels`` ``[B, T]``; see the module doc."""

    def __init__(self, tasks: int):
        self.evals = [StreamingEval() for _ in range(tasks)]

    def update(self, probs: Any, labels: Any, user_ids: Any | None = None, label_prob: Any | None = None) -> None:
        probs, labels = np.asarray(probs), np.asarray(labels)
        for t, ev in enumerate(self.evals):
            ev.update(probs[:, t], labels[:, t], user_ids, None if label_prob is None else np.asarray(label_prob)[:, t])

    def result(self) -> dict[str, float]:
        per = [ev.result() for ev in self.evals]
        out: dict[str, float] = {"count": per[0]["count"]}
        for key in _MEAN_KEYS:
            if key in per[0]:
                out[key] = float(np.mean([r[key] for r in per]))
        for t, r in enumerate(per):
            out.update({f"t{t}/{k}": v for k, v in r.items() if k != "count"})
        return out
