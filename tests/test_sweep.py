"""Sweep specs, stable run ids, the results table, runners (sequential and worker processes;
CTR and sequential models through the one trainer), failure recording, resume, status and
cluster-job emission."""

from __future__ import annotations

import csv
import json
import multiprocessing
import pathlib
import shutil

import pytest
import yaml

from recjax.scaling import emit, results, runner
from recjax.scaling.sweep import SpecError, expand, load_sweep
from tests.conftest import REPO, TINY, run_cli

DLRM = str(REPO / "configs" / "models" / "dlrm.yaml")


def write_spec(tmp_path: pathlib.Path, **extra) -> pathlib.Path:
    spec = {
        "name": "t",
        "base": DLRM,
        "out_dir": str(tmp_path / "out"),
        "overrides": {**{k: yaml.safe_load(v) for k, v in (t.split("=", 1) for t in TINY)},
                      "train.eval_every": 0, "train.checkpoint_every": 0,
                      "train.async_checkpoint": False},
        "presets": {"s": {"model.top_mlp": [16]}, "m": {"model.top_mlp": [32, 16]}},
        "grid": {"preset": ["s", "m"], "examples": [192, 384]},
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_expand_grid_presets_budgets_and_stable_ids(tmp_path):
    sweep = load_sweep(write_spec(tmp_path, runs=[{"preset": "m", "flops": 3e8}]))
    runs = expand(sweep)
    assert len(runs) == 5
    assert [r.config.train.steps for r in runs[:4]] == [3, 6, 3, 6]  # examples / batch 64
    assert [r.config.model.top_mlp for r in runs[:4]] == [[16], [16], [32, 16], [32, 16]]
    assert runs[0].run_id.startswith("s-") and runs[2].run_id.startswith("m-")
    assert runs[0].config.run_dir == str(tmp_path / "out" / "runs" / runs[0].run_id)

    from recjax.data.spec import feature_spec
    from recjax.models import registry

    last = runs[4]  # IsoFLOP point: steps from the analytic FLOPs
    fwd = registry.forward_flops_per_example(last.config, feature_spec(last.config.data))
    assert last.config.train.steps == round(3e8 / (3 * fwd * 64))
    assert last.flops_budget == 3e8

    ids = [r.run_id for r in runs]
    assert [r.run_id for r in expand(sweep)] == ids  # deterministic
    assert [r.run_id for r in expand(sweep, ["train.log_every=7"])] == ids  # logging: same runs
    assert all(a != b for a, b in zip(ids, (r.run_id for r in expand(sweep, ["seed=1"])), strict=True))
    reordered = load_sweep(write_spec(tmp_path, grid={"examples": [384, 192], "preset": ["m", "s"]}))
    assert sorted(r.run_id for r in expand(reordered)) == sorted(ids[:4])

    # a preset can name its own model file, replacing the spec's base
    dcn = {"config": str(REPO / "configs" / "models" / "dcnv2.yaml"), "model.num_cross_layers": 1}
    other = expand(load_sweep(write_spec(tmp_path, presets={"s": {}, "m": {}, "dcn": dcn},
                                         grid={"preset": ["dcn"], "examples": [192]})))
    assert other[0].config.model.name == "dcnv2" and other[0].config.model.num_cross_layers == 1
    assert other[0].run_id.startswith("dcn-") and other[0].config.data.global_batch == 64

    # a preset's `arch` names the architecture in the results table (variants of one model)
    from recjax.scaling.runner import base_row

    named = load_sweep(write_spec(tmp_path, presets={"s": {}, "m": {}, "dcn": {**dcn, "arch": "dcn_small"}},
                                  grid={"preset": ["dcn", "s"], "examples": [192]}))
    rows = [base_row(named, r) for r in expand(named)]
    assert [r["model"] for r in rows] == ["dcn_small", rows[1]["model"]] and rows[1]["model"] != "dcn_small"


@pytest.mark.parametrize(
    ("extra", "cli", "message"),
    [
        ({"gird": {}}, [], "unknown sweep key 'gird': did you mean 'grid'"),
        ({"grid": {"preset": ["xl"]}}, [], "unknown preset 'xl'"),
        ({"grid": {"preset": ["s"], "model.top_mlp": [[8]]}}, [], "preset 's' and an axis both set"),
        ({}, ["model.top_mlp=[4]"], "would change swept keys"),
        ({"grid": {"model.top_mpl": [[8]]}}, [], "did you mean 'model.top_mlp'"),
        ({"grid": {"examples": 100}}, [], "must be a non-empty list"),
    ],
)
def test_spec_errors_say_what_to_fix(tmp_path, extra, cli, message):
    with pytest.raises(SpecError, match=message):
        expand(load_sweep(write_spec(tmp_path, **extra)), cli)


def _append(args: tuple[str, int]) -> None:
    path, worker = args
    for i in range(5):
        results.upsert_row(path, {"run_id": f"w{worker}-{i}", "status": "ok", "eval_logloss": 0.5 + i})


def test_results_upsert_is_atomic_under_concurrent_writers(tmp_path):
    table = tmp_path / "results.csv"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_append, [(str(table), w) for w in range(4)])
    rows = results.read_rows(table)
    assert sorted(r["run_id"] for r in rows) == sorted(f"w{w}-{i}" for w in range(4) for i in range(5))
    results.upsert_row(table, {"run_id": "w0-0", "status": "failed", "error": "boom, with comma"})
    rows = results.by_run_id(results.read_rows(table))
    assert len(rows) == 20 and rows["w0-0"]["status"] == "failed"
    assert rows["w0-0"]["error"] == "boom, with comma" and rows["w0-0"]["eval_logloss"] is None
    assert rows["w1-3"]["eval_logloss"] == 3.5
    with open(table) as f:
        assert next(csv.reader(f)) == list(results.COLUMNS)
    with pytest.raises(ValueError, match="unknown results column"):
        results.upsert_row(table, {"run_id": "x", "loss": 1.0})


