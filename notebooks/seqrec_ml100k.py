"""Train SASRec, BERT4Rec, LinRec and Cotten4Rec on MovieLens-100k over a few seeds; tabulate.

Each run is ``recjax train --config configs/experiments/<model>_ml100k.yaml`` (one backbone,
RecBole's SASRec sizes, leave-one-out, full ranking over all items without history masking,
early stopping on validation NDCG@10) with ``data.sequences.path`` pointing at a directory
written by ``recjax data prepare``. Every run's ``report.json`` is collected; per model the
mean and standard deviation over seeds of test HR@10 / NDCG@10, epochs, training
sequences/s and wall time to the validation-selected best epoch go to
``notebooks/results/<tag>.json`` and ``.md``::

    recjax data prepare ml-100k.inter /tmp/ml-100k      # RecBole's file, or MovieLens' u.data
    .venv/bin/python notebooks/seqrec_ml100k.py --data /tmp/ml-100k --seeds 0 1 2
    .venv/bin/python notebooks/seqrec_ml100k.py --data /tmp/ml-100k --runs sasrec:0 bert4rec:1 --reuse

Runs go one at a time, so the sequences/s of each are measured on an otherwise idle machine
(as far as this script controls it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
MODELS = ("sasrec", "bert4rec", "linrec", "cotten4rec")
KEYS = ("hr@10", "ndcg@10", "mrr")


def run(model: str, seed: int, data: str, tag: str, overrides: list[str], reuse: bool) -> dict:
    run_dir = REPO / "runs" / tag / f"{model}_seed{seed}"
    if reuse and (run_dir / "report.json").is_file():
        print(f"reusing {run_dir / 'report.json'}", flush=True)
        return _row(model, seed, json.loads((run_dir / "report.json").read_text()))
    cmd = [sys.executable, "-m", "recjax.cli", "train", "--config", f"configs/experiments/{model}_ml100k.yaml",
           f"data.sequences.path={data}", f"seed={seed}", f"run_dir={run_dir}", "train.resume=false", "--overwrite",
           "train.tensorboard=false", *overrides]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return _row(model, seed, json.loads((run_dir / "report.json").read_text()))


def _row(model: str, seed: int, report: dict) -> dict:
    """The fields of one run that the table uses (report.json of `recjax train`)."""
    spe = report["data"]["batches_per_epoch"]
    return {
        "model": model, "seed": seed, "model_config": report["model"],
        "protocol": report["data"]["protocol"], "data": report["data"],
        "device": report["environment"]["device"], "versions": report["environment"]["versions"],
        "valid": report["best_eval"]["valid"], "test": report["test"],
        "best_epoch": report["best_step"] / spe, "epochs_run": report["epochs"],
        "stopped_early": report["stopped_early"],
        "train_sequences_per_s": report["train_examples_per_s"],
        "wall_time_to_best_s": report["wall_time_to_best_s"],
        "wall_time_total_s": report["wall_time_total_s"],
    }


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        entry = {"model": model, "attention": rs[0]["model_config"]["attention"], "seeds": [r["seed"] for r in rs]}
        series = {f"test_{k}": [r["test"][k] for r in rs] for k in KEYS}
        series |= {f"valid_{k}": [r["valid"][k] for r in rs] for k in KEYS}
        series |= {
            "best_epoch": [r["best_epoch"] for r in rs],
            "epochs_run": [r["epochs_run"] for r in rs],
            "train_sequences_per_s": [r["train_sequences_per_s"] for r in rs],
            "wall_time_to_best_s": [r["wall_time_to_best_s"] for r in rs],
            "wall_time_total_s": [r["wall_time_total_s"] for r in rs],
        }
        for name, values in series.items():
            v = np.asarray(values, dtype=float)
            entry[name] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
                           "values": values}
        out.append(entry)
    return out


def markdown(doc: dict) -> str:
    def ms(x: dict, fmt: str) -> str:
        return format(x["mean"], fmt) + (f" ± {format(x['std'], fmt)}" if x["std"] is not None else "")

    lines = [
        f"MovieLens-100k ({doc['data']['users']} users, {doc['data']['items']} items, "
        f"{doc['data']['interactions']:,} interactions); protocol: {doc['protocol']}. "
        f"Mean ± std over seeds; {doc['device']}.",
        "",
        "| model | attention | seeds | test HR@10 | test NDCG@10 | test MRR | best epoch | epochs run "
        "| train seq/s | wall to best (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in doc["summary"]:
        lines.append(
            f"| {s['model']} | {s['attention']} | {len(s['seeds'])} | {ms(s['test_hr@10'], '.4f')} | "
            f"{ms(s['test_ndcg@10'], '.4f')} | {ms(s['test_mrr'], '.4f')} | {ms(s['best_epoch'], '.0f')} | "
            f"{ms(s['epochs_run'], '.0f')} | {ms(s['train_sequences_per_s'], '.0f')} | "
            f"{ms(s['wall_time_to_best_s'], '.0f')} |")
    pop = doc["popularity_test"]
    lines += ["", f"Popularity baseline (test): HR@10 {pop['hr@10']:.4f}, NDCG@10 {pop['ndcg@10']:.4f}."]
    if "cotten4rec_vs_bert4rec" in doc:
        c = doc["cotten4rec_vs_bert4rec"]
        lines.append(f"Cotten4Rec vs BERT4Rec test NDCG@10 (means): {c['relative_difference']:+.1%}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="directory written by `recjax data prepare` (ML-100k)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--runs", nargs="+", default=None, metavar="MODEL:SEED",
                    help="explicit runs instead of --models x --seeds, e.g. sasrec:0 bert4rec:1")
    ap.add_argument("--reuse", action="store_true", help="reuse runs that already wrote report.json")
    ap.add_argument("--tag", default="seqrec_ml100k")
    ap.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = ap.parse_args()

    plan = ([(m, int(s)) for m, s in (r.split(":") for r in args.runs)] if args.runs
            else [(m, s) for m in args.models for s in args.seeds])
    for m, _ in plan:
        if m not in MODELS:
            ap.error(f"unknown model {m!r} in --runs (choose from {', '.join(MODELS)})")
    rows = [run(m, s, args.data, args.tag, args.overrides, args.reuse) for m, s in plan]
    first = rows[0]
    doc = {
        "command": "python notebooks/seqrec_ml100k.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": first["device"],
        "versions": first["versions"],
        "protocol": first["protocol"],
        "data": {k: first["data"][k] for k in ("users", "items", "interactions", "max_len", "train_row_mode")},
        "overrides": args.overrides,
        "popularity_test": first["data"]["popularity_baseline"]["test"],
        "summary": summarise(rows),
        "runs": rows,
    }
    by_model = {s["model"]: s for s in doc["summary"]}
    if {"cotten4rec", "bert4rec"} <= by_model.keys():
        b, c = by_model["bert4rec"]["test_ndcg@10"]["mean"], by_model["cotten4rec"]["test_ndcg@10"]["mean"]
        doc["cotten4rec_vs_bert4rec"] = {"bert4rec_ndcg@10": b, "cotten4rec_ndcg@10": c,
                                         "relative_difference": (c - b) / b}
    out = REPO / "notebooks" / "results"
    (out / f"{args.tag}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{args.tag}.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
