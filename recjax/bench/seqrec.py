"""``recjax bench seqrec``: memory and step time vs maximum sequence length of the sequential
recommenders' attention types, all on one backbone (:mod:`recjax.models.seqrec`).

Types (the presets' attention settings; everything else is shared)::

    sasrec      softmax attention,            causal         (objective next_item)
    bert4rec    softmax attention,            bidirectional  (objective cloze)
    linrec      ELU + L2 linear attention,    causal         (objective next_item)
    cotten4rec  cosine linear attention,      bidirectional  (objective cloze)

For each type and max length ``S`` the backbone is built (``--hidden``, ``--layers``,
``--heads``, ``--inner``; other model keys from trailing ``key=value`` overrides) and one
jitted training step is measured on a fixed batch of ``B`` full-length rows (``inputs
[B, S]``, ``lengths = S``; the cloze types get [MASK] at the last position, as at test
time): the loss and the gradients of every parameter, dropout on, no optimizer update. The
loss is the full-softmax cross-entropy over items ``1..num_items`` at the last valid
position only, ``-log softmax(item_logits(h[b, n_b - 1]))[target_b]``: the item softmax
costs ``B x hidden x num_items`` at every ``S``, so the attention's scaling shows. Softmax
attention keeps ``[B, heads, S, S]`` scores (memory ~ S^2), linear attention
``[B, heads, d_h, d_h]`` states and ``[B, S, hidden]`` activations (memory ~ S).

Per (type, S) row: XLA's compiled memory (arguments + outputs + temporaries, per device,
:func:`recjax.bench.timing.compiled_memory_bytes`); the allocator's peak where the device
reports one (GPU). That peak is process-wide, so with ``--isolate`` (the default there)
each type runs in a fresh process with its lengths in ascending order, and a row's peak is
marked ``allocator_peak_own`` when it rose during that row (else it is only an upper
bound). Then the median step time over ``--iters`` after ``--warmup``, sequences/s and
tokens/s. Rows whose compiled memory exceeds ``--memory-cap-gb`` are compiled but not run
(``--memory-cap-gb 0``: a compile-only memory table).

The JSON is rewritten after every row (``complete`` is false until the last one), so a run
stopped by a time limit keeps what it measured.

Summary: the ratio softmax / linear of compiled memory (and allocator peak and step time
where both rows ran) at the largest length both compiled, for the causal pair (sasrec /
linrec) and the bidirectional pair (bert4rec / cotten4rec); and per type the least-squares
slope of log memory (log step time) against log ``S`` over the largest ``--fit-last``
lengths: about 1 for linear attention, approaching 2 for softmax once the ``S x S`` scores
outweigh the parameters and the length-independent item softmax.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from recjax.errors import ConfigError

# name -> (attention, causal, objective) of configs/models/<name>.yaml (a test keeps them equal)
TYPES: dict[str, tuple[str, bool, str]] = {
    "sasrec": ("softmax", True, "next_item"),
    "bert4rec": ("softmax", False, "cloze"),
    "linrec": ("elu_l2", True, "next_item"),
    "cotten4rec": ("cosine", False, "cloze"),
}
PAIRS = (("sasrec", "linrec"), ("bert4rec", "cotten4rec"))  # softmax / linear, same causality
# model keys every row sets itself (its type's attention settings and the backbone flags)
SET_PER_ROW = ("name", "attention", "causal", "objective", "hidden", "num_layers", "num_heads", "inner")
LOSS = ("full-softmax cross-entropy over items 1..num_items at the last valid position of each "
        "row only (its cost does not depend on the max length)")
STEP = "loss and gradients of all parameters (forward + backward, dropout on), no optimizer update"
DEFAULTS = {"lengths": [50, 100, 200, 500, 1000, 2000], "batch": 16, "num_items": 1682,
            "hidden": 64, "layers": 2, "heads": 2, "inner": 256, "iters": 10, "warmup": 2}
QUICK = {"lengths": [32, 128, 256], "batch": 2, "num_items": 50, "hidden": 16, "layers": 1,
         "heads": 2, "inner": 64, "iters": 1, "warmup": 1}
# one H200 in about 5 minutes: ML-100k's sizes at GPU batch and lengths to 8k (softmax's 8k rows
# need 179 GiB, so they are compiled, not run; at 16k XLA's autotuner itself ran out of memory
# compiling them); bf16 compute via `train.compute_dtype=bfloat16`
GPU = {"lengths": [256, 1024, 4096, 8192], "batch": 64, "num_items": 1682, "hidden": 64,
       "layers": 2, "heads": 2, "inner": 256, "iters": 20, "warmup": 3}
_ROW_PREFIX = "SEQREC_ROW "  # a child process's result lines (--isolate)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides for every type, e.g. model.dropout=0.1 "
                        "train.compute_dtype=bfloat16 model.attention_impl=xla (after a "
                        "list option such as --lengths, put -- before them)")
    p.add_argument("--types", nargs="+", choices=tuple(TYPES), default=list(TYPES),
                   help="attention types to run (default all four)")
    p.add_argument("--lengths", type=int, nargs="+", help="maximum sequence lengths")
    p.add_argument("--batch", type=int, help="sequences per step")
    p.add_argument("--num-items", type=int, help="catalogue size (ML-100k: 1682)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--inner", type=int, help="FFN width")
    p.add_argument("--iters", type=int, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, help="untimed steps first (the first compiles)")
    p.add_argument("--quick", action="store_true",
                   help="tiny defaults for a smoke test (flags given still win): "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--gpu", action="store_true",
                   help="GPU-sized defaults (flags given still win; one command for a lent GPU: "
                        "recjax bench seqrec --gpu --out DIR/bench_seqrec_gpu.json): "
                        + ", ".join(f"{k}={v}" for k, v in GPU.items()))
    p.add_argument("--fit-last", type=int, default=3,
                   help="how many of the largest lengths the log-log fit uses")
    p.add_argument("--memory-cap-gb", type=float, default=None,
                   help="do not run rows whose compiled memory exceeds this (default: half the "
                        "host memory on CPU, the allocator's limit on GPU)")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="run each type in a fresh process so allocator peaks are per row "
                        "(auto: where the device reports an allocator peak, i.e. GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="JSON path (default notebooks/results/bench_seqrec_<device>.json)")
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)  # a child process's specs
    p.epilog = "defaults: " + ", ".join(f"{k}={v}" for k, v in DEFAULTS.items())


def run(args: argparse.Namespace) -> int:
    if args.rows is not None:  # a child process of --isolate: one type's rows, in order
        cache: dict = {}
        for spec in json.loads(args.rows):
            print(_ROW_PREFIX + json.dumps(measure_row(spec, cache)), flush=True)
        return 0
    if args.quick and args.gpu:
        raise ConfigError("recjax bench seqrec: choose one of --quick and --gpu")
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else GPU[key] if args.gpu else value)
    _validate(args)
    if args.isolate != "no" and "jax" not in sys.modules:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave it to the children
    import jax

    from recjax.bench.timing import allocator_peak_bytes, environment
    from recjax.train.run_dir import write_json

    env = environment()
    isolate = args.isolate == "yes" or (args.isolate == "auto" and allocator_peak_bytes() is not None)
    config = {
        "types": {t: dict(zip(("attention", "causal", "objective"), TYPES[t], strict=True))
                  for t in args.types},
        "lengths": sorted(set(args.lengths)), "batch": args.batch, "num_items": args.num_items,
        "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "inner": args.inner,
        "overrides": list(args.overrides), "iters": args.iters, "warmup": args.warmup,
        "seed": args.seed, "fit_last": args.fit_last,
        "memory_cap_bytes": _memory_cap(args.memory_cap_gb, jax), "isolate": isolate,
    }
    shared = {k: v for k, v in config.items() if k not in ("types", "lengths")}
    from recjax.models.seqrec import check_config

    # the resolved model config; bad overrides or sizes stop here, before any row runs
    cfg = row_config({**shared, "type": args.types[0], "max_len": 1})
    check_config(cfg.model)
    model = dataclasses.asdict(cfg.model)
    config["model"] = {k: v for k, v in model.items() if k not in SET_PER_ROW}
    config["compute_dtype"] = cfg.model.compute_dtype or cfg.train.compute_dtype
    print(f"seqrec attention scaling on {env['device_kind']}: batch {args.batch}, hidden "
          f"{args.hidden}, {args.layers} layers, {args.heads} heads, {args.num_items} items, "
          f"dropout {model['dropout']} (attention {model['attn_dropout']})", flush=True)
    print(_header(), flush=True)
    out = pathlib.Path(args.out or f"notebooks/results/bench_seqrec_{_slug(env['device_kind'])}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, cache = [], {}

    def write(complete: bool) -> dict:
        # after every row, so a run stopped by a time limit keeps the rows it measured
        summary = summarize(rows, args.fit_last)
        write_json(out, {"benchmark": "seqrec", **env, "loss": LOSS, "step": STEP, "config": config,
                         "complete": complete, "rows": rows, "summary": summary,
                         "wall_seconds": time.perf_counter() - t0})
        return summary

    for name in args.types:
        specs = [{**shared, "type": name, "max_len": s} for s in config["lengths"]]
        for row in _run_child(specs) if isolate else (measure_row(s, cache) for s in specs):
            rows.append(row)
            print(_format_row(row), flush=True)
            write(complete=False)
    for line in _format_summary(write(complete=True)):
        print(line)
    print(f"wrote {len(rows)} rows to {out}")
    return 1 if any("error" in r for r in rows) else 0


def _validate(args: argparse.Namespace) -> None:
    sizes = {"--lengths": min(args.lengths), "--batch": args.batch, "--num-items": args.num_items,
             "--hidden": args.hidden, "--layers": args.layers, "--heads": args.heads,
             "--inner": args.inner, "--iters": args.iters, "--fit-last": args.fit_last}
    bad = [f"{k} must be positive, got {v}" for k, v in sizes.items() if v < 1]
    fixed = {f"model.{k}" for k in SET_PER_ROW} | {"data.source", "data.sequences.max_len"}
    for o in args.overrides:
        if "=" not in o:
            bad.append(f"override {o!r} is not key=value")
        elif o.split("=", 1)[0].strip() in fixed:
            bad.append(f"override {o!r} sets a key that each row sets (use --types, --lengths, "
                       "--hidden, --layers, --heads, --inner)")
    if bad:
        raise ConfigError("recjax bench seqrec: " + "; ".join(bad))


def _memory_cap(cap_gb: float | None, jax: Any) -> int:
    if cap_gb is not None:
        return int(cap_gb * 2**30)
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit:
        return int(limit)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def row_config(spec: dict[str, Any]) -> Any:
    """The validated ``Config`` of one row: its type's attention, the backbone sizes, ``max_len``."""
    from recjax.config import load_config

    attention, causal, objective = TYPES[spec["type"]]
    return load_config(None, [
        "model.name=seqrec", "data.source=sequences", *spec["overrides"],
        f"model.attention={attention}", f"model.causal={str(causal).lower()}",
        f"model.objective={objective}", f"model.hidden={spec['hidden']}",
        f"model.num_layers={spec['layers']}", f"model.num_heads={spec['heads']}",
        f"model.inner={spec['inner']}", f"data.sequences.max_len={spec['max_len']}",
    ])


