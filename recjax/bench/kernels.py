"""``recjax bench kernels``: time and memory of every kernel implementation, one JSON.

Runs :func:`recjax.bench.attention.bench_attention` (softmax attention vs linear attention:
quadratic reference, chunked XLA, Pallas on GPU) and :func:`recjax.bench.moe.bench_moe`
(dense masked einsum vs ``ragged_dot`` vs the Pallas grouped matmul on GPU, plus a dense
matmul of the same active FLOPs) and :func:`recjax.bench.gdpa.bench_gdpa` (GDPA's kernels vs its
XLA path and softmax attention, full and windowed), and writes every row with the device, versions and
command to ``--out`` (default ``notebooks/results/bench_kernels_<device>.json``).
Step times are medians of device-synchronised repeats after warm-up; they are ratios to
compare within one run, not absolute claims.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", choices=("attention", "moe", "gdpa"), default=None, help="run one group only")
    p.add_argument("--seqs", type=int, nargs="*", default=[128, 512, 2048, 8192])
    p.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    p.add_argument("--windows", type=int, nargs="*", default=[0, 64], help="GDPA windows (0: none)")
    p.add_argument("--experts", type=int, nargs="*", default=[8, 32, 64])
    p.add_argument("--topk", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--moe-tokens", type=int, default=None, help="tokens per MoE call (default: by device)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default: by device)")
    p.add_argument("--out", default=None, help="JSON path (default notebooks/results/bench_kernels_<device>.json)")


def run(args: argparse.Namespace) -> int:
    import jax

    from recjax.bench.attention import bench_attention
    from recjax.bench.gdpa import bench_gdpa
    from recjax.bench.moe import bench_moe
    from recjax.bench.timing import environment

    env = environment()
    on_gpu = env["platform"] == "gpu"
    t0 = time.perf_counter()
    result: dict = {**env, "attention": [], "moe": [], "gdpa": []}
    if args.only in (None, "attention"):
        print(f"attention: seqs {args.seqs}, head_dims {args.head_dims} on {env['device_kind']}", flush=True)
        result["attention"] = bench_attention(args.seqs, args.head_dims, repeats=args.repeats)
        _print_rows(result["attention"], ("op", "impl", "seq", "head_dim", "causal", "mode"))
    if args.only in (None, "moe"):
        tokens = args.moe_tokens or (16384 if on_gpu else 2048)
        repeats = args.repeats or (20 if on_gpu else 3)
        print(f"moe: experts {args.experts}, top-k {args.topk}, {tokens} tokens", flush=True)
        result["moe"] = bench_moe(args.experts, args.topk, tokens=tokens, repeats=repeats,
                                  d=512 if on_gpu else 64, f=1024 if on_gpu else 128,
                                  dtype="bfloat16" if on_gpu else "float32")
        _print_rows(result["moe"], ("op", "impl", "experts", "topk", "mode"))
    if args.only in (None, "gdpa"):
        windows = [w or None for w in args.windows]
        seqs = [s for s in args.seqs if s <= 4096 or on_gpu]  # its full softmax is quadratic
        print(f"gdpa: seqs {seqs}, head_dims {args.head_dims}, windows {windows}", flush=True)
        result["gdpa"] = bench_gdpa(seqs, args.head_dims, windows, repeats=args.repeats)
        _print_rows(result["gdpa"], ("op", "impl", "seq", "head_dim", "window", "mode"))
    result["wall_seconds"] = time.perf_counter() - t0
    device = jax.devices()[0].device_kind.replace(" ", "_").lower()
    out = pathlib.Path(args.out or f"notebooks/results/bench_kernels_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    counts = ", ".join(f"{len(result[k])} {k}" for k in ("attention", "moe", "gdpa"))
    print(f"wrote {counts} rows to {out}")
    return 0


def _print_rows(rows: list[dict], keys: tuple[str, ...]) -> None:
    for r in rows:
        label = " ".join(f"{k}={r[k]}" for k in keys if k in r)
        if r.get("skipped"):
            print(f"  {label}: skipped ({r['skipped']})")
        elif r.get("error"):
            print(f"  {label}: error ({r['error']})")
        else:
            mem = r.get("memory_bytes")
            mem_s = f", {mem / 2**20:.1f} MiB" if isinstance(mem, (int, float)) and mem >= 0 else ""
            print(f"  {label}: {r['median_ms']:.3f} ms{mem_s}", flush=True)
