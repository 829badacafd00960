"""``recjax fit RESULTS.csv --law ...``: fit scaling laws to a sweep's table; JSON + PNG out.

Laws: ``power`` (L vs C), ``chinchilla`` (L vs N, D), ``isoflop`` (minima per budget),
``loglinear`` (metric vs ln C), ``efficiency`` (eta of ``--target``, or of every architecture,
over eta of ``--baseline``, on the data budgets both ran, with one intercept per budget; with
``--metric excess_kl`` also the compute exponent of ``A_D C^-alpha_C``),
``mfu`` (MFU vs params and vs compute per device kind), or ``all`` (each that applies).
Only rows with ``status == ok`` are used. N is ``--n-col`` (default ``active_params``: the
dense parameters one example uses), D is ``examples_seen``, C is ``train_flops_total``, and
the compute-optimal allocation uses ``C = k N D`` with ``k`` the table's median
``train_flops_total / (N D)`` unless ``--flops-per-param-example`` is given.
Writes ``<out>/fit_<law>.json`` and ``<out>/<law>.png`` (default out: ``<table dir>/fits``).

``--loss excess_kl`` (mean KL from the teacher, synthetic data) fits an excess loss: ``E`` is
held at 0 unless ``--fix-e`` says otherwise (``A/N^alpha + B/D^beta``, ``A/C^alpha``), and the
free-``E`` fit is stored beside it as a check (``free_E_check`` in the JSON).
``--huber-delta``: Hoffmann et al.'s 1e-3 makes the Huber loss an L1 fit whenever the log
residuals are larger (seed noise of a CPU sweep is ~1e-2); about 1.35 x the residual scale
keeps it quadratic at the noise level and robust beyond (the delta is stored in the JSON).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

LAWS = ("power", "chinchilla", "isoflop", "loglinear", "efficiency", "mfu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results table (CSV) written by `recjax sweep run`")
    parser.add_argument("--law", choices=[*LAWS, "all"], default="all")
    parser.add_argument("--out", default=None, help="output directory (default: <table dir>/fits)")
    parser.add_argument("--model", default=None, help="only rows of this model (architecture)")
    parser.add_argument("--loss", default="eval_logloss", help="loss column (power, chinchilla, isoflop)")
    parser.add_argument("--metric", default="eval_ne", help="metric column (loglinear, efficiency)")
    parser.add_argument("--n-col", default="active_params", help="N column")
    parser.add_argument("--flops-per-param-example", type=float, default=None,
                        help="k in C = k N D (default: median over the table)")
    parser.add_argument("--fix-e", default=None, metavar="bayes|FLOAT",
                        help="hold E (irreducible loss) fixed: the table's Bayes logloss or a value")
    parser.add_argument("--huber-delta", type=float, default=None,
                        help="Huber delta on log loss (power, chinchilla; default 1e-3, Hoffmann et al.)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--level", type=float, default=0.95, help="interval coverage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isoflop-method", choices=["parabola", "akima"], default="parabola")
    parser.add_argument("--budget-rtol", type=float, default=0.1,
                        help="runs whose compute differs by less than this share a budget")
    parser.add_argument("--target", default=None,
                        help="architecture whose efficiency is measured (default: all but the baseline)")
    parser.add_argument("--baseline", default=None, help="baseline architecture (efficiency)")


def _rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from recjax.scaling import results

    path = pathlib.Path(args.results)
    if not path.is_file():
        raise ValueError(f"results table not found: {path}")
    rows = results.ok_rows(results.read_rows(path))
    if args.model:
        rows = [r for r in rows if r.get("model") == args.model]
    if not rows:
        raise ValueError(f"{path}: no rows with status ok" + (f" for model {args.model!r}" if args.model else ""))
    return rows


def _need_one_model(rows: list[dict[str, Any]], law: str) -> None:
    models = sorted({r.get("model") for r in rows})
    if len(models) > 1:
        raise ValueError(f"--law {law} mixes models {models}; pick one with --model")


def fit_law(law: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[Any, Any]:
    """Returns (fit or dict of fits, figure)."""
    import numpy as np

    from recjax.scaling import fit as F
    from recjax.scaling import plots
    from recjax.scaling.results import column, ok_rows

    kw = {"n_boot": args.n_boot, "level": args.level, "seed": args.seed}
    lse = {"delta": args.huber_delta} if args.huber_delta is not None else {}
    if law in ("power", "chinchilla", "isoflop", "loglinear"):
        _need_one_model(rows, law)
    if law in ("power", "chinchilla", "isoflop"):
        rows = ok_rows(rows, args.loss, args.n_col, "train_flops_total")
        n, d = column(rows, args.n_col), column(rows, "examples_seen")
        c, loss = column(rows, "train_flops_total"), column(rows, args.loss)
        k = args.flops_per_param_example or float(np.median(c / (n * d)))
        excess = args.loss == "excess_kl"
        fixed = 0.0 if excess and args.fix_e is None else _fixed_e(args.fix_e, rows)
        floor = None if excess else _floor(rows)
    if law == "power":
        fit = F.fit_power_law(c, loss, E=fixed, **kw, **lse)
        if excess and fixed == 0.0:
            fit.info["free_E_check"] = _params(F.fit_power_law(c, loss, **kw, **lse))
        fig, (ax,) = plots.new_figure()
        plots.frontier(ax, c, loss, power=fit, floor=floor)
        if excess:
            ax.set_yscale("log")
    elif law == "chinchilla":
        fit = F.fit_chinchilla(n, d, loss, E=fixed, **kw, **lse)
        fit.info["flops_per_param_example"] = k
        if excess and fixed == 0.0:
            fit.info["free_E_check"] = _params(F.fit_chinchilla(n, d, loss, **kw, **lse))
        fig, axes = plots.new_figure(3)
        plots.frontier(axes[0], c, loss, chinchilla=fit, flops_per_param_example=k, floor=floor)
        if excess:
            axes[0].set_yscale("log")
        plots.compute_optimal(axes[1], axes[2], fit, c, k)
    elif law == "isoflop":
        fit = F.fit_isoflop(n, loss, c, method=args.isoflop_method, rtol=args.budget_rtol, **kw)
        fig, (ax,) = plots.new_figure()
        plots.isoflop(ax, fit, n, loss)
    elif law == "loglinear":
        rows = ok_rows(rows, args.metric, "train_flops_total")
        c, m = column(rows, "train_flops_total"), column(rows, args.metric)
        fit = F.fit_loglinear(c, m, **kw)
        fig, (ax,) = plots.new_figure()
        plots.versus(ax, c, m, [r["model"] for r in rows], xlabel="training FLOPs C",
                     ylabel=args.metric, title=f"{args.metric} = m0 + eta ln C",
                     fits={rows[0]["model"]: fit})
    elif law == "efficiency":
        fit, fig = _efficiency(rows, args, kw)
    elif law == "mfu":
        fit, fig = _mfu(rows, args, kw)
    else:
        raise ValueError(f"unknown law {law!r}; choose from {LAWS}")
    return fit, fig


def _params(fit: Any) -> dict[str, Any]:
    """A fit's parameters with their intervals (as in its JSON), for a check stored beside it."""
    return fit.to_dict()["params"]


