"""Scaling-law fits with bootstrap intervals (numpy + scipy; no jax).

Laws (``log`` is natural; every interval is a bootstrap percentile interval at ``level``):

- **power**: saturating power law in compute ``L(C) = E + A C^-alpha``.
- **chinchilla** (approach 3): ``L(N, D) = E + A / N^alpha + B / D^beta``, fitted in log space as
  ``min mean_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i)`` with
  ``A = e^a, B = e^b, E = e^e``, delta = 1e-3, L-BFGS from the grid of starts
  ``a, b in {0, 5, ..., 25}; e in {-1, -0.5, ..., 1}; alpha, beta in {0, 0.5, ..., 2}``. The
  power law uses the same objective with one term. The mean of Huber terms is divided by
  ``delta^2`` (same minimiser) so that it is O(1) and ordinary tolerances apply.
  Either law can hold ``E`` fixed (e.g. at the Bayes-optimal loss of a synthetic stream).
  Compute-optimal allocation for ``C = k N D``: ``N_opt = G (C/k)^(beta/(alpha+beta))``,
  ``D_opt = (C/k) / N_opt``, ``G = (alpha A / (beta B))^(1/(alpha+beta))``.
- **isoflop** (approach 2): per compute budget, a parabola (or Akima interpolant) of loss vs
  ``log N``; its minimum ``N*``; then ``N* = K C^a`` by least squares in log-log.
- **loglinear** (HSTU / Kunlun): ``m(C) = m0 + eta ln C``, optionally with one intercept per
  data budget (the slope is then model scaling at fixed data); scaling efficiency = ``eta`` of
  an architecture divided by ``eta`` of a baseline fitted on the same compute range or budgets.

Cost control (measured in the fit's ``wall_s``): all grid starts run together in a batched
L-BFGS (:mod:`recjax.scaling.lbfgs`) for ``first_pass`` iterations, the ``keep`` best continue to
convergence, and every bootstrap resample restarts from the ``boot_starts`` best distinct
solutions of the full fit instead of the whole grid. A best fit still improving after
``max_iter`` iterations (a flat, under-determined law) has ``info["converged"] = False``.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from typing import Any

import numpy as np

from recjax.scaling import lbfgs

HUBER_DELTA = 1e-3
COEF_STARTS = np.arange(0.0, 25.1, 5.0)  # a, b (log A, log B)
E_STARTS = np.arange(-1.0, 1.01, 0.5)  # e (log E)
EXPONENT_STARTS = np.arange(0.0, 2.01, 0.5)  # alpha, beta


@dataclasses.dataclass
class Fit:
    """Point estimates, bootstrap samples (``NaN`` rows = failed resamples) and fit metadata."""

    law: str
    params: dict[str, float]
    samples: dict[str, np.ndarray]
    level: float = 0.95
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def interval(self, name: str) -> tuple[float, float]:
        s = self.samples.get(name)
        if s is None or not np.any(np.isfinite(s)):
            return (float("nan"), float("nan"))
        q = (1.0 - self.level) / 2.0
        lo, hi = np.nanquantile(s, [q, 1.0 - q])
        return (float(lo), float(hi))

    def summary(self, indent: str = "  ") -> str:
        """One line per parameter: ``name = value  [lo, hi]``."""
        lines = []
        for name, v in self.params.items():
            lo, hi = self.interval(name)
            lines.append(f"{indent}{name:>15} = {v:.5g}  [{lo:.5g}, {hi:.5g}]")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        params = {}
        for k, v in self.params.items():
            lo, hi = self.interval(k)
            params[k] = {"value": float(v), "lo": lo, "hi": hi}
        return {"law": self.law, "level": self.level, "params": params, **_jsonable(self.info)}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def _check(name: str, x: Any, n: int | None = None, positive: bool = True) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if n is not None and a.size != n:
        raise ValueError(f"{name} has {a.size} values but the other inputs have {n}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite values; drop failed runs (status != ok) first")
    if positive and np.any(a <= 0):
        raise ValueError(f"{name} must be > 0 (it is used in a log); got min {a.min()}")
    return a


def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n]`` row indices drawn with replacement."""
    return rng.integers(0, n, size=(n_boot, n))


