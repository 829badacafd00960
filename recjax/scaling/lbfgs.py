"""Batched L-BFGS in numpy: many independent small problems (starts x bootstrap resamples) at once.

Each row ``i`` of ``x0 [S, P]`` is its own problem; ``value_grad(x [s, P], rows [s])`` returns
``(f [s], g [s, P])`` for the problems ``rows`` (so per-problem data such as bootstrap weights
can be looked up). Every iteration works only on the problems still running, so converged
starts cost nothing, and there is no compile step. Direction: the standard two-loop recursion
over the last ``memory`` pairs ``(s, y)``; step: backtracking from 1 by factors of 4 until the
Armijo condition ``f(x + t d) <= f(x) + 1e-4 t g.d`` holds. A problem stops when
``max |g| < gtol``, when a step lowers ``f`` by less than ``ftol * max(1, |f|)``, or when no
step length decreases ``f``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ValueGrad = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _direction(g: np.ndarray, s_hist: np.ndarray, y_hist: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """``-H g`` for each row; histories ``[s, m, P]`` newest first, ``rho = 0`` for empty slots."""
    q = g.copy()
    m = s_hist.shape[1]
    alphas = np.zeros((g.shape[0], m))
    for j in range(m):
        alphas[:, j] = rho[:, j] * np.einsum("sp,sp->s", s_hist[:, j], q)
        q -= alphas[:, j, None] * y_hist[:, j]
    sy = np.einsum("sp,sp->s", s_hist[:, 0], y_hist[:, 0])
    yy = np.einsum("sp,sp->s", y_hist[:, 0], y_hist[:, 0])
    first = 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1.0)  # no history yet: a short step
    gamma = np.where((rho[:, 0] > 0) & (yy > 0), sy / np.where(yy > 0, yy, 1.0), first)
    r = gamma[:, None] * q
    for j in reversed(range(m)):
        beta = rho[:, j] * np.einsum("sp,sp->s", y_hist[:, j], r)
        r += (alphas[:, j] - beta)[:, None] * s_hist[:, j]
    return -r


def minimize(
    value_grad: ValueGrad,
    x0: np.ndarray,
    *,
    max_iter: int = 1000,
    memory: int = 10,
    gtol: float = 1e-10,
    ftol: float = 1e-14,
    max_backtrack: int = 30,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise the ``S`` problems of ``x0 [S, P]``; returns ``(x [S, P], f [S], iterations [S])``.

    Problems whose start is not finite come back with ``f = inf``; a trial step with a
    non-finite value or gradient counts as failed (floating-point warnings are silenced).
    """
    with np.errstate(all="ignore"):
        return _minimize(value_grad, x0, max_iter, memory, gtol, ftol, max_backtrack)


def _minimize(
    value_grad: ValueGrad, x0: np.ndarray, max_iter: int, memory: int, gtol: float, ftol: float,
    max_backtrack: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.array(x0, dtype=np.float64)
    n, p = x.shape
    f, g = value_grad(x, np.arange(n))
    f = np.where(np.isfinite(f), f, np.inf)
    s_hist = np.zeros((n, memory, p))
    y_hist = np.zeros((n, memory, p))
    rho = np.zeros((n, memory))
    iters = np.zeros(n, dtype=np.int64)
    active = np.isfinite(f) & np.all(np.isfinite(g), axis=1)
    for _ in range(max_iter):
        a = np.flatnonzero(active)
        if a.size == 0:
            break
        d = _direction(g[a], s_hist[a], y_hist[a], rho[a])
        gd = np.einsum("sp,sp->s", g[a], d)
        uphill = ~(gd < 0)
        d[uphill] = -g[a][uphill]
        gd[uphill] = -np.einsum("sp,sp->s", g[a][uphill], g[a][uphill])

        x_new, f_new, g_new = np.empty_like(d), np.full(a.size, np.inf), np.empty_like(d)
        t = np.ones(a.size)
        todo = np.arange(a.size)
        for _ in range(max_backtrack):
            xt = x[a[todo]] + t[todo, None] * d[todo]
            ft, gt = value_grad(xt, a[todo])
            ok = np.isfinite(ft) & (ft <= f[a[todo]] + 1e-4 * t[todo] * gd[todo])
            ok &= np.all(np.isfinite(gt), axis=1)
            done = todo[ok]
            x_new[done], f_new[done], g_new[done] = xt[ok], ft[ok], gt[ok]
            todo = todo[~ok]
            if todo.size == 0:
                break
            t[todo] *= 0.25
        moved = np.isfinite(f_new)
        m_idx = a[moved]
        s = x_new[moved] - x[m_idx]
        y = g_new[moved] - g[m_idx]
        sy = np.einsum("sp,sp->s", s, y)
        push = sy > np.maximum(1e-12 * np.einsum("sp,sp->s", y, y), 1e-100)
        pi = m_idx[push]
        s_hist[pi] = np.roll(s_hist[pi], 1, axis=1)
        y_hist[pi] = np.roll(y_hist[pi], 1, axis=1)
        rho[pi] = np.roll(rho[pi], 1, axis=1)
        s_hist[pi, 0], y_hist[pi, 0], rho[pi, 0] = s[push], y[push], 1.0 / sy[push]

        decrease = f[m_idx] - f_new[moved]
        x[m_idx], f[m_idx], g[m_idx] = x_new[moved], f_new[moved], g_new[moved]
        iters[m_idx] += 1
        converged = (np.max(np.abs(g[m_idx]), axis=1) < gtol) | (
            decrease <= ftol * np.maximum(1.0, np.abs(f[m_idx]))
        )
        active[a[~moved]] = False
        active[m_idx[converged]] = False
    return x, f, iters