def _fixed_e(value: str | None, rows: list[dict[str, Any]]) -> float | None:
    if value is None:
        return None
    if value == "bayes":
        floor = _floor(rows)
        if floor is None:
            raise ValueError("--fix-e bayes needs one bayes_logloss shared by all rows")
        return floor
    return float(value)


def _floor(rows: list[dict[str, Any]]) -> float | None:
    vals = {r.get("bayes_logloss") for r in rows} - {None}
    return float(next(iter(vals))) if len(vals) == 1 else None


def _efficiency(rows: list[dict[str, Any]], args: argparse.Namespace,
                kw: dict[str, Any]) -> tuple[Any, Any]:
    """Each target's (``--target``, or every other architecture) efficiency against ``--baseline``
    on the data budgets both ran, slopes taken within each budget (model scaling at fixed data)
    with one intercept per budget."""
    import numpy as np

    from recjax.scaling import fit as F
    from recjax.scaling import plots
    from recjax.scaling.results import column, ok_rows, shared_budgets

    if not args.baseline:
        raise ValueError("--law efficiency needs --baseline ARCH (and optionally --target ARCH)")
    rows = ok_rows(rows, args.metric, "train_flops_total")
    archs = sorted({r["model"] for r in rows})
    targets = [args.target] if args.target else [a for a in archs if a != args.baseline]
    if not targets:
        raise ValueError(f"--law efficiency: the table has no architecture besides {args.baseline!r}")
    exponent = args.metric == "excess_kl"
    fits, fitted = {}, {}
    for name in targets:
        pair = shared_budgets([r for r in rows if r["model"] in (name, args.baseline)])
        c, m, budget = (column(pair, k) for k in ("train_flops_total", args.metric, "examples_seen"))
        arch = np.array([r["model"] for r in pair])
        groups = None if np.isnan(budget).any() else budget
        fits[name] = F.scaling_efficiency(c, m, arch, name, args.baseline, groups=groups,
                                          compute_exponent=exponent, **kw)
        fitted.update({a: F.fit_loglinear(c[arch == a], m[arch == a], n_boot=0,
                                          groups=None if groups is None else groups[arch == a])
                       for a in (name, args.baseline)})
    shown = [r for r in rows if r["model"] in fitted]
    fig, (ax,) = plots.new_figure()
    plots.versus(ax, column(shown, "train_flops_total"), column(shown, args.metric),
                 [r["model"] for r in shown], xlabel="training FLOPs C", ylabel=args.metric,
                 title=f"scaling efficiency vs {args.baseline}", fits=fitted)
    if exponent:
        ax.set_yscale("log")
    return (fits[args.target] if args.target else fits), fig


