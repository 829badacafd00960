"""Attention benchmark: softmax attention against linear attention's implementations.

``bench_attention`` times (``timing.median_seconds``) and sizes (``compiled_memory_bytes``,
plus the allocator's process-wide peak so far on GPU) each of

- ``softmax``: ``jax.nn.dot_product_attention(implementation="xla")``;
- ``softmax_cudnn``: the same with ``implementation="cudnn"`` (GPU only);
- ``reference``, ``xla``, ``pallas``, ``interpret``: ``linear_attention`` with that ``impl``
  (``pallas`` on GPU only; ``interpret`` is for tiny checks, never a default),
- ``fla``: flash-linear-attention's ``chunk_linear_attn`` (PyTorch + Triton, causal only, no
  feature map: the plain kernel) on the same shapes, timed with CUDA events; GPU only, where
  ``torch`` and ``fla`` import (else a skipped row saying why),

forward (``fwd``) and forward + backward (``fwd+bwd``: the gradient of ``sum(out)`` w.r.t.
q, k and v), causal and not, on random ``[batch, seq, heads, head_dim]`` inputs. The
quadratic ones (``softmax``, ``reference``) are skipped where their estimated
``[seq, seq]`` score memory exceeds ``memory_cap_bytes``. jax is imported inside the
functions, so importing this module does not start jax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

QUADRATIC = ("softmax", "reference")
GPU_ONLY = ("pallas", "softmax_cudnn", "fla")


def default_impls(on_gpu: bool) -> tuple[str, ...]:
    base = ("softmax", "reference", "xla")
    return base + GPU_ONLY if on_gpu else base


def bench_attention(
    seqs: Sequence[int] = (128, 512, 2048, 8192),
    head_dims: Sequence[int] = (64, 128),
    *,
    batch: int | None = None,
    heads: int | None = None,
    impls: Sequence[str] | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    dtype: str | None = None,
    causal: Sequence[bool] = (False, True),
    modes: Sequence[str] = ("fwd", "fwd+bwd"),
    feature_map: str = "cosine",
    memory_cap_bytes: int | None = None,
) -> list[dict[str, Any]]:
    """One row per (seq, head_dim, causal, impl, mode); see the module docstring.

    Defaults depend on the backend. CPU: batch 1, heads 2, float32, warmup 1, repeats 3,
    memory cap 512 MiB (the default sweep takes a few minutes on 2 cores). GPU: batch 8,
    heads 8, bfloat16, warmup 2, repeats 10, memory cap half the device's memory.
    Row keys: op, impl, seq, head_dim, batch, heads, causal, mode, dtype, feature_map (linear
    attention only), median_ms, memory_bytes (bytes: arguments + outputs + temporaries of the
    compiled function), allocator_peak_bytes (GPU), and "skipped" or "error" with a reason
    instead of the measurements.
    """
    import jax
    import jax.numpy as jnp

    from recjax.bench.timing import (
        allocator_peak_bytes,
        attention_bench_settings,
        compiled_memory_bytes,
        median_seconds,
    )

    on_gpu = jax.default_backend() == "gpu"
    s = attention_bench_settings("bench_attention", default_impls(True) + ("interpret",), default_impls(on_gpu),
                                 batch=batch, heads=heads, impls=impls, warmup=warmup, repeats=repeats, dtype=dtype,
                                 modes=modes)
    batch, heads, impls, warmup, repeats, dtype = (s[k] for k in ("batch", "heads", "impls", "warmup", "repeats", "dtype"))
    cap = memory_cap_bytes or _default_cap(on_gpu)

    rows = []
    for seq in seqs:
        for head_dim in head_dims:
            keys = jax.random.split(jax.random.key(seq * 1000 + head_dim), 3)
            shape = (batch, seq, heads, head_dim)
            qkv = [jax.random.normal(key, shape, jnp.dtype(dtype)) for key in keys]
            for is_causal in causal:
                for impl in impls:
                    for mode in modes:
                        row = {
                            "op": "softmax_attention" if impl.startswith("softmax") else
                            "linear_attention",
                            "impl": {"softmax": "xla", "softmax_cudnn": "cudnn"}.get(impl, impl),
                            "seq": seq, "head_dim": head_dim, "batch": batch, "heads": heads,
                            "causal": is_causal, "mode": mode, "dtype": dtype,
                            "median_ms": None, "memory_bytes": None,
                        }
                        if row["op"] == "linear_attention":
                            row["feature_map"] = feature_map
                        reason = _skip_reason(impl, mode, on_gpu, batch * heads * seq * seq, cap)
                        if impl == "fla" and not reason:
                            reason = _fla_missing(is_causal)
                        if reason:
                            rows.append({**row, "skipped": reason})
                            continue
                        if impl == "fla":
                            try:
                                row["median_ms"] = _fla_ms(shape, dtype, mode, warmup, repeats)
                            except Exception as e:
                                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                            rows.append(row)
                            continue
                        fn = _step(impl, is_causal, mode, feature_map)
                        try:
                            row["memory_bytes"] = compiled_memory_bytes(fn, *qkv)
                            seconds = median_seconds(fn, *qkv, warmup=warmup, repeats=repeats)
                            row["median_ms"] = 1e3 * seconds
                        except Exception as e:  # one failed config must not end the sweep
                            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        if on_gpu:
                            row["allocator_peak_bytes"] = allocator_peak_bytes()
                        rows.append(row)
            del qkv
    return rows


def _fla_missing(causal: bool) -> str | None:
    if not causal:
        return "flash-linear-attention's chunk_linear_attn is causal only"
    try:
        import torch
        from fla.ops.linear_attn import chunk_linear_attn  # noqa: F401
    except Exception as e:  # not installed, or an incompatible build
        return f"flash-linear-attention not importable ({type(e).__name__}: {str(e)[:120]})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def _fla_ms(shape: tuple[int, ...], dtype: str, mode: str, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``chunk_linear_attn`` on ``[B, T, H, d]`` inputs (CUDA events)."""
    import statistics

    import torch
    from fla.ops.linear_attn import chunk_linear_attn

    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dt, requires_grad=mode != "fwd") for _ in range(3))

    def once():
        out = chunk_linear_attn(q, k, v, normalize=False)
        out = out[0] if isinstance(out, tuple) else out
        if mode != "fwd":
            out.float().sum().backward()

    for _ in range(warmup):
        once()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _default_cap(on_gpu: bool) -> int:
    import jax

    if on_gpu:
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        if limit:
            return int(limit) // 2
        return 16 * 2**30
    return 512 * 2**20


