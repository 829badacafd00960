"""Never destroy a run (issue 13, item 6) and run directories on a non-local path (item 8).

Each test drives the CLI in-process (``recjax.cli.main`` returns the exit code; the one-line
error goes to stderr) on a tiny DLRM (4 steps, global batch 64) and checks the exact error
line and that every file in the run directory is byte-identical afterwards.

Item 8 runs the trainer on ``gs://bucket/run``. No network: the two places where a ``gs://``
path leaves the process are replaced by a directory standing in for the bucket —
``etils.epath``'s fsspec backend (what a real run reaches through gcsfs; mode ``"a"``
overwrites there, as gcsfs does) and orbax's TensorStore kvstore for ``gs://`` (the ``gcs``
driver becomes the ``file`` driver on the same directory), and orbax's hierarchical-namespace
probe answers "no" (it would call the GCS API). Everything else — recjax's run-dir code,
``epath`` URI handling, orbax's GCS code paths (commit files instead of renames) — runs as it
would against a bucket.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import warnings

import pytest

from recjax.cli import main
from tests.conftest import REPO, cli, snapshot
from tests.conftest import with_overrides as args

DLRM = [
    "--config", str(REPO / "configs/experiments/dlrm_synthetic.yaml"),
    "train.steps=4", "data.global_batch=64", "data.eval_batches=1", "train.tensorboard=false",
    "data.synthetic.num_sparse=2", "data.synthetic.vocab_sizes=[500]", "data.synthetic.num_users=100",
    "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=2", "optim.warmup_steps=2",
]








def records(run: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steps_of(run: pathlib.Path, split: str) -> list[int]:
    return [r["step"] for r in records(run) if r["split"] == split]


def checkpoint_steps(run: pathlib.Path) -> list[int]:
    d = run / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A finished 4-step run: checkpoints 2 and 4, evals at 0, 2, 4, config, report."""
    run = tmp_path_factory.mktemp("template") / "run"
    assert main(["train", *DLRM, f"run_dir={run}"]) == 0
    assert checkpoint_steps(run) == [2, 4]
    return run


