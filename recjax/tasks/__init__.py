"""Tasks: what is trained (data, model, loss, evaluation); the trainer (``recjax.train``) is
how. ``get_task(cfg)`` returns the task registered for the model's entry in
:data:`recjax.registry.TASKS`."""

from __future__ import annotations

from recjax.config import Config, task_name
from recjax.registry import TASKS
from recjax.tasks.base import Task


def get_task(cfg: Config) -> Task:
    return TASKS.get(task_name(cfg))(cfg)
