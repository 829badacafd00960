"""Multi-host behaviour with several local processes over gloo: settings resolution, each
process reading only its shard, 2 processes x 4 devices training like 1 process x 8, a killed
process stopping the job and the relaunch resuming exactly, checkpoints moving between process
counts, and JAX's heartbeat bound when no launcher watches the processes."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from recjax.config import CriteoDataConfig, DataConfig, SyntheticDataConfig
from recjax.data import pipeline
from recjax.data.criteo import write_criteo_tsv
from recjax.errors import CheckpointMismatchError, DistributedError
from recjax.parallel.distributed import resolve
from recjax.parallel.launch import free_port
from tests.conftest import KILL_DRIVER, REPO, checkpoint_steps, read_losses, run_cli, tiny

# The model every multi-process run trains: the flagship, at its CI size.
MODEL_CONFIG = "configs/models/tokenmixer_large_tiny.yaml"
STEPS, CKPT_EVERY, KILL_AT = 30, 10, 25  # process 1 dies fetching the batch of step 25
# 8 devices hold the row-sharded tables: rows are padded to a multiple of 8 (500 -> 504)
PAD = "embedding.pad_rows_to=8"
TRAIN_ARGS = ["--config", MODEL_CONFIG, *tiny(
    f"train.steps={STEPS}", f"train.checkpoint_every={CKPT_EVERY}", "train.eval_every=0",
    "train.async_checkpoint=false", "train.keep_checkpoints=5", PAD,
)]






# ----------------------------------------------------------------------------- settings


def _ns(**kw) -> argparse.Namespace:
    base = dict(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None)
    return argparse.Namespace(**{**base, **kw})


SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "16",
         "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}


def test_resolve_priority_detection_and_errors():
    assert not resolve(None, {}).multi_process  # nothing set: one process, no runtime
    env = {"RECJAX_COORDINATOR_ADDRESS": "10.0.0.1:9", "RECJAX_NUM_PROCESSES": "4", "RECJAX_PROCESS_ID": "2",
           "RECJAX_LOCAL_DEVICE_IDS": "0,1", "RECJAX_HEARTBEAT_TIMEOUT_S": "7"}
    spec = resolve(None, env)
    assert (spec.source, spec.coordinator_address, spec.num_processes, spec.process_id) == ("explicit", "10.0.0.1:9", 4, 2)
    assert spec.local_device_ids == (0, 1)
    assert spec.timeouts == {"init": 300, "heartbeat": 7, "shutdown": 120}
    # flags beat env, also inside a SLURM job (explicit settings switch JAX's detection off)
    spec = resolve(_ns(coordinator_address="h:1", num_processes=2, process_id=1), {**env, **SLURM})
    assert (spec.source, spec.coordinator_address, spec.num_processes, spec.process_id) == ("explicit", "h:1", 2, 1)
    # clusters JAX reads itself
    assert resolve(None, SLURM).source == "slurm"
    assert resolve(None, {**SLURM, "SLURM_NTASKS": "1"}).source == "single"
    assert resolve(None, {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "8"}).source == "ompi"
    assert resolve(None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "0"}).source == "k8s"
    assert resolve(None, {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}).source == "tpu"
    assert resolve(None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).source == "single"  # a pod, not an indexed job
    # explicit switches
    assert resolve(None, {**SLURM, "RECJAX_DISTRIBUTED": "off"}).source == "single"
    assert resolve(None, {"RECJAX_DISTRIBUTED": "on"}).multi_process  # e.g. a GCE TPU VM
    assert resolve(_ns(num_processes=1), SLURM).source == "single"
    with pytest.raises(DistributedError, match="process id is not set"):
        resolve(None, {"RECJAX_COORDINATOR_ADDRESS": "h:1", "RECJAX_NUM_PROCESSES": "2"})
    with pytest.raises(DistributedError, match=r"process id 2 is not in \[0, 2\)"):
        resolve(_ns(coordinator_address="h:1", num_processes=2, process_id=2), {})
    with pytest.raises(DistributedError, match="RECJAX_NUM_PROCESSES must be an integer"):
        resolve(None, {"RECJAX_NUM_PROCESSES": "two"})
    with pytest.raises(DistributedError, match="auto, on or off"):
        resolve(None, {"RECJAX_DISTRIBUTED": "yes"})


def test_train_cli_reports_incomplete_settings():
    proc = run_cli(["train", *tiny("train.steps=1"), "--num-processes", "2"], check=False)
    assert proc.returncode == 1 and "coordinator address, process id are not set" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- data


def _stream(cfg: DataConfig, procs: int, n: int, state: dict | None = None) -> tuple[list[np.ndarray], list[dict]]:
    """``n`` global batches of example ids read by ``procs`` processes (optionally resumed from
    ``state``), and each process's state afterwards."""
    its = [pipeline.make_iterator(cfg, "train", process_index=p, process_count=procs) for p in range(procs)]
    if state is not None:
        for it in its:
            it.set_state(state)
    batches = [np.concatenate([next(it)["example_id"] for it in its]) for _ in range(n)]
    return batches, [it.get_state() for it in its]


