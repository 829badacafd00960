"""Execute a sweep: skip finished runs, record failures with their error, show progress + ETA.

Runs whose row in the table has ``status == ok`` are skipped; failed and missing ones run
again (an interrupted run resumes from its own checkpoints, as ``recjax train`` does).

- ``procs == 1``: runs execute one after another in this process
  (:func:`recjax.train.trainer.train`, the one trainer of every task), each one's console
  output going to ``<run_dir>/train.log``.
- ``procs > 1``: up to ``procs`` worker processes at a time, each
  ``python -m recjax.cli sweep run SPEC --only RUN_ID`` (output in ``<run_dir>/worker.log``).
  A worker writes its own row; if it dies without one (killed, out of memory), the row
  is written here with the exit code and the log's last line.

Whoever trains a run writes its row (process 0 only, in a multi-process job): sizes and FLOPs
from the trainer's report, step times from ``metrics.jsonl``, quality by task (CTR: the final
evaluation's logloss / NE / AUC; seqrec: the best validation value and the test metrics of the
best parameters; see :mod:`recjax.scaling.results`). A run stopped by a preemption notice
(:class:`~recjax.train.trainer.Preempted`) writes no row and ends the sweep with the trainer's
exit code, so the job can be requeued; the rerun resumes it.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from recjax.scaling import results
from recjax.scaling.sweep import Run, Sweep

# (table column, candidate model-config attributes), first present wins
SIZE_ATTRS = {
    "d_model": ("d_model", "dim", "hidden"),
    "layers": ("num_layers", "layers"),
    "tokens": ("num_tokens", "tokens"),
    "experts": ("moe_experts", "num_experts", "experts"),
}


def pending(runs: list[Run], rows: list[results.Row]) -> list[Run]:
    done = {r["run_id"] for r in rows if r.get("status") == "ok"}
    return [r for r in runs if r.run_id not in done]


def base_row(sweep: Sweep, run: Run) -> results.Row:
    """The columns known from the spec and config alone (no jax). ``steps`` and
    ``examples_seen`` are left empty for epoch-based runs (``train.epochs > 0``): their step
    count depends on the data and on early stopping, and the trainer's report fills them in."""
    from recjax.config import task_name

    cfg = run.config
    steps = cfg.train.steps if cfg.train.epochs <= 0 else None
    row: results.Row = {
        "run_id": run.run_id, "sweep": sweep.name, "model": run.arch or cfg.model.name, "task": task_name(cfg),
        "preset": run.preset, "config_hash": run.config_hash,
        "axes": json.dumps(run.axes, sort_keys=True), "seed": cfg.seed,
        "flops_budget": run.flops_budget, "global_batch": cfg.data.global_batch,
        "steps": steps, "examples_seen": steps * cfg.data.global_batch if steps is not None else None,
        "run_dir": cfg.run_dir,
    }
    for col, attrs in SIZE_ATTRS.items():
        row[col] = next((getattr(cfg.model, a) for a in attrs if hasattr(cfg.model, a)), None)
    return row


def _step_times(run_dir: pathlib.Path) -> list[float]:
    """Step times of every train logging window in ``metrics.jsonl``."""
    times: list[float] = []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("split") == "train" and rec.get("step_time_s"):
                times.append(float(rec["step_time_s"]))
    return times


RANKING_COLUMNS = ("hr@10", "ndcg@10", "mrr")


def quality_columns(report: dict[str, Any]) -> results.Row:
    """The quality columns of a trainer report (:func:`recjax.train.trainer.train`).

    CTR: the last evaluation (at the final step) of the ``eval`` split. Ranking: the best
    validation value and step of ``train.best_metric``, the validation metrics of the tested
    (best) parameters (``report["best_eval"]``) and the test split's metrics."""
    out: results.Row = {"train_loss": (report.get("train") or {}).get("loss")}
    last = (report.get("eval") or {}).get("eval")
    if last is not None:
        out.update(eval_logloss=last.get("logloss"), eval_ne=last.get("ne"), eval_auc=last.get("auc"),
                   bayes_logloss=last.get("bayes_logloss"), excess_kl=last.get("excess_kl"))
    if report.get("best_metric"):
        out.update(best_metric=report["best_metric"], best_value=report.get("best_value"),
                   best_step=report.get("best_step"))
    tested = report.get("best_eval") or report.get("eval") or {}
    valid, test = tested.get("valid"), report.get("test")
    if valid is not None:
        out.update({f"valid_{k}": valid.get(k) for k in RANKING_COLUMNS})
    if isinstance(test, dict):
        out.update({f"test_{k}": test.get(k) for k in RANKING_COLUMNS})
        name = (report.get("best_metric") or "").partition("/")[2]
        out["test_value"] = test.get(name) if name else None
    return out


