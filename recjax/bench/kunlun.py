"""``recjax bench kunlun [CONFIG] [dotted.key=value ...]``: what each Kunlun component saves.

The train step of a Kunlun config (default ``configs/experiments/kunlun_bench.yaml``: 256-event
sequences, four layers) is timed as ``recjax bench mfu`` times a preset
(:func:`recjax.bench.mfu.bench_preset`: compiled once, fixed batch, median of ``--steps``),
once as configured and once per variant that puts components back to their baselines:

- ``no_window``: ``sliding_window=false`` (every tower attends over all its events);
- ``no_compskip``: ``compskip=false`` (every layer runs interaction, attention and pooling);
- ``no_window_no_compskip``: both;
- ``pma``, ``pffn``: the same-size swaps of pooling and interaction;
- ``no_personalization`` (not run by default): one tower over all events, sized as the first
  tower, so its FLOPs say how that tower was sized rather than what personalization saves.

Each row has the analytic forward FLOPs per example by component
(:func:`recjax.models.kunlun.component_flops`) and the savings of the configured model against
the variant: analytic ``1 - F_kunlun / F_variant`` and measured ``1 - t_kunlun / t_variant``.
The JSON (default ``notebooks/results/bench_kunlun_<device>.json``) carries the device,
versions and command.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

DEFAULT_CONFIG = "configs/experiments/kunlun_bench.yaml"
VARIANTS: dict[str, list[str]] = {
    "no_window": ["model.sliding_window=false"],
    "no_compskip": ["model.compskip=false"],
    "no_window_no_compskip": ["model.sliding_window=false", "model.compskip=false"],
    "pma": ["model.pooling=pma"],
    "pffn": ["model.interaction=pffn"],
    "no_personalization": ["model.personalization=false"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="CONFIG|key=value",
                        help=f"a Kunlun config (default {DEFAULT_CONFIG}), then dotted.key=value overrides")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "no_personalization"),
                        help=f"comma-separated variants to compare with (of {', '.join(VARIANTS)})")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    parser.add_argument("--out", default=None, help="JSON path (default notebooks/results/bench_kunlun_<device>.json)")


def savings(full: dict[str, Any], variant: dict[str, Any]) -> dict[str, float]:
    """The configured model's savings against ``variant``: analytic FLOPs and step time."""
    return {"flops_saving": 1.0 - full["fwd_flops_per_example"] / variant["fwd_flops_per_example"],
            "step_time_saving": 1.0 - full["step_time_median_s"] / variant["step_time_median_s"],
            "speedup": variant["step_time_median_s"] / full["step_time_median_s"]}


def run(args: argparse.Namespace) -> int:
    from recjax.bench.mfu import _slug, _split, bench_preset
    from recjax.bench.timing import environment
    from recjax.config import load_config
    from recjax.data.spec import feature_spec
    from recjax.models.kunlun import component_flops

    has_config = any("=" not in i for i in args.items)
    configs, overrides = _split(args.items if has_config else [DEFAULT_CONFIG, *args.items])
    if len(configs) > 1:
        raise ValueError(f"give one Kunlun config, got {configs}")
    path = configs[0]
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    env = environment()
    records = []
    for name in ["kunlun", *names]:
        extra = [*overrides, *VARIANTS.get(name, [])]
        cfg = load_config(path, extra)
        if cfg.model.name != "kunlun":
            raise ValueError(f"{path} configures model {cfg.model.name!r}, not kunlun")
        rec = {"variant": name, "overrides": VARIANTS.get(name, []),
               "component_flops": component_flops(cfg, feature_spec(cfg.data)),
               **bench_preset(path, extra, args.steps, args.warmup, None)}
        if records:
            rec.update(savings(records[0], rec))
        records.append(rec)
        print(_line(rec), flush=True)
    out = pathlib.Path(args.out or f"notebooks/results/bench_kunlun_{_slug(env['device_kind'])}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "kunlun_components", **env, "config": path, "overrides": overrides,
                               "warmup": args.warmup, "results": records}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _line(rec: dict[str, Any]) -> str:
    line = (f"{rec['variant']:>22}: {rec['fwd_flops_per_example'] / 1e6:8.2f} MFLOP fwd/example | step "
            f"{1e3 * rec['step_time_median_s']:8.2f} ms")
    if "flops_saving" in rec:
        line += (f" | Kunlun saves {100 * rec['flops_saving']:5.1f}% FLOPs, "
                 f"{100 * rec['step_time_saving']:5.1f}% step time")
    return line
