"""``recjax launch``: generated SLURM / Kubernetes / TPU launch files parsed and checked, the
checked-in examples kept in sync, and the local launcher's output prefixes and failure handling
(on plain Python commands, no jax)."""

from __future__ import annotations

import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

from recjax.errors import LaunchError
from recjax.parallel import launch
from recjax.train.preemption import PREEMPTED_EXIT_CODE
from tests.conftest import REPO, run_cli

TRAIN = ["recjax", "train", "--config", "configs/experiments/dlrm_synthetic.yaml", "run_dir=/shared/runs/dlrm"]
EXAMPLES = REPO / "launch"
# the commands whose outputs are checked in under launch/ (and shown in the README)
EXAMPLE_COMMANDS = {
    "slurm_example.sbatch": ["launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                             "--time", "04:00:00", "--setup", "source .venv/bin/activate", "--dry-run", "--", *TRAIN],
    "k8s_jobset_example.yaml": ["launch", "k8s", "--num-processes", "4", "--image", "ghcr.io/example/recjax:latest",
                                "--gpus-per-process", "8", "--volume", "shared-runs:/shared", "--dry-run", "--", *TRAIN],
    "tpu_example.sh": ["launch", "tpu", "--tpu-name", "my-v5p-32", "--zone", "us-east5-a",
                       "--workdir", "~/recjax", "--dry-run", "--", *TRAIN],
}


def _sbatch_directives(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value
    return out


def _exports(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("export "):
            key, _, value = shlex.split(line.split("#")[0])[1].partition("=")
            out[key] = value
    return out


def test_slurm_script_one_process_per_gpu():
    script = launch.sbatch_script(TRAIN, nodes=2, gpus_per_node=8, partition="gpu", time_limit="04:00:00",
                                  env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}, setup=["module load cuda"])
    assert script.startswith("#!/bin/bash\n")
    d = _sbatch_directives(script)
    assert d["nodes"] == "2" and d["ntasks-per-node"] == "8" and d["gpus-per-node"] == "8"
    assert d["partition"] == "gpu" and d["time"] == "04:00:00" and "requeue" in d
    assert d["signal"] == "TERM@120"  # SIGTERM to every task 2 minutes before the time limit
    env = _exports(script)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
    assert env["RECJAX_HEARTBEAT_TIMEOUT_S"] == "60" and env["RECJAX_SHUTDOWN_TIMEOUT_S"] == "120"
    assert "RECJAX_LOCAL_DEVICE_IDS" not in env  # JAX gives task i GPU SLURM_LOCALID
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1
    words = shlex.split(srun[0])
    assert "--kill-on-bad-exit=1" in words and any(w.startswith("--wait=") for w in words)
    assert words[-len(TRAIN) - 2:] == [*TRAIN, "||", "status=$?"]  # the status decides on a requeue
    assert script.index("module load cuda") < script.index("srun ")
    # bash accepts it
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_slurm_script_one_process_per_node_and_bad_layouts():
    script = launch.sbatch_script(TRAIN, nodes=4, gpus_per_node=4, procs_per_node=1)
    assert _sbatch_directives(script)["ntasks-per-node"] == "1"
    assert _exports(script)["RECJAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
    cpu = launch.sbatch_script(TRAIN, nodes=3)
    assert _sbatch_directives(cpu)["ntasks-per-node"] == "1" and "gpus-per-node" not in _sbatch_directives(cpu)
    with pytest.raises(LaunchError, match="procs-per-node"):
        launch.sbatch_script(TRAIN, nodes=2, gpus_per_node=8, procs_per_node=2)
    with pytest.raises(LaunchError, match="nodes"):
        launch.sbatch_script(TRAIN, nodes=0)


def test_slurm_signal_before_the_time_limit_is_configurable():
    assert _sbatch_directives(launch.sbatch_script(TRAIN, nodes=1, signal_s=300))["signal"] == "TERM@300"
    assert "signal" not in _sbatch_directives(launch.sbatch_script(TRAIN, nodes=1, signal_s=0))
    with pytest.raises(LaunchError, match="--signal-s"):
        launch.sbatch_script(TRAIN, nodes=1, signal_s=-1)
    out = run_cli(["launch", "slurm", "--nodes", "1", "--signal-s", "600", "--", *TRAIN]).stdout
    assert _sbatch_directives(out)["signal"] == "TERM@600"


@pytest.mark.parametrize("srun_status, requeued", [(PREEMPTED_EXIT_CODE, True), (0, False), (3, False)])
def test_slurm_script_requeues_the_job_when_preempted(tmp_path: pathlib.Path, srun_status: int, requeued: bool):
    """The script run by bash with stand-ins for srun and scontrol: status 75 (the trainer saved
    and exited after SIGTERM) requeues the job and is returned; any other status is returned."""
    for tool, body in (("srun", f'echo "$@" > {tmp_path}/srun.args\nexit {srun_status}'),
                       ("scontrol", f'echo "$@" > {tmp_path}/scontrol.args')):
        (tmp_path / tool).write_text(f"#!/bin/bash\n{body}\n")
        (tmp_path / tool).chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(launch.sbatch_script(TRAIN, nodes=2))
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "77"}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == srun_status, proc.stderr
    assert (tmp_path / "srun.args").read_text().split()[-len(TRAIN):] == TRAIN
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "77"]
        assert "preempted; requeueing job 77" in proc.stderr
    else:
        assert not (tmp_path / "scontrol.args").exists()


def _container(pod_spec: dict) -> dict:
    (container,) = pod_spec["containers"]
    return container


def _env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_k8s_jobset_manifest():
    docs = list(yaml.safe_load_all(launch.k8s_manifest(
        TRAIN, num_processes=4, image="img:1", gpus_per_process=8, name="ctr", port=1234,
        max_restarts=5, volume="runs:/shared", env={"FOO": "bar baz"},
    )))
    (js,) = docs
    assert js["apiVersion"].startswith("jobset.x-k8s.io/") and js["kind"] == "JobSet"
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 5
    assert js["spec"]["network"]["subdomain"] == "ctr"
    (rj,) = js["spec"]["replicatedJobs"]
    job = rj["template"]["spec"]
    assert rj["replicas"] == 1 and job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"] == 4 and job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    c = _container(pod)
    assert c["image"] == "img:1" and c["command"] == TRAIN
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    env = _env(c)
    # pod 0 of replicated job "workers", reachable through the JobSet's headless service
    assert env["RECJAX_COORDINATOR_ADDRESS"] == f"ctr-{rj['name']}-0-0.ctr:1234"
    assert env["RECJAX_NUM_PROCESSES"] == "4" and env["FOO"] == "bar baz"
    assert env["RECJAX_PROCESS_ID"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert c["volumeMounts"][0]["mountPath"] == "/shared"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "runs"


def test_k8s_indexed_job_manifest_has_headless_service():
    svc, job = yaml.safe_load_all(launch.k8s_manifest(TRAIN, num_processes=2, image="img", name="ctr", kind="job"))
    assert svc["kind"] == "Service" and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"job-name": "ctr"}
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    port = svc["spec"]["ports"][0]["port"]
    assert _env(_container(pod))["RECJAX_COORDINATOR_ADDRESS"] == f"ctr-0.ctr:{port}"
    with pytest.raises(LaunchError, match="DNS label"):
        launch.k8s_manifest(TRAIN, num_processes=2, image="img", name="Bad_Name")


def test_tpu_command():
    argv = launch.tpu_command(TRAIN, tpu_name="pod", zone="us-east5-a", project="proj", workdir="~/recjax",
                              env={"A": "x y"})
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert "--zone=us-east5-a" in argv and "--project=proj" in argv and "--worker=all" in argv
    remote = argv[argv.index("--command") + 1]
    words = shlex.split(remote)
    assert words[:3] == ["cd", "~/recjax", "&&"]
    assignments = dict(w.split("=", 1) for w in words[3:-len(TRAIN)])
    assert assignments["RECJAX_DISTRIBUTED"] == "on" and assignments["A"] == "x y"
    assert words[-len(TRAIN):] == TRAIN


@pytest.mark.parametrize("name", sorted(EXAMPLE_COMMANDS))
def test_cli_dry_run_matches_checked_in_example(name: str, tmp_path: pathlib.Path):
    args = EXAMPLE_COMMANDS[name]
    out = run_cli(args).stdout
    assert out == (EXAMPLES / name).read_text(), (
        f"launch/{name} is stale: regenerate it with `recjax {' '.join(args)} > launch/{name}`")
    written = tmp_path / name
    sep = args.index("--")
    assert run_cli([*args[:sep], "--output", str(written), *args[sep:]]).stdout == out
    assert written.read_text() == out


def test_cli_errors():
    proc = run_cli(["launch", "slurm", "--nodes", "2", "--dry-run"], check=False)
    assert proc.returncode == 2 and "no command given" in proc.stderr
    proc = run_cli(["launch", "k8s", "--num-processes", "2", "--image", "i", "--env", "NOEQUALS", "--", "x"],
                   check=False)
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr


def test_submit_hands_the_file_to_sbatch_and_kubectl(tmp_path: pathlib.Path):
    # stand-ins for the cluster tools: record their arguments and what they read
    for tool in ("sbatch", "kubectl"):
        fake = tmp_path / tool
        fake.write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/{tool}.args\n'
                        f'if [ $# -eq 0 ]; then cat > {tmp_path}/{tool}.in; else cat "${{@: -1}}" > {tmp_path}/{tool}.in; fi\n')
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "recjax.cli", "launch", *args], capture_output=True,
                              text=True, cwd=REPO, env=env, timeout=60)

    # no --output: the script goes to sbatch's stdin
    assert cli("slurm", "--nodes", "2", "--submit", "--", *TRAIN).returncode == 0
    assert (tmp_path / "sbatch.in").read_text() == launch.sbatch_script(TRAIN, nodes=2)
    manifest = tmp_path / "job.yaml"
    assert cli("k8s", "--num-processes", "2", "--image", "img", "--submit", "-o", str(manifest), "--", *TRAIN).returncode == 0
    assert (tmp_path / "kubectl.args").read_text().split() == ["apply", "-f", str(manifest)]
    assert (tmp_path / "kubectl.in").read_text() == manifest.read_text()