def result_row(sweep: Sweep, run: Run, report: dict[str, Any], wall_s: float) -> results.Row:
    """A finished run's row from its trainer ``report``: sizes and FLOPs (``model_info``),
    steps run, quality (:func:`quality_columns`); step times from its ``metrics.jsonl``;
    device from jax."""
    import jax

    from recjax.train import flops as flops_lib

    cfg = run.config
    info = report["model_info"]
    row = base_row(sweep, run)
    quality = quality_columns(report)
    if report["task"] == "ctr" and quality.get("eval_logloss") is None:
        raise RuntimeError(f"{cfg.run_dir}: the report has no final evaluation ('eval' split)")
    if report["task"] == "seqrec" and not isinstance(report.get("test"), dict):
        raise RuntimeError(f"{cfg.run_dir}: the report has no test metrics")
    times = _step_times(pathlib.Path(cfg.run_dir))
    steps = int(report["steps"])
    n_dev = jax.device_count()
    kind = jax.devices()[0].device_kind
    peak = flops_lib.peak_flops_per_device(kind)
    step_time = statistics.median(times) if times else None
    flops_step_dev = info["train_flops_per_example"] * cfg.data.global_batch / n_dev
    row.update(
        steps=steps, examples_seen=steps * cfg.data.global_batch, epochs=report.get("epochs"),
        dense_params=int(info["params_dense"]),
        active_params=int(info.get("params_active", info["params_dense"])),
        embedding_params=int(info["params_embedding"]),
        fwd_flops_per_example=float(info["fwd_flops_per_example"]),
        train_flops_total=float(info["train_flops_per_example"]) * steps * cfg.data.global_batch,
        device_kind=kind, n_devices=n_dev, peak_flops=peak, step_time_median=step_time,
        examples_per_s=cfg.data.global_batch / step_time if step_time else None,
        tflops_per_device=flops_step_dev / step_time / 1e12 if step_time else None,
        mfu=flops_lib.mfu(flops_step_dev, step_time or 0.0, peak),
        **quality, status="ok", wall_time_s=wall_s,
    )
    if report["task"] == "ctr" and cfg.data.source == "synthetic":
        row["data_floor_kl"] = data_floor_kl(cfg.data.synthetic, row["examples_seen"])
    return row


def fill_data_floors(sweep: Sweep, runs: list[Run]) -> int:
    """Add ``data_floor_kl`` to this sweep's finished synthetic-CTR rows that lack it; returns
    how many rows were filled."""
    by_id = {r.run_id: r for r in runs}
    filled = 0
    for row in results.read_rows(sweep.table):
        run = by_id.get(row["run_id"])
        if (run is None or row.get("status") != "ok" or row.get("task") != "ctr"
                or row.get("data_floor_kl") is not None or run.config.data.source != "synthetic"):
            continue
        floor = data_floor_kl(run.config.data.synthetic, int(row["examples_seen"]))
        if floor is not None:
            results.upsert_row(sweep.table, {**row, "data_floor_kl": floor})
            filled += 1
    return filled


FLOOR_EXAMPLES = 2048  # held-out examples the data-limited floor averages over
_floors: dict[str, Any] = {}  # stream config (JSON) -> DataLimitedFloor, reused across a sweep's budgets


def data_floor_kl(stream: Any, examples: int) -> float | None:
    """The stream's data-limited floor after ``examples`` training examples
    (:mod:`recjax.data.synthetic_floor`), on the first ``FLOOR_EXAMPLES`` eval examples; None
    for streams it does not support (vocabularies above 10M ids). Computed once per stream and
    process (~10 s on a CPU core for the scaling stream), then per budget in milliseconds."""
    import dataclasses

    import numpy as np

    from recjax.data.synthetic import EVAL_OFFSET, SyntheticCTR
    from recjax.data.synthetic_floor import DataLimitedFloor

    key = json.dumps(dataclasses.asdict(stream), sort_keys=True)
    if key not in _floors:
        ids = np.arange(FLOOR_EXAMPLES, dtype=np.int64) + EVAL_OFFSET
        try:
            _floors[key] = DataLimitedFloor(SyntheticCTR(stream), ids)
        except ValueError:
            _floors[key] = None
    return None if _floors[key] is None else float(_floors[key].kl(examples)[0])


def quality_summary(row: results.Row) -> str | None:
    """One short quality figure of a row for progress and status lines (None: no quality)."""
    if row.get("eval_logloss") is not None:
        return f"logloss {row['eval_logloss']:.5f}"
    if row.get("best_value") is not None:
        test = f", test {row['test_value']:.4f}" if row.get("test_value") is not None else ""
        return f"{row['best_metric']} {row['best_value']:.4f} (step {row.get('best_step')}){test}"
    if row.get("test_ndcg@10") is not None:
        return f"test ndcg@10 {row['test_ndcg@10']:.4f}"
    return None


