"""Ahead-of-time compile of the real train step for a target mesh, without the hardware.

``recjax compile --devices 64 --config ... mesh.data=8 mesh.fsdp=8`` runs on 64 virtual CPU
devices: the abstract state (with shardings) and an abstract global batch are lowered
through the same jitted train step the loop uses, and the compiled executable's
``memory_analysis`` (per device) and ``cost_analysis`` FLOPs are reported beside the
analytic model FLOPs. Nothing is allocated except what XLA needs to compile.

Beside XLA's memory figure the report gives an analytic estimate per device
(:func:`analytic_memory`): the sharded train state (exact, from the shardings), gradients
(the size of the parameter shards, without the tables a sparse update handles), activations kept for the backward pass (the model's
per-example estimate for its remat policy times the per-device batch), the layer weights
gathered in the compute dtype (every layer's when nothing is rematerialised -- XLA keeps
each scanned layer's gathered weights as a backward residual -- one layer's under
``remat: full``), and one layer's unsharded fp32 gradient before its reduce-scatter.
A model entry without an activation estimate counts none.

The report also places every embedding table (rows, the mesh axes its rows are split over,
shard count, bytes per device: :func:`table_placement`) and splits the per-device train state
into parameters and optimizer state (:func:`state_memory`); ``recjax params --devices N``
prints the same placement and state figures without compiling. The bytes each device sends
per step are read from the compiled HLO's collectives (:mod:`recjax.train.collectives`).
"""

from __future__ import annotations

import pathlib
import platform
import time
from importlib import metadata
from typing import Any

import jax
import numpy as np

from recjax.config import Config
from recjax.models import registry
from recjax.parallel import sharding as shd
from recjax.train import flops as flops_lib
from recjax.train import sparse_update as sparse
from recjax.train.collectives import collective_traffic
from recjax.train.state import TrainSetup, describe_model, grouped_params, inspection_setup
from recjax.train.step import make_train_step