def copy_run(template: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    run = tmp_path / "run"
    shutil.copytree(template, run)
    return run


# ----------------------------------------------------------------------------- item 6


def test_resume_false_is_refused_and_overwrite_starts_over(template, tmp_path, capsys):
    """6a/6b: train.resume=false in a run with checkpoints is refused before anything is
    written (config.json keeps the earlier run's values although this config differs);
    --overwrite deletes the earlier run and starts over."""
    run = copy_run(template, tmp_path)
    before = snapshot(run)
    rc, out, err = cli(capsys, "train", *args(DLRM, f"run_dir={run}", "train.resume=false",
                                              "optim.dense.lr=0.01"))
    assert rc == 1
    assert err == (
        f"error: {run} holds checkpoints of an earlier run (steps 2..4) and train.resume=false: "
        "pass --overwrite to delete that run and start over, or choose another run_dir "
        "(nothing was changed)\n")
    assert out == ""
    assert snapshot(run) == before  # checkpoints, config.yaml/json, metrics.jsonl, report.json

    rc, out, err = cli(capsys, "train", *args(DLRM, f"run_dir={run}", "train.resume=false",
                                              "train.steps=2", "--overwrite"))
    assert rc == 0, err
    assert "resumed" not in out
    assert checkpoint_steps(run) == [2]
    assert steps_of(run, "train") == [1, 2] and steps_of(run, "eval") == [0, 2]
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 2
    assert json.loads((run / "report.json").read_text())["steps"] == 2


def test_resume_with_changed_keys_is_refused_unless_allowed_or_accepted(template, tmp_path, capsys):
    """6c/6b: a resume that changes keys outside the allowed ones lists them and is refused
    (config.json unchanged); train.steps and the eval/checkpoint cadence may change;
    --accept-config-changes proceeds with the new values."""
    run = copy_run(template, tmp_path)
    before = snapshot(run)
    rc, out, err = cli(capsys, "train", *args(DLRM, f"run_dir={run}", "train.steps=6",
                                              "optim.dense.lr=0.01", "optim.decay=linear"))
    assert rc == 1
    assert err == (
        f"error: resuming {run} (step 4) with a config that changes optim.decay: 'cosine' -> "
        "'linear'; optim.dense.lr: 0.001 -> 0.01. Resume with the saved config "
        "(run_dir/config.yaml), pass --accept-config-changes to continue with these values, or "
        "use another run_dir (nothing was changed)\n")
    assert snapshot(run) == before

    # accepted, but the checkpoint does not fit the model: refused before the config is written
    rc, out, err = cli(capsys, "train", *args(DLRM, f"run_dir={run}", "train.steps=6", "model.top_mlp=[32]",
                                              "--accept-config-changes"))
    assert rc == 1
    assert err.startswith(f"error: checkpoint {run / 'checkpoints' / '4'} does not match the model:\n")
    assert "params.top.layers.2.kernel: in the checkpoint (128, 1) but not in the model" in err
    assert snapshot(run) == before

    # allowed: how long, how often to evaluate and checkpoint, how many eval batches
    rc, out, err = cli(capsys, "train", *args(DLRM, f"run_dir={run}", "train.steps=6", "train.eval_every=3",
                                              "train.checkpoint_every=3", "data.eval_batches=2"))
    assert rc == 0, err
    assert f"resumed from {run / 'checkpoints' / '4'} at step 4" in out
    assert checkpoint_steps(run) == [2, 4, 6]
    assert steps_of(run, "train") == [1, 2, 3, 4, 5, 6]

    rc, out, err = cli(capsys, "train", *args(DLRM, f"run_dir={run}", "train.steps=8", "optim.dense.lr=0.01",
                                              "--accept-config-changes"))
    assert rc == 0, err
    assert f"resumed from {run / 'checkpoints' / '6'} at step 6" in out
    assert json.loads((run / "config.json").read_text())["optim"]["dense"]["lr"] == 0.01
    assert checkpoint_steps(run)[-1] == 8
    assert steps_of(run, "train") == list(range(1, 9))


def test_final_checkpoint_is_saved_before_the_final_eval(tmp_path, capsys):
    """6d: the final eval fails (a Criteo eval file shorter than one global batch); the
    final-step checkpoint is there, and a rerun after fixing the file only evaluates."""
    train_tsv, eval_tsv = tmp_path / "train.tsv", tmp_path / "eval.tsv"
    assert main(["data", "synth-criteo", str(train_tsv), "--rows", "512"]) == 0
    assert main(["data", "synth-criteo", str(eval_tsv), "--rows", "10", "--seed", "1"]) == 0
    run = tmp_path / "run"
    criteo = args(DLRM, f"run_dir={run}", "data.source=criteo", f"data.criteo.train_files=[{train_tsv}]",
                  f"data.criteo.eval_files=[{eval_tsv}]", "data.criteo.vocab_sizes=[1000]",
                  "train.eval_every=0", "train.checkpoint_every=0")
    rc, out, err = cli(capsys, "train", *criteo)
    assert rc == 1
    assert err == (
        f"error: the eval set (['{eval_tsv}']) holds fewer examples than one global batch "
        "(data.global_batch=64); give it at least that many rows or lower data.global_batch\n")
    assert "step 4/4" in out
    assert checkpoint_steps(run) == [4]  # saved (and committed) before the eval that failed
    assert not (run / "report.json").exists()

    assert main(["data", "synth-criteo", str(eval_tsv), "--rows", "128", "--seed", "1"]) == 0
    rc, out, err = cli(capsys, "train", *criteo)
    assert rc == 0, err
    assert f"resumed from {run / 'checkpoints' / '4'} at step 4" in out and "eval @ 4:" in out
    assert "step 1/4" not in out  # nothing trained again
    assert steps_of(run, "train") == [1, 2, 3, 4] and steps_of(run, "eval") == [4]
    assert json.loads((run / "report.json").read_text())["steps"] == 4


def test_metrics_are_cut_back_to_the_resumed_step(template, tmp_path, capsys):
    """6e: a crash after step 4 was logged but before its checkpoint was committed (and in
    the middle of a metrics line): the resume from step 2 logs steps 3.. once each; the
    records up to step 2 are kept byte for byte. Rerunning the finished command changes
    nothing (no second final eval, no new report)."""
    run = copy_run(template, tmp_path)
    shutil.rmtree(run / "checkpoints" / "4")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["step"] <= 2]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tra')  # cut short by the crash
    rc, out, err = cli(capsys, "train", *args(DLRM, f"run_dir={run}", "train.steps=6"))
    assert rc == 0, err
    assert f"resumed from {run / 'checkpoints' / '2'} at step 2" in out
    text = (run / "metrics.jsonl").read_text()
    assert text.startswith("".join(kept))
    assert steps_of(run, "train") == [1, 2, 3, 4, 5, 6]
    assert steps_of(run, "eval") == [0, 2, 4, 6]
    assert checkpoint_steps(run) == [2, 4, 6]

    before = snapshot(run)
    rc, out, err = cli(capsys, "train", *args(DLRM, f"run_dir={run}", "train.steps=6"))
    assert rc == 0, err
    assert out == f"{run} already finished at step 6 (report.json): nothing to do; raise train.steps " \
                  "(or train.epochs) to train on, or use another run_dir\n"
    assert snapshot(run) == before


