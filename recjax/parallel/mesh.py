"""Build the device mesh over the fixed axes ``data, fsdp, tensor, expert`` from config."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from recjax.config import MeshConfig
from recjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """Resolve the degrees of ``MESH_AXES``; at most one may be -1 ("all the rest")."""
    degrees = [cfg.data, cfg.fsdp, cfg.tensor, cfg.expert]
    free = [i for i, d in enumerate(degrees) if d == -1]
    if len(free) > 1:
        names = ", ".join(MESH_AXES[i] for i in free)
        raise ConfigError(f"mesh: only one axis may be -1, got -1 for {names}")
    for name, d in zip(MESH_AXES, degrees, strict=True):
        if d == 0 or d < -1:
            raise ConfigError(f"mesh.{name}: degree must be a positive integer or -1, got {d}")
    fixed = math.prod(d for d in degrees if d != -1)
    if free:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh: {n_devices} devices are not divisible by the fixed degrees "
                f"({dict(zip(MESH_AXES, degrees, strict=True))}, product {fixed})"
            )
        degrees[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(
            f"mesh: degrees {dict(zip(MESH_AXES, degrees, strict=True))} multiply to {fixed}, "
            f"but there are {n_devices} devices; set one axis to -1 or fix the degrees"
        )
    return tuple(degrees)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """An ``AxisType.Auto`` (GSPMD) mesh over ``devices`` (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    # explicit device lists (e.g. abstract topologies) keep their given order
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
