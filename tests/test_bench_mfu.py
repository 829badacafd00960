"""`recjax bench mfu`: per-preset step time, throughput, TFLOP/s and MFU in a results JSON."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, tiny


def test_bench_mfu_writes_json_per_preset(tmp_path):
    out = tmp_path / "mfu.json"
    proc = run_cli(["bench", "mfu", "configs/models/dlrm.yaml", "configs/models/missing.yaml",
                    *tiny("data.global_batch=128"), "--steps", "3", "--warmup", "1",
                    "--peak-tflops", "0.5", "--out", str(out)], check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one preset failed, the other kept
    doc = json.loads(out.read_text())
    assert doc["device_kind"] == "cpu" and doc["versions"]["jax"] and "bench mfu" in doc["command"]
    assert doc["peak_flops_per_device"] == 0.5e12 and doc["peak_source"].startswith("assumed")
    ok, missing = doc["results"]
    assert "missing.yaml" in missing["config"] and "not found" in missing["error"]
    assert ok["global_batch"] == 128 and ok["steps_timed"] == 3
    assert ok["step_time_min_s"] <= ok["step_time_median_s"] <= ok["step_time_max_s"]
    assert ok["examples_per_s"] == pytest.approx(128 / ok["step_time_median_s"])
    assert ok["train_flops_per_example"] == 3 * ok["fwd_flops_per_example"] > 0
    expected = ok["train_flops_per_example"] * 128 / ok["step_time_median_s"] / 1e12
    assert ok["tflops_per_device"] == pytest.approx(expected)
    assert ok["mfu"] == pytest.approx(ok["tflops_per_device"] / 0.5)
    assert "MFU" in proc.stdout and "FAILED" in proc.stdout
