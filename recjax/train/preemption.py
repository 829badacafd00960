"""Preemption: notice SIGTERM, agree on a step, save there and exit with a documented code.

After ``jax.distributed.initialize`` JAX's preemption notifier owns SIGTERM (the signal no
longer stops the process); every process then asks the coordination service each step
(:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`), which answers True
on all processes at the same step once any of them was signalled. Without a distributed
runtime a SIGTERM handler sets a flag for the trainer to read at the next step boundary.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; the relaunch resumes from the checkpoint


def _sync_manager() -> Any:
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover
        return None
    return getattr(distributed.global_state, "preemption_sync_manager", None)


class PreemptionWatch:
    """``reached(step)``: True at the step boundary where the run should save and exit."""

    def __init__(self) -> None:
        self.distributed = _sync_manager() is not None
        self.signalled = False
        self._previous: Any = None
        if not self.distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def reached(self, step: int) -> bool:
        if self.distributed:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signalled

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
