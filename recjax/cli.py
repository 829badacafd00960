"""``recjax`` command line: train | eval | compile | params | data | bench | launch | sweep | fit.

The model subcommands take ``--config FILE`` (layered over ``configs/base.yaml``) and trailing
``dotted.key=value`` overrides. jax is imported only after the arguments are parsed, so
``--devices N`` can create N virtual CPU devices first.

Subcommands listed in ``PLUGINS`` live in their own modules, each exposing
``add_arguments(parser)`` and ``run(args) -> int``; such a module imports jax only inside
``run`` (the parser is built before any device flag is applied).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys
from typing import Any

from recjax.errors import ConfigError, UserError
from recjax.parallel import distributed

# (subcommand, sub-subcommand or None) -> module with add_arguments(parser) and run(args)
PLUGINS: dict[tuple[str, str | None], tuple[str, str]] = {
    ("bench", "kernels"): ("recjax.bench.kernels", "time and memory of the kernels' implementations"),
    ("bench", "embeddings"): ("recjax.bench.embeddings", "step time and temporaries vs table rows (sparse vs dense updates); bytes exchanged by lookups"),
    ("bench", "mfu"): ("recjax.bench.mfu", "step time, examples/s, TFLOP/s and MFU of model presets"),
    ("bench", "gpu-check"): ("recjax.bench.gpu_check", "the whole GPU check (gpu tests, kernel and MFU benchmarks, goals) in one command"),
    ("bench", "kunlun"): ("recjax.bench.kunlun", "Kunlun's step time and analytic FLOPs with each component switched to its baseline"),
    ("bench", "seqrec"): ("recjax.bench.seqrec", "memory and step time vs sequence length of the sequential recommenders' attention types"),
    ("launch", None): ("recjax.parallel.launch", "start a multi-process job: local | slurm | k8s | tpu"),
    ("sweep", None): ("recjax.scaling.sweep_cli", "run or emit a scaling-law sweep"),
    ("fit", None): ("recjax.scaling.fit_cli", "fit scaling laws to a sweep's results table"),
    ("data", "prepare"): ("recjax.data.prepare_cli", "read interactions, filter, write per-user sequences"),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (layered over configs/base.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a model")
    _add_config_args(p)
    p.add_argument("--devices", type=int, default=None, help="use N virtual CPU devices")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run_dir's earlier run (checkpoints, logs, report) and start over")
    p.add_argument("--accept-config-changes", action="store_true",
                   help="resume although keys that should not change between sessions changed")
    distributed.add_arguments(p)

    p = sub.add_parser("eval", help="evaluate the best (or newest) checkpoint of a run")
    _add_config_args(p)
    p.add_argument("--devices", type=int, default=None, help="use N virtual CPU devices")
    distributed.add_arguments(p)

    p = sub.add_parser("compile", help="AOT-compile the train step for a mesh; report memory and FLOPs")
    _add_config_args(p)
    p.add_argument("--devices", type=int, default=None, help="number of virtual CPU devices to compile for")
    p.add_argument("--max-device-memory-gb", type=float, default=None, help="exit 1 when over this")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--hlo", default=None, help="also write the compiled step's optimized HLO text here")

    p = sub.add_parser("params", help="print parameter counts, analytic FLOPs and per-device state of a config")
    _add_config_args(p)
    p.add_argument("--devices", type=int, default=None,
                   help="place the state on N virtual CPU devices (default: the devices present)")

    p = sub.add_parser("data", help="data utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("synth-criteo", help="write a Criteo-format TSV file of synthetic rows")
    d.add_argument("out", help="output .tsv path")
    d.add_argument("--rows", type=int, default=10_000)
    d.add_argument("--seed", type=int, default=0)
    _add_plugins(sub, groups={"data": dsub})
    return parser


def _add_plugins(sub: Any, groups: dict[str, Any]) -> None:
    """Add ``PLUGINS``; a ``(group, child)`` entry joins ``groups[group]`` or a new group."""
    for (name, child), (module, help_text) in PLUGINS.items():
        mod = importlib.import_module(module)
        if child is None:
            p = sub.add_parser(name, help=help_text)
        else:
            if name not in groups:
                group = sub.add_parser(name, help=f"{name} subcommands")
                groups[name] = group.add_subparsers(dest=f"{name}_command", required=True)
            p = groups[name].add_parser(child, help=help_text)
        mod.add_arguments(p)
        p.set_defaults(plugin_run=mod.run)


def _use_virtual_devices(n: int | None) -> None:
    if n is None:
        return
    if "jax" in sys.modules:
        raise RuntimeError("--devices must be applied before jax is imported")
    from recjax.parallel.launch import with_virtual_devices

    os.environ["XLA_FLAGS"] = with_virtual_devices(os.environ.get("XLA_FLAGS", ""), n)
    os.environ["JAX_PLATFORMS"] = "cpu"


def _load(args: argparse.Namespace) -> Any:
    from recjax.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from recjax.train.trainer import train

    train(_load(args), overwrite=args.overwrite, accept_config_changes=args.accept_config_changes)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import jax

    from recjax.train.trainer import evaluate

    out = evaluate(_load(args))
    if jax.process_index() == 0:
        print(json.dumps(out))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from recjax.train.compile import compile_report, format_report

    report = compile_report(cfg, hlo_path=args.hlo)
    print(format_report(report))
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"command": "recjax " + " ".join(sys.argv[1:]), **report}, indent=2))
    total_gb = report["memory_per_device"]["total"] / 1e9
    if args.max_device_memory_gb is not None and total_gb > args.max_device_memory_gb:
        print(f"error: {total_gb:.2f} GB per device exceeds --max-device-memory-gb "
              f"{args.max_device_memory_gb}", file=sys.stderr)
        return 1
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    """``name: number`` lines: parameter counts and analytic FLOPs per example (per sequence for
    the sequential task) from the config alone; then, on the config's mesh over the devices
    present (``--devices N``: N virtual ones), each embedding table's rows and row shards and
    the per-device train state and memory estimate (``recjax.train.compile``; nothing is
    compiled or allocated). A mesh the devices cannot hold is a config error after the counts."""
    cfg = _load(args)
    from recjax.tasks import get_task
    from recjax.train.state import describe_config, inspection_setup

    task = get_task(cfg)  # one task: its data is read once
    info = describe_config(cfg, task)
    per = task.example_name[:-1]  # "example" | "sequence"
    lines = {
        "params_dense": info["params_dense"],
        "params_active": info["params_active"],
        "params_embedding": info["params_embedding"],
        "params_total": info["params_dense"] + info["params_embedding"],
        f"fwd_flops_per_{per}": info["fwd_flops_per_example"],
        f"train_flops_per_{per}": info["train_flops_per_example"],
    }
    _print_numbers(lines)

    from recjax.train import compile as compile_lib

    setup = inspection_setup(cfg, task)
    tables = compile_lib.table_placement(setup)
    state = compile_lib.state_memory(setup)
    estimate = compile_lib.analytic_memory(setup, info)
    per_example = compile_lib.activation_bytes_per_example(cfg, setup.task.data_info)
    lines = {}
    for t in tables:
        lines[f"{t['name']}.rows"] = t["rows"]
        lines[f"{t['name']}.shards"] = t["shards"]
    lines.update({
        "devices": setup.n_devices,
        "state_bytes_unsharded": state["unsharded_total"],
        "state_bytes_per_device": state["total"],
        "table_bytes_per_device": sum(t["bytes_per_device"] for t in tables),
    })
    if per_example is not None:
        lines[f"activation_bytes_per_{per}"] = per_example
        lines["activation_bytes_per_device"] = estimate["activations"]
    lines["memory_estimate_per_device"] = estimate["total"]
    _print_numbers(lines)
    return 0


def _print_numbers(lines: dict[str, float]) -> None:
    for k, v in lines.items():
        print(f"{k:>30}: {v:,.0f}")


def cmd_data(args: argparse.Namespace) -> int:
    from recjax.data.criteo import write_criteo_tsv

    write_criteo_tsv(args.out, rows=args.rows, seed=args.seed)
    print(f"wrote {args.rows} rows to {args.out}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "compile": cmd_compile, "params": cmd_params, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow an option (`recjax train --overwrite train.steps=5`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _use_virtual_devices(getattr(args, "devices", None))
    try:
        # train/eval join a multi-process job when one is configured; compile joins only for the
        # real devices (with --devices it compiles for a virtual topology in this one process)
        if args.command in ("train", "eval") or (args.command == "compile" and args.devices is None):
            distributed.initialize(args)
        if hasattr(args, "plugin_run"):
            return args.plugin_run(args)
        return COMMANDS[args.command](args)
    except UserError as e:
        code = getattr(e, "exit_code", 2 if isinstance(e, ConfigError) else 1)
        kind = "config error: " if isinstance(e, ConfigError) else "" if hasattr(e, "exit_code") else "error: "
        print(f"{kind}{e}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
