"""GDPA benchmark: the kernels against GDPA's XLA path and softmax attention on the same shapes.

``bench_gdpa`` times (``timing.median_seconds``) and sizes (``compiled_memory_bytes``) each of

- ``softmax``: ``jax.nn.dot_product_attention(implementation="xla")``, with
  ``local_window_size`` where a window is set (masked, so it still computes every score);
- ``softmax_cudnn``: the same with ``implementation="cudnn"`` (GPU only);
- ``xla``, ``pallas`` (GPU only), ``interpret``: ``gdpa`` with that ``impl`` (the banded XLA
  path where a window is set),

forward and forward + backward (the gradient of ``sum(out)`` w.r.t. q, k, v), for each window
(``None`` = full bidirectional attention) on random ``[batch, seq, heads, head_dim]`` inputs.
Each row also carries ``analytic_gflops``, the forward matmul FLOPs over the unmasked pairs
(:func:`recjax.kernels.gdpa.gdpa_flops`; x3 with the backward). jax is imported inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

GPU_ONLY = ("pallas", "softmax_cudnn")


def default_impls(on_gpu: bool) -> tuple[str, ...]:
    return ("softmax", "xla") + (GPU_ONLY if on_gpu else ())


def bench_gdpa(
    seqs: Sequence[int] = (512, 2048),
    head_dims: Sequence[int] = (64, 128),
    windows: Sequence[int | None] = (None, 64),
    *,
    activation: str = "gelu",
    batch: int | None = None,
    heads: int | None = None,
    impls: Sequence[str] | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    dtype: str | None = None,
    modes: Sequence[str] = ("fwd", "fwd+bwd"),
) -> list[dict[str, Any]]:
    """One row per (seq, head_dim, window, impl, mode).

    Defaults by backend as in ``bench_attention``: CPU batch 1, heads 2, float32, 1 warm-up,
    3 repeats; GPU batch 8, heads 8, bfloat16, 2 warm-ups, 10 repeats. Row keys: op, impl, seq,
    head_dim, window, batch, heads, mode, dtype, activation, analytic_gflops, median_ms,
    memory_bytes, or "skipped"/"error" with a reason.
    """
    import jax
    import jax.numpy as jnp

    from recjax.bench.timing import attention_bench_settings, compiled_memory_bytes, median_seconds
    from recjax.kernels.gdpa import gdpa_flops

    on_gpu = jax.default_backend() == "gpu"
    s = attention_bench_settings("bench_gdpa", default_impls(True) + ("interpret",), default_impls(on_gpu),
                                 batch=batch, heads=heads, impls=impls, warmup=warmup, repeats=repeats, dtype=dtype,
                                 modes=modes)
    batch, heads, impls, warmup, repeats, dtype = (s[k] for k in ("batch", "heads", "impls", "warmup", "repeats", "dtype"))
    rows = []
    for seq in seqs:
        for head_dim in head_dims:
            keys = jax.random.split(jax.random.key(seq * 1000 + head_dim), 3)
            shape = (batch, seq, heads, head_dim)
            qkv = [jax.random.normal(key, shape, jnp.dtype(dtype)) * head_dim**-0.25 for key in keys]
            for window in windows:
                fwd_gflops = gdpa_flops(batch, seq, seq, heads, head_dim, head_dim, window=window) / 1e9
                for impl in impls:
                    for mode in modes:
                        row = {
                            "op": "softmax_attention" if impl.startswith("softmax") else "gdpa",
                            "impl": {"softmax": "xla", "softmax_cudnn": "cudnn"}.get(impl, impl),
                            "seq": seq, "head_dim": head_dim, "window": window, "batch": batch,
                            "heads": heads, "mode": mode, "dtype": dtype, "activation": activation,
                            "analytic_gflops": fwd_gflops * (3 if mode == "fwd+bwd" else 1),
                            "median_ms": None, "memory_bytes": None,
                        }
                        if impl in GPU_ONLY and not on_gpu:
                            rows.append({**row, "skipped": f"{impl} needs a GPU"})
                            continue
                        fn = _step(impl, window, mode, activation)
                        try:
                            row["memory_bytes"] = compiled_memory_bytes(fn, *qkv)
                            row["median_ms"] = 1e3 * median_seconds(fn, *qkv, warmup=warmup, repeats=repeats)
                        except Exception as e:  # one failed config must not end the sweep
                            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        rows.append(row)
            del qkv
    return rows


def _step(impl: str, window: int | None, mode: str, activation: str):
    """The jitted ``(q, k, v) -> out`` (fwd) or ``-> (dq, dk, dv)`` (fwd+bwd) of ``impl``."""
    import jax
    import jax.numpy as jnp

    from recjax.kernels.gdpa import gdpa

    if impl.startswith("softmax"):
        backend = "cudnn" if impl == "softmax_cudnn" else "xla"
        local = None if window is None else (window, window)
        attend = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, local_window_size=local, implementation=backend
        )
    else:
        attend = lambda q, k, v: gdpa(q, k, v, activation=activation, window=window, impl=impl)
    if mode == "fwd":
        return jax.jit(attend)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
