"""Data parallelism changes no number: ``recjax train`` gives the same per-step losses (fp32,
within 1e-5 over 20 steps) on 1 device, on 8 virtual CPU devices (``--devices 8
mesh.data=8``) and on 2 processes x 4 devices (``recjax launch local``, gloo), for a CTR
config and a sequential-recommender config; the CTR config's all-to-all lookups
(``embedding.exchange=all_to_all``) give the GSPMD lookups' losses on both topologies; and its
raw-id version with dynamic tables trains the same on every topology."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.conftest import REPO, read_losses, run_cli

STEPS = 20
TOL = 1e-5
COMMON = [f"train.steps={STEPS}", "train.log_every=1", "train.tensorboard=false",
          "train.compute_dtype=float32", "train.checkpoint_every=0", "train.eval_every=0"]
# small versions of the two experiment configs; every table has a multiple of 8 rows, so the
# row-sharded tables divide over 8 devices with the same shapes as on one device
CONFIGS = {
    "ctr": ["--config", "configs/experiments/dlrm_synthetic.yaml", "data.global_batch=64",
            "data.eval_batches=2", "data.synthetic.num_sparse=4", "data.synthetic.vocab_sizes=[512]",
            "data.synthetic.num_users=96", "optim.warmup_steps=2", *COMMON],
    "seqrec": ["--config", "configs/experiments/seqrec_synthetic.yaml", "data.global_batch=32",
               "data.sequences.synthetic.num_users=200", "data.sequences.synthetic.num_items=64",
               "data.sequences.max_len=10", "model.hidden=16", "model.inner=32",
               "embedding.pad_rows_to=8", "train.epochs=0", "train.eval_every_epochs=0",
               "train.checkpoint_every_epochs=0", "train.best_metric=", "train.patience=0", *COMMON],
}




# one event tower of one layer: the two lookups of C1's table are what the test is about
KUNLUN_SMALL = ["data.synthetic.events=16", "data.synthetic.capacity_width=64", "model.num_layers=1",
                "model.personalization=false", "model.global_experts=1",
                "model.towers=[{width: 16, heads: 2, tokens: 2, layers: 1, window: 4, length: 16}]"]
# the CTR config with its lookups as all-to-alls (rows and batch both over `data`), with its
# tables' columns split instead of their rows, with each table whole on one device (stacked,
# one all-to-all for all), and with raw 64-bit ids through dynamic tables
# (8 hash partitions: one per device on 8 devices); Kunlun reads C1's table twice per step
# (the target item and the event items), both lookups by all-to-all
ALL_TO_ALL = {
    "ctr_all_to_all": [*CONFIGS["ctr"], "embedding.exchange=all_to_all"],
    "ctr_columns": [*CONFIGS["ctr"], "embedding.placement=column_sharded"],
    "ctr_table_wise": [*CONFIGS["ctr"], "embedding.placement=table_wise", "embedding.exchange=all_to_all"],
    "kunlun": ["--config", "configs/experiments/kunlun_events.yaml", *CONFIGS["ctr"][2:], *KUNLUN_SMALL],
    "kunlun_all_to_all": ["--config", "configs/experiments/kunlun_events.yaml", *CONFIGS["ctr"][2:], *KUNLUN_SMALL,
                          "embedding.exchange=all_to_all"],
    "ctr_dynamic": [*CONFIGS["ctr"], "embedding.exchange=all_to_all", "data.synthetic.raw_ids=true",
                    "embedding.dynamic.capacity=300", "embedding.dynamic.partitions=8",
                    "embedding.dynamic.threshold=2"],
    # SMES on four labels: progressive routing, each selected expert once per example
    "smes": ["--config", "configs/experiments/smes_multitask.yaml", *CONFIGS["ctr"][2:],
             "data.synthetic.capacity_width=64"],
}


def launch_local(n: int, devices: int, command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """``recjax launch local -n N -d M -- command`` (as tests/test_distributed.py runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "recjax.cli", "launch", "local", "-n", str(n), "-d", str(devices), "--", *command],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def train(run_dir: pathlib.Path, task: str, topology: str) -> dict[int, float]:
    """Train ``CONFIGS[task]`` on ``topology`` ("1", "8": devices of one process; "2x4":
    processes x devices) into ``run_dir``; returns the per-step losses."""
    args = [*{**CONFIGS, **ALL_TO_ALL}[task], f"run_dir={run_dir}"]
    if topology == "2x4":
        proc = launch_local(2, 4, ["recjax", "train", *args, "mesh.data=8"])
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert "distributed: 2 processes x 4 cpu devices = 8 devices" in proc.stdout, proc.stdout[-4000:]
        out = proc.stdout
    else:
        out = run_cli(["train", "--devices", topology, *args, f"mesh.data={topology}"]).stdout
    devices = 8 if topology == "2x4" else int(topology)
    assert f"mesh {{'data': {devices}," in out, out[-4000:]
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], dict[int, float]]:
    """``runs(task, topology)``: the losses of that run, trained once per module."""
    root = tmp_path_factory.mktemp("parallel")
    done: dict[tuple[str, str], dict[int, float]] = {}

    def get(task: str, topology: str) -> dict[int, float]:
        if (task, topology) not in done:
            done[task, topology] = train(root / f"{task}-{topology}", task, topology)
        return done[task, topology]

    return get


