"""Benchmark timing and memory helpers shared by every ``recjax bench`` subcommand.

Times are the median over ``repeats`` device-synchronised calls after ``warmup`` calls
(the first of which compiles). Memory is the compiled executable's own estimate
(``memory_analysis``: arguments + outputs + temporaries, per device), which works on every
backend; on GPU the allocator's peak (``memory_stats()["peak_bytes_in_use"]``) is reported
beside it when available.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import jax


def attention_bench_settings(name: str, known_impls: tuple[str, ...], default_impls: tuple[str, ...], *,
                             batch: int | None, heads: int | None, impls: Any, warmup: int | None,
                             repeats: int | None, dtype: str | None, modes: Any) -> dict[str, Any]:
    """The attention benchmarks' settings with their backend defaults -- CPU: batch 1, heads 2,
    float32, 1 warm-up, 3 repeats; GPU: batch 8, heads 8, bfloat16, 2 warm-ups, 10 repeats --
    after checking ``impls`` against ``known_impls`` and ``modes`` against fwd / fwd+bwd."""
    on_gpu = jax.default_backend() == "gpu"
    impls = tuple(impls or default_impls)
    unknown = set(impls) - set(known_impls)
    if unknown or not set(modes) <= {"fwd", "fwd+bwd"}:
        raise ValueError(f"{name}: unknown impls {sorted(unknown)} or modes {list(modes)}; impls are "
                         f"{known_impls}, modes 'fwd' and 'fwd+bwd'.")
    return {"batch": batch or (8 if on_gpu else 1), "heads": heads or (8 if on_gpu else 2),
            "impls": impls, "warmup": warmup if warmup is not None else (2 if on_gpu else 1),
            "repeats": repeats or (10 if on_gpu else 3), "dtype": dtype or ("bfloat16" if on_gpu else "float32")}


def median_seconds(fn: Callable[..., Any], *args: Any, warmup: int = 2, repeats: int = 10) -> float:
    """Median wall time of ``fn(*args)`` with ``jax.block_until_ready`` on the result."""
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compiled_memory_bytes(jitted: Any, *args: Any) -> int:
    """Per-device bytes (arguments + outputs + temporaries) of ``jitted`` lowered on ``args``."""
    mem = jitted.lower(*args).compile().memory_analysis()
    if mem is None:
        return -1
    return int(
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        - getattr(mem, "alias_size_in_bytes", 0)
    )


def allocator_peak_bytes() -> int | None:
    """The device allocator's peak since process start (GPU/TPU), or None (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", -1))


def environment() -> dict[str, Any]:
    """Device kind, count, versions and the command line, for every results JSON."""
    versions = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    dev = jax.devices()[0]
    return {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "versions": versions,
        "command": "recjax " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
