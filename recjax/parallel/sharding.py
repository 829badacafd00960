"""Logical axis names -> mesh ``PartitionSpec``s, driven by the ``mesh.rules`` config.

Modules annotate parameters with logical names (``nnx.Param(..., sharding=("table_rows",
"embed"))``) and constrain activations with :func:`constrain`. The rules and mesh are set
once per run with :func:`use_rules`; outside that context :func:`constrain` is a no-op, so
models also run unsharded (tests, notebooks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recjax.errors import ConfigError

Rules = dict[str, list[str]]
_ACTIVE: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Activate ``rules`` on ``mesh`` for :func:`constrain` and :func:`logical_sharding`."""
    for logical, axes in rules.items():
        for a in axes:
            if a not in mesh.axis_names:
                raise ConfigError(f"mesh.rules.{logical}: unknown mesh axis '{a}' (mesh axes: {mesh.axis_names})")
    _ACTIVE.append((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active() -> tuple[Mesh, Rules] | None:
    """The innermost active (mesh, rules), or None outside :func:`use_rules`."""
    return _ACTIVE[-1] if _ACTIVE else None


def spec_axes(entry: Any) -> tuple[str, ...]:
    """One ``PartitionSpec`` entry as a tuple of mesh axis names (``None`` -> ``()``)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def leading_axes(sharding: NamedSharding) -> tuple[str, ...]:
    """The mesh axes a ``NamedSharding`` splits the first dimension over (``()``: none)."""
    spec = tuple(sharding.spec)
    return spec_axes(spec[0]) if spec else ()


def logical_to_spec(logical: Sequence[str | None] | None, rules: Rules, mesh: Mesh | None = None) -> PartitionSpec:
    """Map logical names to a PartitionSpec; unknown or ``None`` names are replicated.

    A mesh axis is used at most once per spec (first dimension wins), and axes of size 1
    are dropped so specs stay readable.
    """
    if not logical:
        return PartitionSpec()
    used: set[str] = set()
    out: list[Any] = []
    for name in logical:
        axes = [] if name is None else list(rules.get(name, []))
        axes = [a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1)]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dimensions they do not divide (e.g. a 13-row bias over 8 devices)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept: list[str] = []
        size = 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def logical_sharding(logical: Sequence[str | None] | None, shape: Sequence[int]) -> NamedSharding | None:
    """NamedSharding for an array of ``shape`` under the active rules (None when inactive)."""
    if not _ACTIVE:
        return None
    mesh, rules = _ACTIVE[-1]
    return NamedSharding(mesh, fit_spec(logical_to_spec(logical, rules, mesh), shape, mesh))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; identity when no rules are active."""
    sharding = logical_sharding(logical, x.shape)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def tree_shardings(specs: Any, abstract: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of logical specs (``PartitionSpec`` of logical names).

    A ``table_rows`` or ``table_cols`` dimension that its mesh axes do not divide is refused
    with a :class:`ConfigError` (dropping the axes would replicate a whole embedding table on
    every device); every other dimension drops the axes it cannot use (:func:`fit_spec`).
    """

    def one(path: Any, spec: PartitionSpec, leaf: Any) -> NamedSharding:
        want = logical_to_spec(tuple(spec), rules, mesh)
        got = fit_spec(want, leaf.shape, mesh)
        for dim, (name, w, g) in enumerate(zip(tuple(spec), tuple(want), tuple(got), strict=False)):
            if name in ("table_rows", "table_cols") and w != g:
                axes = (w,) if isinstance(w, str) else tuple(w)
                shards = int(np.prod([mesh.shape[a] for a in axes]))
                where = jax.tree_util.keystr(path, simple=True, separator=".")
                fix = (f"set embedding.pad_rows_to={shards} (or a multiple) to pad the rows, or "
                       "embedding.placement=replicated to keep a whole copy on every device"
                       if name == "table_rows" else f"use a dim that {shards} divides or another placement")
                what = "rows" if name == "table_rows" else "columns"
                raise ConfigError(
                    f"{where}: {leaf.shape[dim]:,} {what} do not divide over the {shards} shards of mesh "
                    f"axes {' x '.join(axes)} (mesh.rules.{name}); {fix}")
        return NamedSharding(mesh, got)

    return jax.tree_util.tree_map_with_path(
        one, specs, abstract, is_leaf=lambda s: isinstance(s, PartitionSpec))
