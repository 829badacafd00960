"""The Task interface: everything the one trainer needs to know about what it trains.

A task supplies

- ``data_info``: what the model is built from (``build(cfg, data_info, rngs)``);
- ``abstract_batch()``: the global train batch as ``ShapeDtypeStruct`` s (keys, shapes, dtypes);
- ``loss(model, batch, rng) -> (total, metrics)``: the scalar to minimise and scalar (or
  ``[E]``) diagnostics, ``metrics["loss"]`` among them;
- ``train_iterator(process_index, process_count)``: process-local rows of each global batch,
  with ``get_state()`` / ``set_state()`` holding a global stream position (so a run resumes
  mid-epoch and on another process count);
- ``evaluators(setup)``: ``{split: params -> metrics}`` run at the eval cadence, and
  ``final_evaluators(setup)``: run once at the end on the best (or last) parameters;
- ``forward_flops_per_example()`` and ``steps_per_epoch`` (``None`` for unbounded streams).

Tasks import models only through the registry and never the trainer's loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from recjax.config import Config
from recjax.errors import ConfigError
from recjax.models import registry as models

Metrics = dict[str, jax.Array]
Evaluator = Callable[[Any], dict[str, float]]


def scalar_metrics(aux: dict[str, Any]) -> Metrics:
    """Diagnostics as scalars: a vector ``v [E]`` becomes ``name/0 .. name/E-1``."""
    out: Metrics = {}
    for k, v in aux.items():
        v = jnp.asarray(v)
        if v.ndim == 0:
            out[k] = v
        else:
            out.update({f"{k}/{i}": v[i] for i in range(v.shape[0])})
    return out


class Task:
    name = ""
    example_name = "examples"  # what one row of a batch is, for progress lines

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @staticmethod
    def check_config(cfg: Config) -> None:
        """Raise :class:`ConfigError` for values of the task's sections it cannot use."""

    # --------------------------------------------------------------------------- model
    @property
    def data_info(self) -> Any:
        raise NotImplementedError

    def build_model(self, rngs: Any) -> Any:
        return models.build_model(self.cfg, self.data_info, rngs)

    def forward_flops_per_example(self) -> float:
        return models.forward_flops_per_example(self.cfg, self.data_info)

    def inactive_params(self) -> int:
        entry = models.get(self.cfg.model.name)
        return int(entry.inactive_params(self.cfg, self.data_info)) if entry.inactive_params else 0

    # --------------------------------------------------------------------------- training
    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        raise NotImplementedError

    def loss(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError

    def train_iterator(self, process_index: int, process_count: int) -> Any:
        raise NotImplementedError

    @property
    def steps_per_epoch(self) -> int | None:
        return None

    def total_steps(self) -> int:
        """``train.epochs`` passes (epoch-based tasks) or ``train.steps``."""
        t = self.cfg.train
        if t.epochs > 0:
            if self.steps_per_epoch is None:
                raise ConfigError(f"train.epochs needs a finite training set; the {self.name} "
                                  "task streams without epochs: set train.steps instead")
            return t.epochs * self.steps_per_epoch
        return t.steps

    # --------------------------------------------------------------------------- evaluation
    def evaluators(self, setup: Any) -> dict[str, Evaluator]:
        return {}

    def final_evaluators(self, setup: Any) -> dict[str, Evaluator]:
        return {}

    def describe_data(self) -> dict[str, Any]:
        """A summary of the data for the console and report.json."""
        return {}

    def format_eval(self, split: str, step: int, metrics: dict[str, float]) -> str:
        shown = " | ".join(f"{k} {v:.4f}" for k, v in list(metrics.items())[:6])
        return f"{split} @ {step}: {shown}"
