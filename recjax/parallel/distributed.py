"""The one way every entry point joins JAX's multi-controller runtime: :func:`initialize`.

Where the four process parameters come from, first match wins per parameter:

1. command-line flags ``--coordinator-address --num-processes --process-id --local-device-ids``
   (see :func:`add_arguments`);
2. environment ``RECJAX_COORDINATOR_ADDRESS``, ``RECJAX_NUM_PROCESSES``, ``RECJAX_PROCESS_ID``,
   ``RECJAX_LOCAL_DEVICE_IDS`` (comma-separated), which ``recjax launch`` sets;
3. a cluster JAX detects itself: SLURM (inside ``srun``), Open MPI (``mpirun``), Kubernetes
   indexed Jobs / JobSets (needs the ``kubernetes`` package) and Cloud TPU VMs. recjax only
   decides whether one is present (:func:`detect_cluster`); JAX reads its parameters.

With none of these, the run is a single process and JAX's runtime is not started.
``RECJAX_DISTRIBUTED=off`` forces a single process; ``=on`` always calls
``jax.distributed.initialize`` (e.g. on a GCE TPU VM, where the workers are known only to
the metadata server).

Failure bounds (seconds; environment overrides in brackets):

- ``init`` (300) [``RECJAX_INIT_TIMEOUT_S``]: how long processes wait for each other to join;
- ``heartbeat`` (60) [``RECJAX_HEARTBEAT_TIMEOUT_S``]: a process silent this long is declared
  dead and every other process is stopped with an error (no silent hang when a host dies);
- ``shutdown`` (120) [``RECJAX_SHUTDOWN_TIMEOUT_S``]: how long a finished process waits at
  exit for the others before giving up.

On CPU the cross-process collectives are gloo's (``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from recjax.errors import DistributedError

ENV_PREFIX = "RECJAX_"
DEFAULT_TIMEOUTS = {"init": 300, "heartbeat": 60, "shutdown": 120}




@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """How this process joins the job. ``None`` fields are left to JAX's cluster detection."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    source: str = "single"  # "single", "explicit", or the detected cluster ("slurm", "ompi", ...)
    timeouts: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))

    @property
    def multi_process(self) -> bool:
        return self.source != "single"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The explicit multi-process flags (each overrides its ``RECJAX_*`` variable)."""
    g = parser.add_argument_group("multi-process (default: RECJAX_* env, else cluster detection)")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the job")
    g.add_argument("--process-id", type=int, default=None, help="this process, 0 .. num_processes-1")
    g.add_argument("--local-device-ids", default=None, help="comma-separated local devices to use")


def _int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def _ids(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name} must be comma-separated integers, got {value!r}") from None


def detect_cluster(env: Mapping[str, str]) -> str | None:
    """Name of a multi-process launcher JAX can read its parameters from, or ``None``.

    Only launches with more than one process count: a one-task ``srun`` or ``mpirun -n 1``
    stays a plain single-process run.
    """
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and (_int(env["SLURM_NTASKS"], "SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
        return "k8s"
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([w for w in workers.split(",") if w]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def resolve(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> ProcessSpec:
    """Decide how this process joins the job, from flags, ``RECJAX_*`` env and the cluster.

    Pure (no jax import), so launch settings can be checked before any device exists.
    """
    env = os.environ if env is None else env
    timeouts = {
        k: _int(env.get(f"{ENV_PREFIX}{k.upper()}_TIMEOUT_S"), f"{ENV_PREFIX}{k.upper()}_TIMEOUT_S") or v
        for k, v in DEFAULT_TIMEOUTS.items()
    }

    def pick(flag: str, parse: Any) -> Any:
        value = getattr(args, flag, None) if args is not None else None
        if value is not None:
            return parse(value, "--" + flag.replace("_", "-"))
        name = ENV_PREFIX + flag.upper()
        return parse(env.get(name), name)

    address = pick("coordinator_address", lambda v, _: v or None)
    n = pick("num_processes", _int)
    pid = pick("process_id", _int)
    ids = pick("local_device_ids", _ids)
    mode = env.get(f"{ENV_PREFIX}DISTRIBUTED", "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise DistributedError(f"{ENV_PREFIX}DISTRIBUTED must be auto, on or off, got {mode!r}")
    if mode == "off":
        return ProcessSpec(local_device_ids=ids, timeouts=timeouts)
    if n is not None and n < 1:
        raise DistributedError(f"the number of processes must be >= 1, got {n}")
    if n is not None and pid is not None and not 0 <= pid < n:
        raise DistributedError(f"process id {pid} is not in [0, {n}): ids run from 0 to num_processes - 1")

    given = {"coordinator address": address, "number of processes": n, "process id": pid}
    if n == 1 and mode == "auto":
        return ProcessSpec(num_processes=1, process_id=0, local_device_ids=ids, timeouts=timeouts)
    if all(v is not None for v in given.values()):
        return ProcessSpec(address, n, pid, ids, "explicit", timeouts)
    cluster = detect_cluster(env)
    if cluster is None and mode == "auto" and any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        raise DistributedError(
            f"incomplete multi-process settings: the {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set and no cluster (SLURM, Open MPI, "
            "Kubernetes indexed Job, Cloud TPU) was detected. Set all of --coordinator-address, "
            "--num-processes, --process-id (or RECJAX_COORDINATOR_ADDRESS, RECJAX_NUM_PROCESSES, "
            "RECJAX_PROCESS_ID), or start the job with `recjax launch`."
        )
    if cluster is None and mode == "auto":
        return ProcessSpec(local_device_ids=ids, timeouts=timeouts)
    return ProcessSpec(address, n, pid, ids, cluster or "jax auto-detection", timeouts)


def initialize(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> ProcessSpec:
    """Join the job described by :func:`resolve` (must run before anything touches a device).

    A single-process spec does nothing. Otherwise the CPU collectives are set to gloo and
    ``jax.distributed.initialize`` is called once with the spec and its timeouts; process 0
    then prints one line: process count, devices per process, and where the settings came from.
    """
    spec = resolve(args, env)
    if not spec.multi_process:
        return spec
    import jax

    if jax.distributed.is_initialized():
        return spec
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=list(spec.local_device_ids) if spec.local_device_ids is not None else None,
        # explicit settings are complete: keep JAX from reading a surrounding SLURM/MPI job
        cluster_detection_method="deactivate" if spec.source == "explicit" else None,
        initialization_timeout=spec.timeouts["init"],
        heartbeat_timeout_seconds=spec.timeouts["heartbeat"],
        shutdown_timeout_seconds=spec.timeouts["shutdown"],
    )
    if jax.process_index() == 0:
        print(
            f"distributed: {jax.process_count()} processes x {jax.local_device_count()} "
            f"{jax.devices()[0].platform} devices = {jax.device_count()} devices "
            f"(settings: {spec.source}; coordinator {spec.coordinator_address or 'from the cluster'}; "
            f"timeouts s: {dict(spec.timeouts)})",
            flush=True,
        )
    return spec