def failed_row(sweep: Sweep, run: Run, error: str, wall_s: float) -> results.Row:
    return {**base_row(sweep, run), "status": "failed", "error": error, "wall_time_s": wall_s}


def execute(sweep: Sweep, run: Run) -> results.Row:
    """Train ``run`` in this process and write its row (ok or failed). A preemption notice
    is not a failure: it propagates (no row; the rerun resumes the run)."""
    import jax

    from recjax.train.trainer import Preempted, train

    run_dir = pathlib.Path(run.config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "a") as log:
        try:
            with contextlib.redirect_stdout(log):
                report = train(run.config)
            row = result_row(sweep, run, report, time.perf_counter() - t0)
        except Preempted:
            raise
        except Exception as e:
            log.write(traceback.format_exc())
            error = f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
            row = failed_row(sweep, run, error, time.perf_counter() - t0)
    if jax.process_index() == 0:
        results.upsert_row(sweep.table, row)
    return row


class Progress:
    """``[done/total]`` lines with counts and an ETA from the mean wall time of runs so far."""

    def __init__(self, total: int, skipped: int, procs: int, print_fn: Callable[[str], None]):
        self.total, self.skipped, self.procs, self.print = total, skipped, procs, print_fn
        self.walls: list[float] = []
        self.ok = self.failed = 0

    def update(self, row: results.Row) -> None:
        self.walls.append(float(row.get("wall_time_s") or 0.0))
        if row["status"] == "ok":
            self.ok += 1
        else:
            self.failed += 1
        done = self.skipped + self.ok + self.failed
        left = self.total - done
        eta = statistics.mean(self.walls) * left / self.procs
        detail = quality_summary(row) or str(row.get("error") or "")[:80]
        self.print(
            f"[{done:>{len(str(self.total))}}/{self.total}] {row['status']:<6} {row['run_id']} "
            f"{detail} ({self.walls[-1]:.1f}s) | {self.ok} ok, {self.failed} failed, "
            f"{self.skipped} skipped, {left} left | ETA {format_duration(eta)}"
        )


def format_duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_sweep(
    sweep: Sweep,
    runs: list[Run],
    *,
    procs: int = 1,
    cli_overrides: list[str] | None = None,
    print_fn: Callable[[str], None] = print,
) -> list[results.Row]:
    """Run every pending run of ``runs``; returns the rows written by this call. Finished rows
    written before the ``data_floor_kl`` column existed get it first (:func:`fill_data_floors`)."""
    fill_data_floors(sweep, runs)
    todo = pending(runs, results.read_rows(sweep.table))
    progress = Progress(len(runs), len(runs) - len(todo), max(procs, 1), print_fn)
    print_fn(f"sweep {sweep.name}: {len(runs)} runs, {len(runs) - len(todo)} already done, "
             f"{len(todo)} to run ({procs} at a time); table {sweep.table}")
    rows = []
    if procs <= 1:
        for run in todo:
            rows.append(execute(sweep, run))
            progress.update(rows[-1])
        return rows
    queue, active = list(todo), {}
    while queue or active:
        while queue and len(active) < procs:
            run = queue.pop(0)
            active[run.run_id] = (run, _spawn(sweep, run, cli_overrides or []), time.perf_counter())
        time.sleep(0.2)
        for run_id, (run, proc, t0) in list(active.items()):
            if proc.poll() is None:
                continue
            del active[run_id]
            rows.append(_collect(sweep, run, proc.returncode, time.perf_counter() - t0))
            progress.update(rows[-1])
    return rows


def worker_command(sweep: Sweep, run: Run, cli_overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "recjax.cli", "sweep", "run", str(sweep.path), "--only", run.run_id,
        "--out-dir", str(sweep.out_dir), *cli_overrides,
    ]


def _spawn(sweep: Sweep, run: Run, cli_overrides: list[str]) -> subprocess.Popen:
    run_dir = pathlib.Path(run.config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "worker.log", "a") as log:  # the child keeps its own handle
        return subprocess.Popen(worker_command(sweep, run, cli_overrides), stdout=log,
                                stderr=subprocess.STDOUT)


def _collect(sweep: Sweep, run: Run, returncode: int, wall_s: float) -> results.Row:
    """The worker's own row, or a failed row if it died without writing one (exit code > 1)."""
    row = results.by_run_id(results.read_rows(sweep.table)).get(run.run_id)
    if returncode in (0, 1) and row is not None:
        return row
    log = pathlib.Path(run.config.run_dir) / "worker.log"
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    last = lines[-1] if lines else "no output"
    row = failed_row(sweep, run, f"worker exited with code {returncode}: {last}"[:500], wall_s)
    results.upsert_row(sweep.table, row)
    return row