def max_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b)
    return max(abs(a[s] - b[s]) for s in a)


@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_8_devices_train_like_1(runs: Callable, task: str):
    diff = max_diff(runs(task, "8"), runs(task, "1"))
    print(f"{task}: max |loss(8 devices) - loss(1 device)| over {STEPS} steps: {diff:.3g}")
    assert diff < TOL


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_2_processes_x_4_devices_train_like_1_x_8(runs: Callable, task: str):
    diff = max_diff(runs(task, "2x4"), runs(task, "8"))
    print(f"{task}: max |loss(2 processes x 4 devices) - loss(1 x 8)| over {STEPS} steps: {diff:.3g}")
    assert diff < TOL


@pytest.mark.parametrize("topology", ["8", pytest.param("2x4", marks=pytest.mark.slow)])
def test_all_to_all_lookup_trains_like_gspmd(runs: Callable, topology: str):
    """The explicit all-to-all lookup (and its row-gradient exchange in the sparse update)
    gives the GSPMD gather's losses, on one process and across two."""
    diff = max_diff(runs("ctr_all_to_all", topology), runs("ctr", "8"))
    print(f"all-to-all vs GSPMD lookup on {topology}: max |loss difference| over {STEPS} steps: {diff:.3g}")
    assert diff < TOL


def test_two_all_to_all_lookups_of_one_table_train_like_gspmd(runs: Callable):
    """Kunlun looks up C1's rows for the target item and for every event: two all-to-all
    lookups of one table, whose row gradients go back in one exchange, give the GSPMD
    gathers' losses on 8 devices."""
    diff = max_diff(runs("kunlun_all_to_all", "8"), runs("kunlun", "8"))
    print(f"kunlun, all-to-all vs GSPMD lookups on 8 devices: max |loss difference| over {STEPS} steps: {diff:.3g}")
    assert diff < TOL


def test_multi_task_smes_trains_like_1_device(runs: Callable):
    """Four task losses, SMES routing and its balance loss: the summed multi-task loss on 8
    devices equals one device's."""
    diff = max_diff(runs("smes", "8"), runs("smes", "1"))
    print(f"smes, 4 tasks, 8 devices vs 1: max |loss difference| over {STEPS} steps: {diff:.3g}")
    assert diff < TOL


@pytest.mark.parametrize("topology", ["8", pytest.param("2x4", marks=pytest.mark.slow)])
def test_dynamic_tables_train_like_1_device(runs: Callable, topology: str):
    """Raw ids through dynamic tables (hash partitions on 8 devices, evictions, admission at 2
    occurrences, all-to-all lookups) give one device's losses."""
    diff = max_diff(runs("ctr_dynamic", topology), runs("ctr_dynamic", "1"))
    print(f"dynamic tables on {topology} vs 1 device: max |loss difference| over {STEPS} steps: {diff:.3g}")
    assert diff < TOL


def test_column_sharded_tables_train_like_1_device(runs: Callable):
    """Tables split by columns (each device holds every row's 2 of 16 columns; row-wise
    Adagrad's per-row mean summed over the column shards) give one device's losses."""
    diff = max_diff(runs("ctr_columns", "8"), runs("ctr", "1"))
    print(f"column-sharded tables on 8 devices vs 1 device: max |loss difference| over {STEPS} steps: {diff:.3g}")
    assert diff < TOL


def test_table_wise_tables_train_like_1_device(runs: Callable):
    """Each table whole on one of 8 devices, the 5 tables stacked into one row-sharded param and
    read by one all-to-all, gives the row-sharded tables' losses on one device (each table's
    initial rows are drawn alone, so the packing changes no value)."""
    diff = max_diff(runs("ctr_table_wise", "8"), runs("ctr", "1"))
    print(f"table-wise tables on 8 devices vs 1 device: max |loss difference| over {STEPS} steps: {diff:.3g}")
    assert diff < TOL