def measure_row(spec: dict[str, Any], cache: dict | None = None) -> dict[str, Any]:
    """Build the backbone of ``spec["type"]`` at ``spec["max_len"]`` and measure its train step.

    ``cache`` (any dict kept across calls) shares initial parameters between rows whose
    parameter trees have the same shapes (their values do not change time or memory).
    """
    import jax

    from recjax.bench.timing import allocator_peak_bytes, compiled_memory_bytes, median_seconds

    attention, causal, objective = TYPES[spec["type"]]
    b, s = spec["batch"], spec["max_len"]
    row: dict[str, Any] = {"type": spec["type"], "attention": attention, "causal": causal,
                           "objective": objective, "max_len": s, "batch": b}
    peak_before = allocator_peak_bytes()
    try:
        step, step_args, info = _train_step(spec, {} if cache is None else cache)
        row.update(info)
        t0 = time.perf_counter()
        row["compiled_memory_bytes"] = compiled_memory_bytes(step, *step_args)
        row["compile_s"] = time.perf_counter() - t0
        if row["compiled_memory_bytes"] > spec["memory_cap_bytes"]:
            row["skipped"] = (f"compiled memory {row['compiled_memory_bytes'] / 2**30:.2f} GiB exceeds "
                              f"the cap of {spec['memory_cap_bytes'] / 2**30:.2f} GiB (--memory-cap-gb)")
            return row
        seconds = median_seconds(step, *step_args, warmup=spec["warmup"], repeats=spec["iters"])
        row.update(median_step_s=seconds, sequences_per_s=b / seconds, tokens_per_s=b * s / seconds)
        peak = allocator_peak_bytes()
        if peak is not None:
            row.update(allocator_peak_bytes=peak, allocator_peak_own=peak > (peak_before or 0))
    except Exception as e:  # one failed row (e.g. out of memory) must not end the sweep
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        jax.clear_caches()
    return row


