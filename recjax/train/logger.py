"""Metrics logging: JSON lines (the record of truth), TensorBoard scalars, console lines.

``run_dir/metrics.jsonl`` gets one object per ``log`` call::

    {"step": 200, "split": "train", "time": 1712345678.9, "loss": 0.4821, ...}

written, flushed and fsync'ed before ``log`` returns, so a crash loses nothing already
logged. On an object store (``gs://...``: no append, and an object appears only once it is
closed; gcsfs even turns mode ``"a"`` into ``"w"``) the logger keeps the file's records and
rewrites the whole file, through a temporary and a rename, at every ``log`` call: the same
guarantee, at the cost of one small upload per log line. Non-finite floats are written as ``null``, non-numeric values as strings.
TensorBoard (``run_dir/tb``, via tensorboardX) gets each finite numeric value as the
scalar ``"<split>/<name>"``. Only the primary process should pass ``enabled=True``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath


def _as_number(v: Any) -> float | int | None:
    """A Python int/float for numeric scalars (numpy/jax 0-d included), else None."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if hasattr(v, "shape") and getattr(v, "shape", None) == () and hasattr(v, "item"):
        item = v.item()
        return _as_number(item) if isinstance(item, numbers.Number) else None
    return None


def _json_value(v: Any) -> Any:
    num = _as_number(v)
    if num is None:
        return v if v is None else str(v)
    if isinstance(num, float) and not math.isfinite(num):
        return None
    return num


def is_remote(path: str | os.PathLike) -> bool:
    """True for an object-store path (``gs://b/run``, ``s3://...``), False for a local one."""
    return "://" in os.fspath(path)


class MetricsLogger:
    """Append-only JSONL + optional TensorBoard writer; a no-op when ``enabled=False``."""

    def __init__(
        self, run_dir: str | os.PathLike, *, tensorboard: bool = True, enabled: bool = True
    ):
        self.run_dir = epath.Path(run_dir)
        self.enabled = enabled
        self._file = None
        self._lines: list[str] | None = None  # object stores: every record, rewritten per log
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if is_remote(self.run_dir):
            self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        else:
            self._file = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))

    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        if not self.enabled or (self._file is None and self._lines is None):
            return
        record = {"step": int(step), "split": split, "time": time.time()}
        record.update({str(k): _json_value(v) for k, v in metrics.items()})
        line = json.dumps(record, allow_nan=False) + "\n"
        if self._lines is not None:
            self._lines.append(line)
            tmp = self.path.parent / (self.path.name + ".tmp")
            tmp.write_text("".join(self._lines))
            tmp.replace(self.path)
        else:
            self._file.write(line)
            self._file.flush()
            try:  # on disk before log returns
                os.fsync(self._file.fileno())
            except (OSError, ValueError):  # io.UnsupportedOperation: a file without a descriptor
                pass
        if self._tb is not None:
            for name, v in metrics.items():
                num = _as_number(v)
                if num is not None and math.isfinite(num):
                    self._tb.add_scalar(f"{split}/{name}", num, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._lines = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.1f}"


def format_line(
    step: int,
    total_steps: int,
    metrics: Mapping[str, Any],
    keys: Sequence[str] = ("loss",),
) -> str:
    """One console line, e.g.::

        step   200/2000 | loss 0.4821 | 25.1k ex/s | 0.12 TFLOP/s/dev | MFU n/a

    ``keys`` are shown as ``name value`` (those present); then throughput from
    ``examples_per_s``, ``tflops_per_device`` and ``mfu`` (a fraction) when logged.
    """
    width = len(str(total_steps))
    parts = [f"step {step:>{width}}/{total_steps}"]
    for k in keys:
        if k in metrics:
            num = _as_number(metrics[k])
            parts.append(f"{k} {num:.4f}" if num is not None else f"{k} {metrics[k]}")
    if "examples_per_s" in metrics:
        parts.append(f"{_si(float(metrics['examples_per_s']))} ex/s")
    if "tflops_per_device" in metrics:
        parts.append(f"{float(metrics['tflops_per_device']):.2f} TFLOP/s/dev")
    mfu = metrics.get("mfu")
    parts.append(f"MFU {100 * float(mfu):.1f}%" if mfu is not None else "MFU n/a")
    return " | ".join(parts)
