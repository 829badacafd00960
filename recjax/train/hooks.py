"""Trainer hooks with state that a checkpoint carries: best metric / early stopping, clock.

Both are plain objects whose ``state()`` is JSON and which ``load()`` it back, so a resumed
run continues them exactly (the trainer saves them in every checkpoint's ``loop`` item).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from recjax.config import TrainConfig
from recjax.errors import ConfigError


@dataclass
class BestTracker:
    """Best value of ``train.best_metric`` ("split/name") and early stopping after
    ``train.patience`` evaluations in a row without a strict improvement (0: never).
    ``last_eval_step`` is the step of the latest evaluation, tracked with or without a metric."""

    metric: str = ""
    mode: str = "max"
    patience: int = 0
    best: float | None = None
    best_step: int | None = None
    bad: int = 0
    last_eval_step: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_config(cls, t: TrainConfig) -> BestTracker:
        return cls(t.best_metric, t.best_mode, t.patience)

    def update(self, step: int, results: dict[str, dict[str, float]]) -> bool:
        """Record the evaluations of ``step`` (``{split: metrics}``); True if a new best."""
        self.last_eval_step = step
        if not self.metric:
            return False
        split, _, name = self.metric.partition("/")
        if split not in results or name not in results[split]:
            have = [f"{s}/{k}" for s, m in results.items() for k in m]
            raise ConfigError(f"train.best_metric {self.metric!r} is not among the eval metrics: {have}")
        value = float(results[split][name])
        self.history.append({"step": step, "value": value})
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better and math.isfinite(value):
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad,
                "last_eval_step": self.last_eval_step, "history": self.history}

    def load(self, s: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad = s["best"], s["best_step"], int(s["bad"])
        self.last_eval_step, self.history = int(s["last_eval_step"]), list(s["history"])


@dataclass
class Clock:
    """Seconds summed over resumed sessions: training steps (with the host's batch assembly,
    without compile, eval or checkpoints), eval, checkpoints, and wall time from the first
    step; ``*_to_best_s`` stop at the best evaluation."""

    train_s: float = 0.0
    eval_s: float = 0.0
    checkpoint_s: float = 0.0
    wall_s: float = 0.0
    wall_to_best_s: float | None = None
    train_to_best_s: float | None = None
    _wall0: float = field(default=0.0, repr=False)

    def start(self) -> None:
        self._wall0 = time.perf_counter() - self.wall_s

    def tick(self) -> None:
        self.wall_s = time.perf_counter() - self._wall0

    def best_now(self) -> None:
        self.tick()
        self.wall_to_best_s, self.train_to_best_s = self.wall_s, self.train_s

    def state(self) -> dict[str, Any]:
        self.tick()
        return {k: getattr(self, k) for k in ("train_s", "eval_s", "checkpoint_s", "wall_s",
                                              "wall_to_best_s", "train_to_best_s")}

    def load(self, s: dict[str, Any]) -> None:
        for k, v in s.items():
            setattr(self, k, v)
