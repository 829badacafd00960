"""``recjax bench gpu-check --out DIR``: the whole GPU check in one command, one JSON per part.

Parts, each a subprocess with its own time limit (a part that fails or runs out of time is
recorded as such and the next one runs):

- ``tests``: ``pytest -m gpu`` (the GPU-marked tests: Pallas kernels against their references,
  Triton lowering) -> ``tests.json`` (counts and failed test ids, from a JUnit XML);
- ``attention``: ``recjax bench kernels --only attention`` at S in {1024, 4096, 16384},
  head_dim in {64, 128}: XLA softmax, cuDNN attention, linear attention (XLA, Pallas) and
  flash-linear-attention where importable -> ``kernels_attention.json``;
- ``moe``: ``recjax bench kernels --only moe``: the grouped GEMM (Pallas, ``ragged_dot``,
  tokamax where installed) against a dense matmul of the same active FLOPs -> ``kernels_moe.json``;
- ``gdpa``: ``recjax bench kernels --only gdpa`` at S in {1024, 4096}, head_dim 128, full and
  window 256: the GDPA kernels against GDPA's XLA path, XLA softmax and cuDNN attention ->
  ``kernels_gdpa.json``;
- ``mfu``: ``recjax bench mfu`` of TokenMixer-Large 100M, 500M and 1B in bf16 compute -> ``mfu.json``;
- ``summary.json``: each part's status and seconds, and the goals (linear attention fwd+bwd at
  S = 4096 at least 2x XLA softmax and 1.1x flash-linear-attention; grouped GEMM at least 80% of
  the dense matmul's TFLOP/s; TokenMixer-Large 1B at least 65% MFU) as met / not met / not
  measured, with the numbers they were judged on.

``--wheels DIR`` first installs every wheel in DIR without network (``pip install --no-index
--find-links DIR``): packages the GPU host lacks (tokamax and its dependencies,
flash-linear-attention) travel with the check. ``--dry`` runs every part at toy sizes on any
backend (CPU: the GPU-only rows and tests are skipped) to check the plumbing end to end; its
goals are "not measured". The full check is sized for under 8 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
MFU_PRESETS = ("tokenmixer_large_100m", "tokenmixer_large_500m", "tokenmixer_large_1b")
GOALS = {"attention_vs_softmax": 2.0, "attention_vs_fla": 1.1, "gmm_vs_dense": 0.8, "mfu_1b": 0.65}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for the per-part JSONs and summary.json")
    p.add_argument("--dry", action="store_true", help="toy sizes, any backend: checks the plumbing only")
    p.add_argument("--wheels", default=None, help="install every wheel in this folder first (no network)")
    p.add_argument("--parts", nargs="*", default=["tests", "attention", "moe", "gdpa", "mfu"],
                   choices=["tests", "attention", "moe", "gdpa", "mfu"])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "recjax.cli", *args]


def part_commands(out: pathlib.Path, dry: bool) -> dict[str, tuple[list[str], float]]:
    """part -> (command, time limit in seconds)."""
    junit = str(out / "tests.xml")
    if dry:
        return {
            "tests": ([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                       "tests/test_linear_attention.py", "tests/test_moe_kernels.py", "tests/test_gdpa.py",
                       f"--junitxml={junit}"], 600),
            "attention": (_cli("bench", "kernels", "--only", "attention", "--seqs", "64", "--head-dims", "16",
                               "--repeats", "1", "--out", str(out / "kernels_attention.json")), 600),
            "moe": (_cli("bench", "kernels", "--only", "moe", "--experts", "4", "--topk", "2", "--moe-tokens", "64",
                         "--repeats", "1", "--out", str(out / "kernels_moe.json")), 600),
            "gdpa": (_cli("bench", "kernels", "--only", "gdpa", "--seqs", "64", "--head-dims", "16", "--windows",
                          "0", "16", "--repeats", "1", "--out", str(out / "kernels_gdpa.json")), 600),
            "mfu": (_cli("bench", "mfu", "configs/models/tokenmixer_large_tiny.yaml", "data.global_batch=64",
                         "--steps", "2", "--warmup", "1", "--out", str(out / "mfu.json")), 600),
        }
    return {
        "tests": ([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                   f"--junitxml={junit}"], 90),
        "attention": (_cli("bench", "kernels", "--only", "attention", "--seqs", "1024", "4096", "16384",
                           "--head-dims", "64", "128", "--out", str(out / "kernels_attention.json")), 170),
        "moe": (_cli("bench", "kernels", "--only", "moe", "--experts", "8", "64", "--topk", "2",
                     "--out", str(out / "kernels_moe.json")), 80),
        "gdpa": (_cli("bench", "kernels", "--only", "gdpa", "--seqs", "1024", "4096", "--head-dims", "128",
                      "--windows", "0", "256", "--out", str(out / "kernels_gdpa.json")), 45),
        # bf16 compute: MFU is judged against the bf16 peak (float32 gave 8.7% for 1B on an H200)
        "mfu": (_cli("bench", "mfu", *(f"configs/models/{p}.yaml" for p in MFU_PRESETS),
                     "train.compute_dtype=bfloat16", "--steps", "10", "--out", str(out / "mfu.json")), 150),
    }


def install_wheels(folder: pathlib.Path) -> dict[str, Any]:
    wheels = sorted(str(w) for w in folder.glob("*.whl"))
    if not wheels:
        return {"status": "no wheels", "folder": str(folder)}
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder), *wheels],
                          capture_output=True, text=True)
    return {"status": "ok" if proc.returncode == 0 else "failed", "wheels": [pathlib.Path(w).name for w in wheels],
            "output_tail": (proc.stdout + proc.stderr)[-2000:]}


def run_part(name: str, cmd: list[str], limit: float, out: pathlib.Path) -> dict[str, Any]:
    print(f"[gpu-check] {name}: {' '.join(cmd[1:])} (limit {limit:.0f} s)", flush=True)
    t0 = time.perf_counter()
    log = out / f"{name}.log"
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    seconds = time.perf_counter() - t0
    print(f"[gpu-check] {name}: {status} in {seconds:.0f} s (log {log})", flush=True)
    return {"status": status, "seconds": seconds, "log": log.name}


def summarize_tests(junit: pathlib.Path) -> dict[str, Any]:
    if not junit.is_file():
        return {"error": "no JUnit XML written"}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed}


def _rows(path: pathlib.Path, key: str) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [r for r in json.loads(path.read_text()).get(key, []) if "median_ms" in r]


def _goal(value: float | None, target: float, basis: str) -> dict[str, Any]:
    if value is None:
        return {"status": "not measured", "target": target, "basis": basis}
    return {"status": "met" if value >= target else "not met", "value": value, "target": target, "basis": basis}


def judge_goals(out: pathlib.Path, dry: bool) -> dict[str, Any]:
    """The issue's goals from the part JSONs (every value is a ratio measured in this run)."""
    if dry:
        return {name: {"status": "not measured", "target": t, "basis": "dry run"} for name, t in GOALS.items()}
    att = _rows(out / "kernels_attention.json", "attention")

    def ms(op: str, impl: str, causal: bool) -> float | None:
        got = [r["median_ms"] for r in att if r["op"] == op and r["impl"] == impl and r["seq"] == 4096
               and r["head_dim"] == 64 and r["mode"] == "fwd+bwd" and r["causal"] == causal]
        return got[0] if got else None

    ratios_softmax, ratios_fla = [], []
    for causal in (False, True):
        pallas, fla = ms("linear_attention", "pallas", causal), ms("linear_attention", "fla", causal)
        softmax = ms("softmax_attention", "xla", causal)
        if pallas and softmax:
            ratios_softmax.append(softmax / pallas)
        if pallas and fla:
            ratios_fla.append(fla / pallas)
    moe = _rows(out / "kernels_moe.json", "moe")
    gmm_ratios = []
    for r in moe:
        if r["op"] == "grouped_matmul" and r["impl"] == "pallas":
            dense = [d for d in moe if d["op"] == "dense_matmul" and d["mode"] == r["mode"]
                     and d["experts"] == r["experts"] and d["topk"] == r["topk"]]
            if dense:
                gmm_ratios.append(r["tflops_per_s"] / dense[0]["tflops_per_s"])
    mfu = None
    mfu_path = out / "mfu.json"
    if mfu_path.is_file():
        for r in json.loads(mfu_path.read_text()).get("results", []):
            if "tokenmixer_large_1b" in str(r.get("config")) and isinstance(r.get("mfu"), (int, float)):
                mfu = r["mfu"]
    return {
        "attention_vs_softmax": _goal(min(ratios_softmax, default=None), GOALS["attention_vs_softmax"],
                                      "XLA softmax time / Pallas linear attention time, fwd+bwd, S=4096, D=64, "
                                      "worse of causal and not"),
        "attention_vs_fla": _goal(min(ratios_fla, default=None), GOALS["attention_vs_fla"],
                                  "flash-linear-attention time / Pallas time, same shapes"),
        "gmm_vs_dense": _goal(min(gmm_ratios, default=None), GOALS["gmm_vs_dense"],
                              "Pallas grouped GEMM TFLOP/s / dense matmul TFLOP/s at equal active FLOPs, worst case"),
        "mfu_1b": _goal(mfu, GOALS["mfu_1b"], "TokenMixer-Large 1B train-step MFU (bf16 peak)"),
    }


def run(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"dry": args.dry, "parts": {}}
    if args.wheels:
        summary["wheels"] = install_wheels(pathlib.Path(args.wheels))
        print(f"[gpu-check] wheels: {summary['wheels']['status']}", flush=True)
    commands = part_commands(out, args.dry)
    for name in args.parts:
        cmd, limit = commands[name]
        summary["parts"][name] = run_part(name, cmd, limit, out)
        if name == "tests":
            tests = summarize_tests(out / "tests.xml")
            (out / "tests.json").write_text(json.dumps(tests, indent=2))
            summary["parts"][name]["tests"] = tests
    summary["goals"] = judge_goals(out, args.dry)
    summary["seconds"] = time.perf_counter() - t0
    from recjax.bench.timing import environment

    summary.update(environment())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, goal in summary["goals"].items():
        value = f" ({goal['value']:.3g} vs {goal['target']})" if "value" in goal else ""
        print(f"[gpu-check] goal {name}: {goal['status']}{value}")
    print(f"[gpu-check] wrote {out}/summary.json in {summary['seconds']:.0f} s")
    failed = [n for n, p in summary["parts"].items() if p["status"] != "ok"]
    return 1 if failed else 0
