"""Measure what each knob of the synthetic CTR stream does (``recjax.data.synthetic``).

No training: every number comes from the teacher itself on 20,000 held-out examples.

- ``teacher_logit_scale``: the learnable signal, the KL of the best constant predictor (the
  mean probability) from the teacher, ``excess_kl(mean q, q)``.
- ``capacity_spectrum`` (gamma): the excess KL of the teacher whose capacity term keeps only
  its first ``m`` hidden units, the best a width-``m`` copy of that term can do, and the
  log-log slope of that curve over m = 4..256 (the parameter axis).
- ``capacity_share``: the measured share of the capacity term in the sum of the terms'
  variances.
- ``zipf_exponent`` and ``vocab_sizes``: the expected fraction of examples whose id occurs
  fewer than 100 times in ``n`` training examples (``rare_id_fraction``; checked against
  counts drawn from the stream in ``tests/test_data_synthetic.py``) and its log-log slope in
  ``n`` (the data axis), and the data-limited floor (``recjax.data.synthetic_floor``: the
  excess KL an idealised learner keeps after ``n`` examples) of the default and the scaling
  stream with its log-log slope.

Writes ``notebooks/results/stream_knobs.{json,md}``::

    .venv/bin/python notebooks/stream_knobs.py
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import sys
import time

import numpy as np

from recjax.config import SyntheticDataConfig
from recjax.data.synthetic import EVAL_OFFSET, SyntheticCTR, rare_id_fraction
from recjax.data.synthetic_floor import data_limited_kl
from recjax.tasks.metrics import excess_kl

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "stream_knobs"
EVAL = np.arange(20_000, dtype=np.int64) + EVAL_OFFSET
WIDTHS = (4, 8, 16, 32, 64, 128, 256)
SCALING = SyntheticDataConfig(  # the stream of configs/experiments/scaling_stream.yaml
    vocab_sizes=[100_000], zipf_exponent=1.5, teacher_terms=["linear", "fm", "dense_mlp", "capacity"],
    capacity_width=1024, capacity_spectrum=0.75, capacity_share=0.7, teacher_logit_scale=2.0,
)


def slope(x, y) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def signal() -> list[dict]:
    rows = []
    for name, base in (("default", SyntheticDataConfig()), ("scaling", SCALING)):
        for scale in (1.0, 2.0, 3.0):
            q = SyntheticCTR(dataclasses.replace(base, teacher_logit_scale=scale)).label_prob(EVAL)
            rows.append({"stream": name, "teacher_logit_scale": scale, "ctr": float(q.mean()),
                         "constant_predictor_kl": excess_kl(np.full_like(q, q.mean()), q)})
    return rows


def capacity() -> list[dict]:
    rows = []
    for gamma in (0.5, 0.75, 1.0, 1.5):
        gen = SyntheticCTR(dataclasses.replace(SCALING, capacity_spectrum=gamma))
        q = gen.label_prob(EVAL)
        var = gen.logit_terms(EVAL).var(axis=0)
        kls = [excess_kl(gen.label_prob(EVAL, m), q) for m in WIDTHS]
        rows.append({"capacity_spectrum": gamma, "capacity_share_measured": float(var[-1] / var.sum()),
                     "truncated_kl": dict(zip(map(str, WIDTHS), kls, strict=True)),
                     "slope_in_width": slope(WIDTHS, kls)})
    return rows


def data_axis() -> list[dict]:
    budgets = (2.5e5, 1e6, 5e6, 2e7)
    rows = []
    for s in (1.05, 1.5, 2.0):
        for vocab in (10_000, 100_000):
            frac = [rare_id_fraction(vocab, s, n) for n in budgets]
            rows.append({"zipf_exponent": s, "vocab": vocab,
                         "rare_fraction": dict(zip((f"{n:.2g}" for n in budgets), frac, strict=True)),
                         "slope_in_examples": slope(budgets, frac)})
    return rows


def data_floor() -> list[dict]:
    budgets = (1e5, 2.5e5, 7.5e5, 2e6, 5e6, 2e7)
    rows = []
    for name, cfg in (("default", SyntheticDataConfig()), ("scaling", SCALING)):
        kl = data_limited_kl(SyntheticCTR(cfg), budgets, EVAL[:4096])
        rows.append({"stream": name, "floor_kl": dict(zip((f"{n:.2g}" for n in budgets), kl.tolist(), strict=True)),
                     "slope_in_examples": slope(budgets, kl)})
    return rows


def markdown(payload: dict) -> str:
    out = ["Synthetic stream knobs, measured on the teacher (20,000 held-out examples; no training).", "",
           "Learnable signal: KL of the constant predictor from the teacher.", "",
           "| stream | logit scale | CTR | constant-predictor KL |", "|---|---:|---:|---:|"]
    out += [f"| {r['stream']} | {r['teacher_logit_scale']:g} | {r['ctr']:.3f} | {r['constant_predictor_kl']:.4f} |"
            for r in payload["signal"]]
    out += ["", "Parameter axis (scaling stream, capacity share 0.7): excess KL of the teacher with its "
            "capacity term cut to its first m of 1024 hidden units.", "",
            "| gamma | measured share | " + " | ".join(f"m={m}" for m in WIDTHS) + " | slope |",
            "|---:|---:|" + "---:|" * (len(WIDTHS) + 1)]
    out += [f"| {r['capacity_spectrum']:g} | {r['capacity_share_measured']:.3f} | "
            + " | ".join(f"{v:.5f}" for v in r["truncated_kl"].values()) + f" | {r['slope_in_width']:.2f} |"
            for r in payload["capacity"]]
    budgets = list(payload["data_axis"][0]["rare_fraction"])
    out += ["", "Data axis: expected fraction of examples whose id (one column) occurs < 100 times in n "
            "training examples.", "",
            "| Zipf s | vocab | " + " | ".join(f"n={n}" for n in budgets) + " | slope |",
            "|---:|---:|" + "---:|" * (len(budgets) + 1)]
    out += [f"| {r['zipf_exponent']:g} | {r['vocab']:,} | " + " | ".join(f"{v:.4f}" for v in r["rare_fraction"].values())
            + f" | {r['slope_in_examples']:.2f} |" for r in payload["data_axis"]]
    budgets = list(payload["data_floor"][0]["floor_kl"])
    out += ["", "Data-limited floor: excess KL of an idealised learner after n examples (4,096 held-out examples).",
            "", "| stream | " + " | ".join(f"n={n}" for n in budgets) + " | slope |",
            "|---|" + "---:|" * (len(budgets) + 1)]
    out += [f"| {r['stream']} | " + " | ".join(f"{v:.4f}" for v in r["floor_kl"].values())
            + f" | {r['slope_in_examples']:.2f} |" for r in payload["data_floor"]]
    return "\n".join(out) + "\n"


def main() -> None:
    t0 = time.perf_counter()
    payload = {
        "command": "python notebooks/stream_knobs.py",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": "cpu", "python": platform.python_version(), "numpy": np.__version__,
        "eval_examples": int(EVAL.size),
        "scaling_stream": dataclasses.asdict(SCALING),
        "signal": signal(), "capacity": capacity(), "data_axis": data_axis(), "data_floor": data_floor(),
    }
    payload["wall_s"] = time.perf_counter() - t0
    RESULTS.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    RESULTS.with_suffix(".md").write_text(markdown(payload))
    sys.stdout.write(markdown(payload))


if __name__ == "__main__":
    main()
