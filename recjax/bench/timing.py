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
