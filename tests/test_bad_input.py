"""Bad input (issue 13, item 7): each a one-line error that names the key or file and what to
do, and nothing in the run directory lost or overwritten; the table placement printed at
start; out-of-vocabulary ids counted in train and eval metrics with a one-time warning.

The CLI runs in-process (``recjax.cli.main``) on a tiny DLRM, except the 8-device cases, which
run ``recjax train --devices 8`` in a subprocess. Errors that come before anything is written
are pointed at a copy of a finished run, whose files must stay byte-identical.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from recjax.cli import main
from tests.conftest import REPO, cli, run_cli, snapshot
from tests.conftest import with_overrides as args

DLRM = [
    "--config", str(REPO / "configs/experiments/dlrm_synthetic.yaml"),
    "train.steps=4", "data.global_batch=64", "data.eval_batches=1", "train.tensorboard=false",
    "data.synthetic.num_sparse=2", "data.synthetic.vocab_sizes=[500]", "data.synthetic.num_users=100",
    "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=2", "optim.warmup_steps=2",
]
SEQREC = [
    "--config", str(REPO / "configs/experiments/seqrec_synthetic.yaml"),
    "train.epochs=1", "data.global_batch=32", "data.sequences.max_len=8",
    "data.sequences.synthetic={num_users: 40, num_items: 30, min_length: 5, max_length: 10}",
]








def records(run: pathlib.Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A finished 4-step run on one device (checkpoints 2 and 4) with no OOV ids."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *DLRM, f"run_dir={run}"]) == 0
    return run


@pytest.fixture
def earlier_run(finished: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


CONFIG_ERRORS = [
    (DLRM, ["mesh.rules.batch=[data, fdsp]"],
     "config error: mesh.rules.batch: unknown mesh axis 'fdsp'; did you mean 'fsdp'? "
     "(mesh axes: data, fsdp, tensor, expert)"),
    (DLRM, ["mesh.rules.table_rows=[tensr]"],
     "config error: mesh.rules.table_rows: unknown mesh axis 'tensr'; did you mean 'tensor'? "
     "(mesh axes: data, fsdp, tensor, expert)"),
    (DLRM, ["train.steps=-5"], "config error: train.steps must be positive, got -5"),
    (DLRM, ["train.steps=0"], "config error: train.steps must be positive, got 0"),
    (DLRM, ["data.global_batch=0"], "config error: data.global_batch must be positive, got 0"),
    (DLRM, ["data.global_batch=-64"], "config error: data.global_batch must be positive, got -64"),
    (DLRM, ["data.eval_batches=0"], "config error: data.eval_batches must be positive, got 0"),
    (DLRM, ["embedding.pad_rows_to=0"], "config error: embedding.pad_rows_to must be >= 1, got 0"),
    (SEQREC, ["train.epochs=-1"], "config error: train.epochs must be >= 0, got -1"),
    (SEQREC, ["train.epochs=0", "train.steps=-5"], "config error: train.steps must be positive, got -5"),
    (SEQREC, ["data.global_batch=0"], "config error: data.global_batch must be positive, got 0"),
]


@pytest.mark.parametrize(("base", "bad", "line"), CONFIG_ERRORS,
                         ids=[" ".join(bad) for _, bad, _ in CONFIG_ERRORS])
def test_config_errors_are_one_line_and_touch_nothing(earlier_run, capsys, base, bad, line):
    before = snapshot(earlier_run)
    rc, out, err = cli(capsys, "train", *args(base, f"run_dir={earlier_run}", *bad))
    assert rc == 2
    assert err == line + "\n" and out == ""
    assert snapshot(earlier_run) == before


def test_eval_set_smaller_than_one_global_batch(tmp_path, capsys):
    """The eval file (10 rows) is shorter than one global batch (64): the first evaluation
    (step 0) stops the run with the file, the key and the fix; nothing was trained or saved."""
    train_tsv, eval_tsv = tmp_path / "train.tsv", tmp_path / "eval.tsv"
    assert main(["data", "synth-criteo", str(train_tsv), "--rows", "256"]) == 0
    assert main(["data", "synth-criteo", str(eval_tsv), "--rows", "10", "--seed", "1"]) == 0
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", *args(
        DLRM, f"run_dir={run}", "data.source=criteo", f"data.criteo.train_files=[{train_tsv}]",
        f"data.criteo.eval_files=[{eval_tsv}]", "data.criteo.vocab_sizes=[1000]"))
    assert rc == 1
    assert err == (
        f"error: the eval set (['{eval_tsv}']) holds fewer examples than one global batch "
        "(data.global_batch=64); give it at least that many rows or lower data.global_batch\n")
    assert "step 1/4" not in out
    assert not list((run / "checkpoints").iterdir())
    assert (run / "metrics.jsonl").read_text() == ""


def test_row_sharded_table_that_does_not_divide_is_refused(earlier_run):
    """On 8 devices, 500-row tables (row-sharded over data=8) are refused, naming the table,
    the shard count and embedding.pad_rows_to; the earlier run (1 device) is untouched."""
    before = snapshot(earlier_run)
    proc = run_cli(["train", "--devices", "8", *args(DLRM, f"run_dir={earlier_run}")], check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "config error: embedding.tables.C1: 500 rows do not divide over the 8 shards of mesh axes "
        "data (mesh.rules.table_rows); set embedding.pad_rows_to=8 (or a multiple) to pad the rows, "
        "or embedding.placement=replicated to keep a whole copy on every device")
    assert "Traceback" not in proc.stderr
    assert snapshot(earlier_run) == before


def test_column_sharded_table_whose_dim_does_not_divide_is_refused():
    proc = run_cli(["compile", "--devices", "8", *args(DLRM, "embedding.placement=column_sharded",
                                                       "embedding.dim=12", "model.bottom_mlp=[16,12]")], check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "config error: embedding.tables.C1: 12 columns do not divide over the 8 shards of mesh axes data "
        "(mesh.rules.table_cols); use a dim that 8 divides or another placement")


def test_padded_rows_train_and_the_placement_is_printed(tmp_path):
    """With embedding.pad_rows_to=8 the same config trains on 8 devices; the start of the run
    prints each row-sharded table: rows, shard axis and count, bytes per device, expected bytes
    sent per step."""
    run = tmp_path / "run"
    proc = run_cli(["train", "--devices", "8",
                    *args(DLRM, f"run_dir={run}", "embedding.pad_rows_to=8", "train.steps=2")])
    placement = "\n".join([
        # 64 ids: all-gather 4*64*7/8 + all-reduce 2*4*64*16*7/8 (lookup) + 64*(4+4*16)*7/8 (rows)
        "  embedding.tables.C1: 504 rows x 16 over data (8 shards of 63 rows), 3.94 KiB per device; "
        "sends ~10.94 KiB per step",
        "  embedding.tables.C2: 504 rows x 16 over data (8 shards of 63 rows), 3.94 KiB per device; "
        "sends ~10.94 KiB per step",
        "  embedding.tables.user: 104 rows x 16 over data (8 shards of 13 rows), 832 B per device; "
        "sends ~10.94 KiB per step",
    ])
    assert f":\n{placement}\n" in proc.stdout  # under its heading, before training starts
    assert proc.stdout.index(placement) < proc.stdout.index("step 1/2")
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1} over 8 cpu device(s)" in proc.stdout
    assert json.loads((run / "report.json").read_text())["steps"] == 2


def test_oov_ids_are_counted_and_warned_once(finished, tmp_path, capsys):
    """One 50-row table for features with 500 and 100 ids: OOV ids are counted in the train
    and eval records, shown on the eval line, and warned about once; a run without OOV ids
    counts zero and does not warn."""
    assert all(r["oov_ids"] == 0 for r in records(finished, "train") + records(finished, "eval"))

    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", *args(
        DLRM, f"run_dir={run}", "embedding.tables=[{name: shared, vocab_size: 50, features: [C1, C2, user]}]"))
    assert rc == 0, err
    train, evals = records(run, "train"), records(run, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["oov_ids"] > 0 and 0.01 < r["oov_rate"] < 1 for r in train)
    assert all(r["oov_ids"] > 0 and 0.01 < r["oov_rate"] < 1 for r in evals)
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    rate = 100 * evals[0]["oov_rate"]
    assert warnings == [
        f"warning: {rate:.1f}% of the eval lookups are out of vocabulary (embedding.oov=hash); "
        "raise the vocabulary sizes or check the ids"]
    assert f"| OOV {rate:.2f}%" in out
