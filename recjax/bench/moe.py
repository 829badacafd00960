"""Benchmarks of the MoE kernels: grouped matmul implementations and the whole ``moe_ffn``.

Per (experts, topk) shape, with group sizes from :func:`recjax.kernels.moe.route` on random
logits (near-balanced), rows are:

- ``op="grouped_matmul"``: ``x [tokens*topk, d] @ w[g] [d, f]`` by ``impl`` ``reference``
  (dense masked einsum), ``xla`` (``jax.lax.ragged_dot``), ``pallas`` (Triton kernel),
  ``tokamax`` (``tokamax.ragged_dot``, where installed);
- ``op="moe_ffn"``: the SwiGLU MoE layer over ``tokens`` tokens (one expert set) by ``impl``
  ``dense``, ``xla``, ``pallas``, ``tokamax`` (its ``reference`` gathers ``tokens*topk`` weight
  matrices and is not benchmarked);
- ``op="dense_matmul"``, ``impl="xla"``: one baseline ``[tokens*topk, d] @ [d, f]`` matmul,
  the same active FLOPs as the grouped matmul, for comparing TFLOP/s.

``mode`` is ``fwd`` or ``fwd+bwd`` (gradients of every float input). ``active_flops`` counts
only the routed work (``3x`` forward for ``fwd+bwd``), so an implementation that computes
every expert shows a lower ``tflops_per_s``. ``memory_bytes`` is the compiled executable's
estimate (:func:`recjax.bench.timing.compiled_memory_bytes`); ``allocator_peak_bytes`` is the
device allocator's peak since process start (GPU; ``None`` on CPU). ``pallas`` rows are
produced only on GPU. A case that fails (e.g. out of memory: the ``reference`` grouped matmul
materialises ``[E, tokens*topk, f]``) gets an ``error`` field instead of measurements.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

GMM_IMPLS = ("reference", "xla", "pallas", "tokamax", "interpret")
MOE_IMPLS = ("dense", "xla", "pallas", "tokamax", "interpret")


def default_impls() -> tuple[str, ...]:
    """reference, xla and dense; pallas on GPU; tokamax where it is installed."""
    import importlib.util

    import jax

    gpu = ("pallas",) if jax.default_backend() == "gpu" else ()
    tokamax = ("tokamax",) if importlib.util.find_spec("tokamax") is not None else ()
    return ("reference", "xla", "dense") + gpu + tokamax


def bench_moe(
    experts: Sequence[int] = (8, 32, 64),
    topk: Sequence[int] = (1, 2, 4),
    *,
    tokens: int = 1024,
    d: int = 64,
    f: int = 128,
    impls: Sequence[str] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """Time and memory of every (op, impl, experts, topk, mode); see the module docstring.

    The CPU defaults (1024 tokens, ``d=64``, ``f=128``) took 400 s (3 min of CPU time) on 2
    cores shared with other jobs.
    ``impls`` defaults to :func:`default_impls`; ``pallas`` is skipped without a GPU.
    """
    import jax
    import jax.numpy as jnp

    impls = tuple(default_impls() if impls is None else impls)
    unknown = set(impls) - set(GMM_IMPLS) - set(MOE_IMPLS)
    if unknown:
        raise ValueError(
            f"bench_moe: unknown impls {sorted(unknown)}; choose from "
            f"{sorted(set(GMM_IMPLS) | set(MOE_IMPLS))}"
        )
    if jax.default_backend() != "gpu":
        impls = tuple(i for i in impls if i != "pallas")
    rows: list[dict[str, Any]] = []
    for e in experts:
        for k in (k for k in topk if k <= e):
            shape = {
                "experts": e,
                "topk": k,
                "tokens": tokens,
                "d": d,
                "f": f,
                "dtype": jnp.dtype(dtype).name,
            }
            for op, impl, fn, args, flops in _cases(e, k, tokens, d, f, impls, jnp.dtype(dtype)):
                for mode in ("fwd", "fwd+bwd"):
                    row = {"op": op, "impl": impl, **shape, "mode": mode}
                    try:
                        row.update(_measure(fn, args, mode, flops, warmup, repeats))
                    except Exception as err:  # e.g. out of memory: record it, keep sweeping
                        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    rows.append(row)
    return rows


def _cases(
    e: int, k: int, tokens: int, d: int, f: int, impls: tuple[str, ...], dtype: Any
) -> list[tuple[str, str, Callable, tuple, int]]:
    """(op, impl, function, arguments, forward active FLOPs) for one (experts, topk) shape."""
    import jax

    from recjax.kernels.moe import moe_ffn_flops

    group_sizes, xs, w, args = jax.jit(_inputs, static_argnums=range(1, 7))(
        jax.random.PRNGKey(1000 * e + k), e, k, tokens, d, f, dtype
    )
    gmm_flops = 2 * tokens * k * d * f
    cases: list[tuple[str, str, Callable, tuple, int]] = [
        (
            "grouped_matmul",
            i,
            functools.partial(_gmm, group_sizes=group_sizes, impl=i),
            (xs, w),
            gmm_flops,
        )
        for i in GMM_IMPLS
        if i in impls
    ]
    cases.append(("dense_matmul", "xla", lambda x, w: x @ w[0], (xs, w), gmm_flops))
    cases += [
        (
            "moe_ffn",
            i,
            functools.partial(_moe, k=k, impl=i),
            args,
            moe_ffn_flops(tokens, d, f, e, k),
        )
        for i in MOE_IMPLS
        if i in impls
    ]
    return cases


def _inputs(key, e, k, tokens, d, f, dtype):
    """Group sizes of random top-k routing, sorted rows and a weight for the grouped matmul,
    and ``(x, router_w, w_gate_up, w_down)`` for ``moe_ffn``."""
    import jax

    from recjax.kernels.moe import route

    keys = iter(jax.random.split(key, 8))
    normal = lambda shape, s=1.0: (s * jax.random.normal(next(keys), shape)).astype(dtype)
    group_sizes = route(jax.random.normal(next(keys), (tokens, e)), k).group_sizes
    xs, w = normal((tokens * k, d)), normal((e, d, f), d**-0.5)
    args = (
        normal((tokens, d)),
        normal((d, e), d**-0.5),
        normal((e, d, 2, f), d**-0.5),
        normal((e, f, d), f**-0.5),
    )
    return group_sizes, xs, w, args


def _gmm(x, w, *, group_sizes, impl):  # module-level, so jax is imported only when run
    from recjax.kernels.moe import grouped_matmul

    return grouped_matmul(x, w, group_sizes, impl=impl)


def _moe(x, *params, k, impl):
    from recjax.kernels.moe import moe_ffn

    return moe_ffn(x, *params, k, impl=impl)[0]


def _measure(
    fn: Callable, args: tuple, mode: str, fwd_flops: int, warmup: int, repeats: int
) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from recjax.bench.timing import allocator_peak_bytes, compiled_memory_bytes, median_seconds

    if mode == "fwd":
        jitted, flops = jax.jit(fn), fwd_flops
    else:
        loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
        jitted, flops = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))), 3 * fwd_flops
    seconds = median_seconds(jitted, *args, warmup=warmup, repeats=repeats)
    return {
        "median_ms": 1e3 * seconds,
        "memory_bytes": compiled_memory_bytes(jitted, *args),
        "allocator_peak_bytes": allocator_peak_bytes(),
        "active_flops": flops,
        "tflops_per_s": flops / seconds / 1e12,
    }
