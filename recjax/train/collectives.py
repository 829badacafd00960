"""Bytes a compiled step exchanges between devices, read from its optimized HLO.

Every collective instruction (``all-gather``, ``all-reduce``, ``reduce-scatter``,
``all-to-all``, ``collective-permute``, and their ``-start`` forms) is counted with its result
shape and replica-group size ``g``. Bytes sent per device use the bandwidth-optimal (ring)
volumes, for a result of ``b`` bytes per device::

    all-gather      b (g - 1) / g         reduce-scatter  b (g - 1)
    all-reduce      2 b (g - 1) / g       all-to-all      b (g - 1) / g
    collective-permute  b

A collective inside a loop body is counted once (like ``cost_analysis``). The result of an
asynchronous ``all-gather-start`` / ``collective-permute-start`` is an (operand, result)
tuple; only its last array is counted.
"""

from __future__ import annotations

import re
from typing import Any

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_LINE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\("
)
_ARRAY = re.compile(r"\b(\w+)\[([\d,]*)\]")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{(.*?)\}\s*[,)]")


def _arrays_bytes(arrays: list[tuple[str, tuple[int, ...]]]) -> int:
    total = 0
    for dtype, dims in arrays:
        n = 1
        for d in dims:
            n *= d
        total += n * _BYTES.get(dtype, 4)
    return total


def _group_size(line: str, n_devices: int) -> int:
    if m := _IOTA_GROUPS.search(line):
        return int(m.group(2))
    if m := _LIST_GROUPS.search(line):
        return len([x for x in m.group(1).split(",") if x])
    return n_devices


def _sent(kind: str, b: int, g: int) -> float:
    if g <= 1:
        return 0.0
    return {"all-gather": b * (g - 1) / g, "all-reduce": 2 * b * (g - 1) / g,
            "reduce-scatter": b * (g - 1), "all-to-all": b * (g - 1) / g,
            "collective-permute": float(b)}[kind]


def collective_ops(hlo_text: str, n_devices: int) -> list[dict[str, Any]]:
    """Every collective of one compiled module's text: ``{"kind", "arrays": [(dtype, (dims,
    ...)), ...] (its result, as counted), "group": replica-group size}`` in text order."""
    ops = []
    for line in hlo_text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        kind, arrays = m.group("kind"), _ARRAY.findall(m.group("shape"))
        if f"{kind}-start(" in line and kind in ("all-gather", "collective-permute"):
            arrays = arrays[-1:]
        ops.append({"kind": kind, "group": 2 if kind == "collective-permute" else _group_size(line, n_devices),
                    "arrays": [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in arrays]})
    return ops


def collective_traffic(hlo_text: str, n_devices: int) -> dict[str, Any]:
    """``{"bytes_sent_per_device": float, "by_kind": {kind: {"count", "result_bytes",
    "bytes_sent"}}}`` for one compiled module's text (``compiled.as_text()``)."""
    by_kind: dict[str, dict[str, float]] = {}
    for op in collective_ops(hlo_text, n_devices):
        b = _arrays_bytes(op["arrays"])
        k = by_kind.setdefault(op["kind"], {"count": 0, "result_bytes": 0, "bytes_sent": 0.0})
        k["count"] += 1
        k["result_bytes"] += b
        k["bytes_sent"] += _sent(op["kind"], b, op["group"])
    return {"bytes_sent_per_device": sum(k["bytes_sent"] for k in by_kind.values()), "by_kind": by_kind}
