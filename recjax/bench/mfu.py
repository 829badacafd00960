"""``recjax bench mfu CONFIG [CONFIG ...] [dotted.key=value ...]``: train-step speed and MFU.

For each config (a model preset, layered over ``configs/base.yaml``; trailing overrides
apply to all) on the current devices: the AOT-compiled train step runs ``--warmup`` times,
then ``--steps`` times, each timed with a device sync, on one fixed batch (the first of the
task's train stream, so the input pipeline is excluded). Reported per preset: median step
time (compile excluded), examples/s, model TFLOP/s per device with the analytic training FLOPs
(``3 x`` forward matmul FLOPs per example, :mod:`recjax.train.flops`) and MFU against the
dense bf16 peak of the device kind. Devices without a known peak (CPU) get MFU ``n/a``
unless ``--peak-tflops`` states the peak to assume (then recorded as assumed).

The JSON (default ``notebooks/results/mfu_<device kind>.json``) carries the device, library
versions and command (:func:`recjax.bench.timing.environment`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import time
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="+", metavar="CONFIG|key=value",
                        help="preset config files, then dotted.key=value overrides for all")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per preset")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compile")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s per device to assume when the device kind has none")
    parser.add_argument("--out", default=None, help="JSON path (default notebooks/results/mfu_<device>.json)")


def _split(items: list[str]) -> tuple[list[str], list[str]]:
    configs = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    if not configs:
        raise ValueError("give at least one preset config file before the key=value overrides")
    return configs, overrides


def bench_preset(path: str, overrides: list[str], steps: int, warmup: int,
                 peak: float | None) -> dict[str, Any]:
    """Compile, warm up and time one preset's train step; returns its result record."""
    import jax

    from recjax.config import load_config
    from recjax.train import flops as flops_lib
    from recjax.train.state import build_setup, describe_model
    from recjax.train.step import make_train_step

    cfg = load_config(path, overrides)
    setup = build_setup(cfg)
    info = describe_model(setup)
    state = setup.init_state()
    t0 = time.perf_counter()
    step = make_train_step(setup).lower(setup.abstract_state, setup.abstract_batch()).compile()
    compile_s = time.perf_counter() - t0
    # the first batch of the task's train stream, assembled as the trainer does
    local = next(setup.task.train_iterator(jax.process_index(), jax.process_count()))
    batch = setup.global_batch({k: local[k] for k in setup.task.abstract_batch()})
    for _ in range(max(warmup, 1)):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    g = cfg.data.global_batch
    flops_step_dev = info["train_flops_per_example"] * g / setup.n_devices
    mem = flops_lib.memory_report(step)
    return {
        "config": path,
        "model": cfg.model.name,
        "params_dense": int(info["params_dense"]),
        "params_active": int(info.get("params_active", info["params_dense"])),
        "params_embedding": int(info["params_embedding"]),
        "fwd_flops_per_example": float(info["fwd_flops_per_example"]),
        "train_flops_per_example": float(info["train_flops_per_example"]),
        "global_batch": g,
        "n_devices": setup.n_devices,
        "compute_dtype": cfg.train.compute_dtype,
        "compile_s": compile_s,
        "steps_timed": steps,
        "step_time_median_s": med,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "examples_per_s": g / med,
        "tflops_per_device": flops_step_dev / med / 1e12,
        "xla_flops_per_step_per_device": flops_lib.xla_flops(step),
        "mfu": flops_lib.mfu(flops_step_dev, med, peak),
        "memory_per_device_bytes": mem.get("total"),
    }


def run(args: argparse.Namespace) -> int:
    import jax

    from recjax.bench.timing import environment
    from recjax.train import flops as flops_lib

    configs, overrides = _split(args.items)
    env = environment()
    peak = flops_lib.peak_flops_per_device(env["device_kind"])
    peak_source = "table" if peak is not None else None
    if peak is None and args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "assumed (--peak-tflops)"
    if peak is None:
        print(f"no peak FLOP/s known for device kind {env['device_kind']!r}: MFU n/a "
              "(give --peak-tflops to assume one)")
    records = []
    for path in configs:
        try:
            rec = bench_preset(path, overrides, args.steps, args.warmup, peak)
        except Exception as e:  # one preset failing (e.g. out of memory) must not lose the rest
            rec = {"config": path, "error": f"{type(e).__name__}: {e}"[:500]}
            jax.clear_caches()
        records.append(rec)
        print(_line(rec), flush=True)
    out = pathlib.Path(args.out or f"notebooks/results/mfu_{_slug(env['device_kind'])}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "mfu", **env, "peak_flops_per_device": peak, "peak_source": peak_source,
           "overrides": overrides, "warmup": args.warmup, "results": records}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if any("error" in r for r in records) else 0


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "device"


def _line(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"{rec['config']}: FAILED {rec['error']}"
    mfu = f"{100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else "n/a"
    return (f"{rec['config']}: {rec['params_active'] / 1e6:.3f}M active params | step "
            f"{1e3 * rec['step_time_median_s']:.2f} ms | {rec['examples_per_s']:,.0f} ex/s | "
            f"{rec['tflops_per_device']:.3f} TFLOP/s/dev | MFU {mfu}")