def _train_step(spec: dict[str, Any], cache: dict) -> tuple[Any, tuple[Any, Any], dict[str, Any]]:
    """The jitted ``(params, batch) -> (loss, grads)``, its arguments, and facts for the row."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from recjax.models.seqrec import SequenceInfo
    from recjax.tasks import get_task
    from recjax.tasks.seqrec import sequence_loss
    from recjax.train.state import abstract_model

    b, s, n_items = spec["batch"], spec["max_len"], spec["num_items"]
    cfg = row_config(spec)
    # the trainer's task and model build, over a catalogue of the row's size (no data loaded)
    task = get_task(cfg)
    task.data_info = SequenceInfo(n_items, s)
    graphdef, abstract = nnx.split(abstract_model(cfg, task))
    shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), nnx.to_pure_dict(abstract))
    key = (spec["seed"], json.dumps(shapes, sort_keys=True))
    if key not in cache:  # initialising costs a compile; types with the same shapes share it
        init = jax.jit(lambda k: nnx.to_pure_dict(nnx.state(task.build_model(nnx.Rngs(params=k)))))
        cache[key] = init(jax.random.key(spec["seed"]))
    params = cache[key]

    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        # the trainer's loss; targets only at the last position (what prefix rows train on)
        model = nnx.merge(graphdef, params)
        return sequence_loss(model, batch, batch["rng"], cfg.model, last_only=True)[0]

    k_in, k_target, k_drop = jax.random.split(jax.random.key(spec["seed"] + 1), 3)
    inputs = jax.random.randint(k_in, (b, s), 1, n_items + 1, jnp.int32)
    if cfg.model.objective == "cloze":
        inputs = inputs.at[:, -1].set(n_items + 1)  # the appended [MASK] that the loss reads
    last_targets = jax.random.randint(k_target, (b,), 1, n_items + 1, jnp.int32)
    batch = {"inputs": inputs, "lengths": jnp.full((b,), s, jnp.int32), "rng": k_drop,
             "targets": jnp.zeros((b, s), jnp.int32).at[:, -1].set(last_targets)}
    impl = cfg.model.attention_impl
    if cfg.model.attention == "softmax":
        impl = "einsum (B x heads x S x S scores)"
    elif impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    info = {"attention_impl": impl, "params": int(sum(x.size for x in jax.tree.leaves(params)))}
    return jax.jit(jax.value_and_grad(loss_fn)), (params, batch), info


def _run_child(specs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``measure_row`` of each spec, in order, in a fresh interpreter (a fresh allocator peak)."""
    cmd = [sys.executable, "-m", "recjax.cli", "bench", "seqrec", "--rows", json.dumps(specs)]
    done, other = 0, []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            if line.startswith(_ROW_PREFIX):
                done += 1
                yield json.loads(line[len(_ROW_PREFIX):])
            else:
                other = (other + [line.rstrip()])[-20:]
    for spec in specs[done:]:  # the process died before these rows
        attention, causal, objective = TYPES[spec["type"]]
        yield {"type": spec["type"], "attention": attention, "causal": causal,
               "objective": objective, "max_len": spec["max_len"], "batch": spec["batch"],
               "error": f"row process exited with status {proc.returncode}: "
                        + " | ".join(other)[-400:]}


