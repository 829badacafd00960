"""Preemption: notice SIGTERM, agree on a step, save there and exit with a documented code.

After ``jax.distributed.initialize`` JAX's preemption notifier owns SIGTERM (the signal no
longer stops the process; checked on jax 0.10.2 with gloo CPU collectives: the notifier is
installed by ``initialize`` unless ``jax_enable_preemption_service`` is off). Every process
then asks the coordination service each step
(:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`), which answers True
on all processes at the same step once any of them was signalled: the signal may reach one
process (a host's maintenance notice) or all of them (SLURM, Kubernetes, ``recjax launch
local``). Without a distributed runtime a SIGTERM handler sets a flag for the trainer to read
at the next step boundary.

The trainer then saves, waits for the save and exits with :data:`PREEMPTED_EXIT_CODE`;
running the same command again resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading
import warnings
from typing import Any

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; the relaunch resumes from the checkpoint


def _distributed_state() -> Any:
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover
        return None
    return distributed.global_state


class PreemptionWatch:
    """``reached(step)``: True at the step boundary where the run should save and exit.

    Call it at every step on every process (JAX's sync point needs each step id).
    """

    def __init__(self) -> None:
        state = _distributed_state()
        client = getattr(state, "client", None)
        manager = getattr(state, "preemption_sync_manager", None) if client is not None else None
        self.distributed = manager is not None
        self.signalled = False
        self._previous: Any = None
        if client is not None and not self.distributed:
            # A flag per process would let one process save alone (a collective) and hang;
            # leave SIGTERM's default action (stop) instead.
            warnings.warn(
                "JAX's preemption service is off (jax_enable_preemption_service=False): a "
                "SIGTERM stops this multi-process run without saving a checkpoint",
                stacklevel=2,
            )
        elif not self.distributed and threading.current_thread() is threading.main_thread():
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
