"""``recjax sweep run | emit | status SPEC [dotted.key=value ...]``: run or emit a scaling sweep.

- ``run``: train every run of the spec without an ``ok`` row in ``<out_dir>/results.csv``,
  sequentially (default) or ``--procs N`` worker processes at a time; ``--emit slurm|k8s``
  instead writes (and submits) one cluster job per pending run, like ``emit``.
- ``emit --target slurm|k8s [--dry-run]``: job files under ``<out_dir>/jobs/``; ``--dry-run``
  prints them instead of submitting.
- ``status``: one line per run (ok / failed / started / pending) and the counts.

Trailing ``dotted.key=value`` overrides apply to every run (they may not touch swept keys).
Runs executed in this process join a multi-process job first when the environment describes
one (:func:`recjax.parallel.distributed.initialize`), as emitted cluster jobs do.
Exit status: 0 when every selected run is ok (or was emitted), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from recjax.scaling.sweep import SpecError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sweep_command", required=True)
    for name, help_text in (("run", "run the pending runs"), ("emit", "one cluster job per run"),
                            ("status", "show each run's state")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("spec", help="sweep YAML (configs/sweeps/*.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted.key=value applied to every run")
        p.add_argument("--out-dir", default=None, help="replaces the spec's out_dir")
        p.add_argument("--only", action="append", default=None, metavar="RUN_ID",
                       help="restrict to this run id (repeatable)")
        if name == "run":
            p.add_argument("--procs", type=int, default=1, help="worker processes at a time")
            p.add_argument("--emit", choices=["slurm", "k8s"], default=None,
                           help="emit cluster jobs instead of running here")
        if name == "emit":
            p.add_argument("--target", choices=["slurm", "k8s"], required=True)
        if name in ("run", "emit"):
            p.add_argument("--dry-run", action="store_true", help="with emit: print, do not submit")


def _select(runs: list[Any], only: list[str] | None) -> list[Any]:
    if not only:
        return runs
    known = {r.run_id for r in runs}
    missing = [i for i in only if i not in known]
    if missing:
        raise SpecError(f"--only: no run(s) {missing} in this sweep; see `recjax sweep status`")
    return [r for r in runs if r.run_id in set(only)]


def run(args: argparse.Namespace) -> int:
    from recjax.scaling import results, runner
    from recjax.scaling.sweep import expand, load_sweep

    sweep = load_sweep(args.spec, args.out_dir)
    runs = _select(expand(sweep, args.overrides), args.only)
    if args.sweep_command == "status":
        return _status(sweep, runs, results.read_rows(sweep.table))
    target = args.target if args.sweep_command == "emit" else args.emit
    if target:
        return _emit(sweep, runs, target, args)
    if args.dry_run:
        raise SpecError("--dry-run only applies with --emit slurm|k8s")
    if args.procs <= 1:  # runs train in this process: join the cluster job, if any, first
        from recjax.parallel import distributed

        distributed.initialize()
    runner.run_sweep(sweep, runs, procs=args.procs, cli_overrides=args.overrides,
                     print_fn=lambda s: print(s, flush=True))
    rows = results.by_run_id(results.read_rows(sweep.table))
    bad = [r.run_id for r in runs if rows.get(r.run_id, {}).get("status") != "ok"]
    if bad:
        print(f"{len(bad)} run(s) not ok: {' '.join(bad)} (see `recjax sweep status {args.spec}`)")
    return 1 if bad else 0


def _emit(sweep: Any, runs: list[Any], target: str, args: argparse.Namespace) -> int:
    from recjax.scaling import emit, results, runner

    todo = runner.pending(runs, results.read_rows(sweep.table))
    jobs = emit.emit(sweep, todo, target, cli_overrides=args.overrides, dry_run=args.dry_run)
    for path, cmd in jobs:
        if args.dry_run:
            print(f"# {path}\n{path.read_text()}")
        print(("would run: " if args.dry_run else "submitted: ") + " ".join(cmd))
    print(f"{len(jobs)} {target} job(s) for {len(runs)} run(s); {len(runs) - len(todo)} already ok")
    return 0


def _status(sweep: Any, runs: list[Any], rows: list[dict[str, Any]]) -> int:
    from recjax.scaling import runner

    by_id = {r["run_id"]: r for r in rows}
    counts: dict[str, int] = {}
    print(f"sweep {sweep.name}: table {sweep.table}")
    for r in runs:
        row = by_id.get(r.run_id)
        if row is not None:
            state = row["status"]
        elif (pathlib.Path(r.config.run_dir) / "metrics.jsonl").is_file():
            state = "started"
        else:
            state = "pending"
        counts[state] = counts.get(state, 0) + 1
        detail = ""
        quality = runner.quality_summary(row) if row is not None else None
        if quality is not None:
            detail = f"{quality} in {row.get('wall_time_s') or 0:.0f}s"
        elif row is not None:
            detail = str(row.get("error") or "")[:100]
        print(f"  {r.run_id:<24} {state:<8} {json.dumps(r.axes, sort_keys=True):<50} {detail}")
    print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" of {len(runs)}")
    return 0 if counts.get("ok", 0) == len(runs) else 1
