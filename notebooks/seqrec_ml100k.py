"""Sequential recommenders on MovieLens-100k: the model table, the RecBole ablation, the BERT4Rec
sweep and the Cotten4Rec vs BERT4Rec comparison, each over seeds, through ``recjax train``.

Every run is ``recjax train --config configs/experiments/<model>_ml100k.yaml`` (SASRec: the
pre-LN backbone on stride-10 windows for 25 epochs; BERT4Rec: RecBole's model and prefix rows at
hidden 128 for 20 epochs; LinRec and Cotten4Rec swap the attention of those two, Cotten4Rec at
RecBole's sizes; leave-one-out, full ranking over all items without history masking, the best
epoch picked by validation NDCG@10) with
``data.sequences.path`` pointing at a directory written by ``recjax data prepare``, plus the
overrides of its variant. Runs live in ``runs/seqrec_ml100k/<model>[_<variant>]_seed<seed>``
and are shared by the studies (``--reuse`` keeps finished ones)::

    recjax data prepare ml-100k.inter data/prepared/ml-100k   # RecBole's file, or MovieLens' u.data
    python notebooks/seqrec_ml100k.py --data data/prepared/ml-100k --seeds 0 1 2 --models sasrec bert4rec
    python notebooks/seqrec_ml100k.py --data data/prepared/ml-100k --runs linrec:0 linrec:1 --reuse
    python notebooks/seqrec_ml100k.py --data data/prepared/ml-100k --study ablation --seeds 0 1 2
    python notebooks/seqrec_ml100k.py --data data/prepared/ml-100k --study cotten4rec --seeds 0 1 2
    python notebooks/seqrec_ml100k.py --data data/prepared/ml-100k --study bert4rec_sweep --seeds 0 1 --parallel 6

Studies (results in ``notebooks/results/<tag>.{json,md}``):

- ``models`` (``seqrec_ml100k``): test HR@10 / NDCG@10 / MRR of the validation-selected epoch,
  best epoch, sequences/s and wall time to the best epoch, mean and std over seeds.
- ``ablation`` (``seqrec_ml100k_ablation``): each RecBole difference switched back to the
  pre-LN recjax default alone, and all of them together, with the change of the test and
  validation NDCG@10 means against the preset.
- ``cotten4rec`` (``seqrec_ml100k_cotten4rec``): BERT4Rec and Cotten4Rec (the same model with
  cosine linear attention) in the ML-100k experiment setting and with the paper's hyper-parameters
  (MODELS.md section 4), each scored under full ranking and 100 uniform sampled negatives
  (``recjax eval`` of the best checkpoint), with 95% intervals over seeds of both means and
  of their relative difference.
- ``bert4rec_sweep`` (``seqrec_ml100k_bert4rec_sweep``): RecBole's BERT4Rec at RecBole's sizes
  and budget with a few keys changed per variant (``SWEEP``), validation and test NDCG@10 over
  seeds, the variant with the best mean validation (among those with the most seeds) marked.

Runs go one at a time, so the sequences/s of each are measured on an otherwise idle machine
(as far as this script controls it); only the sweep's ``--parallel N`` runs several at once (on
a GPU, where one small run leaves it mostly idle).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
MODELS = ("sasrec", "bert4rec", "linrec", "cotten4rec")
KEYS = ("hr@10", "ndcg@10", "mrr")

# The ablation's variants, each a full assignment of the keys in which RecBole (configs/models/
# <model>_recbole.yaml) and the recjax default (configs/models/<model>.yaml) differ, plus the
# training rows and budget, on the experiment config's data and optimiser: RecBole's model on
# non-overlapping windows (batches of 64, constant lr, up to 200 epochs with patience 10), RecBole with one
# difference switched to the recjax default ("recbole+..."), RecBole's SASRec on overlapping
# windows, the recjax default, and the experiment config itself (the `models` study's runs;
# SASRec's: 25 epochs; BERT4Rec's: RecBole's prefix rows).
SASREC_KEYS = ("model.norm", "model.output_bias", "data.sequences.window_stride", "train.epochs", "train.patience")
BERT4REC_KEYS = ("model.norm", "model.output_head", "data.sequences.mask_replace",
                 "data.sequences.mask_last_prob", "data.sequences.eval_drop_first", "data.sequences.window_stride",
                 "data.sequences.train_rows", "data.global_batch", "optim.decay", "train.epochs", "train.patience")


def _assign(keys: tuple[str, ...], values: tuple) -> list[str]:
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in zip(keys, values, strict=True)]


def _merge(*overrides: list[str]) -> list[str]:
    """Override lists combined left to right, a later value of a key replacing an earlier one
    (``recjax train`` refuses a key given twice)."""
    merged: dict[str, str] = {}
    for o in overrides:
        merged |= dict(x.split("=", 1) for x in o)
    return [f"{k}={v}" for k, v in merged.items()]


# RecBole's BERT4Rec sizes and budget (hidden 64, inner 256, 10 epochs of prefix rows here): the
# experiment config grew to hidden 128 / 20 epochs after the sweep below, and the ablation and the
# ml100k Cotten4Rec comparison keep RecBole's sizes (configs/experiments/cotten4rec_ml100k.yaml
# pins them for Cotten4Rec).
RECBOLE_SIZES = ["model.hidden=64", "model.inner=256"]
RECBOLE_BUDGET = [*RECBOLE_SIZES, "train.epochs=10"]


ABLATIONS: dict[str, dict[str, list[str]]] = {
    "sasrec": {name: _assign(SASREC_KEYS, values) for name, values in {
        "recbole": ("post", False, 0, 200, 10),
        "recbole+pre_ln": ("pre", False, 0, 200, 10),
        "recbole+output_bias": ("post", True, 0, 200, 10),
        "recbole_on_overlapping_windows": ("post", False, 10, 200, 10),
        "recjax_default": ("pre", True, 0, 200, 10),
    }.items()},
    "bert4rec": {name: _assign(BERT4REC_KEYS, values) for name, values in {
        "recbole": ("post", "ffn", "mask", 0.5, True, 0, "windows", 64, "constant", 200, 10),
        "recbole+pre_ln": ("pre", "ffn", "mask", 0.5, True, 0, "windows", 64, "constant", 200, 10),
        "recbole+no_output_head": ("post", "none", "mask", 0.5, True, 0, "windows", 64, "constant", 200, 10),
        "recbole+mask_80_10_10": ("post", "ffn", "bert", 0.5, True, 0, "windows", 64, "constant", 200, 10),
        "recbole+no_last_item_batches": ("post", "ffn", "mask", 0.0, True, 0, "windows", 64, "constant", 200, 10),
        "recbole+eval_keeps_first_item": ("post", "ffn", "mask", 0.5, False, 0, "windows", 64, "constant", 200, 10),
        "recjax_default": ("pre", "none", "bert", 0.0, False, 0, "windows", 64, "constant", 200, 10),
    }.items()},
}
ABLATIONS["bert4rec"] = {name: [*o, *RECBOLE_SIZES] for name, o in ABLATIONS["bert4rec"].items()}
# the ablation's rows beyond RecBole's windows: the experiment configs, and BERT4Rec's prefix rows
# at RecBole's sizes (the experiment before the sweep below)
ABLATION_EXPERIMENTS = {"sasrec": {"experiment": []}, "bert4rec": {"recbole_sizes": RECBOLE_BUDGET, "experiment": []}}

# BERT4Rec sweep (--study bert4rec_sweep): RecBole's model on prefix rows at RecBole's sizes and
# budget ("base") with a few keys changed; a variant is chosen by its mean validation NDCG@10
# over seeds. LAST1: only last-item batches (RecBole mixes them half and half).
LAST1 = ["data.sequences.mask_last_prob=1.0"]
H128 = ["model.hidden=128", "model.inner=512"]
SWEEP: dict[str, list[str]] = {
    "base": [],
    "base_e30": ["train.epochs=30"],
    "base_h128_e20": [*H128, "train.epochs=20"],
    "base_len100": ["data.sequences.max_len=100"],
    "base_mp4": ["data.sequences.mask_prob=0.4"],
    "last1": LAST1,
    "last1_e30": [*LAST1, "train.epochs=30"],
    "last1_h128": [*LAST1, *H128],
    "last1_h128_e20": [*LAST1, *H128, "train.epochs=20"],
    "last1_h256_d3": [*LAST1, "model.hidden=256", "model.inner=1024", "model.dropout=0.3", "model.attn_dropout=0.3"],
    "last1_l4": [*LAST1, "model.num_layers=4"],
    "last1_len100": [*LAST1, "data.sequences.max_len=100"],
    "last1_len200": [*LAST1, "data.sequences.max_len=200"],
    "last1_lr5e4_e20": [*LAST1, "optim.dense.lr=0.0005", "optim.embedding.lr=0.0005", "train.epochs=20"],
    "last1_untied": [*LAST1, "model.tie_embeddings=false"],
    "last1_wd": [*LAST1, "optim.dense.name=adamw", "optim.dense.weight_decay=0.01"],
}
# Cotten4Rec paper (MODELS.md section 4): hidden 128, 2 blocks, 2 heads, max_len 100, dropout 0.1,
# AdamW lr 1e-3 wd 1e-3, 10% warm-up then linear decay, batch 128, clip 1.0 -- over a fixed
# PAPER_EPOCHS (the schedule needs a length), still validation-selected. The paper does not say
# how it cuts training rows; these are BERT4Rec's own: non-overlapping cloze windows of max_len
# items (1,519 rows, 12 batches per epoch), not RecBole's 97k prefix rows (60 epochs of those at
# batch 128 are ~45k steps, 63x the windows' 720). The item table takes Adam without the decay
# (the embedding optimisers have none; 1e-3 x 1e-3 over 720 steps would shrink it by 0.07%).
PAPER_EPOCHS = 60
PAPER_WARMUP = PAPER_EPOCHS * 12 // 10  # 10% of the steps: 12 batches of 128 per epoch
PAPER = ["model.hidden=128", "model.num_layers=2", "model.num_heads=2", "model.inner=512",
         "data.sequences.max_len=100", "model.dropout=0.1", "model.attn_dropout=0.1",
         "optim.dense.name=adamw", "optim.dense.lr=0.001", "optim.dense.weight_decay=0.001",
         "optim.embedding.name=adam", "optim.embedding.lr=0.001",
         f"optim.warmup_steps={PAPER_WARMUP}", "optim.decay=linear", "optim.min_lr_ratio=0.0",
         "optim.grad_clip_norm=1.0",
         "data.global_batch=128", "data.sequences.train_rows=windows", "data.sequences.window_stride=0",
         f"train.epochs={PAPER_EPOCHS}", "train.patience=0"]
SAMPLED = ["ranking.protocol=sampled", "ranking.num_negatives=100", "ranking.negatives=uniform"]


def run_dir(model: str, variant: str, seed: int) -> pathlib.Path:
    name = model if variant in ("", "experiment") else f"{model}_{variant}"
    return REPO / "runs" / "seqrec_ml100k" / f"{name}_seed{seed}"


def train(model: str, variant: str, seed: int, data: str, overrides: list[str], reuse: bool) -> dict:
    """Train one run (or reuse its report.json) and return the fields the tables use."""
    out = run_dir(model, variant, seed)
    if not (reuse and (out / "report.json").is_file()):
        cmd = [sys.executable, "-m", "recjax.cli", "train", "--config", f"configs/experiments/{model}_ml100k.yaml",
               f"data.sequences.path={data}", f"seed={seed}", f"run_dir={out}", "train.resume=false",
               "--overwrite", "train.tensorboard=false", *overrides]
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    else:
        print(f"reusing {out / 'report.json'}", flush=True)
    row = _row(model, seed, json.loads((out / "report.json").read_text()))
    return row | {"variant": variant or "experiment", "overrides": overrides}


def evaluate(model: str, variant: str, seed: int, data: str, overrides: list[str], reuse: bool) -> dict:
    """``recjax eval`` of a finished run's best checkpoint with extra (protocol) overrides."""
    out = run_dir(model, variant, seed)
    cache = out / ("eval_" + "_".join(o.split("=")[1] for o in overrides) + ".json")
    if reuse and cache.is_file():
        return json.loads(cache.read_text())
    cmd = [sys.executable, "-m", "recjax.cli", "eval", "--config", f"configs/experiments/{model}_ml100k.yaml",
           f"data.sequences.path={data}", f"seed={seed}", f"run_dir={out}", "train.tensorboard=false", *overrides]
    print("$", " ".join(cmd[2:]), flush=True)
    res = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    cache.write_text(json.dumps(result))
    return result


