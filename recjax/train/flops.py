"""Peak FLOP/s per chip, model FLOPs utilisation, and XLA cost / memory reports.

Convention: **MFU is always relative to the chip's dense bf16 peak**, whatever the
compute dtype — an fp32 run on a GPU therefore reports a (much) lower MFU than the same
run in bf16; that is intended, it shows how far the run is from the chip's best::

    mfu = flops_per_step_per_device / step_time_s / peak_bf16_flops_per_device

FLOPs count a multiply-add as 2 FLOPs (the same as XLA's ``cost_analysis``).
"""

from __future__ import annotations

import re
from typing import Any

# Dense (no sparsity) bf16 peak FLOP/s per chip (per jax device).
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "B200": 2250e12,
    "TPU v4": 275e12,
    "TPU v5e": 197e12,  # device_kind "TPU v5 lite"
    "TPU v5p": 459e12,  # device_kind "TPU v5p" (some runtimes: "TPU v5")
    "TPU v6e": 918e12,  # Trillium; device_kind "TPU v6 lite"
}

# (regex on the normalised device_kind, table key); first match wins, most specific first.
_PATTERNS: list[tuple[str, str]] = [
    (r"h100.*pcie", "H100 PCIe"),
    (r"h200", "H200"),  # also GH200
    (r"h100", "H100"),
    (r"b200", "B200"),
    (r"tpu.*v6.*(lite|e\b)|trillium", "TPU v6e"),
    (r"tpu.*v5.*(lite|e\b)", "TPU v5e"),
    (r"tpu.*v5p|tpu v5$", "TPU v5p"),
    (r"tpu.*v4", "TPU v4"),
]


def peak_flops_per_device(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s for a jax ``device.device_kind``; None if unknown (e.g. ``"cpu"``).

    >>> peak_flops_per_device("NVIDIA H100 80GB HBM3")
    989000000000000.0
    """
    kind = " ".join(str(device_kind).lower().replace("_", " ").split())
    for pattern, key in _PATTERNS:
        if re.search(pattern, kind):
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(flops_per_step_per_device: float, step_time_s: float, peak: float | None) -> float | None:
    """``flops / step_time / peak`` (a fraction, 1.0 = peak); None if peak unknown or time <= 0."""
    if peak is None or peak <= 0 or not step_time_s or step_time_s <= 0:
        return None
    return float(flops_per_step_per_device) / float(step_time_s) / float(peak)


def xla_flops(compiled: Any) -> float:
    """FLOPs per device of one run of a compiled executable, from ``cost_analysis()``.

    Handles a dict or a list of dicts (older jax: one per partition; the first is used),
    and returns NaN when XLA gives no estimate.
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return float("nan")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return float("nan")
    return float(cost["flops"])


_MEMORY_FIELDS = {
    "argument": "argument_size_in_bytes",
    "output": "output_size_in_bytes",
    "temp": "temp_size_in_bytes",
    "alias": "alias_size_in_bytes",
    "generated_code": "generated_code_size_in_bytes",
}


def memory_report(compiled: Any) -> dict[str, int]:
    """Per-device bytes from ``compiled.memory_analysis()``.

    Keys: ``argument, output, temp, alias, generated_code, total`` with
    ``total = argument + output + temp - alias`` (donated inputs aliased to outputs are
    counted once). Missing fields are left out; ``{}`` if there is no analysis at all.
    """
    try:
        mem = compiled.memory_analysis()
    except Exception:
        return {}
    if mem is None:
        return {}
    out: dict[str, int] = {}
    for key, attr in _MEMORY_FIELDS.items():
        value = getattr(mem, attr, None)
        if value is not None:
            out[key] = int(value)
    if any(k in out for k in ("argument", "output", "temp")):
        out["total"] = sum(out.get(k, 0) for k in ("argument", "output", "temp")) - out.get(
            "alias", 0
        )
    return out


def format_bytes(n: float | None) -> str:
    """Binary units: ``format_bytes(1536) == "1.50 KiB"``; ``"n/a"`` for None."""
    if n is None:
        return "n/a"
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