def _mfu(rows: list[dict[str, Any]], args: argparse.Namespace, kw: dict[str, Any]) -> tuple[Any, Any]:
    import numpy as np

    from recjax.scaling import fit as F
    from recjax.scaling import plots
    from recjax.scaling.results import column, ok_rows

    rows = ok_rows(rows, "mfu", args.n_col)
    if not rows:
        raise ValueError("no rows with an MFU (the device's peak is unknown, e.g. CPU); "
                         "TFLOP/s per device is in the table's tflops_per_device column")
    kinds = np.array([r["device_kind"] for r in rows])
    n, c, mfu = column(rows, args.n_col), column(rows, "train_flops_total"), column(rows, "mfu")
    fits: dict[str, dict[str, Any]] = {}
    for kind in sorted(set(kinds.tolist())):
        sel = kinds == kind
        fits[kind] = {name: F.fit_loglinear(x[sel], mfu[sel], **kw)
                      for name, x in (("vs_params", n), ("vs_compute", c))
                      if np.unique(x[sel]).size >= 2}
    fig, axes = plots.new_figure(2)
    for ax, key, x, xlabel in ((axes[0], "vs_params", n, args.n_col),
                               (axes[1], "vs_compute", c, "training FLOPs C")):
        plots.versus(ax, x, mfu, kinds, xlabel=xlabel, ylabel="MFU", title=f"MFU {key.replace('_', ' ')}",
                     fits={k: v[key] for k, v in fits.items() if key in v})
    return fits, fig


def _to_json(fit: Any) -> Any:
    if isinstance(fit, dict):
        return {k: _to_json(v) for k, v in fit.items()}
    return fit.to_dict()


def format_fit(fit: Any, indent: str = "  ") -> str:
    if isinstance(fit, dict):
        return "\n".join(f"{indent}{k}:\n{format_fit(v, indent + '  ')}" for k, v in fit.items())
    return fit.summary(indent)


def run(args: argparse.Namespace) -> int:
    rows = _rows(args)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.results).parent / "fits"
    out.mkdir(parents=True, exist_ok=True)
    laws = [args.law] if args.law != "all" else ["power", "chinchilla", "isoflop", "loglinear"]
    if args.law == "all":
        if any(r.get("mfu") is not None for r in rows):
            laws.append("mfu")
        if args.baseline:
            laws.append("efficiency")
    failed = 0
    for law in laws:
        try:
            fit, fig = fit_law(law, rows, args)
        except ValueError as e:
            print(f"{law}: skipped: {e}")
            failed += 1
            continue
        (out / f"fit_{law}.json").write_text(json.dumps(_to_json(fit), indent=2))
        fig.savefig(out / f"{law}.png", dpi=120)
        level = next(iter(fit.values())) if isinstance(fit, dict) else fit
        print(f"{law} ({_level(level)} intervals, {args.n_boot} resamples) -> {out / f'fit_{law}.json'}")
        print(format_fit(fit))
    return 1 if failed == len(laws) or (args.law != "all" and failed) else 0


def _level(fit: Any) -> str:
    if isinstance(fit, dict):
        return _level(next(iter(fit.values()))) if fit else "n/a"
    return f"{100 * fit.level:.0f}%"