def _row(model: str, seed: int, report: dict) -> dict:
    """The fields of one run that the tables use (report.json of `recjax train`)."""
    spe = report["data"]["batches_per_epoch"]
    return {
        "model": model, "seed": seed, "model_config": report["model"],
        "protocol": report["data"]["protocol"], "data": report["data"],
        "device": report["environment"]["device"], "versions": report["environment"]["versions"],
        "valid": report["best_eval"]["valid"], "test": report["test"],
        "best_epoch": report["best_step"] / spe, "epochs_run": report["epochs"],
        "stopped_early": report["stopped_early"],
        # training rows per second of training time over all of a run's sessions
        "train_sequences_per_s": report["data"]["train_rows"] * report["epochs"] / report["train_time_s"],
        "wall_time_to_best_s": report["wall_time_to_best_s"],
        "wall_time_total_s": report["wall_time_total_s"],
    }


def stats(values: list[float]) -> dict:
    """Mean, sample std and the 95% t-interval half-width of the mean."""
    v = np.asarray(values, dtype=float)
    std = float(v.std(ddof=1)) if v.size > 1 else None
    half = float(T95.get(v.size - 1, 1.96) * std / math.sqrt(v.size)) if std is not None else None
    return {"mean": float(v.mean()), "std": std, "ci95": half, "values": list(values)}


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["model"], r["variant"]) for r in rows):
        rs = [r for r in rows if (r["model"], r["variant"]) == key]
        entry = {"model": key[0], "variant": key[1], "attention": rs[0]["model_config"]["attention"],
                 "seeds": [r["seed"] for r in rs], "device": _devices(rs)}
        series = {f"test_{k}": [r["test"][k] for r in rs] for k in KEYS}
        series |= {f"valid_{k}": [r["valid"][k] for r in rs] for k in KEYS}
        series |= {k: [r[k] for r in rs] for k in ("best_epoch", "epochs_run", "train_sequences_per_s",
                                                   "wall_time_to_best_s", "wall_time_total_s")}
        entry |= {name: stats(values) for name, values in series.items()}
        out.append(entry)
    return out