def compile_report(cfg: Config, hlo_path: str | None = None) -> dict[str, Any]:
    """Compile the train step for ``cfg``'s mesh and report memory, FLOPs and collectives;
    ``hlo_path``: also write the optimized HLO text there."""
    setup = inspection_setup(cfg)
    info = describe_model(setup)
    t0 = time.perf_counter()
    lowered = make_train_step(setup).lower(setup.abstract_state, setup.abstract_batch())
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    hlo = compiled.as_text()
    if hlo_path:
        path = pathlib.Path(hlo_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(hlo)
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
        "tables": table_placement(setup),
        "state_per_device": state_memory(setup),
        "memory_per_device": mem,
        "analytic_memory_per_device": estimate,
        "xla_over_analytic_memory": mem.get("total", float("nan")) / estimate["total"],
        "xla_flops_per_device": flops_lib.xla_flops(compiled),
        "collectives_per_device": collective_traffic(hlo, setup.n_devices),
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


def _full_bytes(tree: Any) -> int:
    return int(sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


def state_memory(setup: TrainSetup) -> dict[str, int]:
    """Bytes of the train state per device (from its shardings) and in all (unsharded)."""
    a = setup.abstract_state
    params, opt = _shard_bytes(a["params"]), _shard_bytes(a["opt_state"])
    return {"params": params, "opt_state": opt, "total": _shard_bytes(a),
            "unsharded_total": _full_bytes(a)}


def table_placement(setup: TrainSetup) -> list[dict[str, Any]]:
    """Every embedding-group parameter (the :class:`~recjax.layers.embedding.EmbeddingTable` s):
    name, rows, dim, the mesh axes its rows are split over (``[]``: replicated), the shard
    count, rows and bytes per device."""
    out = []
    dynamic = {t.rows.path: t.layout for t in setup.dynamic_tables}
    stacks = dict(setup.stacks)
    for path, leaf, group in grouped_params(setup.abstract_state["params"], setup.groups):
        if group != "embedding":
            continue
        axes = list(shd.leading_axes(leaf.sharding))
        shards = int(np.prod([setup.mesh.shape[a] for a in axes])) if axes else 1
        spec = tuple(leaf.sharding.spec)
        col_axes = list(shd.spec_axes(spec[1])) if len(spec) > 1 else []
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        out.append({
            "name": ".".join(str(k) for k in path),
            "rows": int(leaf.shape[0]),
            "dim": int(leaf.shape[1]) if leaf.ndim > 1 else 1,
            "row_axes": axes,
            "shards": shards,
            "col_axes": col_axes,
            "rows_per_device": int(shard_shape[0]),
            "cols_per_device": int(shard_shape[1]) if leaf.ndim > 1 else 1,
            "bytes_per_device": int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize,
        })
        if path in stacks:
            out[-1]["table_wise"] = dict(stacks[path].shard_of)  # table -> the shard holding it
        if path in dynamic:
            lay = dynamic[path]
            out[-1]["dynamic"] = {"capacity": lay.partitions * lay.capacity, "partitions": lay.partitions,
                                  "slots_per_partition": lay.slots}
    expected = expected_table_traffic(setup)
    for t in out:
        if t["name"].split(".")[-1] in expected:
            t["expected_bytes_per_step"] = expected[t["name"].split(".")[-1]]
    return out


def expected_table_traffic(setup: TrainSetup) -> dict[str, dict[str, float]]:
    """Bytes each device is expected to send per train step for each sparse-updated lookup
    table (by name), from the traced lookups, with :mod:`recjax.train.collectives`' ring volumes.

    ``N`` ids of the global batch per step (all lookups), ``Bs`` batch shards, ``S`` row shards,
    ``d`` dim, ``C`` all-to-all slots per destination; 4-byte ids and fp32 rows:

    - ``lookup``: GSPMD into a row-sharded table: all-gather of the ids ``4 N (Bs-1)/Bs`` and
      all-reduce of the partial rows ``2 * 4 N d (S-1)/S``; all-to-all: ids and rows
      ``(S-1) C (4 + 4d)``; columns split ``c`` ways (batch over the same axes): the ids'
      all-gather and an all-to-all of the rows ``4 (N / Bs) d (c-1)/c``; replicated: 0.
    - ``gradient`` (sparse update): all-gather of (id, row sum) over the batch ``N (4 + 4d)
      (Bs-1)/Bs``, plus ``2 * 4 N (c-1)/c`` for row-wise Adagrad's per-row mean over split
      columns; all-to-all: ``(S-1) C (4 + 4d)``.
    - ``hash`` (dynamic tables): ids all-gathered as (hi, lo) in the update and the lookup
      ``2 * 8 N (Bs-1)/Bs``, rows combined by a max ``2 * 4 N (S-1)/S``.

    Tables updated densely are not estimated (the dense path is the test oracle).
    """
    from recjax.train.step import discover_lookups

    if not setup.sparse_tables:
        return {}
    with shd.use_rules(setup.mesh, setup.cfg.mesh.rules):
        tape = discover_lookups(setup, setup.abstract_state["params"], setup.abstract_batch(), jax.random.key(0))
    bs = setup.batch_shards
    dynamic = {t.rows.name for t in setup.dynamic_tables}
    out = {}
    for t in setup.sparse_tables:
        calls = tape.ids.get(t.name, [])
        n = sum(int(c.shape[0]) for c in calls)
        s, d = t.shards, t.dim
        caps = tape.exchange_caps.get(t.name, [])
        gather = (bs - 1) / bs
        c = int(np.prod([setup.mesh.shape[a] for a in t.col_axes])) if t.col_axes else 1
        if caps and caps[0]:
            lookup = grad = (s - 1) * caps[0] * (4 + 4 * d)
        elif s > 1:
            lookup = 4 * n * gather + 2 * 4 * n * d * (s - 1) / s
            grad = n * (4 + 4 * d) * gather
        else:  # replicated rows; split columns are gathered per id and sent back by all-to-all
            lookup = (4 * n * gather + 4 * n * d / bs * (c - 1) / c) if c > 1 else 0.0
            grad = n * (4 + 4 * d) * gather
            if c > 1 and setup.cfg.optim.embedding.name == "rowwise_adagrad":
                grad += 2 * 4 * n * (c - 1) / c  # each touched row's mean square, summed over columns
        row = {"ids": n, "lookup": float(lookup), "gradient": float(grad)}
        if t.name in dynamic:
            row["hash"] = 2 * 8 * n * gather + 2 * 4 * n * (s - 1) / s
        row["total"] = row["lookup"] + row["gradient"] + row.get("hash", 0.0)
        out[t.name] = row
    return out


def format_placement(tables: list[dict[str, Any]]) -> list[str]:
    return [
        f"  {t['name']}: {t['rows']:,} rows x {t['dim']} "
        + (f"over {' x '.join(t['row_axes'])} ({t['shards']} shards of {t['rows_per_device']:,} rows)"
           if t["row_axes"] else
           f"columns over {' x '.join(t['col_axes'])} ({t['dim'] // t['cols_per_device']} shards of "
           f"{t['cols_per_device']} columns)" if t.get("col_axes") and not t["row_axes"] else "replicated")
        + f", {flops_lib.format_bytes(t['bytes_per_device'])} per device"
        + (f"; dynamic: {t['dynamic']['capacity']:,} ids in {t['dynamic']['partitions']} partition(s) of "
           f"{t['dynamic']['slots_per_partition']:,} slots" if "dynamic" in t else "")
        + (f"; sends ~{flops_lib.format_bytes(t['expected_bytes_per_step']['total'])} per step"
           if "expected_bytes_per_step" in t else "")
        + ("; table-wise: " + ", ".join(f"{n} on shard {b}" for n, b in t["table_wise"].items())
           if "table_wise" in t else "")
        for t in tables
    ]


def activation_bytes_per_example(cfg: Config, data_info: Any) -> float | None:
    """The model entry's estimate of the activations kept per example, or None (unknown)."""
    fn = registry.get(cfg.model.name).activation_bytes
    return None if fn is None else float(fn(cfg, data_info))


def analytic_memory(setup: TrainSetup, info: dict[str, float]) -> dict[str, int]:
    """Per-device bytes: state + gradients + activations + FSDP working set (module docstring)."""
    cfg = setup.cfg
    state = _shard_bytes(setup.abstract_state)
    # sparse tables have no gradient array: their touched rows' gradients are batch-sized
    grads = _shard_bytes(sparse.split_tables(setup.abstract_state["params"], setup.sparse_paths)[0])
    per_example = activation_bytes_per_example(cfg, setup.task.data_info) or 0.0
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
    mem, st = r["memory_per_device"], r["state_per_device"]
    lines = [
        f"model {r['model']} (task {r['task']}) | mesh {r['mesh']} | {r['n_devices']} x {r['device_kind']} "
        f"| global batch {r['global_batch']}",
        f"params: {r['params_dense']:,} dense ({r['params_active']:,} active), {r['params_embedding']:,} embedding",
        "tables:\n" + "\n".join(format_placement(r["tables"])) if r["tables"] else "tables: none",
        f"train state per device: params {flops_lib.format_bytes(st['params'])}, optimizer "
        f"{flops_lib.format_bytes(st['opt_state'])}, total {flops_lib.format_bytes(st['total'])} "
        f"(unsharded {flops_lib.format_bytes(st['unsharded_total'])})",
        "per-device memory (XLA): " + ", ".join(f"{k} {flops_lib.format_bytes(v)}" for k, v in mem.items()),
        "per-device memory (analytic): " + ", ".join(
            f"{k} {flops_lib.format_bytes(v)}" for k, v in r["analytic_memory_per_device"].items()
        ) + f"; XLA / analytic = {r['xla_over_analytic_memory']:.2f}",
        f"train-step FLOPs per device: XLA {r['xla_flops_per_device']:.4g}, "
        f"analytic {r['analytic_train_flops_per_device']:.4g} (3 x forward matmuls)",
        "collectives per device per step: " + (", ".join(
            f"{k} x{int(v['count'])} {flops_lib.format_bytes(v['bytes_sent'])}"
            for k, v in r["collectives_per_device"]["by_kind"].items())
            + f"; {flops_lib.format_bytes(r['collectives_per_device']['bytes_sent_per_device'])} sent"
            if r["collectives_per_device"]["by_kind"] else "none"),
        f"compile time {r['compile_seconds']:.1f}s",
    ]
    return "\n".join(lines)