def summarize(rows: list[dict[str, Any]], fit_last: int) -> dict[str, Any]:
    """Softmax / linear ratios at the largest length both have, and log-log slopes per type.

    Compiled memory counts for every compiled row (also those the memory cap kept from
    running); step time only where the row ran; the allocator peak only where it was the
    row's own. A ratio or slope is left out where one of its values is missing.
    """
    sized = {(r["type"], r["max_len"]): r for r in rows if r.get("compiled_memory_bytes", -1) > 0}

    def measures(r: dict[str, Any]) -> dict[str, float | None]:
        return {"compiled_memory": r["compiled_memory_bytes"], "step_time": r.get("median_step_s"),
                "allocator_peak": r.get("allocator_peak_bytes") if r.get("allocator_peak_own") else None}

    ratios = {}
    for soft, lin in PAIRS:
        common = sorted({s for t, s in sized if t == soft} & {s for t, s in sized if t == lin})
        if common:
            a, c = measures(sized[(soft, common[-1])]), measures(sized[(lin, common[-1])])
            ratios[f"{soft}/{lin}"] = {"max_len": common[-1],
                                       **{k: a[k] / c[k] for k in a if a[k] and c[k]}}
    slopes = {}
    for name in dict.fromkeys(r["type"] for r in rows):
        fit = sorted((s, r) for (t, s), r in sized.items() if t == name)[-fit_last:]
        if len(fit) < 2:
            continue
        lengths = [s for s, _ in fit]
        slopes[name] = {"max_lens": lengths}
        for k in ("compiled_memory", "step_time", "allocator_peak"):
            ys = [measures(r)[k] for _, r in fit]
            if all(ys):
                slopes[name][k] = loglog_slope(lengths, ys)
    return {"ratio_softmax_over_linear": ratios, "slope_vs_max_len": slopes}


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def _header() -> str:
    return (f"{'type':>10} {'attention':>9} {'causal':>6} {'max_len':>7} {'compiled MiB':>12} "
            f"{'peak MiB':>9} {'step ms':>9} {'seq/s':>9}")