def _devices(rows: list[dict]) -> str:
    return "; ".join(dict.fromkeys(r["device"] for r in rows))


def summarise_sweep(rows: list[dict]) -> list[dict]:
    """Per sweep variant: validation and test NDCG@10, test HR@10 and the best epoch over seeds,
    best mean validation first; ``selected`` marks the first among those with the most seeds."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        name = variant.removeprefix("sweep_")
        out.append({"variant": name, "overrides": SWEEP[name],
                    "seeds": [r["seed"] for r in rs], "device": _devices(rs),
                    "valid_ndcg@10": stats([r["valid"]["ndcg@10"] for r in rs]),
                    "test_ndcg@10": stats([r["test"]["ndcg@10"] for r in rs]),
                    "test_hr@10": stats([r["test"]["hr@10"] for r in rs]),
                    "best_epoch": stats([r["best_epoch"] for r in rs]),
                    "epochs_run": stats([r["epochs_run"] for r in rs]), "selected": False})
    out.sort(key=lambda e: -e["valid_ndcg@10"]["mean"])
    most = max((len(e["seeds"]) for e in out), default=0)
    for e in out:
        if len(e["seeds"]) == most:
            e["selected"] = True
            break
    return out


def recbole_reference() -> dict:
    """RecBole 1.2.1's own runs on this protocol (``notebooks/recbole_reference.py``), per model:
    the seeds and the test NDCG@10 / HR@10 over them; empty before any was run."""
    path = REPO / "notebooks" / "results" / "recbole_ml100k.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    out = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        rs = [r for r in runs if r["model"] == model]
        out[model] = {"seeds": [r["seed"] for r in rs],
                      "test_ndcg@10": stats([r["test"]["ndcg@10"] for r in rs]),
                      "test_hr@10": stats([r["test"]["hit@10"] for r in rs])}
    return out


def _ms(x: dict, fmt: str) -> str:
    return format(x["mean"], fmt) + (f" ± {format(x['std'], fmt)}" if x["std"] is not None else "")


def _header(doc: dict) -> str:
    d = doc["data"]
    return (f"MovieLens-100k ({d['users']} users, {d['items']} items, {d['interactions']:,} interactions); "
            f"protocol: {doc['protocol']}. Mean ± std over seeds; {doc['device']}.")


def markdown_models(doc: dict) -> str:
    lines = [_header(doc), "",
             "| model | variant | attention | seeds | test HR@10 | test NDCG@10 | test MRR | best epoch | epochs run "
             "| train seq/s | wall to best (s) | device |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in doc["summary"]:
        lines.append(
            f"| {s['model']} | {s['variant']} | {s['attention']} | {len(s['seeds'])} | {_ms(s['test_hr@10'], '.4f')} | "
            f"{_ms(s['test_ndcg@10'], '.4f')} | {_ms(s['test_mrr'], '.4f')} | {_ms(s['best_epoch'], '.0f')} | "
            f"{_ms(s['epochs_run'], '.0f')} | {_ms(s['train_sequences_per_s'], '.0f')} | "
            f"{_ms(s['wall_time_to_best_s'], '.0f')} | {s.get('device', doc['device'])} |")
    pop = doc["popularity_test"]
    lines += ["", f"Popularity baseline (test): HR@10 {pop['hr@10']:.4f}, NDCG@10 {pop['ndcg@10']:.4f}."]
    for model, r in doc.get("recbole_reference", {}).items():
        lines += ["", f"RecBole 1.2.1's {model} re-run on this protocol (notebooks/recbole_reference.py, "
                      f"{len(r['seeds'])} seeds): test HR@10 {_ms(r['test_hr@10'], '.4f')}, "
                      f"NDCG@10 {_ms(r['test_ndcg@10'], '.4f')}."]
    return "\n".join(lines) + "\n"


def markdown_ablation(doc: dict) -> str:
    lines = [_header(doc), "",
             "`recbole`: RecBole's model (configs/models/<model>_recbole.yaml) on non-overlapping windows "
             "(batches of 64, up to 200 epochs, patience 10); `recbole+X`: with one difference X switched to "
             "the recjax default; `recbole_on_overlapping_windows`: RecBole's model on windows of stride 10; "
             "`recjax_default`: configs/models/<model>.yaml; `experiment`: configs/experiments/<model>_ml100k.yaml "
             "(the model table: SASRec for 25 epochs, BERT4Rec on RecBole's prefix rows at hidden 128 for 20 epochs); "
             "`recbole_sizes`: BERT4Rec's experiment at RecBole's sizes for 10 epochs. Δ: difference of the means "
             "against `recbole`, ± the 95% interval of that difference over seeds. Same data and optimiser "
             "throughout; validation-selected.", "",
             "| model | variant | seeds | test NDCG@10 | Δ test | valid NDCG@10 | Δ valid | best epoch |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    base = {s["model"]: s for s in doc["summary"] if s["variant"] == "recbole"}

    def delta(s: dict, key: str) -> str:
        b = base[s["model"]]
        if s["variant"] == "recbole":
            return "—"
        d = s[key]["mean"] - b[key]["mean"]
        ci = [x[key]["ci95"] for x in (s, b)]
        return f"{d:+.4f}" + (f" ± {math.hypot(*ci):.4f}" if None not in ci else "")

    for s in doc["summary"]:
        lines.append(f"| {s['model']} | {s['variant']} | {len(s['seeds'])} | {_ms(s['test_ndcg@10'], '.4f')} | "
                     f"{delta(s, 'test_ndcg@10')} | {_ms(s['valid_ndcg@10'], '.4f')} | {delta(s, 'valid_ndcg@10')} | "
                     f"{_ms(s['best_epoch'], '.0f')} |")
    return "\n".join(lines) + "\n"


def markdown_sweep(doc: dict) -> str:
    lines = [_header(doc), "",
             "BERT4Rec as RecBole builds it, on RecBole's prefix rows; `base` = RecBole's sizes and budget "
             f"({', '.join(RECBOLE_BUDGET)} on configs/experiments/bert4rec_ml100k.yaml), each variant changing the "
             "keys shown. Validation-selected epoch; mean ± std over seeds; sorted by mean validation NDCG@10, "
             "the variant picked (**bold**) is the best by validation among those with the most seeds.", "",
             "| variant | changes from base | seeds | valid NDCG@10 | test NDCG@10 | test HR@10 | best epoch / epochs |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for e in doc["summary"]:
        name = f"**{e['variant']}**" if e["selected"] else e["variant"]
        lines.append(f"| {name} | {' '.join(e['overrides']) or '—'} | {len(e['seeds'])} | "
                     f"{_ms(e['valid_ndcg@10'], '.4f')} | {_ms(e['test_ndcg@10'], '.4f')} | "
                     f"{_ms(e['test_hr@10'], '.4f')} | {_ms(e['best_epoch'], '.0f')} / {e['epochs_run']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def compare(bert: list[float], cotten: list[float]) -> dict:
    """Relative difference of the means (Cotten4Rec - BERT4Rec) / BERT4Rec with a 95% interval
    (delta method over the two independent seed samples), and the paper's "within 2%" verdict."""
    b, c = stats(bert), stats(cotten)
    rel = (c["mean"] - b["mean"]) / b["mean"]
    out = {"bert4rec": b, "cotten4rec": c, "relative_difference": rel, "ci95": None, "within_2pct": "unresolved"}
    if b["std"] is not None and c["std"] is not None:
        se = math.sqrt((c["std"] ** 2 / len(cotten)) + (c["mean"] / b["mean"]) ** 2 * b["std"] ** 2 / len(bert)) / b["mean"]
        half = T95.get(len(bert) + len(cotten) - 2, 1.96) * se
        out["ci95"] = half
        if rel - half >= -0.02:
            out["within_2pct"] = "holds"  # Cotten4Rec is at most 2% below, with 95% confidence
        elif rel + half < -0.02:
            out["within_2pct"] = "refuted"
    return out


