"""Preemption: a run sent SIGTERM at step k saves a checkpoint at a step >= k, exits with
``PREEMPTED_EXIT_CODE`` (75) within 60 s, and the same command relaunched resumes with the
losses of an uninterrupted run. One process (CTR and sequential: a SIGTERM handler), and
2 processes x 4 devices (sequential) where only process 1 is signalled and JAX's preemption
sync point brings process 0 to the same step."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from recjax.parallel.launch import free_port, local_env
from recjax.train.preemption import PREEMPTED_EXIT_CODE
from tests.conftest import REPO, read_losses, run_cli
from tests.test_trainer_parallel import CONFIGS, launch_local

K = 10  # SIGTERM once metrics.jsonl shows this step
EXIT_WITHIN_S = 60


def args(task: str, steps: int, run_dir: pathlib.Path) -> list[str]:
    """The small ``task`` config of tests/test_trainer_parallel.py, ``steps`` long (logged every step)."""
    return [*(a for a in CONFIGS[task] if not a.startswith("train.steps=")), f"train.steps={steps}",
            f"run_dir={run_dir}"]


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def last_logged_step(run_dir: pathlib.Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def start(argv: list[str], env: dict[str, str], log: pathlib.Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "recjax.cli", *argv], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT, text=True)


def preempt(run_dir: pathlib.Path, procs: list[subprocess.Popen], signalled: list[subprocess.Popen],
            logs: list[pathlib.Path], timeout: float = 600) -> tuple[int, float]:
    """SIGTERM ``signalled`` once ``run_dir`` logged step K; wait for every process to exit.
    Returns the last logged step when the signal was sent and the seconds until all exited."""
    try:
        deadline = time.monotonic() + timeout
        while (at := last_logged_step(run_dir)) < K:
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                pytest.fail(f"the run ended or stalled before step {K}:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
            time.sleep(0.02)
        t0 = time.monotonic()
        for p in signalled:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=300)
        return at, time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def check_preempted(run_dir: pathlib.Path, procs: list[subprocess.Popen], logs: list[pathlib.Path],
                    at: int, seconds: float) -> int:
    """Every process exited with 75 in time, after saving a step >= the signalled one."""
    text = "\n".join(log.read_text() for log in logs)
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT_CODE] * len(procs), text[-6000:]
    assert seconds < EXIT_WITHIN_S
    (saved,) = checkpoint_steps(run_dir)  # train.checkpoint_every=0: only the preemption's save
    assert saved >= at >= K
    assert f"preemption notice: saved step {saved}; exiting with code {PREEMPTED_EXIT_CODE}" in text
    assert sorted(read_losses(run_dir)) == list(range(1, saved + 1))
    return saved


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_one_process_saves_on_sigterm_exits_75_and_resumes_exactly(tmp_path: pathlib.Path, task: str):
    steps = 300  # a few ms each: SIGTERM at step 10 lands long before the end
    run, log = tmp_path / "run", tmp_path / "preempted.log"
    command = ["train", "--devices", "1", *args(task, steps, run)]
    proc = start(command, {**os.environ, "JAX_PLATFORMS": "cpu"}, log)
    at, seconds = preempt(run, [proc], [proc], [log])
    saved = check_preempted(run, [proc], [log], at, seconds)
    print(f"{task}, 1 process: SIGTERM at logged step {at}, saved step {saved}, exit "
          f"{proc.returncode} after {seconds:.1f} s")

    relaunched = run_cli(command).stdout  # the same command
    assert f"resumed from {run / 'checkpoints' / str(saved)} at step {saved}" in relaunched
    resumed = read_losses(run)
    run_cli(["train", "--devices", "1", *args(task, steps, tmp_path / "uninterrupted")])
    uninterrupted = read_losses(tmp_path / "uninterrupted")
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, steps + 1))
    assert resumed == uninterrupted  # bit for bit: same devices, exact restore


@pytest.mark.slow
def test_two_processes_sigterm_to_one_saves_everywhere_exits_75_and_resumes(tmp_path: pathlib.Path):
    steps = 80
    run = tmp_path / "run"
    command = ["train", *args("seqrec", steps, run), "mesh.data=8"]
    port = free_port()
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [start(command, local_env(os.environ, i, 2, 4, port, {}), logs[i]) for i in range(2)]
    at, seconds = preempt(run, procs, [procs[1]], logs)  # process 0 is not signalled
    saved = check_preempted(run, procs, logs, at, seconds)
    assert "distributed: 2 processes x 4 cpu devices" in logs[0].read_text()
    print(f"seqrec, 2 processes x 4 devices, SIGTERM to process 1: at logged step {at}, saved step "
          f"{saved}, exit codes {[p.returncode for p in procs]} after {seconds:.1f} s")

    relaunched = launch_local(2, 4, ["recjax", *command])  # the same command
    assert relaunched.returncode == 0, relaunched.stdout[-4000:] + relaunched.stderr[-4000:]
    assert f"resumed from {run / 'checkpoints' / str(saved)} at step {saved}" in relaunched.stdout
    resumed = read_losses(run)
    run_cli(["train", "--devices", "8", *args("seqrec", steps, tmp_path / "uninterrupted"), "mesh.data=8"])
    uninterrupted = read_losses(tmp_path / "uninterrupted")
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, steps + 1))
    diff = max(abs(resumed[s] - uninterrupted[s]) for s in resumed)
    print(f"max |loss(preempted at {saved} + relaunched, 2 x 4) - loss(uninterrupted, 1 x 8)| "
          f"over {steps} steps: {diff:.3g}")
    assert diff < 1e-5


def test_watch_without_jax_runtime_flags_sigterm_and_restores_the_handler():
    from recjax.train.preemption import PreemptionWatch

    before = signal.getsignal(signal.SIGTERM)
    watch = PreemptionWatch()
    try:
        assert not watch.distributed and not watch.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process keeps running
        assert watch.reached(2)
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_watch_warns_when_the_jax_runtime_has_no_preemption_service(monkeypatch: pytest.MonkeyPatch):
    from types import SimpleNamespace

    from recjax.train import preemption

    fake = SimpleNamespace(client=object(), preemption_sync_manager=None)
    monkeypatch.setattr(preemption, "_distributed_state", lambda: fake)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.warns(UserWarning, match="preemption service is off"):
        watch = preemption.PreemptionWatch()
    assert not watch.distributed and signal.getsignal(signal.SIGTERM) is before  # no lone flag
    watch.close()
