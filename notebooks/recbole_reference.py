"""RecBole 1.2.1 itself on the ML-100k protocol of ``notebooks/seqrec_ml100k.py``: the reference
the sequential models are compared against, re-run so its seed-to-seed spread can be seen.

Runs in its own environment (RecBole pins old packages; it is not a recjax dependency)::

    python -m venv /tmp/recbole && /tmp/recbole/bin/pip install torch "numpy<2" scipy pandas \
        scikit-learn pyyaml tensorboard thop tabulate plotly texttable psutil tqdm \
        colorlog==4.7.2 colorama==0.4.4
    /tmp/recbole/bin/pip install --no-deps recbole==1.2.1   # skips its ray pin (see below)
    /tmp/recbole/bin/python notebooks/recbole_reference.py --model BERT4Rec --seed 2020

RecBole's defaults for the model (``recbole/properties/model/<model>.yaml``) and its ml-100k
copy (the file ``recjax data prepare`` read for ``data/prepared/ml-100k``); protocol: leave-one-out
by time (``LS: valid_and_test``), full ranking over all items, history not masked, 12 epochs
of batches of 2,048 prefix rows, the epoch with the best validation NDCG@10 tested. Appends one
record (validation NDCG@10 per epoch, test metrics, wall time, versions) to
``notebooks/results/recbole_ml100k.json``.

Two shims keep RecBole 1.2.1 running on current packages: ``ray`` (imported at module level by
``recbole.quick_start`` for hyper-parameter search only) is stubbed, and ``torch.load`` gets
``weights_only=False`` (RecBole's checkpoints pickle its config; torch >= 2.6 refuses them by
default, which fails the final test evaluation).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import re
import sys
import time
import types

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "recbole_ml100k.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="BERT4Rec", help="a RecBole sequential model, e.g. BERT4Rec, SASRec")
    ap.add_argument("--seed", type=int, default=2020, help="RecBole's seed (its default: 2020)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="/tmp/recbole_runs", help="RecBole's checkpoint and log directory (RecBole writes ./log/ there)")
    args = ap.parse_args()

    ray = types.ModuleType("ray")
    ray.tune = types.ModuleType("ray.tune")
    sys.modules.update({"ray": ray, "ray.tune": ray.tune})
    import recbole
    import torch
    from recbole.quick_start import run_recbole

    if args.threads:
        torch.set_num_threads(args.threads)
    load = torch.load
    torch.load = lambda *a, **k: load(*a, **{**k, "weights_only": False})
    out = pathlib.Path(args.out).resolve()
    config = {
        "data_path": str(pathlib.Path(recbole.__file__).parent / "dataset_example"),
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 50, "train_neg_sample_args": None, "loss_type": "CE",
        "epochs": args.epochs, "train_batch_size": 2048, "eval_batch_size": 4096, "stopping_step": 10,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
        "show_progress": False, "seed": args.seed, "checkpoint_dir": str(out), "log_wandb": False,
    }
    # RecBole writes its log under ./log/: keep it with the checkpoints, out of the checkout.
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    start = time.time()
    result = run_recbole(model=args.model, dataset="ml-100k", config_dict=config)
    wall = time.time() - start
    # RecBole's init_logger gives the root logger this run's file handler (a glob for the newest
    # log would pick up a concurrent run's file).
    log = pathlib.Path(next(h.baseFilename for h in logging.getLogger().handlers
                            if isinstance(h, logging.FileHandler)))
    valid_curve = [float(v) for v in re.findall(r"valid result:\s*\n[^\n]*?ndcg@10 : ([0-9.]+)", log.read_text())]
    record = {
        "model": args.model, "seed": args.seed, "epochs": args.epochs,
        "command": "python notebooks/recbole_reference.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": f"cpu, {torch.get_num_threads()} torch threads",
        "versions": {"python": platform.python_version(), "recbole": recbole.__version__,
                     "torch": torch.__version__},
        "valid_ndcg@10_per_epoch": valid_curve,
        "best_valid": dict(result["best_valid_result"]), "test": dict(result["test_result"]),
        "wall_time_s": wall,
    }
    runs = json.loads(RESULTS.read_text())["runs"] if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps({"protocol": "leave-one-out, full ranking over 1682 items, history not masked",
                                   "runs": [*runs, record]}, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