def test_truncate_metrics_rules(tmp_path):
    """The cut itself: train records up to the step, other splits up to ``evals_through``,
    none of ``drop_splits``; a fresh start (step -1) keeps nothing; a torn line is dropped."""
    from recjax.train import run_dir as rd

    recs = [(0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"),
            (4, "eval"), (2, "test")]
    body = "".join(json.dumps({"step": s, "split": sp}) + "\n" for s, sp in recs) + '{"step": 5, "spl'

    def cut(step: int, **kw) -> list[tuple[int, str]]:
        (tmp_path / "metrics.jsonl").write_text(body)
        rd.truncate_metrics(rd.run_path(tmp_path), step, **kw)
        return [(r["step"], r["split"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]

    assert cut(2) == [(0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (2, "test")]
    assert cut(4, evals_through=2) == [(0, "eval"), (1, "train"), (2, "train"), (2, "eval"),
                                       (3, "train"), (4, "train"), (2, "test")]
    assert cut(4, evals_through=3, drop_splits=("test",)) == [
        (0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train")]
    assert cut(-1) == []


# ----------------------------------------------------------------------------- item 8


def test_run_path_keeps_urls_and_refuses_stores_orbax_cannot_write(tmp_path, capsys, monkeypatch):
    """gs:// stays a URL (pathlib's resolve() would make it ./gs:/...); local paths become
    absolute; s3:// and unknown schemes are refused up front in one line (orbax 0.12's
    TensorStore spec builder fails on them with "Checkpoint path should be absolute")."""
    from recjax.train import run_dir as rd

    monkeypatch.chdir(tmp_path)
    assert str(rd.run_path("gs://bucket/run")) == "gs://bucket/run"
    assert str(rd.run_path("runs/x")) == str(tmp_path / "runs" / "x")
    for url in ("s3://bucket/run", "memory://run"):
        rc, out, err = cli(capsys, "train", *args(DLRM, f"run_dir={url}"))
        assert rc == 2 and out == ""
        assert err == (f"config error: run_dir='{url}': checkpoints can be written to a local path or a "
                       "gs:// bucket (orbax builds TensorStore specs for those only; s3:// and others fail "
                       "there); use one of those\n")
    assert list(tmp_path.iterdir()) == []


class _FakeBucket:
    """``gs://`` served from a local directory (see the module docstring)."""

    def __init__(self, root: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
        from etils.epath import backend as epath_backend
        from fsspec.implementations.dirfs import DirFileSystem
        from fsspec.implementations.local import LocalFileSystem
        from orbax.checkpoint._src.path import gcs_utils

        class GCSLike(DirFileSystem):
            protocol = ("gs", "gcs")

            def open(self, path, mode="rb", *a, **kw):
                if "a" in mode:  # gcsfs: "Append mode 'a' is not supported in GCS. Using overwrite mode instead."
                    warnings.warn("append mode is not supported in GCS: overwriting", stacklevel=2)
                    mode = mode.replace("a", "w")
                return super().open(path, mode, *a, **kw)

        self.root = root
        self.fs = GCSLike(path=str(root), fs=LocalFileSystem())
        self.paths: list[str] = []

        def fs(backend, path):
            self.paths.append(str(path))
            assert str(path).startswith("gs://"), path
            return self.fs

        def kvstore(path: str) -> dict:
            bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
            return {"driver": "file", "path": f"{root}/{bucket}/{key}"}

        monkeypatch.setattr(epath_backend._FileSystemSpecBackend, "fs", fs)
        monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
        monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)


def test_run_dir_on_an_object_store_path(tmp_path, capsys, monkeypatch):
    """8: a run on gs://bucket/run trains, checkpoints (orbax's GCS code path), is refused
    with train.resume=false, resumes, and keeps every metrics record (no append on object
    stores); nothing is written to a local "gs:" directory."""
    from recjax.train import run_dir as rd

    bucket = _FakeBucket(tmp_path / "bucket_root", monkeypatch)
    monkeypatch.chdir(tmp_path)
    url = "gs://bucket/run"
    assert str(rd.run_path(url)) == url and str(rd.run_path("gs://bucket/run/")) == url
    local = tmp_path / "bucket_root" / "bucket" / "run"

    rc, out, err = cli(capsys, "train", *args(DLRM, f"run_dir={url}"))
    assert rc == 0, err
    assert f"checkpoints in {url}/checkpoints; report {url}/report.json" in out
    assert checkpoint_steps(local) == [2, 4]
    assert (local / "checkpoints" / "4" / "commit_success.txt").exists()  # GCS: commit file, no rename
    assert {"config.yaml", "config.json", "metrics.jsonl", "report.json"} <= {p.name for p in local.iterdir()}
    assert any(p.endswith("/run/metrics.jsonl") for p in bucket.paths)
    assert not (tmp_path / "gs:").exists() and not (REPO / "gs:").exists()

    before = snapshot(local)
    rc, out, err = cli(capsys, "train", *args(DLRM, f"run_dir={url}", "train.resume=false"))
    assert rc == 1
    assert err.startswith(f"error: {url} holds checkpoints of an earlier run (steps 2..4)")
    assert snapshot(local) == before

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, out, err = cli(capsys, "train", *args(DLRM, f"run_dir={url}", "train.steps=6"))
    assert rc == 0, err
    assert not [w for w in caught if "append mode" in str(w.message)]  # metrics.jsonl is never appended to
    assert f"resumed from {url}/checkpoints/4 at step 4" in out
    assert steps_of(local, "train") == [1, 2, 3, 4, 5, 6]
    assert steps_of(local, "eval") == [0, 2, 4, 6]
    # step 4 was the final step: its checkpoint predates its eval, which runs again (same values)
    old_lines = before["metrics.jsonl"].splitlines(keepends=True)
    assert (local / "metrics.jsonl").read_bytes().startswith(b"".join(old_lines[:-1]))
    redone = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "eval" and json.loads(line)["step"] == 4]
    assert [r["logloss"] for r in redone] == [json.loads(old_lines[-1])["logloss"]]
    assert json.loads((local / "report.json").read_text())["steps"] == 6