def _skip_reason(impl: str, mode: str, on_gpu: bool, scores: int, cap: int) -> str | None:
    if impl in GPU_ONLY and not on_gpu:
        return f"{impl} needs a GPU"
    if impl in QUADRATIC:
        # fp32 [batch, heads, seq, seq] scores: ~2 live copies forward, ~4 with the backward.
        estimate = scores * 4 * (2 if mode == "fwd" else 4)
        if estimate > cap:
            return (
                f"estimated {estimate / 2**30:.2f} GiB of [seq, seq] scores exceeds the memory "
                f"cap of {cap / 2**30:.2f} GiB"
            )
    return None


def _step(impl: str, causal: bool, mode: str, feature_map: str):
    """The jitted ``(q, k, v) -> out`` (fwd) or ``-> (dq, dk, dv)`` (fwd+bwd) of ``impl``."""
    import jax
    import jax.numpy as jnp

    from recjax.kernels.linear_attention import linear_attention

    if impl.startswith("softmax"):
        backend = "cudnn" if impl == "softmax_cudnn" else "xla"
        attend = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=backend
        )
    else:
        attend = lambda q, k, v: linear_attention(
            q, k, v, causal=causal, feature_map=feature_map, impl=impl
        )
    if mode == "fwd":
        return jax.jit(attend)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
