"""The one-command GPU check: end to end in its dry mode on CPU, and its goal verdicts."""

from __future__ import annotations

import json
import pathlib

from tests.conftest import run_cli


def test_dry_gpu_check_writes_every_part(tmp_path: pathlib.Path):
    """`recjax bench gpu-check --dry` on CPU runs every part at toy sizes: the GPU-marked tests
    are collected and skipped, the kernel benchmarks time the CPU implementations, the MFU bench
    times the tiny preset, and summary.json marks every goal "not measured"."""
    out = tmp_path / "check"
    proc = run_cli(["bench", "gpu-check", "--dry", "--out", str(out)])
    assert "wrote" in proc.stdout, proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {n: p["status"] for n, p in summary["parts"].items()} == dict.fromkeys(
        ["tests", "attention", "moe", "gdpa", "mfu"], "ok")
    assert {g["status"] for g in summary["goals"].values()} == {"not measured"}
    tests = json.loads((out / "tests.json").read_text())
    assert tests["skipped"] > 0 and tests["failed"] == 0
    attention = json.loads((out / "kernels_attention.json").read_text())["attention"]
    assert {(r["op"], r["impl"]) for r in attention if r["median_ms"]} == {
        ("softmax_attention", "xla"), ("linear_attention", "xla"), ("linear_attention", "reference")}
    moe = json.loads((out / "kernels_moe.json").read_text())["moe"]
    assert {r["op"] for r in moe if "median_ms" in r} == {"grouped_matmul", "dense_matmul", "moe_ffn"}
    gdpa = json.loads((out / "kernels_gdpa.json").read_text())["gdpa"]
    assert {(r["op"], r["impl"], r["window"]) for r in gdpa if r["median_ms"]} == {
        (op, impl, w) for op, impl in (("softmax_attention", "xla"), ("gdpa", "xla")) for w in (None, 16)}
    mfu = json.loads((out / "mfu.json").read_text())["results"]
    assert mfu[0]["model"] == "tokenmixer_large" and mfu[0]["examples_per_s"] > 0


def test_goals_are_judged_from_the_part_jsons(tmp_path: pathlib.Path):
    from recjax.bench.gpu_check import judge_goals

    def att(op, impl, causal, ms):
        return {"op": op, "impl": impl, "seq": 4096, "head_dim": 64, "mode": "fwd+bwd", "causal": causal, "median_ms": ms}

    rows = [att("linear_attention", "pallas", c, 1.0) for c in (False, True)]
    rows += [att("softmax_attention", "xla", False, 3.0), att("softmax_attention", "xla", True, 1.5)]
    rows += [att("linear_attention", "fla", True, 1.2)]
    (tmp_path / "kernels_attention.json").write_text(json.dumps({"attention": rows}))
    moe = [{"op": op, "impl": impl, "mode": "fwd+bwd", "experts": 8, "topk": 2, "median_ms": 1.0, "tflops_per_s": t}
           for op, impl, t in (("grouped_matmul", "pallas", 450.0), ("dense_matmul", "xla", 500.0))]
    (tmp_path / "kernels_moe.json").write_text(json.dumps({"moe": moe}))
    (tmp_path / "mfu.json").write_text(json.dumps({"results": [{"config": "configs/models/tokenmixer_large_1b.yaml",
                                                                "mfu": 0.6}]}))
    goals = judge_goals(tmp_path, dry=False)
    assert goals["attention_vs_softmax"]["status"] == "not met" and goals["attention_vs_softmax"]["value"] == 1.5
    assert goals["attention_vs_fla"]["status"] == "met" and abs(goals["attention_vs_fla"]["value"] - 1.2) < 1e-12
    assert goals["gmm_vs_dense"]["status"] == "met" and goals["gmm_vs_dense"]["value"] == 0.9
    assert goals["mfu_1b"] == {"status": "not met", "value": 0.6, "target": 0.65,
                               "basis": goals["mfu_1b"]["basis"]}


def test_full_mfu_part_computes_in_bf16(tmp_path: pathlib.Path):
    """MFU is judged against the bf16 peak, so the full check's MFU part runs bf16 compute."""
    from recjax.bench.gpu_check import MFU_PRESETS, part_commands

    cmd, _ = part_commands(tmp_path, dry=False)["mfu"]
    assert "train.compute_dtype=bfloat16" in cmd
    assert [c for c in cmd if c.endswith(".yaml")] == [f"configs/models/{p}.yaml" for p in MFU_PRESETS]
