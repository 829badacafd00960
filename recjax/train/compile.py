"""Ahead-of-time compile of the real train step for a target mesh, without the hardware.

``recjax compile --devices 64 --config ... mesh.data=8 mesh.fsdp=8`` runs on 64 virtual CPU
devices: the abstract state (with shardings) and an abstract global batch are lowered
through the same jitted train step the loop uses, and the compiled executable's
``memory_analysis`` (per device) and ``cost_analysis`` FLOPs are reported beside the
analytic model FLOPs. Nothing is allocated except what XLA needs to compile.

Beside XLA's memory figure the report gives an analytic estimate per device
(:func:`analytic_memory`): the sharded train state (exact, from the shardings), gradients
(the size of the parameter shards), activations kept for the backward pass (the model's
per-example estimate for its remat policy times the per-device batch), the layer weights
gathered in the compute dtype (every layer's when nothing is rematerialised -- XLA keeps
each scanned layer's gathered weights as a backward residual -- one layer's under
``remat: full``), and one layer's unsharded fp32 gradient before its reduce-scatter.
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from typing import Any

import jax
import numpy as np

from recjax.config import Config
from recjax.models import registry
from recjax.train import flops as flops_lib
from recjax.train.state import TrainSetup, build_setup, describe_model
from recjax.train.step import make_train_step


def compile_report(cfg: Config) -> dict[str, Any]:
    # the schedule's length does not change the compiled step: no need to read an epoch's rows
    setup = build_setup(cfg, total_steps=max(cfg.train.steps, 1))
    info = describe_model(setup)
    t0 = time.perf_counter()
    lowered = make_train_step(setup).lower(setup.abstract_state, setup.abstract_batch())
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    mem = flops_lib.memory_report(compiled)
    analytic = info["train_flops_per_example"] * cfg.data.global_batch / setup.n_devices
    estimate = analytic_memory(setup, info)
    return {
        "model": cfg.model.name,
        "task": setup.task.name,
        "mesh": dict(setup.mesh.shape),
        "n_devices": setup.n_devices,
        "device_kind": jax.devices()[0].device_kind,
        "global_batch": cfg.data.global_batch,
        **info,
        "memory_per_device": mem,
        "analytic_memory_per_device": estimate,
        "xla_over_analytic_memory": mem.get("total", float("nan")) / estimate["total"],
        "xla_flops_per_device": flops_lib.xla_flops(compiled),
        "analytic_train_flops_per_device": analytic,
        "compile_seconds": seconds,
        "versions": {
            "python": platform.python_version(),
            **{p: metadata.version(p) for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")},
        },
    }


def _shard_bytes(tree: Any) -> int:
    return int(sum(
        np.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    ))


def analytic_memory(setup: TrainSetup, info: dict[str, float]) -> dict[str, int]:
    """Per-device bytes: state + gradients + activations + FSDP working set (module docstring)."""
    cfg = setup.cfg
    state = _shard_bytes(setup.abstract_state)
    grads = _shard_bytes(setup.abstract_state["params"])
    entry = registry.get(cfg.model.name)
    per_example = entry.activation_bytes(cfg, setup.task.data_info) if entry.activation_bytes else 0.0
    activations = int(per_example * cfg.data.global_batch / setup.batch_shards)
    compute_bytes = 2 if cfg.train.compute_dtype == "bfloat16" else 4
    layers = getattr(cfg.model, "num_layers", 1)
    layer = info["params_dense"] / layers
    kept = 1 if getattr(cfg.model, "remat", "none") == "full" else layers
    gathered = int(kept * layer * compute_bytes)
    layer_grad = int(layer * 4)
    return {
        "state": state,
        "gradients": grads,
        "activations": activations,
        "gathered_weights": gathered,
        "layer_gradient": layer_grad,
        "total": state + grads + activations + gathered + layer_grad,
    }


def format_report(r: dict[str, Any]) -> str:
    mem = r["memory_per_device"]
    lines = [
        f"model {r['model']} | mesh {r['mesh']} | {r['n_devices']} x {r['device_kind']} | global batch {r['global_batch']}",
        f"params: {r['params_dense']:,} dense ({r['params_active']:,} active), {r['params_embedding']:,} embedding",
        "per-device memory (XLA): " + ", ".join(f"{k} {flops_lib.format_bytes(v)}" for k, v in mem.items()),
        "per-device memory (analytic): " + ", ".join(
            f"{k} {flops_lib.format_bytes(v)}" for k, v in r["analytic_memory_per_device"].items()
        ) + f"; XLA / analytic = {r['xla_over_analytic_memory']:.2f}",
        f"train-step FLOPs per device: XLA {r['xla_flops_per_device']:.4g}, "
        f"analytic {r['analytic_train_flops_per_device']:.4g} (3 x forward matmuls)",
        f"compile time {r['compile_seconds']:.1f}s",
    ]
    return "\n".join(lines)