# ----------------------------------------------------------------------------- LSE laws


class _LSEObjective:
    """``mean_i w_i Huber(LSE_k(c_k - x_k log X_ki, e) - log L_i) / delta^2`` and its gradient.

    Parameters per problem: ``[c_1..c_K, e, x_1..x_K]``. ``weights [W, n]`` are data weightings
    (row 0 = all ones; bootstrap resamples as counts); ``which[problem]`` picks one.
    """

    def __init__(self, log_x: np.ndarray, log_l: np.ndarray, delta: float, fixed_e: bool):
        self.log_x = log_x  # [K, n]
        self.log_l = log_l  # [n]
        self.delta = delta
        self.weights = np.ones((1, log_l.size))
        self.which = np.zeros(0, dtype=np.int64)
        # a zero gradient keeps e where it starts (L-BFGS then never moves it)
        self.mask = np.ones(2 * log_x.shape[0] + 1)
        if fixed_e:
            self.mask[log_x.shape[0]] = 0.0

    def __call__(self, x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.log_l.size
        block = max(1, (1 << 15) // n)  # rows per chunk: temporaries stay in cache
        fs, gs = [], []
        with np.errstate(all="ignore"):  # diverging starts give inf/nan and are discarded
            for i in range(0, x.shape[0], block):
                w = self.weights[self.which[rows[i : i + block]]]
                f, g = self._value_grad(x[i : i + block], w)
                fs.append(f)
                gs.append(g * self.mask)
        return np.concatenate(fs), np.concatenate(gs)

    def _value_grad(self, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = self.log_x.shape[0]
        e = x[:, k, None]
        terms = [x[:, j, None] - x[:, k + 1 + j, None] * self.log_x[j] for j in range(k)]  # [s, n]
        top = np.maximum(np.maximum.reduce(terms), e) if k > 1 else np.maximum(terms[0], e)
        ex = [np.exp(t - top) for t in terms]
        ex_e = np.exp(e - top)
        z = ex_e + sum(ex)
        pred = top + np.log(z)
        d = self.delta
        r = pred - self.log_l
        ar = np.abs(r)
        h = np.where(ar <= d, 0.5 * r * r, d * (ar - 0.5 * d))
        wsum = w.sum(axis=1)
        f = np.einsum("sn,sn->s", w, h) / (wsum * d**2)
        wd = w * np.clip(r, -d, d) / (z * (wsum * d**2)[:, None])  # dHuber/dpred / z, weighted
        g_c = [np.einsum("sn,sn->s", wd, x_) for x_ in ex]
        g_x = [-((wd * x_) @ self.log_x[j]) for j, x_ in enumerate(ex)]
        g_e = np.einsum("sn,sn->s", wd, ex_e)
        return f, np.stack([*g_c, g_e, *g_x], axis=1)


def _grid(k: int) -> np.ndarray:
    """All starts ``[c_1..c_K, e, x_1..x_K]`` of the SCALING.md grid for K terms."""
    axes = [COEF_STARTS] * k + [E_STARTS] + [EXPONENT_STARTS] * k
    return np.array(list(itertools.product(*axes)), dtype=np.float64)


def _distinct_best(x: np.ndarray, f: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` rows of ``x`` with the lowest ``f``, skipping near-duplicates."""
    order = np.argsort(np.where(np.isfinite(f), f, np.inf))
    chosen: list[np.ndarray] = []
    for i in order:
        if not np.isfinite(f[i]) or len(chosen) == count:
            break
        if all(np.max(np.abs(x[i] - c)) > 1e-3 for c in chosen):
            chosen.append(x[i])
    return np.array(chosen)


def _fit_lse(
    log_x: np.ndarray,
    log_l: np.ndarray,
    *,
    n_boot: int,
    seed: int,
    delta: float,
    first_pass: int,
    keep: int,
    boot_starts: int,
    max_iter: int,
    fixed_e: float | None = None,
) -> tuple[np.ndarray, float, np.ndarray, dict[str, Any]]:
    """Best ``[c.., e, x..]``, its objective, bootstrap solutions ``[n_boot, P]``, and info.

    ``fixed_e``: hold ``e = log E`` at this value (e.g. a known irreducible loss).
    """
    t0 = time.perf_counter()
    obj = _LSEObjective(log_x, log_l, delta, fixed_e is not None)
    starts = _grid(log_x.shape[0])
    if fixed_e is not None:
        starts[:, log_x.shape[0]] = fixed_e
        starts = np.unique(starts, axis=0)
    obj.which = np.zeros(len(starts), dtype=np.int64)
    x1, f1, _ = lbfgs.minimize(obj, starts, max_iter=first_pass)
    best = _distinct_best(x1, f1, keep)
    if best.size == 0:
        raise ValueError("every start of the fit diverged; check the inputs (loss > 0, sizes > 0)")
    obj.which = np.zeros(len(best), dtype=np.int64)
    x2, f2, it2 = lbfgs.minimize(obj, best, max_iter=max_iter)
    i = int(np.nanargmin(np.where(np.isfinite(f2), f2, np.inf)))
    info: dict[str, Any] = {
        "n_starts": len(starts),
        "n_refined": len(best),
        "iterations": int(it2[i]),
        "converged": bool(it2[i] < max_iter),  # False: still improving at max_iter (flat law)
        "fit_s": time.perf_counter() - t0,
    }
    boot = np.full((n_boot, starts.shape[1]), np.nan)
    if n_boot > 0:
        t1 = time.perf_counter()
        seeds = _distinct_best(x2, f2, boot_starts)
        idx = bootstrap_indices(log_l.size, n_boot, np.random.default_rng(seed))
        counts = np.stack([np.bincount(r, minlength=log_l.size) for r in idx]).astype(np.float64)
        obj.weights = counts
        obj.which = np.repeat(np.arange(n_boot), len(seeds))
        xb, fb, _ = lbfgs.minimize(obj, np.tile(seeds, (n_boot, 1)), max_iter=max_iter)
        fb = np.where(np.isfinite(fb), fb, np.inf).reshape(n_boot, len(seeds))
        pick = np.argmin(fb, axis=1)
        xb = xb.reshape(n_boot, len(seeds), -1)[np.arange(n_boot), pick]
        ok = np.isfinite(fb[np.arange(n_boot), pick])
        boot[ok] = xb[ok]
        info["boot_s"] = time.perf_counter() - t1
        info["n_boot_failed"] = int((~ok).sum())
    info["wall_s"] = time.perf_counter() - t0
    return x2[i], float(f2[i]), boot, info


_FIT_DEFAULTS = {"first_pass": 10, "keep": 32, "boot_starts": 4, "max_iter": 500}


_LOG_ZERO = -1000.0  # log E for E = 0: exp underflows to exactly 0 next to any loss term


def _irreducible(E: float | None) -> float | None:
    """``log E`` for a fixed ``E >= 0`` (``E = 0``: a loss that is all reducible, e.g. excess KL)."""
    if E is None:
        return None
    if not E >= 0:
        raise ValueError(f"a fixed irreducible loss E must be >= 0, got {E}")
    return float(np.log(E)) if E > 0 else _LOG_ZERO


def fit_power_law(
    compute: Any,
    loss: Any,
    *,
    E: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    delta: float = HUBER_DELTA,
    **opts: int,
) -> Fit:
    """``L(C) = E + A C^-alpha``; params ``E, A, alpha`` (``E`` held fixed when given)."""
    c = _check("compute", compute)
    l_ = _check("loss", loss, c.size)
    if c.size < 4:
        raise ValueError(f"the power law has 3 parameters; {c.size} runs are too few (need >= 4)")
    x, f, boot, info = _fit_lse(
        np.log(c)[None], np.log(l_), n_boot=n_boot, seed=seed, delta=delta,
        fixed_e=_irreducible(E), **{**_FIT_DEFAULTS, **opts},
    )
    with np.errstate(over="ignore", invalid="ignore"):
        params = {"E": np.exp(x[1]), "A": np.exp(x[0]), "alpha": x[2]}
        samples = {"E": np.exp(boot[:, 1]), "A": np.exp(boot[:, 0]), "alpha": boot[:, 2]}
    info.update(n_points=int(c.size), n_boot=n_boot, objective=f, delta=delta, fixed_E=E)
    return Fit("power", {k: float(v) for k, v in params.items()}, samples, level, info)


def fit_chinchilla(
    params: Any,
    data: Any,
    loss: Any,
    *,
    E: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    delta: float = HUBER_DELTA,
    **opts: int,
) -> Fit:
    """``L(N, D) = E + A/N^alpha + B/D^beta`` (approach 3; ``E`` held fixed when given).

    Params ``E, A, B, alpha, beta`` and the compute-optimal exponents
    ``n_opt_exponent = beta/(alpha+beta)``, ``d_opt_exponent = alpha/(alpha+beta)``.
    """
    n = _check("params (N)", params)
    d = _check("data (D)", data, n.size)
    l_ = _check("loss", loss, n.size)
    if n.size < 6:
        raise ValueError(f"approach 3 has 5 parameters; {n.size} runs are too few (need >= 6)")
    x, f, boot, info = _fit_lse(
        np.log(np.stack([n, d])), np.log(l_), n_boot=n_boot, seed=seed, delta=delta,
        fixed_e=_irreducible(E), **{**_FIT_DEFAULTS, **opts},
    )

    def named(v: np.ndarray) -> dict[str, Any]:
        a, b, e, alpha, beta = (v[..., i] for i in range(5))
        return {
            "E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta,
            "n_opt_exponent": beta / (alpha + beta), "d_opt_exponent": alpha / (alpha + beta),
        }

    info.update(n_points=int(n.size), n_boot=n_boot, objective=f, delta=delta, fixed_E=E)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        point = {k: float(v) for k, v in named(x).items()}
        samples = named(boot)
    return Fit("chinchilla", point, samples, level, info)


def power_law(compute: Any, E: Any, A: Any, alpha: Any) -> np.ndarray:
    """``E + A C^-alpha`` (broadcasting; extreme bootstrap samples may give inf/nan)."""
    with np.errstate(all="ignore"):
        return E + A * np.asarray(compute, dtype=np.float64) ** (-alpha)


def chinchilla_loss(params: Any, data: Any, E: Any, A: Any, B: Any, alpha: Any, beta: Any) -> np.ndarray:
    """``E + A/N^alpha + B/D^beta`` (broadcasting)."""
    n = np.asarray(params, dtype=np.float64)
    d = np.asarray(data, dtype=np.float64)
    with np.errstate(all="ignore"):
        return E + A * n ** (-alpha) + B * d ** (-beta)


def compute_optimal(
    E: Any, A: Any, B: Any, alpha: Any, beta: Any, compute: Any, flops_per_param_example: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(N_opt, D_opt, L_opt)`` minimising ``L(N, D)`` subject to ``C = k N D`` (broadcasting)."""
    per = np.asarray(compute, dtype=np.float64) / flops_per_param_example
    with np.errstate(all="ignore"):
        g = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
        n_opt = g * per ** (beta / (alpha + beta))
        d_opt = per / n_opt
    return n_opt, d_opt, chinchilla_loss(n_opt, d_opt, E, A, B, alpha, beta)


def chinchilla_frontier(fit: Fit, compute: Any, flops_per_param_example: float) -> dict[str, np.ndarray]:
    """``N_opt, D_opt, L_opt`` over ``compute [c]`` at the point estimate and for every resample.

    Keys ``n_opt, d_opt, loss`` ``[c]`` and ``n_opt_samples, ...`` ``[n_boot, c]``.
    """
    c = np.asarray(compute, dtype=np.float64)
    keys = ("E", "A", "B", "alpha", "beta")
    n, d, l_ = compute_optimal(*(fit.params[k] for k in keys), c, flops_per_param_example)
    s = [fit.samples[k][:, None] for k in keys]
    ns, ds, ls = compute_optimal(*s, c[None], flops_per_param_example)
    return {"n_opt": n, "d_opt": d, "loss": l_, "n_opt_samples": ns, "d_opt_samples": ds,
            "loss_samples": ls}


def band(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band ``(lo [c], hi [c])`` of ``samples [n_boot, c]``."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.shape[0] == 0:  # no resamples (n_boot=0): no band
        nan = np.full(samples.shape[1:], np.nan)
        return nan, nan
    q = (1.0 - level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # columns where every resample failed
        lo, hi = np.nanquantile(np.where(np.isfinite(samples), samples, np.nan), [q, 1.0 - q], axis=0)
    return lo, hi


# ----------------------------------------------------------------------------- IsoFLOP


def group_budgets(compute: Any, rtol: float = 0.05) -> np.ndarray:
    """Integer budget label per run: runs whose compute is within ``rtol`` (in log) share one."""
    c = np.log(_check("compute", compute))
    order = np.argsort(c)
    labels = np.empty(c.size, dtype=np.int64)
    label, anchor = -1, -np.inf
    for i in order:
        if c[i] - anchor > np.log1p(rtol):
            label, anchor = label + 1, c[i]
        labels[i] = label
    return labels


def _minimum(log_n: np.ndarray, loss: np.ndarray, method: str) -> tuple[float, float, bool]:
    """``(log N*, L*, interior)`` of one IsoFLOP curve; when the fitted minimum is not inside
    the sampled sizes, the best sampled run is returned with ``interior = False``."""
    if method == "parabola":
        a, b, c = np.polyfit(log_n, loss, 2)
        x = -b / (2 * a) if a > 0 else np.nan
        if not log_n.min() < x < log_n.max():
            j = int(np.argmin(loss))
            return float(log_n[j]), float(loss[j]), False
        return float(x), float(np.polyval([a, b, c], x)), True
    if method == "akima":
        from scipy.interpolate import Akima1DInterpolator

        order = np.argsort(log_n)
        xs, ys = log_n[order], loss[order]
        keep = np.concatenate([[True], np.diff(xs) > 0])
        xs, ys = xs[keep], ys[keep]
        grid = np.linspace(xs[0], xs[-1], 512)
        vals = Akima1DInterpolator(xs, ys)(grid)
        j = int(np.argmin(vals))
        return float(grid[j]), float(vals[j]), bool(0 < j < grid.size - 1)
    raise ValueError(f"unknown IsoFLOP method {method!r}: use 'parabola' or 'akima'")


def _isoflop_once(
    log_n: np.ndarray, loss: np.ndarray, labels: np.ndarray, log_c: np.ndarray, method: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per budget label: ``(log C, log N*, L*, interior)``; NaN where < 3 distinct sizes."""
    out = []
    for lab in np.unique(labels):
        m = labels == lab
        if np.unique(log_n[m]).size < 3:
            out.append((np.mean(log_c[m]), np.nan, np.nan, False))
            continue
        out.append((np.mean(log_c[m]), *_minimum(log_n[m], loss[m], method)))
    arr = np.array(out, dtype=np.float64)
    return arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3].astype(bool)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares ``y = intercept + slope x``; NaNs if fewer than 2 points."""
    if x.size < 2 or np.unique(x).size < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def fit_isoflop(
    params: Any,
    loss: Any,
    compute: Any,
    *,
    budgets: Any = None,
    method: str = "parabola",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    rtol: float = 0.05,
) -> Fit:
    """IsoFLOP minima per budget and the power law ``N* = K C^a`` through the interior ones.

    ``budgets``: a budget label or nominal budget per run (default: :func:`group_budgets` of
    ``compute`` with ``rtol``). Params ``a`` (exponent) and ``K``; ``info["minima"]`` lists every
    budget's ``compute, n_opt, loss_opt, interior, runs`` (in label order) and
    ``info["labels"]`` the budget label of each run. Bootstrap: runs are resampled within each
    budget.
    """
    n = _check("params (N)", params)
    l_ = _check("loss", loss, n.size, positive=False)
    c = _check("compute", compute, n.size)
    labels = group_budgets(c, rtol) if budgets is None else np.unique(
        np.asarray(budgets), return_inverse=True
    )[1].ravel()
    log_n, log_c = np.log(n), np.log(c)
    t0 = time.perf_counter()
    bc, bn, bl, interior = _isoflop_once(log_n, l_, labels, log_c, method)
    intercept, slope = _line(bc[interior], bn[interior])
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == lab) for lab in np.unique(labels)]
    boot = np.full((n_boot, 2), np.nan)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(g, size=g.size) for g in groups])
        rc, rn, _, ri = _isoflop_once(log_n[idx], l_[idx], labels[idx], log_c[idx], method)
        boot[b] = _line(rc[ri], rn[ri])
    minima = [
        {"compute": float(np.exp(x)), "n_opt": float(np.exp(y)), "loss_opt": float(z),
         "interior": bool(i), "runs": int((labels == lab).sum())}
        for x, y, z, i, lab in zip(bc, bn, bl, interior, np.unique(labels), strict=True)
    ]
    info = {"method": method, "minima": minima, "labels": labels, "n_points": int(n.size),
            "n_boot": n_boot,
            "n_budgets_used": int(interior.sum()), "wall_s": time.perf_counter() - t0}
    samples = {"a": boot[:, 1], "K": np.exp(boot[:, 0])}
    return Fit("isoflop", {"a": slope, "K": float(np.exp(intercept))}, samples, level, info)


# ----------------------------------------------------------------------------- log-linear


def _within_slope(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[float, np.ndarray]:
    """Least squares ``y = c_g + slope x`` with one intercept per group ``g``: ``(slope, c [G])``
    (groups in ``np.unique`` order); the slope comes from the variation inside the groups."""
    labels, inv = np.unique(g, return_inverse=True)
    counts = np.bincount(inv)
    xc = x - (np.bincount(inv, x) / counts)[inv]
    yc = y - (np.bincount(inv, y) / counts)[inv]
    sxx = float(xc @ xc)
    if sxx <= 0:
        return float("nan"), np.full(labels.size, np.nan)
    slope = float(xc @ yc) / sxx
    return slope, np.bincount(inv, y - slope * x) / counts


def fit_loglinear(
    compute: Any,
    metric: Any,
    *,
    groups: Any = None,
    log_metric: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Fit:
    """``m(C) = m0 + eta ln C`` by least squares; params ``m0, eta``.

    ``groups [runs]`` (e.g. the data budget): one intercept per group and a shared slope, so
    ``eta`` measures how the metric moves with compute *within* a group (model scaling at a
    fixed budget) instead of across budgets; ``m0`` is then the mean intercept and
    ``info["intercepts"]`` has each. Runs are resampled within their group.
    ``log_metric``: fit ``ln m`` instead (``m = e^m0 C^eta``: ``-eta`` is the compute exponent of
    a power law with ``E = 0``).
    """
    c = _check("compute", compute)
    m = _check("metric", metric, c.size, positive=log_metric)
    g = np.zeros(c.size, dtype=np.int64) if groups is None else np.asarray(groups).ravel()
    if g.size != c.size:
        raise ValueError(f"groups has {g.size} values but compute has {c.size}")
    labels, inv = np.unique(g, return_inverse=True)
    if not any(np.unique(c[inv == k]).size >= 2 for k in range(labels.size)):
        raise ValueError("a log-linear fit needs runs at two or more compute values (in one group)")
    x, y = np.log(c), (np.log(m) if log_metric else m)
    eta, c0 = _within_slope(x, y, inv)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(inv == k) for k in range(labels.size)]
    boot = np.full((n_boot, 2), np.nan)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(mm, mm.size) for mm in members])
        slope, cb = _within_slope(x[idx], y[idx], inv[idx])
        boot[b] = (np.nanmean(cb), slope)
    info = {"n_points": int(c.size), "n_boot": n_boot, "compute_range": [float(c.min()), float(c.max())],
            "log_metric": log_metric}
    if groups is not None:
        info["intercepts"] = {str(k): float(v) for k, v in zip(labels.tolist(), c0, strict=True)}
    return Fit("loglinear", {"m0": float(np.mean(c0)), "eta": eta},
               {"m0": boot[:, 0], "eta": boot[:, 1]}, level, info)


def scaling_efficiency(
    compute: Any,
    metric: Any,
    arch: Any,
    target: str,
    baseline: str,
    *,
    groups: Any = None,
    compute_exponent: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Fit:
    """``eta_target / eta_baseline`` of log-linear fits, each architecture's runs resampled
    independently; params ``ratio, eta, eta_baseline``.

    Without ``groups``, both are fitted on the compute range both cover. ``groups [runs]`` (e.g.
    the data budget): per-group intercepts, as in :func:`fit_loglinear`, over every run.
    ``compute_exponent``: also the exponent of ``m = A_g C^-alpha_C`` (a power law with ``E = 0``,
    for a metric that is all reducible such as excess KL; least squares on ``ln m``) per
    architecture; adds ``alpha_C, alpha_C_baseline`` and their ratio ``alpha_C_ratio``.
    """
    c = _check("compute", compute)
    m = _check("metric", metric, c.size, positive=compute_exponent)
    arch = np.asarray(arch).ravel()
    g = np.zeros(c.size, dtype=np.int64) if groups is None else np.asarray(groups).ravel()
    for name in (target, baseline):
        if not np.any(arch == name):
            raise ValueError(f"no runs of architecture {name!r}; present: {sorted(set(arch.tolist()))}")
    lo = max(c[arch == target].min(), c[arch == baseline].min())
    hi = min(c[arch == target].max(), c[arch == baseline].max())
    if not lo < hi:
        raise ValueError(f"{target!r} and {baseline!r} share no compute range; run both over one")
    if groups is None:  # one line per architecture: compare it on the compute range both cover
        inside = (c >= lo) & (c <= hi)
    else:  # slopes within each group: every run counts
        inside = np.ones(c.size, dtype=bool)
    sel = {name: inside & (arch == name) for name in (target, baseline)}
    params: dict[str, float] = {}
    samples: dict[str, np.ndarray] = {}
    kinds = [("eta", False, 1.0)] + ([("alpha_C", True, -1.0)] if compute_exponent else [])
    for key, log_metric, sign in kinds:
        fits = {name: fit_loglinear(c[s], m[s], groups=g[s], log_metric=log_metric, n_boot=n_boot,
                                    seed=seed + i, level=level)
                for i, (name, s) in enumerate(sel.items())}
        t, b = (sign * fits[name].params["eta"] for name in (target, baseline))
        ts, bs = (sign * fits[name].samples["eta"] for name in (target, baseline))
        ratio = "ratio" if key == "eta" else "alpha_C_ratio"
        params.update({ratio: t / b, key: t, f"{key}_baseline": b})
        with np.errstate(divide="ignore", invalid="ignore"):
            samples.update({ratio: ts / bs, key: ts, f"{key}_baseline": bs})
    info = {"target": target, "baseline": baseline, "compute_range": [float(lo), float(hi)],
            "n_points": {name: int(s.sum()) for name, s in sel.items()}, "n_boot": n_boot,
            "groups": None if groups is None else sorted({str(v) for v in g[inside].tolist()})}
    return Fit("scaling_efficiency", params, samples, level, info)
