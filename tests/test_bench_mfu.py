"""`recjax bench mfu` and `bench kunlun`: per-preset step time, throughput, TFLOP/s and MFU, and
Kunlun's savings per component, in results JSON."""

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


# Kunlun with one event tower of 2 layers (a sliding-window layer after a CompSkip one): both
# components are there to switch off, and each variant compiles in about half the preset's time
KUNLUN_ONE_TOWER = [
    "data.global_batch=32", "data.synthetic.events=16", "data.synthetic.capacity_width=64",
    "model.personalization=false", "model.global_experts=1",
    "model.towers=[{width: 16, heads: 2, tokens: 2, layers: 2, window: 4, length: 16}]",
]


def test_bench_kunlun_compares_the_model_with_its_components_switched_off(tmp_path):
    out = tmp_path / "kunlun.json"
    run_cli(["bench", "kunlun", "configs/experiments/kunlun_events.yaml", *KUNLUN_ONE_TOWER,
             "--variants", "no_window_no_compskip", "--steps", "2", "--warmup", "1", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "kunlun_components" and "bench kunlun" in doc["command"]
    full, off = doc["results"]
    assert (full["variant"], off["variant"]) == ("kunlun", "no_window_no_compskip")
    for rec in (full, off):
        assert sum(rec["component_flops"].values()) == pytest.approx(rec["fwd_flops_per_example"])
    for part in ("interaction", "attention"):  # CompSkip halves the first, the window shrinks the second
        assert off["component_flops"][part] > full["component_flops"][part]
    assert off["flops_saving"] == pytest.approx(1 - full["fwd_flops_per_example"] / off["fwd_flops_per_example"])
    assert off["flops_saving"] > 0
    assert off["speedup"] == pytest.approx(off["step_time_median_s"] / full["step_time_median_s"])
    assert off["step_time_saving"] == pytest.approx(1 - 1 / off["speedup"])
