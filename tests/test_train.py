"""End-to-end trainer tests (the CTR task): logs/checkpoints, multi-device equivalence,
kill-and-resume, NaN stop, changed config / checkpoint mismatch, AOT compile, bad data rows."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from tests.conftest import REPO, checkpoint_steps, read_losses, run_cli, run_python, tiny


def test_train_writes_logs_tensorboard_checkpoint_and_learns(tmp_path: pathlib.Path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        ["train", *tiny("train.steps=60", "train.log_every=10", "train.eval_every=30",
                        "train.checkpoint_every=30", "train.tensorboard=true"), f"run_dir={run_dir}"]
    )
    out = proc.stdout
    assert "# resolved config" in out and "per-device memory" in out
    assert "Bayes-optimal" in out and "AUC" in out
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert checkpoint_steps(run_dir) == [30, 60]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert all(r["logloss"] > r["bayes_logloss"] for r in evals)
    assert all(r["excess_kl"] > 0 for r in evals) and evals[-1]["excess_kl"] < evals[0]["excess_kl"]
    assert "excess KL" in out
    assert evals[-1]["logloss"] < evals[0]["logloss"]
    trains = [r for r in records if r["split"] == "train"]
    assert trains[-1]["loss"] < trains[0]["loss"]
    assert {"examples_per_s", "tflops_per_device", "grad_norm", "oov_ids"} <= trains[0].keys()


def _losses_code(run_dir: pathlib.Path, overrides: list[str]) -> str:
    return f"""
import json
from recjax.config import load_config
from recjax.train.trainer import train
cfg = load_config(None, {tiny(*overrides) + [f"run_dir={run_dir}"]!r})
train(cfg)
"""


def test_eight_devices_match_one_device_and_checkpoints_move_between_meshes(tmp_path: pathlib.Path):
    # rows padded to a multiple of the 8 row shards: 500 ids -> 504 rows, 100 users -> 104
    common = ["train.steps=20", "train.eval_every=0", "train.checkpoint_every=10",
              "embedding.placement=row_sharded", "embedding.pad_rows_to=8", "train.async_checkpoint=false"]
    run_python(_losses_code(tmp_path / "one", common + ["mesh.data=1"]), devices=1)
    out = run_python(_losses_code(tmp_path / "eight", common + ["mesh.data=4", "mesh.fsdp=2"]), devices=8)
    assert "'data': 4, 'fsdp': 2" in out
    # the placement plan names every row-sharded table
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if " rows x 16 over " in line}
    assert sorted(lines) == [f"embedding.tables.{t}" for t in ("C1", "C2", "C3", "C4", "user")], out
    assert "504 rows x 16 over data" in lines["embedding.tables.C1"] and "fsdp (8 shards of 63 rows)" in lines[
        "embedding.tables.C1"]
    assert "104 rows x 16 over data" in lines["embedding.tables.user"] and "fsdp (8 shards of 13 rows)" in lines[
        "embedding.tables.user"]
    one, eight = read_losses(tmp_path / "one"), read_losses(tmp_path / "eight")
    assert sorted(one) == list(range(1, 21)) == sorted(eight)
    diffs = [abs(one[s] - eight[s]) for s in one]
    print(f"max |loss_8dev - loss_1dev| over 20 steps: {max(diffs):.3g}")
    assert max(diffs) < 1e-5, diffs
    # the table really is row-sharded over all 8 devices
    code = """
from recjax.config import load_config
from recjax.errors import ConfigError
from recjax.train.state import build_setup
cfg = load_config(None, ["mesh.data=4", "mesh.fsdp=2", "data.synthetic.vocab_sizes=[512]"])
s = build_setup(cfg)
print(s.state_shardings["params"]["embedding"]["tables"]["C1"].spec)
try:  # 500 rows do not divide over 8 shards: refused, never silently replicated
    build_setup(load_config(None, ["mesh.data=4", "mesh.fsdp=2", "data.synthetic.vocab_sizes=[500]",
                                   "data.synthetic.num_users=96", "embedding.placement=row_sharded"]))