def _format_row(r: dict[str, Any]) -> str:
    head = f"{r['type']:>10} {r['attention']:>9} {str(r['causal']):>6} {r['max_len']:>7}"
    if "error" in r:
        return f"{head}  error: {r['error']}"
    mem = f"{r['compiled_memory_bytes'] / 2**20:>12.1f}"
    if "skipped" in r:
        return f"{head} {mem}  skipped: {r['skipped']}"
    peak = r.get("allocator_peak_bytes")
    peak_s = "n/a" if peak is None else ("" if r["allocator_peak_own"] else "<=") + f"{peak / 2**20:.1f}"
    return f"{head} {mem} {peak_s:>9} {1e3 * r['median_step_s']:>9.2f} {r['sequences_per_s']:>9.1f}"


def _format_summary(summary: dict[str, Any]) -> list[str]:
    names = {"compiled_memory": "compiled memory", "allocator_peak": "allocator peak",
             "step_time": "step time"}
    lines = []
    for pair, e in summary["ratio_softmax_over_linear"].items():
        parts = [f"{label} x{e[k]:.2f}" for k, label in names.items() if k in e]
        lines.append(f"{pair} at max_len {e['max_len']}: " + ", ".join(parts))
    for name, e in summary["slope_vs_max_len"].items():
        parts = [f"{label} {e[k]:.2f}" for k, label in names.items() if k in e]
        lines.append(f"{name}: log-log slope over max_len {e['max_lens']}: " + ", ".join(parts))
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "device"
