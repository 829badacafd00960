"""The sweep results table: one CSV row per run, replaced atomically under a file lock.

Columns (``COLUMNS``, in order; empty cell = unknown / not applicable):

- identity: ``run_id, sweep, model, task`` (``ctr`` | ``seqrec``), ``preset, config_hash, axes``
  (``axes``: JSON of the values the sweep set for this run), ``seed``;
- size: ``d_model, layers, tokens, experts`` (from the model config when it has them),
  ``dense_params, active_params, embedding_params``;
- compute: ``fwd_flops_per_example`` (analytic matmul FLOPs; an example of the seqrec task is
  one sequence), ``train_flops_total`` (``3 x fwd x examples_seen``), ``flops_budget`` (the
  nominal budget of an IsoFLOP sweep), ``examples_seen, global_batch, steps`` (the steps run:
  fewer than configured when early stopping ended the run), ``epochs`` (passes over a finite
  training set; empty for streams);
- speed: ``device_kind, n_devices, peak_flops`` (per device, empty when unknown e.g. CPU),
  ``step_time_median`` (s, median over the run's logging windows), ``examples_per_s``,
  ``tflops_per_device``, ``mfu`` (fraction of ``peak_flops``);
- quality: ``train_loss`` (the last logged training loss, every task);
  CTR: ``eval_logloss, eval_ne, eval_auc`` (the evaluation at the final step),
  ``bayes_logloss``, ``excess_kl`` (mean KL of the predictions from the teacher's
  probabilities) and ``data_floor_kl`` (the excess KL an idealised learner keeps after
  ``examples_seen`` examples, :mod:`recjax.data.synthetic_floor`): synthetic data only;
  ranking (seqrec): ``best_metric`` (``split/name``, e.g. ``valid/ndcg@10``), ``best_value``
  and ``best_step`` (its best value and where), ``valid_hr@10, valid_ndcg@10, valid_mrr`` (the
  validation of the parameters that were tested: the best ones), ``test_hr@10, test_ndcg@10,
  test_mrr`` and ``test_value`` (the test split's value of ``best_metric``'s name);
- bookkeeping: ``status`` (``ok`` | ``failed``), ``error``, ``wall_time_s``, ``run_dir``.

Writers (sequential runs, local worker processes, cluster jobs on a shared file system) call
:func:`upsert_row`, which takes an exclusive ``fcntl`` lock on ``<table>.lock``, replaces the
row with the same ``run_id`` (or appends), writes a temporary file and renames it over the
table, so readers never see a partial file and a rerun of a failed run replaces its row.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import math
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

COLUMNS: dict[str, type] = {
    "run_id": str, "sweep": str, "model": str, "task": str, "preset": str, "config_hash": str,
    "axes": str, "seed": int,
    "d_model": int, "layers": int, "tokens": int, "experts": int,
    "dense_params": int, "active_params": int, "embedding_params": int,
    "fwd_flops_per_example": float, "train_flops_total": float, "flops_budget": float,
    "examples_seen": int, "global_batch": int, "steps": int, "epochs": float,
    "device_kind": str, "n_devices": int, "peak_flops": float,
    "step_time_median": float, "examples_per_s": float, "tflops_per_device": float, "mfu": float,
    "train_loss": float,
    "eval_logloss": float, "eval_ne": float, "eval_auc": float, "bayes_logloss": float,
    "excess_kl": float, "data_floor_kl": float,
    "best_metric": str, "best_value": float, "best_step": int,
    "valid_hr@10": float, "valid_ndcg@10": float, "valid_mrr": float,
    "test_hr@10": float, "test_ndcg@10": float, "test_mrr": float, "test_value": float,
    "status": str, "error": str, "wall_time_s": float, "run_dir": str,
}

Row = dict[str, Any]


def _parse(name: str, text: str) -> Any:
    if text == "":
        return None
    kind = COLUMNS.get(name, str)
    if kind is int:
        return int(float(text))
    return kind(text)


def _format(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if math.isfinite(value) else ""
    if isinstance(value, np.integer):
        return str(int(value))
    return "" if value is None else str(value)


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Every row of the table (``[]`` if it does not exist), typed by ``COLUMNS``."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(k, v or "") for k, v in rec.items()} for rec in csv.DictReader(f)]


def _write(path: pathlib.Path, rows: Iterable[Row]) -> None:
    rows = list(rows)
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *extra])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _format(r.get(k)) for k in (*COLUMNS, *extra)})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def upsert_row(path: str | os.PathLike, row: Row) -> None:
    """Insert ``row`` or replace the row with its ``run_id``, atomically."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown results column(s) {sorted(unknown)}; known: {list(COLUMNS)}")
    if not row.get("run_id"):
        raise ValueError("a results row needs a run_id")
    path = pathlib.Path(path)
    with _locked(path):
        rows = [r for r in read_rows(path) if r.get("run_id") != row["run_id"]]
        _write(path, [*rows, row])


def by_run_id(rows: Iterable[Row]) -> dict[str, Row]:
    return {r["run_id"]: r for r in rows}


def column(rows: Iterable[Row], name: str) -> np.ndarray:
    """Float array of ``name`` over ``rows`` (``NaN`` where empty)."""
    return np.array([np.nan if r.get(name) is None else float(r[name]) for r in rows], dtype=np.float64)


def ok_rows(rows: Iterable[Row], *required: str) -> list[Row]:
    """Rows with ``status == ok`` and a value in every ``required`` column."""
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) is not None for k in required)]


def shared_budgets(rows: Iterable[Row]) -> list[Row]:
    """The rows whose data budget (``examples_seen``) every model in ``rows`` ran, so that
    architectures are compared on the same grid (all rows when a budget is missing)."""
    rows = list(rows)
    if any(r.get("examples_seen") is None for r in rows):
        return rows
    models = {r["model"] for r in rows}
    shared = set.intersection(*({r["examples_seen"] for r in rows if r["model"] == m} for m in models))
    return [r for r in rows if r["examples_seen"] in shared]
