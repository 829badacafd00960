"""Matplotlib figures of scaling fits; each function draws on a given ``Axes``.

Library code never touches pyplot state: notebooks pass ``plt.subplots()`` axes, the CLI
uses :func:`new_figure` (a plain ``Figure``, no GUI backend) and ``fig.savefig``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from recjax.scaling import fit as fitlib


def new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.8) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _span(x: np.ndarray, pad: float = 1.5, n: int = 100) -> np.ndarray:
    return np.geomspace(np.min(x) / pad, np.max(x) * pad, n)


def isoflop(ax: Any, iso: fitlib.Fit, params: Any, loss: Any) -> None:
    """Loss vs params per compute budget (the fit's grouping), its parabola and minimum (star)."""
    n, l_, b = np.asarray(params, float), np.asarray(loss, float), np.asarray(iso.info["labels"])
    minima = iso.info["minima"]
    for lab, m, color in zip(np.unique(b), minima, _colors(len(minima)), strict=True):
        sel = b == lab
        ax.scatter(n[sel], l_[sel], color=color, s=18, label=f"C={m['compute']:.2g}")
        if sel.sum() >= 3 and iso.info["method"] == "parabola":
            x = np.log(n[sel])
            coef = np.polyfit(x, l_[sel], 2)
            grid = np.linspace(x.min(), x.max(), 50)
            ax.plot(np.exp(grid), np.polyval(coef, grid), color=color, lw=1)
        if m["interior"]:
            ax.scatter([m["n_opt"]], [m["loss_opt"]], marker="*", s=120, color=color,
                       edgecolor="k", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("eval loss")
    ax.set_title("IsoFLOP curves (stars: interior minima)")
    ax.legend(fontsize=7)


def frontier(
    ax: Any,
    compute: Any,
    loss: Any,
    *,
    power: fitlib.Fit | None = None,
    chinchilla: fitlib.Fit | None = None,
    flops_per_param_example: float | None = None,
    floor: float | None = None,
) -> None:
    """Loss vs compute: runs, the power law and the approach-3 frontier with bootstrap bands."""
    c, l_ = np.asarray(compute, float), np.asarray(loss, float)
    ax.scatter(c, l_, s=14, color="0.3", label="runs")
    grid = _span(c)
    if power is not None:
        p = power.params
        ax.plot(grid, fitlib.power_law(grid, p["E"], p["A"], p["alpha"]), color="C0",
                label=f"E + A C^-a, a={p['alpha']:.3f}")
        s = power.samples
        curves = fitlib.power_law(grid[None], s["E"][:, None], s["A"][:, None], s["alpha"][:, None])
        ax.fill_between(grid, *fitlib.band(curves, power.level), color="C0", alpha=0.2)
    if chinchilla is not None and flops_per_param_example:
        fr = fitlib.chinchilla_frontier(chinchilla, grid, flops_per_param_example)
        ax.plot(grid, fr["loss"], color="C3", label="approach 3 frontier")
        ax.fill_between(grid, *fitlib.band(fr["loss_samples"], chinchilla.level), color="C3",
                        alpha=0.2)
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label=f"Bayes floor {floor:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("eval loss")
    ax.set_title("Loss vs compute")
    ax.legend(fontsize=7)


def compute_optimal(
    ax_n: Any,
    ax_d: Any,
    chinchilla: fitlib.Fit,
    compute: Any,
    flops_per_param_example: float,
    iso: fitlib.Fit | None = None,
) -> None:
    """Compute-optimal N and D vs C from approach 3 (bands) and the IsoFLOP minima (stars)."""
    grid = _span(np.asarray(compute, float), pad=3.0)
    fr = fitlib.chinchilla_frontier(chinchilla, grid, flops_per_param_example)
    for ax, key, label in ((ax_n, "n_opt", "N_opt"), (ax_d, "d_opt", "D_opt")):
        ax.plot(grid, fr[key], color="C3", label=f"approach 3: {label}")
        ax.fill_between(grid, *fitlib.band(fr[key + "_samples"], chinchilla.level), color="C3",
                        alpha=0.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(label)
    if iso is not None:
        pts = [m for m in iso.info["minima"] if m["interior"]]
        if pts:
            cs = np.array([m["compute"] for m in pts])
            ns = np.array([m["n_opt"] for m in pts])
            ax_n.scatter(cs, ns, marker="*", s=100, color="C2", label="IsoFLOP minima", zorder=3)
            ax_d.scatter(cs, cs / (flops_per_param_example * ns), marker="*", s=100, color="C2",
                         label="IsoFLOP minima", zorder=3)
    ax_n.set_title(f"N_opt ~ C^{chinchilla.params['n_opt_exponent']:.2f}")
    ax_d.set_title(f"D_opt ~ C^{chinchilla.params['d_opt_exponent']:.2f}")
    ax_n.legend(fontsize=7)
    ax_d.legend(fontsize=7)


def bayes_gap(ax: Any, compute: Any, loss: Any, bayes: Any, labels: Any) -> None:
    """Excess loss over the synthetic stream's Bayes-optimal loss vs compute, per label."""
    c, gap, lab = np.asarray(compute, float), np.asarray(loss, float) - np.asarray(bayes, float), \
        np.asarray(labels)
    for name, color in zip(sorted(set(lab.tolist())), _colors(len(set(lab.tolist()))), strict=True):
        sel = lab == name
        order = np.argsort(c[sel])
        ax.plot(c[sel][order], gap[sel][order], "o-", color=color, ms=4, label=str(name))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("eval logloss - Bayes logloss")
    ax.set_title("Gap to the Bayes floor")
    ax.legend(fontsize=7)


def excess_vs_size_and_data(
    ax_n: Any,
    ax_d: Any,
    chinchilla: fitlib.Fit,
    params: Any,
    data: Any,
    excess: Any,
    floor: Any | None = None,
) -> None:
    """Excess loss vs N per data budget (``ax_n``) and vs D per size (``ax_d``), log-log.

    Lines: the approach-3 fit ``E + A/N^alpha + B/D^beta`` at each budget / size with its
    bootstrap band. ``floor [runs]``: each run's idealised data-limited floor (a function of D
    alone), drawn dashed per budget on ``ax_n`` and as one dashed curve on ``ax_d``.
    """
    n, d, y = (np.asarray(a, float) for a in (params, data, excess))
    p, s = chinchilla.params, chinchilla.samples
    keys = ("E", "A", "B", "alpha", "beta")

    def curve(nn: np.ndarray, dd: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        mid = fitlib.chinchilla_loss(nn, dd, *(p[k] for k in keys))
        boot = fitlib.chinchilla_loss(nn[None], dd[None], *(s[k][:, None] for k in keys))
        return mid, fitlib.band(boot, chinchilla.level)

    fl = None if floor is None else np.asarray(floor, float)
    for ax, x, g, xname, gname in ((ax_n, n, d, "N", "D"), (ax_d, d, n, "D", "N")):
        groups = np.unique(g)
        for value, color in zip(groups, _colors(groups.size), strict=True):
            sel = g == value
            ax.scatter(x[sel], y[sel], color=color, s=16, label=f"{gname}={value:.3g}")
            grid = _span(x[sel], pad=1.2)
            full = np.full_like(grid, value)
            mid, (lo, hi) = curve(grid, full) if xname == "N" else curve(full, grid)
            ax.plot(grid, mid, color=color, lw=1)
            ax.fill_between(grid, lo, hi, color=color, alpha=0.15)
            if fl is not None and xname == "N" and np.isfinite(fl[sel]).any():
                ax.axhline(float(np.nanmean(fl[sel])), color=color, ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("dense parameters N" if xname == "N" else "training examples D")
        ax.set_ylabel("excess KL")
    if fl is not None and np.isfinite(fl).any():
        ok = np.isfinite(fl)
        order = np.argsort(d[ok])
        ax_d.plot(d[ok][order], fl[ok][order], "k--", lw=1, label="data-limited floor")
    ax_n.set_title(f"excess KL vs N per D (alpha={p['alpha']:.2f}; dashed: floors)")
    ax_d.set_title(f"excess KL vs D per N (beta={p['beta']:.2f})")
    ax_n.legend(fontsize=7)
    ax_d.legend(fontsize=7)


def versus(ax: Any, x: Any, y: Any, groups: Any, *, xlabel: str, ylabel: str, title: str,
           fits: dict[str, fitlib.Fit] | None = None) -> None:
    """``y`` vs ``x`` (log x) per group, with each group's log-linear fit when given (one line
    per intercept of a fit with per-budget intercepts)."""
    x, y, g = np.asarray(x, float), np.asarray(y, float), np.asarray(groups)
    for name, color in zip(sorted(set(g.tolist())), _colors(len(set(g.tolist()))), strict=True):
        sel = g == name
        ax.scatter(x[sel], y[sel], color=color, s=18, label=str(name))
        if fits and name in fits:
            grid = _span(x[sel], pad=1.2)
            p = fits[name].params
            for m0 in fits[name].info.get("intercepts", {"": p["m0"]}).values():
                ax.plot(grid, m0 + p["eta"] * np.log(grid), color=color, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def _colors(n: int) -> list[str]:
    return [f"C{i % 10}" for i in range(n)]
