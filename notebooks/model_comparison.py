"""Train DLRM, DCNv2, RankMixer and TokenMixer-Large on one synthetic budget; tabulate eval metrics.

Each model trains with ``recjax train --config configs/experiments/compare/<model>.yaml`` (same
stream, same 2.05M training examples, same 32,768 held-out examples, ~140-170k dense
parameters each) plus any ``key=value`` overrides given here (e.g. a different synthetic
teacher), once per seed. A variant (``VARIANTS``) is a model with its own overrides, e.g.
``tokenmixer_large+mixed_residual``: TokenMixer-Large with the block it had before the
paper's (``model.block_layout=mixed_residual``). The final eval of every run and the stream's
Bayes-optimal logloss go to ``notebooks/results/<tag>.json`` and ``.md`` (mean ± std over
seeds)::

    .venv/bin/python notebooks/model_comparison.py --tag model_comparison_synthetic --seeds 2

``--reuse`` reads a run that already finished in its run directory with the same resolved
config instead of training it again (only sound when the code has not changed since; keys
added to the config schema after the run are ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import subprocess
import sys
import time
from importlib import metadata

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = {
    # the block recjax had before the paper's (norm and residual in the mixed layout)
    "tokenmixer_large+mixed_residual": ("tokenmixer_large", ["model.block_layout=mixed_residual"]),
    # SwiGLU down-projections at the full Xavier scale instead of 0.01 x
    "tokenmixer_large+full_down_init": ("tokenmixer_large", ["model.down_init_scale=1.0"]),
    "tokenmixer_large+mixed_residual+full_down_init": (
        "tokenmixer_large", ["model.block_layout=mixed_residual", "model.down_init_scale=1.0"]),
}
MODELS = ("dlrm", "dcnv2", "rankmixer", "tokenmixer_large", *VARIANTS)


def finished(run_dir: pathlib.Path, config: str, overrides: list[str]) -> bool:
    """``run_dir`` holds a finished run (report.json) whose resolved config is ``config`` + ``overrides``."""
    from recjax.config import load_config

    if not (run_dir / "report.json").is_file() or not (run_dir / "config.json").is_file():
        return False
    want = dataclasses.asdict(load_config(REPO / config, [*overrides, f"run_dir={run_dir}"]))
    return _same(json.loads(json.dumps(want)), json.loads((run_dir / "config.json").read_text()))


def _same(want: object, have: object) -> bool:
    """Equal configs, except keys the run's config lacks (added to the schema since, at defaults)."""
    if isinstance(want, dict) and isinstance(have, dict):
        return all(_same(v, have[k]) for k, v in want.items() if k in have)
    return want == have


def run(label: str, tag: str, overrides: list[str], seed: int, reuse: bool) -> dict:
    model, extra = VARIANTS.get(label, (label, []))
    overrides = [*extra, *overrides, f"seed={seed}"]
    run_dir = REPO / "runs" / tag / f"{label}_seed{seed}"
    config = f"configs/experiments/compare/{model}.yaml"
    cmd = [sys.executable, "-m", "recjax.cli", "train", "--config", config, f"run_dir={run_dir}",
           "train.resume=false", "--overwrite", *overrides]
    if reuse and finished(run_dir, config, ["train.resume=false", *overrides]):
        print(f"reusing {run_dir}", flush=True)
    else:
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    wall = json.loads((run_dir / "report.json").read_text())["wall_time_total_s"]
    params = subprocess.run([sys.executable, "-m", "recjax.cli", "params", "--config",
                             f"configs/experiments/compare/{model}.yaml", *overrides],
                            cwd=REPO, check=True, capture_output=True, text=True).stdout
    counts = {k.strip(): float(v.replace(",", "")) for k, v in (ln.split(":") for ln in params.splitlines())}
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    last_train = [r for r in records if r["split"] == "train"][-1]
    final = evals[-1]
    return {
        "model": label,
        "seed": seed,
        "params_dense": counts["params_dense"],
        "params_embedding": counts["params_embedding"],
        "train_flops_per_example": counts["train_flops_per_example"],
        "steps": final["step"],
        "examples": final["step"] * 512,
        "eval_logloss": final["logloss"],
        "bayes_logloss": final.get("bayes_logloss"),
        "gap_to_bayes": final["logloss"] - final["bayes_logloss"] if "bayes_logloss" in final else None,
        "excess_kl": final.get("excess_kl"),
        "eval_ne": final["ne"],
        "eval_auc": final["auc"],
        "eval_gauc": final.get("gauc"),
        "eval_curve": [(r["step"], r["logloss"]) for r in evals],
        "examples_per_s": last_train.get("examples_per_s"),
        "wall_s": wall,
    }


def _mean_std(values: list[float], digits: int, sign: str = "") -> str:
    m = float(np.mean(values))
    if len(values) == 1:
        return f"{m:{sign}.{digits}f}"
    return f"{m:{sign}.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f}"


def markdown(rows: list[dict], overrides: list[str]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"Synthetic stream{' with ' + ' '.join(overrides) if overrides else ''}; "
        f"{rows[0]['examples']:,} training examples, 32,768 eval examples; "
        f"Bayes-optimal logloss {rows[0]['bayes_logloss']:.5f}; seeds {seeds} (mean ± std).",
        "",
        "| model | dense params | train FLOPs/example | eval logloss | gap to Bayes | excess KL | NE | AUC | GAUC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    for label, rs in sorted(by_model.items(), key=lambda kv: np.mean([r["eval_logloss"] for r in kv[1]])):
        cell = {key: _mean_std([r[key] for r in rs], 5 if key != "eval_ne" and "auc" not in key else 4)
                for key in ("eval_logloss", "excess_kl", "eval_ne", "eval_auc", "eval_gauc")}
        gap = _mean_std([r["gap_to_bayes"] for r in rs], 5, "+")
        lines.append(
            f"| {label} | {rs[0]['params_dense']:,.0f} | {rs[0]['train_flops_per_example']:,.0f} | "
            f"{cell['eval_logloss']} | {gap} | {cell['excess_kl']} | {cell['eval_ne']} | {cell['eval_auc']} | "
            f"{cell['eval_gauc']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="model_comparison_synthetic")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, metavar="MODEL",
                    help=f"of {list(MODELS)} (give the overrides before this option)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per model")
    ap.add_argument("--reuse", action="store_true", help="read runs that already finished with the same config")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every model")
    args = ap.parse_args()
    rows = [run(m, args.tag, args.overrides, seed, args.reuse) for m in args.models for seed in range(args.seeds)]
    out = REPO / "notebooks" / "results" / args.tag
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = {p: metadata.version(p) for p in ("jax", "jaxlib", "flax", "optax")}
    payload = {
        "command": "python notebooks/model_comparison.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": "cpu",
        "python": platform.python_version(),
        "versions": versions,
        "overrides": args.overrides,
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, args.overrides))
    print(markdown(rows, args.overrides))


if __name__ == "__main__":
    main()