def test_sweep_runs_in_workers_records_failure_and_resumes(tmp_path, capsys):
    """A good run and a run whose model cannot be built, in 2 worker processes; then a
    sequential rerun (in this process) skips the finished run and retries the failed one."""
    from recjax.cli import main

    spec = write_spec(tmp_path, grid={"preset": ["s", "bad"], "examples": [192]},
                      presets={"s": {"model.top_mlp": [16]},
                               "bad": {"model.bottom_mlp": [8, 4]}})  # last width != embedding dim
    proc = run_cli(["sweep", "run", str(spec), "--procs", "2"], check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[2/2]" in proc.stdout and "ETA" in proc.stdout
    rows = {r["preset"]: r for r in results.read_rows(tmp_path / "out" / "results.csv")}
    assert set(rows) == {"s", "bad"}
    ok = rows["s"]
    assert ok["status"] == "ok" and ok["steps"] == 3 and ok["examples_seen"] == 192
    assert 0 < ok["bayes_logloss"] < ok["eval_logloss"] < 1 and 0 < ok["eval_auc"] < 1
    assert 0 < ok["excess_kl"] < ok["eval_logloss"]
    assert 0 < ok["data_floor_kl"] < ok["excess_kl"]  # 192 examples: far from what the data allows
    assert ok["dense_params"] > 0 and ok["embedding_params"] > 0 and ok["step_time_median"] > 0
    assert ok["train_flops_total"] == pytest.approx(3 * ok["fwd_flops_per_example"] * 192)
    assert ok["device_kind"] == "cpu" and ok["n_devices"] == 1 and ok["mfu"] is None
    assert (pathlib.Path(ok["run_dir"]) / "worker.log").is_file()
    assert rows["bad"]["status"] == "failed" and "bottom_mlp" in rows["bad"]["error"]
    table = tmp_path / "out" / "results.csv"
    results.upsert_row(table, {**ok, "data_floor_kl": None})  # a row written before the column

    capsys.readouterr()
    assert main(["sweep", "run", str(spec)]) == 1
    out = capsys.readouterr().out
    assert "1 already done, 1 to run" in out and "failed" in out
    assert len(results.read_rows(table)) == 2
    refilled = next(r for r in results.read_rows(table) if r["preset"] == "s")
    assert refilled["data_floor_kl"] == pytest.approx(ok["data_floor_kl"], rel=1e-9)
    assert main(["sweep", "status", str(spec)]) == 1
    assert "1 failed, 1 ok of 2" in capsys.readouterr().out


def test_dead_worker_gets_a_failed_row(tmp_path):
    sweep = load_sweep(write_spec(tmp_path))
    run = expand(sweep)[0]
    log = pathlib.Path(run.config.run_dir) / "worker.log"
    log.parent.mkdir(parents=True)
    log.write_text("step 1/3\nKilled\n")
    row = runner._collect(sweep, run, -9, 1.5)
    assert row["status"] == "failed" and "code -9: Killed" in row["error"]
    assert results.read_rows(sweep.table)[0]["run_id"] == run.run_id


def test_emit_dry_run_writes_one_job_per_pending_run(tmp_path):
    launch = {"slurm": {"gpus_per_node": 8, "partition": "gpu", "setup": ["source .venv/bin/activate"]},
              "k8s": {"image": "ghcr.io/x/recjax:1", "gpus_per_process": 8, "kind": "job"}}
    spec = write_spec(tmp_path, launch=launch)
    sweep = load_sweep(spec)
    runs = expand(sweep)
    results.upsert_row(sweep.table, {"run_id": runs[0].run_id, "status": "ok"})

    proc = run_cli(["sweep", "emit", str(spec), "--target", "slurm", "--dry-run"])
    assert "3 slurm job(s) for 4 run(s); 1 already ok" in proc.stdout
    script = (sweep.out_dir / "jobs" / f"{runs[1].run_id}.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --partition=gpu" in script
    assert "source .venv/bin/activate" in script
    assert f"recjax sweep run {spec} --only {runs[1].run_id} --out-dir {sweep.out_dir}" in script
    assert not (sweep.out_dir / "jobs" / f"{runs[0].run_id}.sbatch").exists()

    jobs = emit.emit(sweep, runs[1:2], "k8s", dry_run=True)
    docs = list(yaml.safe_load_all(jobs[0][0].read_text()))
    job = next(d for d in docs if d["kind"] == "Job")
    name = job["metadata"]["name"]
    assert name.endswith(runs[1].run_id) and len(name) <= 40 and name == name.lower()
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:6] == ["recjax", "sweep", "run", str(spec), "--only", runs[1].run_id]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8

    sweep.launch = {"k8s": {"gpus_per_process": 1}}
    with pytest.raises(SpecError, match="launch.k8s.image is required"):
        emit.emit(sweep, runs, "k8s", dry_run=True)
    sweep.launch = {"slurm": {"gpus": 1}}
    with pytest.raises(SpecError, match=r"unknown launch.slurm option\(s\) \['gpus'\]"):
        emit.emit(sweep, runs, "slurm", dry_run=True)
    if shutil.which("sbatch") is None:
        with pytest.raises(SpecError, match="'sbatch' is not on PATH"):
            emit.emit(sweep, runs, "slurm", dry_run=False)


# --------------------------------------------------------------------------- sequential models
SEQREC_SMOKE = REPO / "configs" / "sweeps" / "seqrec_smoke.yaml"


def test_seqrec_sweep_runs_through_sweep_run_with_ranking_columns(tmp_path, capsys):
    """configs/sweeps/seqrec_smoke.yaml (two SASRec sizes, 2 epochs on synthetic sequences)
    through `recjax sweep run`: every row ok, with the best validation value, the test
    metrics of the best parameters and the steps the epochs took; a rerun skips both."""
    from recjax.cli import main

    out = tmp_path / "out"
    assert main(["sweep", "run", str(SEQREC_SMOKE), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[2/2] ok" in printed and "valid/ndcg@10" in printed
    rows = {r["preset"]: r for r in results.read_rows(out / "results.csv")}
    assert set(rows) == {"s", "m"}
    for preset, hidden, layers in (("s", 16, 1), ("m", 32, 2)):
        r = rows[preset]
        report = json.loads((pathlib.Path(r["run_dir"]) / "report.json").read_text())
        assert r["status"] == "ok" and r["task"] == "seqrec" and r["model"] == "seqrec"
        assert r["d_model"] == hidden and r["layers"] == layers
        assert r["epochs"] == 2.0 and r["steps"] == report["steps"] == 2 * report["data"]["batches_per_epoch"]
        assert r["examples_seen"] == 32 * r["steps"]
        assert r["embedding_params"] == 128 * hidden and r["dense_params"] > 0
        assert r["train_flops_total"] == pytest.approx(3 * r["fwd_flops_per_example"] * r["examples_seen"])
        assert r["best_metric"] == "valid/ndcg@10" and r["best_step"] in (r["steps"] // 2, r["steps"])
        assert 0 < r["best_value"] <= 1 and r["valid_ndcg@10"] == pytest.approx(r["best_value"])
        assert r["best_value"] == pytest.approx(report["best_value"])
        assert 0 < r["test_ndcg@10"] <= r["test_hr@10"] <= 1 and 0 < r["test_mrr"] <= 1
        assert r["test_value"] == r["test_ndcg@10"] == pytest.approx(report["test"]["ndcg@10"])
        assert r["train_loss"] == pytest.approx(report["train"]["loss"]) and r["train_loss"] > 0
        assert r["eval_logloss"] is None and r["step_time_median"] > 0 and r["n_devices"] == 1
    assert rows["m"]["dense_params"] > rows["s"]["dense_params"]

    assert main(["sweep", "run", str(SEQREC_SMOKE), "--out-dir", str(out)]) == 0
    assert "2 already done, 0 to run" in capsys.readouterr().out
    assert main(["sweep", "status", str(SEQREC_SMOKE), "--out-dir", str(out)]) == 0
    assert "valid/ndcg@10" in capsys.readouterr().out


def test_seqrec_budgets_replace_epochs_by_steps(tmp_path):
    """A data or compute budget on an epoch-based (sequential) config sets train.steps and
    turns train.epochs off; FLOPs per example come from the task (one sequence)."""
    from recjax.tasks import get_task

    spec = yaml.safe_load(SEQREC_SMOKE.read_text())
    spec.update(base=str(SEQREC_SMOKE.parent / spec["base"]), out_dir=str(tmp_path / "out"),
                grid={"preset": ["s"], "examples": [320]}, runs=[{"preset": "m", "flops": 1e9}])
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = expand(load_sweep(path))
    assert [(r.config.train.steps, r.config.train.epochs) for r in runs[:1]] == [(10, 0)]  # 320 / 32
    fwd = get_task(runs[1].config).forward_flops_per_example()
    assert runs[1].config.train.steps == round(1e9 / (3 * fwd * 32)) and runs[1].config.train.epochs == 0
    assert runs[0].run_id.startswith("s-") and [r.run_id for r in expand(load_sweep(path))] == [r.run_id for r in runs]
    row = runner.base_row(load_sweep(path), runs[0])
    assert row["task"] == "seqrec" and row["steps"] == 10 and row["examples_seen"] == 320

    spec["runs"] = [{"preset": "m", "examples": 320, "train.epochs": 3}]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="sets 'train.epochs' and a budget"):
        load_sweep(path)
    unbudgeted = expand(load_sweep(SEQREC_SMOKE, str(tmp_path / "o2")))[0]
    assert runner.base_row(load_sweep(SEQREC_SMOKE), unbudgeted)["steps"] is None  # epochs: known after the run


def test_shipped_sweep_specs_expand():
    """Every spec in configs/sweeps resolves; the scaling pair shares one table and spans the
    sizes and budgets their comments state."""
    from recjax.config import CONFIG_DIR
    from recjax.train.state import describe_config

    runs = {}
    for spec in sorted(pathlib.Path(CONFIG_DIR, "sweeps").glob("*.yaml")):
        sweep = load_sweep(spec)
        runs[spec.stem] = (sweep, expand(sweep))
        assert runs[spec.stem][1], spec
    tml, base = runs["scaling_tokenmixer_large"], runs["scaling_baselines"]
    assert tml[0].table == base[0].table
    assert (len(tml[1]), len(base[1])) == (40, 60)
    dense = {r.preset: describe_config(r.config)["params_dense"] for r in tml[1]}
    assert max(dense.values()) / min(dense.values()) >= 30
    examples = {r.axes["examples"] for r in tml[1]}
    assert max(examples) / min(examples) >= 20
    for r in base[1]:  # each baseline size within 15% of the TokenMixer-Large size of its name
        size = describe_config(r.config)["params_dense"]
        assert abs(size / dense[r.preset.split("_")[-1]] - 1) < 0.15, (r.preset, size)
