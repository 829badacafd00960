"""``recjax bench embeddings``: what a train step costs as embedding tables grow, and what
their lookups exchange between devices.

Three parts, one JSON (default ``notebooks/results/embeddings_<device kind>.json``, with the
device, versions and command):

- ``step`` (on the devices present): DLRM (``configs/models/dlrm.yaml``) with one big table
  of ``R`` rows (``--rows``) and seven 1,000-row tables, ``--batch`` examples, dim ``--dim``,
  row-wise Adagrad, updated ``sparse`` or ``dense``, with the big table's ids uniform over its
  rows or Zipf(``--zipf``) over them. Per case: the median step time over ``--steps`` timed
  steps on one fixed batch (compile excluded) and the compiled step's temporaries
  (``memory_analysis``). The ratio of each case's step time to the smallest case of the same
  update and ids is reported (the smallest case runs once untimed first, to warm up); dense cases above ``--dense-max-rows`` are skipped (its
  gradient and optimizer passes are table-sized: the JSON records why).
- ``exchange`` (AOT compiles on ``--exchange-devices`` virtual CPU devices in subprocesses,
  ``recjax compile --json``): ``configs/experiments/dcnv2_100m_compile.yaml`` per device count
  and global batch, with the GSPMD lookup, the exact all-to-all and the all-to-all at capacity
  factor 2; per case the bytes each device sends per step, read from the compiled HLO
  (:mod:`recjax.train.collectives`), and the compiled temporaries.

- ``processes``: ``recjax train`` of DLRM with a 4M-row table (sparse updates, all-to-all
  lookups, batch 4,096) for ``--process-steps`` steps on 8 virtual devices of one process and
  on 2 processes x 4 devices (``recjax launch local``, gloo collectives); per topology the
  examples/s of ``report.json`` and the last train loss (the same on both).

The numbers are ratios measured in one run on one machine; absolute times on a shared CPU
vary run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

EXCHANGES = {"gspmd": ["embedding.exchange=gspmd"],
             "all_to_all": ["embedding.exchange=all_to_all", "embedding.exchange_capacity=0"],
             "all_to_all_f2": ["embedding.exchange=all_to_all", "embedding.exchange_capacity=2"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", nargs="+", default=["step", "exchange", "processes"],
                        choices=["step", "exchange", "processes"])
    parser.add_argument("--rows", nargs="+", type=int, default=[10_000, 100_000, 1_000_000, 4_000_000, 30_000_000])
    parser.add_argument("--updates", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    parser.add_argument("--ids", nargs="+", default=["zipf", "uniform"], choices=["zipf", "uniform"])
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the 'zipf' ids")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case")
    parser.add_argument("--dense-max-rows", type=int, default=4_000_000,
                        help="skip dense-update cases with more rows (table-sized passes)")
    parser.add_argument("--exchange-devices", nargs="+", type=int, default=[8, 64], help="exchange: virtual devices")
    parser.add_argument("--global-batches", nargs="+", type=int, default=[4096, 16384],
                        help="exchange: global batch sizes")
    parser.add_argument("--process-steps", type=int, default=200, help="processes: train steps per topology")
    parser.add_argument("--out", default=None, help="JSON path (default notebooks/results/embeddings_<device>.json)")


def _ids(rng: np.random.Generator, kind: str, shape: tuple[int, ...], rows: int, s: float) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, rows, shape)
    return (rng.zipf(s, shape) - 1) % rows


def step_case(rows: int, update: str, ids: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median step time and compiled temporaries of one (rows, update, ids) case."""
    import jax

    from recjax.config import load_config
    from recjax.train.state import build_setup
    from recjax.train.step import make_train_step

    cfg = load_config("configs/models/dlrm.yaml", [
        "data.synthetic.num_sparse=8", f"data.synthetic.vocab_sizes=[{rows},1000,1000,1000,1000,1000,1000,1000]",
        "data.synthetic.user_id=false", f"data.global_batch={args.batch}", f"embedding.dim={args.dim}",
        "optim.embedding.name=rowwise_adagrad", f"optim.embedding.update={update}", "train.steps=1000",
        "train.compute_dtype=float32"])
    setup = build_setup(cfg)
    step = make_train_step(setup)
    ab = setup.abstract_batch()
    rng = np.random.default_rng(0)
    host = {}
    for k, a in ab.items():
        if k == "sparse":
            x = rng.integers(0, 1000, a.shape)
            x[:, 0] = _ids(rng, ids, a.shape[:1], rows, args.zipf)
            host[k] = x.astype(a.dtype)
        elif k == "label":
            host[k] = (rng.random(a.shape) < 0.25).astype(a.dtype)
        else:
            host[k] = rng.normal(size=a.shape).astype(a.dtype)
    batch = dict(zip(ab, setup.replicated_batch([host[k] for k in ab]), strict=True))
    t0 = time.perf_counter()
    compiled = step.lower(setup.abstract_state, setup.abstract_batch()).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state = setup.init_state()
    for _ in range(3):
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    unique = int(len(np.unique(host["sparse"][:, 0])))
    return {"rows": rows, "update": update, "ids": ids, "batch": args.batch, "dim": args.dim,
            "distinct_big_table_ids": unique, "step_time_s": statistics.median(times),
            "temp_bytes": int(mem.temp_size_in_bytes) if mem else None,
            "table_bytes": rows * args.dim * 4, "compile_s": compile_s, "loss": float(m["loss"])}


