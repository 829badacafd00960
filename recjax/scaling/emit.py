"""One cluster job per pending sweep run, through the launchers of :mod:`recjax.parallel.launch`.

Each job runs ``recjax sweep run SPEC --only RUN_ID --out-dir OUT`` on every process of the
job (which joins JAX's multi-controller runtime from the cluster's variables); process 0 appends
the run's row to ``OUT/results.csv``, so ``OUT`` and the spec must be reachable by every job at
the same relative path (jobs start in the submitting directory on SLURM; in the image's working
directory on Kubernetes), on a file system where the table's ``fcntl`` lock works.

Options come from the spec's ``launch.slurm`` / ``launch.k8s`` mapping and are passed to
:func:`~recjax.parallel.launch.sbatch_script` / :func:`~recjax.parallel.launch.k8s_manifest`:

- slurm: ``nodes`` (1), ``gpus_per_node`` (0), ``procs_per_node``, ``partition``, ``time``
  ("04:00:00"), ``cpus_per_task``, ``setup`` (shell lines, e.g. activating the environment),
  ``env`` (exported variables);
- k8s: ``image`` (required), ``num_processes`` (1), ``gpus_per_process`` (0), ``kind``
  (``jobset`` | ``job``), ``volume`` (``CLAIM:/mount/path``), ``env``.

Jobs are written to ``OUT/jobs/<run_id>.sbatch`` or ``.yaml``; without ``dry_run`` each is
submitted with ``sbatch`` / ``kubectl apply -f``.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
from typing import Any

from recjax.errors import LaunchError
from recjax.scaling.sweep import Run, SpecError, Sweep

SLURM_KEYS = ("nodes", "gpus_per_node", "procs_per_node", "partition", "time", "cpus_per_task",
              "setup", "env")
K8S_KEYS = ("image", "num_processes", "gpus_per_process", "kind", "volume", "env")


def job_command(sweep: Sweep, run: Run, cli_overrides: list[str]) -> list[str]:
    return ["recjax", "sweep", "run", str(sweep.path), "--only", run.run_id,
            "--out-dir", str(sweep.out_dir), *cli_overrides]


def _options(sweep: Sweep, target: str, keys: tuple[str, ...]) -> dict[str, Any]:
    opts = dict(sweep.launch.get(target) or {})
    unknown = set(opts) - set(keys)
    if unknown:
        raise SpecError(f"{sweep.path}: unknown launch.{target} option(s) {sorted(unknown)}; "
                        f"valid: {', '.join(keys)}")
    return opts


def job_name(sweep: Sweep, run: Run, limit: int = 40) -> str:
    """A lowercase DNS label ending with the run id (pod names add ~20 characters to it)."""
    def label(text: str) -> str:
        return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")

    run_id = label(run.run_id)
    prefix = label(sweep.name)[: max(limit - len(run_id) - 1, 0)].rstrip("-")
    return f"{prefix}-{run_id}" if prefix else run_id[-limit:].lstrip("-")


def slurm_script(sweep: Sweep, run: Run, cli_overrides: list[str]) -> str:
    from recjax.parallel.launch import sbatch_script

    o = _options(sweep, "slurm", SLURM_KEYS)
    return sbatch_script(
        job_command(sweep, run, cli_overrides), nodes=int(o.get("nodes", 1)),
        gpus_per_node=int(o.get("gpus_per_node", 0)), procs_per_node=o.get("procs_per_node"),
        partition=o.get("partition"), time_limit=str(o.get("time", "04:00:00")),
        job_name=job_name(sweep, run), cpus_per_task=o.get("cpus_per_task"),
        setup=list(o.get("setup", [])), env={k: str(v) for k, v in (o.get("env") or {}).items()},
    )


def k8s_job(sweep: Sweep, run: Run, cli_overrides: list[str]) -> str:
    from recjax.parallel.launch import k8s_manifest

    o = _options(sweep, "k8s", K8S_KEYS)
    if not o.get("image"):
        raise SpecError(f"{sweep.path}: launch.k8s.image is required to emit Kubernetes jobs")
    extra = {"kind": o["kind"]} if "kind" in o else {}
    return k8s_manifest(
        job_command(sweep, run, cli_overrides), num_processes=int(o.get("num_processes", 1)),
        image=str(o["image"]), gpus_per_process=int(o.get("gpus_per_process", 0)),
        name=job_name(sweep, run), volume=o.get("volume"),
        env={k: str(v) for k, v in (o.get("env") or {}).items()}, **extra,
    )


TARGETS = {"slurm": (slurm_script, ".sbatch", ["sbatch"]),
           "k8s": (k8s_job, ".yaml", ["kubectl", "apply", "-f"])}


def emit(
    sweep: Sweep, runs: list[Run], target: str, *, cli_overrides: list[str] | None = None,
    dry_run: bool = False,
) -> list[tuple[pathlib.Path, list[str]]]:
    """Write one job file per run; submit them unless ``dry_run``. Returns (file, command)."""
    if target not in TARGETS:
        raise SpecError(f"unknown emit target {target!r}; use one of {sorted(TARGETS)}")
    render, suffix, submit = TARGETS[target]
    if not dry_run and shutil.which(submit[0]) is None:
        raise SpecError(f"'{submit[0]}' is not on PATH: run where jobs can be submitted, or "
                        "pass --dry-run to only write the job files")
    out = sweep.out_dir / "jobs"
    out.mkdir(parents=True, exist_ok=True)
    jobs = []


    for run in runs:
        path = out / f"{run.run_id}{suffix}"
        try:
            path.write_text(render(sweep, run, list(cli_overrides or [])))
        except LaunchError as e:
            raise SpecError(f"{sweep.path}: launch.{target}: {e}") from None
        cmd = [*submit, str(path)]
        if not dry_run:
            subprocess.run(cmd, check=True)
        jobs.append((path, cmd))
    return jobs
