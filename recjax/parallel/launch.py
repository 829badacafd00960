"""``recjax launch local | slurm | k8s | tpu``: start one recjax command as a multi-process job.

Every target runs the same command (what follows ``--``) once per process; each process
joins the job through :func:`recjax.parallel.distributed.initialize`:

- ``local``: N processes on this machine with M virtual CPU devices each; the launcher sets
  ``RECJAX_COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID``, prefixes every output line with
  ``[pI]``, and when a process fails stops the others (SIGTERM, then SIGKILL after
  ``--grace-s``) and exits with that process's status. A SIGTERM to the launcher is passed on
  to every process, which saves a checkpoint and exits with
  :data:`~recjax.train.preemption.PREEMPTED_EXIT_CODE` (SIGKILL after ``--term-grace-s``); the
  launcher then exits with that code too.
- ``slurm``: an sbatch script; ``srun`` starts the processes and JAX reads the SLURM variables.
  ``--kill-on-bad-exit=1`` ends the step when one task fails, ``--wait`` bounds how long the
  others may outlive the first to exit. SLURM sends every task SIGTERM ``--signal-s`` seconds
  before the time limit; the tasks save and exit with the preemption code, and the script
  requeues the job, which resumes.
- ``k8s``: a JobSet (or an indexed Job plus its headless Service); the coordinator is pod 0's
  stable DNS name and each pod's process id is its completion index.
- ``tpu``: one ``gcloud compute tpus tpu-vm ssh --worker=all`` command; JAX finds the TPU
  workers itself (``RECJAX_DISTRIBUTED=on``).

The generators are pure functions (tested by parsing their output); ``--dry-run`` prints,
``--output`` writes, ``--submit`` hands the result to sbatch / kubectl / gcloud. Restarting a
job with the same command resumes from the newest checkpoint in ``run_dir``, which must be
on storage every process can reach.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from recjax.errors import LaunchError
from recjax.train.preemption import PREEMPTED_EXIT_CODE

DEFAULT_PORT = 8476  # coordinator port on clusters (any free port agreed by all processes)
DEFAULT_TERM_GRACE_S = 60.0  # launch local: time to save after a SIGTERM (or a preempted process)
DEFAULT_SIGNAL_S = 120  # SLURM: SIGTERM this many seconds before the time limit


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="launch_target", required=True)

    p = sub.add_parser("local", help="N processes x M virtual CPU devices on this machine")
    p.add_argument("-n", "--num-processes", type=int, default=2, help="processes to start (default 2)")
    p.add_argument("-d", "--devices-per-process", type=int, default=1,
                   help="virtual CPU devices per process (default 1)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("--grace-s", type=float, default=5.0,
                   help="after a failure, seconds between SIGTERM and SIGKILL of the others")
    p.add_argument("--term-grace-s", type=float, default=DEFAULT_TERM_GRACE_S,
                   help="after a SIGTERM to the launcher (or a process that exits preempted, "
                        f"status {PREEMPTED_EXIT_CODE}): seconds the processes get to save a "
                        f"checkpoint and exit before SIGKILL (default {DEFAULT_TERM_GRACE_S:g})")
    _common(p, generator=False)

    p = sub.add_parser("slurm", help="write / print / submit an sbatch script")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--procs-per-node", type=int, default=None,
                   help="processes per node (default: one per GPU, or 1 without GPUs)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default="01:00:00", help="wall-clock limit, HH:MM:SS")
    p.add_argument("--signal-s", type=int, default=DEFAULT_SIGNAL_S,
                   help="SIGTERM every task this many seconds before the time limit, so it saves "
                        f"a checkpoint and the job is requeued (default {DEFAULT_SIGNAL_S}; "
                        "0: no early signal)")
    p.add_argument("--job-name", default="recjax")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--setup", action="append", default=[],
                   help="shell line run before srun on the batch node (repeatable)")
    _common(p)

    p = sub.add_parser("k8s", help="write / print / apply a JobSet or indexed-Job manifest")
    p.add_argument("--num-processes", type=int, required=True, help="pods (one process each)")
    p.add_argument("--image", required=True)
    p.add_argument("--gpus-per-process", type=int, default=0)
    p.add_argument("--name", default="recjax", help="JobSet/Job name (a DNS label)")
    p.add_argument("--kind", choices=("jobset", "job"), default="jobset")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--max-restarts", type=int, default=3,
                   help="JobSet: whole-job restarts after a failure, each resuming from the last "
                        "checkpoint (an indexed Job is not restarted: re-apply it)")
    p.add_argument("--volume", default=None,
                   help="CLAIM:MOUNT_PATH, a PersistentVolumeClaim shared by all pods for run_dir")
    _common(p)

    p = sub.add_parser("tpu", help="print / run the gcloud command for every TPU VM worker")
    p.add_argument("--tpu-name", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--workdir", default=None, help="directory to cd into on each worker")
    _common(p)


def _common(p: argparse.ArgumentParser, generator: bool = True) -> None:
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for every process (repeatable)")
    if generator:
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--dry-run", action="store_true", help="print the result (the default)")
        mode.add_argument("--submit", action="store_true", help="submit it")
        p.add_argument("-o", "--output", default=None, help="also write it to this file")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="after --: the command every process runs, e.g. -- recjax train ...")


def run(args: argparse.Namespace) -> int:
    try:
        command = _command(args.command)
        env = parse_env(args.env)
        if args.launch_target == "local":
            return run_local(command, args.num_processes, args.devices_per_process, port=args.port,
                             grace_s=args.grace_s, term_grace_s=args.term_grace_s, env=env)
        if args.launch_target == "slurm":
            text = sbatch_script(command, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                 procs_per_node=args.procs_per_node, partition=args.partition,
                                 time_limit=args.time, job_name=args.job_name,
                                 cpus_per_task=args.cpus_per_task, setup=args.setup, env=env,
                                 signal_s=args.signal_s)
            submit = ["sbatch", *([args.output] if args.output else [])]  # no file: reads stdin
        elif args.launch_target == "k8s":
            text = k8s_manifest(command, num_processes=args.num_processes, image=args.image,
                                gpus_per_process=args.gpus_per_process, name=args.name,
                                kind=args.kind, port=args.port, max_restarts=args.max_restarts,
                                volume=args.volume, env=env)
            submit = ["kubectl", "apply", "-f", args.output or "-"]
        else:
            submit = tpu_command(command, tpu_name=args.tpu_name, zone=args.zone,
                                 project=args.project, workdir=args.workdir, env=env)
            text = shlex.join(submit) + "\n"
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        if args.launch_target == "tpu":
            os.chmod(args.output, 0o755)
    if not args.submit:
        sys.stdout.write(text)
        return 0
    stdin = text if args.launch_target != "tpu" and not args.output else None
    return subprocess.run(submit, input=stdin, text=True).returncode


def _command(words: Sequence[str]) -> list[str]:
    words = list(words)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise LaunchError("no command given: put it after --, e.g. `-- recjax train --config c.yaml`")
    return words


def parse_env(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.replace("_", "").isalnum():
            raise LaunchError(f"--env {item!r} is not KEY=VALUE")
        out[key] = value
    return out


# ----------------------------------------------------------------------------- local


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_virtual_devices(xla_flags: str, devices: int) -> str:
    """``xla_flags`` (an ``XLA_FLAGS`` value) with its virtual CPU device count set to ``devices``."""
    flags = [f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])


def local_env(base: Mapping[str, str], process_id: int, num_processes: int, devices: int,
              port: int, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of local process ``process_id``: its place in the job, M CPU devices."""
    env = dict(base)
    env.update(
        RECJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        RECJAX_NUM_PROCESSES=str(num_processes),
        RECJAX_PROCESS_ID=str(process_id),
        XLA_FLAGS=with_virtual_devices(env.get("XLA_FLAGS", ""), devices),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _pump(stream: TextIO, out: TextIO, prefix: str, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            out.write(prefix + line)
            out.flush()


def _status(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def run_local(command: Sequence[str], num_processes: int, devices_per_process: int, *,
              port: int | None = None, grace_s: float = 5.0,
              term_grace_s: float = DEFAULT_TERM_GRACE_S, env: Mapping[str, str] | None = None,
              poll_s: float = 0.05) -> int:
    """Run ``command`` as ``num_processes`` local processes; 0 when all succeed, else the
    first failure's status (128 + signal number for a killed process; 130/143 when the
    launcher itself is interrupted or terminated, which also stops every process).

    Preemption: a SIGTERM to the launcher is forwarded to every process; they get
    ``term_grace_s`` (not ``grace_s``) to save and exit, and when all of them exit with
    :data:`PREEMPTED_EXIT_CODE` the launcher returns that code. A process that exits with
    that code by itself (it was sent SIGTERM directly) gives the others ``term_grace_s`` too.

    A leading ``recjax`` runs as ``python -m recjax.cli`` with this interpreter.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise LaunchError("--num-processes and --devices-per-process must be >= 1")
    argv = list(command)
    if argv[0] == "recjax":
        argv = [sys.executable, "-m", "recjax.cli", *argv[1:]]
    port = port or free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    grace = grace_s
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for i in range(num_processes):
            proc = subprocess.Popen(
                argv, env=local_env(os.environ, i, num_processes, devices_per_process, port, env or {}),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                start_new_session=True,  # its own process group: stopping it stops its children
            )
            procs.append(proc)
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                t = threading.Thread(target=_pump, args=(stream, out, f"[p{i}] ", lock), daemon=True)
                t.start()
                pumps.append(t)
            _say(lock, f"launch: process {i}/{num_processes} pid {proc.pid} "
                       f"({devices_per_process} CPU device(s), coordinator 127.0.0.1:{port})")
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            time.sleep(poll_s)
            failed = next(((i, p.returncode) for i, p in enumerate(procs) if p.poll()), None)
        failed = failed or next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode), None)
        if failed is not None and failed[1] == PREEMPTED_EXIT_CODE:
            grace = term_grace_s
            _say(lock, f"launch: process {failed[0]} was preempted (status {PREEMPTED_EXIT_CODE}); "
                       f"giving the others {term_grace_s:g} s to save and exit")
        elif failed is not None:
            _say(lock, f"launch: process {failed[0]} {_status(failed[1])}; stopping the others")
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        if signum == signal.SIGTERM:
            grace = term_grace_s
            _say(lock, f"launch: terminated; passing SIGTERM on to every process (they save a "
                       f"checkpoint and exit with {PREEMPTED_EXIT_CODE}; SIGKILL after {term_grace_s:g} s)")
        else:
            _say(lock, "launch: interrupted; stopping all processes")
        failed = (-1, -signum)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(procs, grace)
        for t in pumps:
            t.join(timeout=5)
    if failed is None:
        _say(lock, f"launch: all {num_processes} processes finished")
        return 0
    if failed[0] == -1 and all(p.returncode == PREEMPTED_EXIT_CODE for p in procs):
        _say(lock, f"launch: every process saved and exited with {PREEMPTED_EXIT_CODE} (preempted); "
                   "run the same command again to resume")
        return PREEMPTED_EXIT_CODE
    return 128 - failed[1] if failed[1] < 0 else failed[1]


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signum)


def _say(lock: threading.Lock, msg: str) -> None:
    with lock:
        print(msg, file=sys.stderr, flush=True)


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every live process group, SIGKILL what is left after ``grace_s``.

    JAX's preemption notifier catches SIGTERM (it only records a preemption notice), so a
    process stuck in a collective needs the SIGKILL.
    """
    def signal_all(sig: int) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    signal_all(signal.SIGKILL)
    for p in procs:
        p.wait()


# ----------------------------------------------------------------------------- SLURM


def sbatch_script(command: Sequence[str], *, nodes: int, gpus_per_node: int = 0,
                  procs_per_node: int | None = None, partition: str | None = None,
                  time_limit: str = "01:00:00", job_name: str = "recjax",
                  cpus_per_task: int | None = None, setup: Sequence[str] = (),
                  env: Mapping[str, str] | None = None, signal_s: int = DEFAULT_SIGNAL_S) -> str:
    """An sbatch script running ``command`` as ``nodes * procs_per_node`` SLURM tasks.

    One process per GPU (the default) lets JAX give each task GPU ``SLURM_LOCALID``; with one
    process per node holding several GPUs, ``RECJAX_LOCAL_DEVICE_IDS`` lists them all.
    ``signal_s > 0`` asks SLURM to SIGTERM every task that long before the time limit; the
    trainer saves and exits with :data:`PREEMPTED_EXIT_CODE`, and the script then requeues
    the job (see the comments in the script).
    """
    if nodes < 1 or gpus_per_node < 0:
        raise LaunchError("--nodes must be >= 1 and --gpus-per-node >= 0")
    if not 0 <= signal_s <= 65535:  # SLURM's limit for sig_time
        raise LaunchError(f"--signal-s must be in [0, 65535] seconds, got {signal_s}")
    ppn = procs_per_node or max(gpus_per_node, 1)
    if gpus_per_node and gpus_per_node % ppn:
        raise LaunchError(f"--gpus-per-node={gpus_per_node} is not divisible by --procs-per-node={ppn}")
    if ppn not in (1, max(gpus_per_node, 1)):
        raise LaunchError("--procs-per-node must be 1 or one per GPU (the two layouts JAX's "
                          f"SLURM detection supports); got {ppn} with {gpus_per_node} GPUs per node")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={ppn}",
    ]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines.append(f"#SBATCH --time={time_limit}")
    if signal_s:
        lines.append(f"#SBATCH --signal=TERM@{signal_s}")
    lines += [
        "#SBATCH --output=%x-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "",
        f"# {nodes * ppn} processes ({nodes} nodes x {ppn}); JAX reads SLURM_* for the coordinator",
        "# (first node, port derived from the job id), process count and id.",
        "set -euo pipefail",
        *setup,
        *_exports(_cluster_env(env)),
    ]
    if gpus_per_node and ppn == 1:
        ids = ",".join(str(i) for i in range(gpus_per_node))
        lines.append(f"export RECJAX_LOCAL_DEVICE_IDS={ids}  # one process drives all GPUs of its node")
    lines += [
        "# any failed task ends the step; the others may outlive the first exit by 60 s at most",
        "status=0",
        "srun --kill-on-bad-exit=1 --wait=60 " + shlex.join(command) + " || status=$?",
    ]
    when = (f"SLURM sends every task SIGTERM {signal_s} s before the time limit (--signal; it may "
            "come up to 60 s early)" if signal_s else
            "a task got SIGTERM (no early signal was asked for; `scancel --signal=TERM JOBID` sends one)")
    note = (f"Status {PREEMPTED_EXIT_CODE} (EX_TEMPFAIL) = preempted: {when}; recjax then saves a checkpoint "
            f"in run_dir at the next step boundary and exits with {PREEMPTED_EXIT_CODE}, and srun returns the "
            "highest task status. The job is then requeued: this script runs again and the same command "
            "resumes from that checkpoint. Any other status is returned unchanged. A signal sent to the "
            "tasks only leaves this shell alive to requeue; a plain scancel or the time limit itself also "
            "stops this shell, and nothing is requeued.")
    lines += ["# " + line for line in textwrap.wrap(note, 92)]
    lines += [
        f'if [ "$status" -eq {PREEMPTED_EXIT_CODE} ]; then',
        '  echo "recjax: preempted; requeueing job $SLURM_JOB_ID to resume from the checkpoint" >&2',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"',
        "",
    ]
    return "\n".join(lines)


def _cluster_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """Failure bounds (see ``recjax.parallel.distributed``) plus the user's variables."""
    from recjax.parallel.distributed import DEFAULT_TIMEOUTS

    out = {f"RECJAX_{k.upper()}_TIMEOUT_S": str(v) for k, v in DEFAULT_TIMEOUTS.items()}
    out.update(env or {})
    return out


def _exports(env: Mapping[str, str]) -> list[str]:
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


# ----------------------------------------------------------------------------- Kubernetes


def k8s_manifest(command: Sequence[str], *, num_processes: int, image: str,
                 gpus_per_process: int = 0, name: str = "recjax", kind: str = "jobset",
                 port: int = DEFAULT_PORT, max_restarts: int = 3, volume: str | None = None,
                 env: Mapping[str, str] | None = None) -> str:
    """YAML for ``num_processes`` pods running ``command``: a JobSet, or an indexed Job plus
    the headless Service that gives pod 0 its DNS name."""
    import yaml

    if num_processes < 1:
        raise LaunchError("--num-processes must be >= 1")
    if not name.replace("-", "").isalnum() or name != name.lower():
        raise LaunchError(f"--name {name!r} must be a lowercase DNS label (letters, digits, -)")
    # pod 0's hostname: JobSet -> <jobset>-<replicated job>-<job index>-<pod index>.<jobset>;
    # indexed Job -> <job>-<index>.<service>
    coordinator = f"{name}-workers-0-0.{name}" if kind == "jobset" else f"{name}-0.{name}"
    index_field = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    container: dict[str, Any] = {
        "name": "recjax",
        "image": image,
        "command": list(command),
        "env": [
            {"name": "RECJAX_COORDINATOR_ADDRESS", "value": f"{coordinator}:{port}"},
            {"name": "RECJAX_NUM_PROCESSES", "value": str(num_processes)},
            {"name": "RECJAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": index_field}}},
            *({"name": k, "value": v} for k, v in _cluster_env(env).items()),
        ],
        "ports": [{"containerPort": port, "name": "coordinator"}],
    }
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if gpus_per_process:
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus_per_process}}
    if volume:
        claim, sep, mount = volume.partition(":")
        if not sep or not claim or not mount.startswith("/"):
            raise LaunchError(f"--volume {volume!r} is not CLAIM:/mount/path")
        container["volumeMounts"] = [{"name": "runs", "mountPath": mount}]
        pod["volumes"] = [{"name": "runs", "persistentVolumeClaim": {"claimName": claim}}]
    job_spec: dict[str, Any] = {
        "parallelism": num_processes,
        "completions": num_processes,
        "completionMode": "Indexed",
        "backoffLimit": 0,  # one failed pod fails the Job, which stops the other pods
        "template": {"spec": pod},
    }
    if kind == "jobset":
        doc = {
            "apiVersion": "jobset.x-k8s.io/v1alpha2",
            "kind": "JobSet",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": {"maxRestarts": max_restarts},
                "network": {"enableDNSHostnames": True, "subdomain": name},
                "replicatedJobs": [{"name": "workers", "replicas": 1, "template": {"spec": job_spec}}],
            },
        }
        return yaml.safe_dump(doc, sort_keys=False)
    if kind != "job":
        raise LaunchError(f"--kind must be jobset or job, got {kind!r}")
    pod["subdomain"] = name
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"job-name": name},
            "ports": [{"port": port, "name": "coordinator"}],
        },
    }
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": job_spec}
    return yaml.safe_dump_all([service, job], sort_keys=False)


# ----------------------------------------------------------------------------- Cloud TPU


def tpu_command(command: Sequence[str], *, tpu_name: str, zone: str, project: str | None = None,
                workdir: str | None = None, env: Mapping[str, str] | None = None) -> list[str]:
    """``gcloud compute tpus tpu-vm ssh NAME --worker=all --command '...'``: every worker of the
    TPU VM runs ``command``; JAX reads the worker list from the TPU metadata."""
    remote = []
    if workdir:
        home, sep, rest = workdir.partition("~/")
        remote.append(f"cd {'~/' + shlex.quote(rest) if sep and not home else shlex.quote(workdir)} &&")
    remote += [f"{k}={shlex.quote(v)}" for k, v in {"RECJAX_DISTRIBUTED": "on", **_cluster_env(env)}.items()]
    remote.append(shlex.join(command))
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, f"--zone={zone}"]
    if project:
        argv.append(f"--project={project}")
    return [*argv, "--worker=all", "--command", " ".join(remote)]