def run_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    # the first case of a process pays one-time costs (backend start-up, first compile): run
    # the smallest case once untimed so it does not inflate the baseline of the ratios
    step_case(min(args.rows), args.updates[0], args.ids[0], args)
    out = []
    for ids in args.ids:
        for update in args.updates:
            for rows in args.rows:
                if update == "dense" and rows > args.dense_max_rows:
                    out.append({"rows": rows, "update": update, "ids": ids,
                                "skipped": f"dense update over --dense-max-rows={args.dense_max_rows}"})
                    print(f"step  {ids:7s} {update:6s} {rows:>11,} rows: skipped (dense over --dense-max-rows)", flush=True)
                    continue
                r = step_case(rows, update, ids, args)
                out.append(r)
                print(f"step  {ids:7s} {update:6s} {rows:>11,} rows: {1e3 * r['step_time_s']:8.2f} ms, "
                      f"temporaries {r['temp_bytes'] / 2**20:9.1f} MiB", flush=True)
    base = {(r["update"], r["ids"]): r["step_time_s"] for r in out if r.get("rows") == min(args.rows) and "step_time_s" in r}
    for r in out:
        if "step_time_s" in r and (r["update"], r["ids"]) in base:
            r["time_over_smallest"] = r["step_time_s"] / base[r["update"], r["ids"]]
    return out


def exchange_case(devices: int, global_batch: int, exchange: str) -> dict[str, Any]:
    mesh = {8: ["mesh.data=8", "mesh.fsdp=1"], 64: ["mesh.data=8", "mesh.fsdp=8"]}.get(devices, [f"mesh.data={devices}", "mesh.fsdp=1"])
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "recjax.cli", "compile", "--devices", str(devices), "--config",
               "configs/experiments/dcnv2_100m_compile.yaml", f"data.global_batch={global_batch}", *mesh,
               *EXCHANGES[exchange], "--json", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if proc.returncode != 0:
            return {"devices": devices, "global_batch": global_batch, "exchange": exchange,
                    "error": proc.stderr[-2000:]}
        rep = json.loads(path.read_text())
    col = rep["collectives_per_device"]
    return {"devices": devices, "global_batch": global_batch, "exchange": exchange,
            "bytes_sent_per_device": col["bytes_sent_per_device"], "by_kind": col["by_kind"],
            "temp_bytes": rep["memory_per_device"].get("temp"), "compile_s": rep["compile_seconds"]}


def run_exchange(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for devices in args.exchange_devices:
        for gb in args.global_batches:
            for exchange in EXCHANGES:
                r = exchange_case(devices, gb, exchange)
                out.append(r)
                shown = (f"{r['bytes_sent_per_device'] / 2**20:9.2f} MiB sent per device" if "error" not in r
                         else "error: " + r["error"].strip().splitlines()[-1])
                print(f"exchange {devices:3d} devices, batch {gb:6d}, {exchange:13s}: {shown}", flush=True)
    return out


PROCESS_CONFIG = ["--config", "configs/models/dlrm.yaml", "data.synthetic.num_sparse=8",
                  "data.synthetic.vocab_sizes=[4000000,1000,1000,1000,1000,1000,1000,1000]",
                  "data.global_batch=4096", "embedding.pad_rows_to=8", "embedding.exchange=all_to_all",
                  "optim.embedding.update=sparse", "train.eval_every=0", "train.checkpoint_every=0",
                  "train.tensorboard=false", "data.eval_batches=1", "mesh.data=8"]


def process_case(topology: str, steps: int, timeout_s: float = 900) -> dict[str, Any]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        args = ["train", *PROCESS_CONFIG, f"train.steps={steps}", f"train.log_every={steps}", f"run_dir={tmp}/run"]
        if topology == "1x8":
            cmd = [sys.executable, "-m", "recjax.cli", *args[:1], "--devices", "8", *args[1:]]
        else:
            cmd = [sys.executable, "-m", "recjax.cli", "launch", "local", "-n", "2", "-d", "4", "--", "recjax", *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"topology": topology, "error": f"no result within {timeout_s} s"}
        if proc.returncode != 0:
            return {"topology": topology, "error": (proc.stdout + proc.stderr)[-2000:]}
        report = json.loads((pathlib.Path(tmp) / "run" / "report.json").read_text())
        losses = [json.loads(line) for line in (pathlib.Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in losses if m.get("split") == "train"][-1]
    return {"topology": topology, "steps": steps, "examples_per_s": report["train_examples_per_s"],
            "last_train_loss": last["loss"]}


def run_processes(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for topology in ("1x8", "2x4"):
        r = process_case(topology, args.process_steps)
        out.append(r)
        shown = (f"{r['examples_per_s']:,.0f} examples/s, last loss {r['last_train_loss']:.5f}" if "error" not in r
                 else "error: " + r["error"].strip().splitlines()[-1])
        print(f"processes {topology}: {shown}", flush=True)
    return out


def run(args: argparse.Namespace) -> int:
    import jax

    from recjax.bench.timing import environment

    result: dict[str, Any] = {**environment(), "args": {
        k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, type(None)))}}
    if "step" in args.parts:
        result["step"] = run_steps(args)
    if "exchange" in args.parts:
        result["exchange"] = run_exchange(args)
    if "processes" in args.parts:
        result["processes"] = run_processes(args)
    kind = jax.devices()[0].device_kind.replace(" ", "_").lower()
    out = pathlib.Path(args.out or f"notebooks/results/embeddings_{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