def markdown_cotten4rec(doc: dict) -> str:
    lines = [_header(doc).replace(f"protocol: {doc['protocol']}. ", "").replace("Mean ± std over seeds; ", ""), "",
             "Test NDCG@10 and HR@10 of the validation-selected checkpoint (selected on full-ranking "
             "validation NDCG@10), mean ± 95% interval over seeds; relative difference Cotten4Rec vs BERT4Rec "
             "with its 95% interval; the paper's claim is \"within 2%\".", "",
             "Settings: `ml100k` = configs/experiments/cotten4rec_ml100k.yaml (the model table's runs) against "
             "BERT4Rec at the same RecBole sizes (bert4rec_ml100k.yaml with " + " ".join(RECBOLE_BUDGET) + "); "
             "`paper` = the paper's hyper-parameters (MODELS.md section 4) over "
             f"{PAPER_EPOCHS} epochs.", "",
             "| setting | protocol | metric | seeds (B / C) | BERT4Rec | Cotten4Rec | Cotten4Rec vs BERT4Rec | within 2% |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for c in doc["comparisons"]:
        def ci(x: dict) -> str:
            return f"{x['mean']:.4f}" + (f" ± {x['ci95']:.4f}" if x["ci95"] is not None else "")
        rel = f"{c['relative_difference']:+.1%}" + (f" ± {c['ci95']:.1%}" if c["ci95"] is not None else "")
        seeds = f"{len(c['bert4rec']['values'])} / {len(c['cotten4rec']['values'])}"
        lines.append(f"| {c['setting']} | {c['protocol']} | {c['metric']} | {seeds} | "
                     f"{ci(c['bert4rec'])} | {ci(c['cotten4rec'])} | {rel} | {c['within_2pct']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="directory written by `recjax data prepare` (ML-100k)")
    ap.add_argument("--study", choices=("models", "ablation", "cotten4rec", "bert4rec_sweep"), default="models")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--runs", nargs="+", default=None, metavar="MODEL:SEED",
                    help="models study: explicit runs instead of --models x --seeds, e.g. sasrec:0 linrec:1")
    ap.add_argument("--settings", nargs="+", choices=("ml100k", "paper"), default=["ml100k", "paper"],
                    help="cotten4rec study: which settings to run")
    ap.add_argument("--reuse", action="store_true", help="reuse runs that already wrote report.json")
    ap.add_argument("--merge", action="store_true",
                    help="models study: keep the results file's rows of the models not in this command")
    ap.add_argument("--variants", nargs="+", default=list(SWEEP), choices=SWEEP, help="bert4rec_sweep: which variants")
    ap.add_argument("--parallel", type=int, default=1,
                    help="bert4rec_sweep: runs at a time (on a GPU; wall times then are not timings)")
    ap.add_argument("--finished-only", action="store_true",
                    help="tabulate the finished runs (report.json) among those planned; train none")
    ap.add_argument("--tag", default=None, help="results file name (default: per study)")
    ap.add_argument("--remark", default="", help="a line appended to the markdown (e.g. how the runs shared the machine)")
    ap.add_argument("overrides", nargs="*", help="key=value applied to every run (over a variant's own)")
    args = ap.parse_args()
    tag = args.tag or {"models": "seqrec_ml100k", "ablation": "seqrec_ml100k_ablation",
                       "cotten4rec": "seqrec_ml100k_cotten4rec", "bert4rec_sweep": "seqrec_ml100k_bert4rec_sweep"}[args.study]
    extra = args.overrides

    def one(model: str, variant: str, seed: int, overrides: list[str]) -> dict | None:
        if args.finished_only and not (run_dir(model, variant, seed) / "report.json").is_file():
            return None
        return train(model, variant, seed, args.data, _merge(overrides, extra), args.reuse or args.finished_only)

    def finished(rows: list[dict | None]) -> list[dict]:
        return [r for r in rows if r is not None]

    doc: dict = {"command": "python notebooks/seqrec_ml100k.py " + " ".join(sys.argv[1:]),
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "overrides": extra}
    if args.study == "models":
        plan = ([(m, int(s)) for m, s in (r.split(":") for r in args.runs)] if args.runs
                else [(m, s) for m in args.models for s in args.seeds])
        for m, _ in plan:
            if m not in MODELS:
                ap.error(f"unknown model {m!r} in --runs (choose from {', '.join(MODELS)})")
        rows = finished([one(m, "", s, []) for m, s in plan])
        results = REPO / "notebooks" / "results" / f"{tag}.json"
        if args.merge and results.is_file():
            now = {r["model"] for r in rows}
            kept = [r for r in json.loads(results.read_text())["runs"] if r["model"] not in now]
            rows = sorted(kept + rows, key=lambda r: MODELS.index(r["model"]))
        doc["recbole_reference"] = recbole_reference()
    elif args.study == "bert4rec_sweep":
        plan = [(v, s) for s in args.seeds for v in args.variants]
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            rows = finished(list(pool.map(lambda q: one("bert4rec", f"sweep_{q[0]}", q[1],
                                                        _merge(RECBOLE_BUDGET, SWEEP[q[0]])), plan)))
    elif args.study == "ablation":
        rows = finished([one(m, v, s, o) for m in args.models if m in ABLATIONS
                         for v, o in {**ABLATIONS[m], **ABLATION_EXPERIMENTS[m]}.items() for s in args.seeds])
        doc["ablations"] = ABLATIONS
    else:
        rows, doc["comparisons"] = [], []
        # (variant, overrides) per model: ml100k compares at RecBole's sizes (Cotten4Rec's config pins them)
        settings = {"ml100k": {"bert4rec": ("recbole_sizes", RECBOLE_BUDGET), "cotten4rec": ("", [])},
                    "paper": {"bert4rec": ("paper", PAPER), "cotten4rec": ("paper", PAPER)}}
        for setting in (k for k in settings if k in args.settings):
            plan = settings[setting]
            runs = {m: finished([one(m, variant, s, o) for s in args.seeds]) for m, (variant, o) in plan.items()}
            if not all(runs.values()):
                continue
            rows += runs["bert4rec"] + runs["cotten4rec"]
            sampled = {m: [evaluate(m, plan[m][0], r["seed"], args.data,
                                    _merge(plan[m][1], extra, SAMPLED), args.reuse)["test"] for r in rs]
                       for m, rs in runs.items()}
            for protocol, tests in (("full", {m: [r["test"] for r in rs] for m, rs in runs.items()}),
                                    ("sampled (100 uniform)", sampled)):
                for metric in ("ndcg@10", "hr@10"):
                    c = compare([t[metric] for t in tests["bert4rec"]], [t[metric] for t in tests["cotten4rec"]])
                    doc["comparisons"].append({"setting": setting, "protocol": protocol, "metric": metric, **c})
        doc["paper_overrides"] = PAPER
    first = rows[0]
    doc |= {
        "device": _devices(rows), "versions": first["versions"], "protocol": first["protocol"],
        "data": {k: first["data"][k] for k in ("users", "items", "interactions", "max_len", "train_row_mode")},
        "popularity_test": first["data"]["popularity_baseline"]["test"],
        "summary": summarise_sweep(rows) if args.study == "bert4rec_sweep" else summarise(rows), "runs": rows,
    }
    doc["remark"] = args.remark
    md = {"models": markdown_models, "ablation": markdown_ablation, "cotten4rec": markdown_cotten4rec,
          "bert4rec_sweep": markdown_sweep}[args.study](doc)
    if args.remark:
        md += "\n" + args.remark + "\n"
    out = REPO / "notebooks" / "results"
    (out / f"{tag}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
