"""``recjax compile --devices 64`` and ``recjax params`` on a sequential (seqrec) config: the
real train step compiled for 64 virtual devices with per-device memory, the item table split
64 ways over ``data`` (configs/tasks/seqrec.yaml pads its rows to a multiple of 64), and the
same placement and state figures from ``recjax params`` without compiling."""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.conftest import run_cli

SEQREC = ["--config", "configs/experiments/seqrec_synthetic.yaml",
          "data.sequences.synthetic.num_users=200", "data.sequences.synthetic.num_items=100"]
ROWS, HIDDEN = 128, 32  # 100 items + pad + [MASK], padded to a multiple of 64; model.hidden


def numbers(stdout: str) -> dict[str, float]:
    return {line.split(":")[0].strip(): float(line.split(":")[1].replace(",", ""))
            for line in stdout.splitlines()}


def test_compile_64_devices_reports_per_device_memory_and_the_table_split(tmp_path: pathlib.Path):
    out_json = tmp_path / "compile.json"
    proc = run_cli(["compile", "--devices", "64", *SEQREC, "--json", str(out_json)])
    assert "item_embedding: 128 rows x 32 over data (64 shards of 2 rows)" in proc.stdout, proc.stdout
    assert "per-device memory (XLA)" in proc.stdout and "train state per device" in proc.stdout
    r = json.loads(out_json.read_text())
    assert r["task"] == "seqrec" and r["n_devices"] == 64 and r["mesh"]["data"] == 64
    assert r["params_embedding"] == ROWS * HIDDEN and r["params_dense"] > 0
    assert r["memory_per_device"]["total"] > 0 and r["memory_per_device"]["temp"] > 0
    (table,) = r["tables"]
    assert table == {"name": "item_embedding", "rows": ROWS, "dim": HIDDEN, "row_axes": ["data"],
                     "shards": 64, "col_axes": [], "rows_per_device": 2, "cols_per_device": HIDDEN,
                     "bytes_per_device": 2 * HIDDEN * 4}
    state = r["state_per_device"]
    assert 0 < state["total"] < state["unsharded_total"]
    assert state["total"] == state["params"] + state["opt_state"] + 4 * 4  # + step, rng, nonfinite_step
    est = r["analytic_memory_per_device"]
    assert est["activations"] > 0 and est["state"] == state["total"]
    assert 0.3 < r["xla_over_analytic_memory"] < 3
    assert r["xla_flops_per_device"] > 0 and r["analytic_train_flops_per_device"] > 0


def test_params_counts_flops_per_sequence_and_per_device_state():
    one = numbers(run_cli(["params", *SEQREC]).stdout)
    assert one["params_embedding"] == ROWS * HIDDEN and one["params_dense"] > 0
    assert one["params_total"] == one["params_dense"] + one["params_embedding"]
    assert one["train_flops_per_sequence"] == 3 * one["fwd_flops_per_sequence"] > 0
    assert one["item_embedding.rows"] == ROWS and one["item_embedding.shards"] == 1
    assert one["devices"] == 1 and one["state_bytes_per_device"] == one["state_bytes_unsharded"]
    assert one["activation_bytes_per_sequence"] > 0
    assert one["activation_bytes_per_device"] == 128 * one["activation_bytes_per_sequence"]  # global batch 128

    many = numbers(run_cli(["params", "--devices", "64", *SEQREC]).stdout)
    assert many["item_embedding.shards"] == 64 and many["devices"] == 64
    assert many["table_bytes_per_device"] == ROWS * HIDDEN * 4 / 64
    assert many["state_bytes_unsharded"] == one["state_bytes_unsharded"]
    assert many["state_bytes_per_device"] < one["state_bytes_per_device"]
    assert many["activation_bytes_per_device"] == 2 * one["activation_bytes_per_sequence"]
    assert 0 < many["memory_estimate_per_device"] < one["memory_estimate_per_device"]


@pytest.mark.parametrize("command", ["params", "compile"])
def test_unpadded_table_that_does_not_divide_is_refused(command: str):
    proc = run_cli([command, "--devices", "64", *SEQREC, "embedding.pad_rows_to=1"], check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "config error" in proc.stderr and "pad_rows_to" in proc.stderr, proc.stderr