def _local(code: str, n: int, *extra: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "recjax.cli", "launch", "local", "-n", str(n), *extra, "--", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
    return proc, time.monotonic() - t0


def test_local_prefixes_lines_and_sets_process_env():
    code = ("import os; print(os.environ['RECJAX_PROCESS_ID'], os.environ['RECJAX_NUM_PROCESSES'], "
            "os.environ['RECJAX_COORDINATOR_ADDRESS'], os.environ['XLA_FLAGS'])")
    proc, _ = _local(code, 3, "-d", "4", "--env", "EXTRA=1")
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert [line.split()[:3] for line in lines] == [["[p0]", "0", "3"], ["[p1]", "1", "3"], ["[p2]", "2", "3"]]
    addresses = {line.split()[3] for line in lines}
    assert len(addresses) == 1 and addresses.pop().startswith("127.0.0.1:")
    assert all(line.endswith("--xla_force_host_platform_device_count=4") for line in lines)
    assert "all 3 processes finished" in proc.stderr


def test_local_failure_stops_the_others_and_returns_its_status():
    # process 1 fails after 1 s; the others ignore SIGTERM (as JAX's preemption notifier does)
    # and would sleep for 10 minutes: the launcher must SIGKILL them after the grace period
    code = ("import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "i = int(os.environ['RECJAX_PROCESS_ID']); time.sleep(1); "
            "print('failing', flush=True) if i == 1 else None; sys.exit(7) if i == 1 else time.sleep(600)")
    proc, seconds = _local(code, 3, "--grace-s", "1")
    assert proc.returncode == 7
    assert "[p1] failing" in proc.stdout
    assert "process 1 exited with status 7; stopping the others" in proc.stderr
    assert seconds < 30


# a process that takes SAVE_S to save after SIGTERM (longer than --grace-s), then exits preempted
SAVES_ON_SIGTERM = (
    "import os, signal, sys, time\n"
    "first = os.environ['RECJAX_PROCESS_ID'] == '0'\n"
    "def preempted(*_):\n"
    "    time.sleep({save_s})\n"
    "    print('saved', flush=True)\n"
    f"    sys.exit({PREEMPTED_EXIT_CODE})\n"
    "signal.signal(signal.SIGTERM, preempted)\n"
    "print('ready', flush=True)\n"
    "{body}\n"
)


def _start_local(code: str, n: int, *extra: str) -> subprocess.Popen:
    """The launcher running ``code`` in ``n`` processes, returned once each printed 'ready'."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "recjax.cli", "launch", "local", "-n", str(n), *extra, "--",
         sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    ready = 0
    while ready < n:
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=60)
        ready += line.rstrip().endswith("ready")
    return proc


def test_local_sigterm_is_passed_on_and_a_preempted_job_exits_75():
    # SIGTERM to the launcher (as a scheduler sends it): every process gets it and has
    # --term-grace-s (not --grace-s) to save; all exit 75, so the launcher exits 75
    proc = _start_local(SAVES_ON_SIGTERM.format(save_s=1.5, body="time.sleep(600)"), 2, "--grace-s", "0.2")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert sorted(line for line in out.splitlines() if "saved" in line) == ["[p0] saved", "[p1] saved"]
    assert "passing SIGTERM on to every process" in err and "every process saved and exited with 75" in err
    assert time.monotonic() - t0 < 30


def test_local_preempted_process_gives_the_others_time_to_save():
    # process 0 alone is signalled (a host's notice) and exits 75 at once; process 1, sent
    # SIGTERM by the launcher, needs 1.5 s: it gets --term-grace-s, not --grace-s
    body = "time.sleep(2); os.kill(os.getpid(), signal.SIGTERM) if first else None; time.sleep(600)"
    code = SAVES_ON_SIGTERM.format(save_s="0 if first else 1.5", body=body)
    proc, _ = _local(code, 2, "--grace-s", "0.2")
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr
    assert "[p0] saved" in proc.stdout and "[p1] saved" in proc.stdout
    assert "process 0 was preempted (status 75); giving the others 60 s" in proc.stderr


def test_local_killed_process_gives_128_plus_signal():
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL) if os.environ['RECJAX_PROCESS_ID'] == '0' else None"
    proc, _ = _local(code, 2)
    assert proc.returncode == 128 + 9 and "was killed by SIGKILL" in proc.stderr