@pytest.fixture(params=["synthetic", "criteo"])
def data_cfg(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> DataConfig:
    syn = SyntheticDataConfig(num_sparse=4, vocab_sizes=[500], num_users=100)
    if request.param == "synthetic":
        return DataConfig(global_batch=48, synthetic=syn)
    path = tmp_path / "day_0.tsv"
    write_criteo_tsv(path, rows=500, seed=0)
    return DataConfig(source="criteo", global_batch=48, criteo=CriteoDataConfig(train_files=[str(path)],
                                                                                vocab_sizes=[1000]))


def test_data_state_is_the_same_on_every_process_and_moves_between_process_counts(data_cfg: DataConfig):
    ref, _ = _stream(data_cfg, 1, 8)
    for before, after in [(2, 1), (1, 4), (4, 2), (3, 2)]:
        head, states = _stream(data_cfg, before, 3)
        assert all(s == states[0] for s in states), states  # one global position, whatever the process
        tail, _ = _stream(data_cfg, after, 5, json.loads(json.dumps(states[0])))
        for got, want in zip(head + tail, ref, strict=True):
            np.testing.assert_array_equal(got, want)


def test_checkpoint_loop_state_restores_onto_another_process_count(tmp_path: pathlib.Path):
    from etils import epath

    from recjax.train.checkpoint import LoopStateHandler

    data = {"source": "synthetic", "split": "train", "next_record": 640}
    state = {"data": data, "best": {"best": None}, "clock": {"train_s": 1.0}}
    for p in range(2):
        (tmp_path / f"process_{p}-of-2.json").write_text(json.dumps(state))
    assert LoopStateHandler().restore(epath.Path(tmp_path)) == state  # this test is 1 process
    (tmp_path / "process_1-of-2.json").write_text(json.dumps({**state, "data": {**data, "next_record": 704}}))
    with pytest.raises(CheckpointMismatchError, match="the saving processes disagree"):
        LoopStateHandler().restore(epath.Path(tmp_path))


# ----------------------------------------------------------------------------- multi-process runs


def launch_local(n: int, devices: int, command: list[str], env: dict[str, str] | None = None,
                 timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    """``recjax launch local -n N -d M -- command``; returns the result and the time it exited."""
    proc = subprocess.run(
        [sys.executable, "-m", "recjax.cli", "launch", "local", "-n", str(n), "-d", str(devices), "--", *command],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )
    return proc, time.time()


GLOBAL_BATCH_SCRIPT = """
import json, pathlib, sys
import numpy as np
from recjax.parallel import distributed
distributed.initialize()
import jax
from jax.sharding import NamedSharding, PartitionSpec
from recjax.config import load_config
from recjax.data import pipeline
from recjax.train.state import build_setup

out, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
setup = build_setup(load_config(None, sys.argv[3:]))
p, n = jax.process_index(), jax.process_count()
it = pipeline.make_iterator(setup.cfg.data, "train", process_index=p, process_count=n)
replicate = jax.jit(lambda x: x, out_shardings=NamedSharding(setup.mesh, PartitionSpec()))
local, assembled = [], []
for _ in range(steps):
    ids = next(it)["example_id"].astype(np.int32)
    local.append(ids.tolist())
    g = setup.global_batch({"example_id": ids})["example_id"]
    assembled.append(np.asarray(replicate(g)).tolist())
(out / f"p{p}.json").write_text(json.dumps({"local": local, "global": assembled, "devices": jax.device_count()}))
"""


def test_each_process_reads_its_shard_and_the_global_batch_holds_every_example_once(tmp_path: pathlib.Path):
    script = tmp_path / "global_batch.py"
    script.write_text(GLOBAL_BATCH_SCRIPT)
    n, devices, steps, g = 4, 2, 3, 48
    proc, _ = launch_local(n, devices, [sys.executable, str(script), str(tmp_path), str(steps),
                                        *tiny(f"data.global_batch={g}", PAD)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [json.loads((tmp_path / f"p{p}.json").read_text()) for p in range(n)]
    assert {r["devices"] for r in runs} == {n * devices}
    b = g // n
    for s in range(steps):
        expected = list(range(s * g, (s + 1) * g))
        for p, r in enumerate(runs):  # process p read only its own contiguous rows
            assert r["local"][s] == expected[p * b:(p + 1) * b]
        union = sorted(i for r in runs for i in r["local"][s])
        assert union == expected  # every example of the global batch exactly once
        for r in runs:  # the assembled global array, as seen from every process
            assert sorted(r["global"][s]) == expected


HEARTBEAT_SCRIPT = """
import os, pathlib, signal, sys, time
import numpy as np
from recjax.parallel import distributed
distributed.initialize()
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((jax.device_count(),), ("d",))
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), np.ones(1, np.float32))
for i in range(10**9):
    assert float(total(x)) == 2.0
    if jax.process_index() == 1 and i == 20:
        pathlib.Path(sys.argv[1]).write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_without_a_launcher_a_dead_process_ends_the_job_within_the_heartbeat_timeout(tmp_path: pathlib.Path):
    script, marker = tmp_path / "heartbeat.py", tmp_path / "killed_at"
    script.write_text(HEARTBEAT_SCRIPT)
    heartbeat = 5
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "RECJAX_NUM_PROCESSES": "2",
           "RECJAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "RECJAX_HEARTBEAT_TIMEOUT_S": str(heartbeat)}
    procs = [subprocess.Popen([sys.executable, str(script), str(marker)], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**env, "RECJAX_PROCESS_ID": str(p)})
             for p in range(2)]
    try:
        _, err = procs[0].communicate(timeout=300)
        ended = time.time()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode != 0, err
    waited = ended - float(marker.read_text())
    print(f"survivor exited {waited:.1f} s after its peer was killed (heartbeat timeout {heartbeat} s)")
    assert waited < 60, err  # JAX's default heartbeat timeout is 100 s


@pytest.mark.slow
def test_multiprocess_training_kill_resume_and_process_count_changes(tmp_path: pathlib.Path):
    """One test (the runs feed each other; one test keeps them together under pytest-xdist)."""
    runs = _train_kill_and_relaunch(tmp_path)
    _check_two_processes_train_like_one(runs)
    _check_killed_process_stops_the_job_and_the_same_command_resumes(runs)
    _check_checkpoints_move_from_two_processes_to_one_and_back(runs)


def _train_kill_and_relaunch(root: pathlib.Path) -> dict:
    """One process x 8 devices (the reference), then 2 processes x 4 devices from scratch with
    process 1 killed at step 25, then the same command relaunched."""
    out: dict = {"root": root}
    t0 = time.time()
    run_cli(["train", *TRAIN_ARGS, f"run_dir={root / 'one'}"], devices=8)
    out["one"] = read_losses(root / "one")
    out["one_seconds"] = time.time() - t0

    driver = root / "driver.py"
    driver.write_text(KILL_DRIVER)
    env = {"KILL_MARKER": str(root / "killed_at"), "KILL_AT_BATCH": str(KILL_AT), "KILL_PROCESS": "1"}
    command = [sys.executable, str(driver), "train", *TRAIN_ARGS, f"run_dir={root / 'two'}"]
    t0 = time.time()
    out["killed"], ended = launch_local(2, 4, command, env)
    out["killed_seconds"] = time.time() - t0
    out["stop_seconds"] = ended - float((root / "killed_at").read_text())
    out["before_kill"] = read_losses(root / "two")
    out["checkpoints_at_kill"] = checkpoint_steps(root / "two")
    t0 = time.time()
    out["relaunched"], _ = launch_local(2, 4, command, env)
    out["relaunched_seconds"] = time.time() - t0
    out["two"] = read_losses(root / "two")
    return out


def _check_two_processes_train_like_one(runs: dict) -> None:
    killed = runs["killed"]
    assert "distributed: 2 processes x 4 cpu devices = 8 devices" in killed.stdout, killed.stdout + killed.stderr
    one, two = runs["one"], runs["before_kill"]
    assert sorted(one) == list(range(1, STEPS + 1))
    assert sorted(two) == list(range(1, KILL_AT))  # steps 1..24, then process 1 died
    diffs = [abs(two[s] - one[s]) for s in two]
    print(f"max |loss(2 proc x 4 dev) - loss(1 proc x 8 dev)| over {len(diffs)} steps: {max(diffs):.3g}")
    assert max(diffs) < 1e-5, diffs


def _check_killed_process_stops_the_job_and_the_same_command_resumes(runs: dict) -> None:
    killed, relaunched = runs["killed"], runs["relaunched"]
    print(f"launcher exited {runs['stop_seconds']:.1f} s after process 1 was killed; runs took "
          f"{runs['one_seconds']:.0f} s (1 proc), {runs['killed_seconds']:.0f} s (2 procs, killed), "
          f"{runs['relaunched_seconds']:.0f} s (2 procs, relaunched)")
    assert killed.returncode == 128 + signal.SIGKILL, killed.stderr
    assert "launch: process 1 was killed by SIGKILL; stopping the others" in killed.stderr
    assert runs["stop_seconds"] < 60
    last = runs["checkpoints_at_kill"][-1]
    assert last == 20  # synchronous checkpoints: step 20 was committed before step 25
    assert relaunched.returncode == 0, relaunched.stdout + relaunched.stderr
    assert f"resumed from {runs['root'] / 'two' / 'checkpoints' / str(last)} at step {last}" in relaunched.stdout
    before, after, one = runs["before_kill"], runs["two"], runs["one"]
    assert sorted(after) == list(range(1, STEPS + 1))
    # steps the killed run finished after its last checkpoint are recomputed bit for bit
    assert all(after[s] == before[s] for s in range(last + 1, KILL_AT))
    assert max(abs(after[s] - one[s]) for s in range(last + 1, STEPS + 1)) < 1e-5


def _check_checkpoints_move_from_two_processes_to_one_and_back(runs: dict) -> None:
    root, one = runs["root"], runs["one"]
    # 2 processes x 4 devices -> 1 process x 8 devices
    shutil.copytree(root / "two" / "checkpoints" / "10", root / "moved" / "checkpoints" / "10")
    out = run_cli(["train", *TRAIN_ARGS, f"run_dir={root / 'moved'}"], devices=8).stdout
    assert "at step 10" in out
    moved = read_losses(root / "moved")
    assert sorted(moved) == list(range(11, STEPS + 1))
    assert max(abs(moved[s] - one[s]) for s in moved) < 1e-5
    # ... and its step-20 checkpoint back onto 2 processes x 4 devices
    shutil.copytree(root / "moved" / "checkpoints" / "20", root / "back" / "checkpoints" / "20")
    proc, _ = launch_local(2, 4, ["recjax", "train", *TRAIN_ARGS, f"run_dir={root / 'back'}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "at step 20" in proc.stdout
    back = read_losses(root / "back")
    assert sorted(back) == list(range(21, STEPS + 1))
    diffs = [abs(back[s] - one[s]) for s in back]
    print(f"after 2->1->2 process moves: max |loss - uninterrupted 1-process loss| {max(diffs):.3g}")
    assert max(diffs) < 1e-5
