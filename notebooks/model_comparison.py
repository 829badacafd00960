"""Train DLRM, DCNv2, RankMixer and TokenMixer-Large on one synthetic budget; tabulate eval metrics.

Each model trains with ``recjax train --config configs/experiments/compare/<model>.yaml`` (same
stream, same 2.05M training examples, same 32,768 held-out examples, ~140-170k dense
parameters each) plus any ``key=value`` overrides given here (e.g. a different synthetic
teacher). The final eval of every run and the stream's Bayes-optimal logloss go to
``notebooks/results/<tag>.json`` and ``.md``::

    .venv/bin/python notebooks/model_comparison.py --tag model_comparison_synthetic
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import time
from importlib import metadata

REPO = pathlib.Path(__file__).resolve().parent.parent
MODELS = ("dlrm", "dcnv2", "rankmixer", "tokenmixer_large")


def run(model: str, tag: str, overrides: list[str]) -> dict:
    run_dir = REPO / "runs" / tag / model
    cmd = [sys.executable, "-m", "recjax.cli", "train", "--config",
           f"configs/experiments/compare/{model}.yaml", f"run_dir={run_dir}", "train.resume=false", "--overwrite",
           *overrides]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.perf_counter() - t0
    params = subprocess.run([sys.executable, "-m", "recjax.cli", "params", "--config",
                             f"configs/experiments/compare/{model}.yaml", *overrides],
                            cwd=REPO, check=True, capture_output=True, text=True).stdout
    counts = {k.strip(): float(v.replace(",", "")) for k, v in (ln.split(":") for ln in params.splitlines())}
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    last_train = [r for r in records if r["split"] == "train"][-1]
    final = evals[-1]
    return {
        "model": model,
        "params_dense": counts["params_dense"],
        "params_embedding": counts["params_embedding"],
        "train_flops_per_example": counts["train_flops_per_example"],
        "steps": final["step"],
        "examples": final["step"] * 512,
        "eval_logloss": final["logloss"],
        "bayes_logloss": final.get("bayes_logloss"),
        "gap_to_bayes": final["logloss"] - final["bayes_logloss"] if "bayes_logloss" in final else None,
        "eval_ne": final["ne"],
        "eval_auc": final["auc"],
        "eval_gauc": final.get("gauc"),
        "eval_curve": [(r["step"], r["logloss"]) for r in evals],
        "examples_per_s": last_train.get("examples_per_s"),
        "wall_s": wall,
    }


def markdown(rows: list[dict], overrides: list[str]) -> str:
    lines = [
        f"Synthetic stream{' with ' + ' '.join(overrides) if overrides else ''}; "
        f"{rows[0]['examples']:,} training examples, 32,768 eval examples; "
        f"Bayes-optimal logloss {rows[0]['bayes_logloss']:.5f}.",
        "",
        "| model | dense params | train FLOPs/example | eval logloss | gap to Bayes | NE | AUC | GAUC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["eval_logloss"]):
        lines.append(
            f"| {r['model']} | {r['params_dense']:,.0f} | {r['train_flops_per_example']:,.0f} | "
            f"{r['eval_logloss']:.5f} | {r['gap_to_bayes']:+.5f} | {r['eval_ne']:.4f} | "
            f"{r['eval_auc']:.4f} | {r['eval_gauc']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="model_comparison_synthetic")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every model")
    args = ap.parse_args()
    rows = [run(m, args.tag, args.overrides) for m in args.models]
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