except ConfigError as e:
    print("refused:", e)
"""
    out = run_python(code, devices=8)
    assert "('data', 'fsdp')" in out
    assert "refused: embedding.tables.C1: 500 rows do not divide over the 8 shards" in out, out
    assert "embedding.pad_rows_to=8" in out
    # the step-10 checkpoint of the 8-device run resumes on 1 device and continues like it
    moved = tmp_path / "moved" / "checkpoints"
    shutil.copytree(tmp_path / "eight" / "checkpoints" / "10", moved / "10")
    out = run_python(_losses_code(tmp_path / "moved", common + ["mesh.data=1"]), devices=1)
    assert "at step 10" in out
    resumed = read_losses(tmp_path / "moved")
    assert sorted(resumed) == list(range(11, 21))
    assert max(abs(resumed[s] - one[s]) for s in resumed) < 1e-5


def test_dcnv2_trains_in_bfloat16(tmp_path: pathlib.Path):
    run_dir = tmp_path / "bf16"
    run_cli(["train", *tiny("model.name=dcnv2", "train.compute_dtype=bfloat16", "train.steps=30",
                            "train.eval_every=30", "train.checkpoint_every=0"), f"run_dir={run_dir}"])
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert all(np.isfinite(r["loss"]) for r in records if r["split"] == "train")
    assert [r["step"] for r in evals] == [0, 30] and evals[1]["logloss"] < evals[0]["logloss"]


def test_kill_and_resume_gives_identical_losses(tmp_path: pathlib.Path):
    steps = 600  # checkpoints every 100; killed after the one at step 300
    args = tiny(f"train.steps={steps}", "train.checkpoint_every=100", "train.eval_every=0", "train.keep_checkpoints=2")
    ref = tmp_path / "ref"
    run_cli(["train", *args, f"run_dir={ref}"])
    run_dir = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "recjax.cli", "train", *args, f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoint_steps(run_dir) and checkpoint_steps(run_dir)[-1] >= 300:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(read_losses(run_dir))
    resumed_from = checkpoint_steps(run_dir)[-1]
    assert killed_at < steps
    out = run_cli(["train", *args, f"run_dir={run_dir}"]).stdout
    assert f"at step {resumed_from}" in out
    ref_losses, losses = read_losses(ref), read_losses(run_dir)
    after = range(resumed_from + 1, steps + 1)
    assert all(losses[s] == ref_losses[s] for s in after), "resumed losses differ from the uninterrupted run"


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: pathlib.Path):
    run_dir = tmp_path / "nan"
    proc = run_cli(
        ["train", *tiny("train.steps=50", "train.checkpoint_every=1", "train.eval_every=0",
                        "optim.dense.lr=1e30", "optim.embedding.lr=1e30", "optim.grad_clip_norm=0",
                        "optim.warmup_steps=0"), f"run_dir={run_dir}"],
        check=False,
    )
    assert proc.returncode != 0
    msg = proc.stderr
    assert "non-finite loss or gradient at step" in msg, msg
    bad = int(msg.split("at step ")[1].split(";")[0])
    saved = checkpoint_steps(run_dir)
    assert saved and max(saved) < bad


def test_eval_command_and_checkpoint_mismatch_names_the_parameter(tmp_path: pathlib.Path):
    run_dir = tmp_path / "mm"
    run_cli(["train", *tiny("train.steps=2", "train.eval_every=0"), f"run_dir={run_dir}"])
    evaluated = run_cli(["eval", *tiny("train.steps=2"), f"run_dir={run_dir}"]).stdout
    assert "eval @ 2: logloss" in evaluated and '"auc"' in evaluated
    changed = ["train", *tiny("train.steps=4", "train.eval_every=0", "model.top_mlp=[32, 16]"), f"run_dir={run_dir}"]
    # resuming with a changed model key is refused before anything is touched ...
    proc = run_cli(changed, check=False)
    assert proc.returncode == 1
    assert "model.top_mlp" in proc.stderr and "--accept-config-changes" in proc.stderr, proc.stderr
    assert checkpoint_steps(run_dir) == [2]
    # ... and with the change accepted, the checkpoint itself names the mismatching parameter
    proc = run_cli([*changed, "--accept-config-changes"], check=False)
    assert proc.returncode != 0
    assert "does not match the model" in proc.stderr and "top" in proc.stderr, proc.stderr


def test_compile_reports_memory_and_enforces_limit(tmp_path: pathlib.Path):
    out_json = tmp_path / "c.json"
    # 8 row shards: the 500-id tables and 100 users are padded to 504 and 104 rows
    pad = "embedding.pad_rows_to=8"
    proc = run_cli(["compile", "--devices", "8", *tiny("mesh.data=4", "mesh.fsdp=2", pad), "--json", str(out_json)])
    assert "per-device memory" in proc.stdout
    report = json.loads(out_json.read_text())
    assert report["n_devices"] == 8 and report["memory_per_device"]["total"] > 0
    assert report["xla_flops_per_device"] > 0
    proc = run_cli(["compile", "--devices", "8", *tiny(pad), "--max-device-memory-gb", "1e-9"], check=False)
    assert proc.returncode == 1 and "exceeds" in proc.stderr
    # unpadded rows that do not divide over the shards are a config error, not a replicated table
    proc = run_cli(["compile", "--devices", "8", *tiny()], check=False)
    assert proc.returncode == 2 and "500 rows do not divide" in proc.stderr and pad in proc.stderr, proc.stderr
    params = run_cli(["params", "--config", "configs/models/dcnv2.yaml", *tiny()]).stdout
    counts = {line.split(":")[0].strip(): float(line.split(":")[1].replace(",", "")) for line in params.splitlines()}
    assert counts["params_embedding"] == 4 * 500 * 16 + 100 * 16  # 4 features of 500 ids + 100 users, dim 16
    assert counts["train_flops_per_example"] == 3 * counts["fwd_flops_per_example"] > 0


def test_bad_criteo_row_is_an_error_with_location_or_skipped(tmp_path: pathlib.Path):
    from recjax.data.criteo import write_criteo_tsv

    path = tmp_path / "day_0.tsv"
    write_criteo_tsv(path, rows=300, seed=0, bad_rows=[5])
    common = ["train", "data.source=criteo", f"data.criteo.train_files=[{path}]", f"data.criteo.eval_files=[{path}]",
              "data.criteo.vocab_sizes=[1000]", "data.global_batch=32", "data.eval_batches=2", "train.steps=4",
              "train.log_every=1", "train.eval_every=0", "train.tensorboard=false"]
    proc = run_cli([*common, f"run_dir={tmp_path / 'a'}"], check=False)
    assert proc.returncode != 0 and f"{path}:6:" in proc.stderr, proc.stderr
    proc = run_cli([*common, f"run_dir={tmp_path / 'b'}", "data.skip_bad_rows=true"])
    rec = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in rec if r["split"] == "train"][-1]
    assert last_train["bad_rows"] == 1
    assert np.isfinite(last_train["loss"])


def test_failed_checkpoint_save_fails_the_run(tmp_path: pathlib.Path):
    code = f"""
from recjax.config import load_config
from recjax.train import checkpoint
from recjax.train.trainer import train

def broken_save(self, directory, args):
    raise OSError("disk full (simulated)")

checkpoint.LoopStateHandler.save = broken_save
cfg = load_config(None, {tiny("train.steps=4", "train.checkpoint_every=2", "train.eval_every=0")
                         + [f"run_dir={tmp_path / 'fail'}"]!r})
try:
    train(cfg)
except Exception as e:
    print("run failed:", type(e).__name__, e)
else:
    print("run succeeded")
"""
    out = run_python(code)
    assert "run failed" in out and "disk full (simulated)" in out, out
    assert not checkpoint_steps(tmp_path / "fail")  # nothing half-written was committed
