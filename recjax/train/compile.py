"""Ahead-of-time compile of the real train step for a target mesh, without the hardware.

``recjax compile --devices 64 --config ... mesh.data=8 mesh.fsdp=8`` runs on 64 virtual CPU
devices: the abstract state (with shardings) and an abstract global batch are lowered
through the same jitted train step the loop uses, and the compiled executable's
``memory_analysis`` (per device) and ``cost_analysis`` FLOPs are reported beside the
analytic model FLOPs. Nothing is allocated except what XLA needs to compile.
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from typing import Any

import jax

from recjax.config import Config
from recjax.train import flops as flops_lib
from recjax.train.state import build_setup, describe_model
from recjax.train.step import abstract_batch, make_train_step


def compile_report(cfg: Config) -> dict[str, Any]:
    setup = build_setup(cfg)
    info = describe_model(setup)
    t0 = time.perf_counter()
    lowered = make_train_step(setup).lower(setup.abstract_state, abstract_batch(setup))
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    mem = flops_lib.memory_report(compiled)
    analytic = info["train_flops_per_example"] * cfg.data.global_batch / setup.n_devices
    return {
        "model": cfg.model.name,
        "mesh": dict(setup.mesh.shape),
        "n_devices": setup.n_devices,
        "device_kind": jax.devices()[0].device_kind,
        "global_batch": cfg.data.global_batch,
        **info,
        "memory_per_device": mem,
        "xla_flops_per_device": flops_lib.xla_flops(compiled),
        "analytic_train_flops_per_device": analytic,
        "compile_seconds": seconds,
        "versions": {
            "python": platform.python_version(),
            **{p: metadata.version(p) for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")},
        },
    }


def format_report(r: dict[str, Any]) -> str:
    mem = r["memory_per_device"]
    lines = [
        f"model {r['model']} | mesh {r['mesh']} | {r['n_devices']} x {r['device_kind']} | global batch {r['global_batch']}",
        f"params: {r['params_dense']:,} dense, {r['params_embedding']:,} embedding",
        "per-device memory: " + ", ".join(f"{k} {flops_lib.format_bytes(v)}" for k, v in mem.items()),
        f"train-step FLOPs per device: XLA {r['xla_flops_per_device']:.4g}, "
        f"analytic {r['analytic_train_flops_per_device']:.4g} (3 x forward matmuls)",
        f"compile time {r['compile_seconds']:.1f}s",
    ]
    return "\n".join(lines)
