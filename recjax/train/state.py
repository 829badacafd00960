"""Train state built abstractly first, then materialised straight into its shardings.

The state is a plain dict pytree::

    {"step": int32[], "params": {...}, "opt_state": optax state, "rng": uint32[2],
     "nonfinite_step": int32[]}   # -1 until a step produced a NaN/inf loss

``rng`` is the run's base key (threefry, from ``seed``); step ``s`` draws from
``fold_in(rng, s)``, and threefry's partitionable streams make those draws the same on any
mesh. ``TrainSetup`` derives everything from the config and the task once: mesh, model
graph, the abstract state (``jax.ShapeDtypeStruct`` leaves carrying their ``NamedSharding``),
the optimizer with its groups (by variable type: every
:class:`~recjax.layers.embedding.EmbeddingTable` is in the embedding group), and the batch
shardings. The same abstract tree is the init target, the checkpoint restore target and the
input of the ahead-of-time compile (``recjax compile``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recjax.config import Config
from recjax.errors import ConfigError
from recjax.layers import dynamic_table as dyn
from recjax.layers.embedding import EmbeddingCollection, EmbeddingTable, LookupTable, Stack
from recjax.parallel import sharding as shd
from recjax.parallel.mesh import make_mesh
from recjax.tasks import Task, get_task
from recjax.train import optim
from recjax.train import sparse_update as sparse

State = dict[str, Any]


def opt_state_shardings(abstract_opt: Any, param_shardings: dict[tuple, NamedSharding], mesh: Mesh) -> Any:
    """Shard each optimizer-state leaf like the parameter whose key path ends its own.

    Optax states mirror the params tree (``mu``, ``nu``, accumulators), so a leaf whose key
    path ends with a parameter's key path takes that parameter's spec, truncated to the
    leaf's rank (e.g. the per-row accumulator ``[V]`` of a ``[V, d]`` table keeps the row
    sharding). Anything else (step counters) is replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    by_len = sorted(param_shardings.items(), key=lambda kv: -len(kv[0]))

    def one(path: tuple, leaf: Any) -> NamedSharding:
        keys = optim.path_keys(path)
        for pkeys, s in by_len:
            if len(keys) >= len(pkeys) and keys[len(keys) - len(pkeys):] == pkeys:
                spec = tuple(s.spec)[: len(leaf.shape)]
                return NamedSharding(mesh, shd.fit_spec(PartitionSpec(*spec), leaf.shape, mesh))
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt)


def param_groups(abstract_model: nnx.Module) -> dict[str, Any]:
    """Params-shaped pure dict of optimizer group labels: ``"embedding"`` for every
    :class:`EmbeddingTable`, ``"dense"`` for every other parameter."""
    state = nnx.state(abstract_model, nnx.Param)
    return nnx.to_pure_dict(jax.tree.map(
        lambda v: "embedding" if isinstance(v, EmbeddingTable) else "dense",
        state, is_leaf=lambda x: isinstance(x, nnx.Variable),
    ))


def lookup_table_paths(abstract_model: nnx.Module) -> tuple[tuple[str, ...], ...]:
    """Key paths of every :class:`LookupTable` (the tables a sparse update may handle)."""
    tables = nnx.to_pure_dict(nnx.state(abstract_model, LookupTable))
    paths = tuple(p for p, _ in sparse.flat_paths(tables))
    names = [p[-1] for p in paths]
    if len(set(names)) != len(names):
        raise ConfigError(f"lookup tables need distinct names for sparse updates, got {names}")
    return paths


@dataclasses.dataclass(frozen=True)
class SparseTable:
    """A lookup table updated row-wise: where it sits in the params and how it is split."""

    path: tuple[str, ...]
    rows: int
    dim: int
    row_axes: tuple[str, ...]  # mesh axes its rows are split over (empty: not row-split)
    shards: int
    col_axes: tuple[str, ...] = ()  # mesh axes its columns are split over

    @property
    def name(self) -> str:
        return str(self.path[-1])

    @property
    def rows_per_shard(self) -> int:
        return self.rows // self.shards


@dataclasses.dataclass(frozen=True)
class DynamicTable:
    """A dynamic (raw-id) table: its rows, where its hash state sits in the params, which
    columns of the batch's ``sparse`` it embeds, and its sizes."""

    rows: SparseTable
    hash_path: tuple[str, ...]
    columns: tuple[int, ...]
    layout: dyn.Layout

    @property
    def hash_leaf_paths(self) -> tuple[tuple[str, ...], ...]:
        return tuple((*self.hash_path, f) for f in dyn.FIELDS)


@dataclasses.dataclass
class TrainSetup:
    cfg: Config
    task: Task
    mesh: Mesh
    graphdef: Any
    tx: optax.GradientTransformation
    total_steps: int
    groups: dict[str, Any]  # params-shaped optimizer group labels
    abstract_state: State  # ShapeDtypeStruct leaves with .sharding
    state_shardings: State
    batch_axes: tuple[str, ...]  # mesh axes the leading (batch) dimension is split over
    # tables updated row-wise (optim.embedding.update=sparse); empty: every gradient is dense
    sparse_tables: tuple[SparseTable, ...] = ()
    dynamic_tables: tuple[DynamicTable, ...] = ()  # raw-id tables (all of them sparse tables)
    stacks: tuple[tuple[tuple[str, ...], Stack], ...] = ()  # (param path, table-wise stack)

    @property
    def sparse_paths(self) -> tuple[tuple[str, ...], ...]:
        return tuple(t.path for t in self.sparse_tables)

    @property
    def hash_paths(self) -> tuple[tuple[str, ...], ...]:
        """Params leaves that are hash-table state: neither differentiated nor optimized."""
        return tuple(p for t in self.dynamic_tables for p in t.hash_leaf_paths)

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def batch_shards(self) -> int:
        return int(np.prod([self.mesh.shape[a] for a in self.batch_axes])) if self.batch_axes else 1

    def init_state(self) -> State:
        """Materialise the state directly into its shardings (no host-side full copy)."""
        init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
        with shd.use_rules(self.mesh, self.cfg.mesh.rules):
            return init(jax.random.PRNGKey(self.cfg.seed))

    def _init_fn(self, rng: jax.Array) -> State:
        model_rng, state_rng = jax.random.split(rng)
        params = nnx.to_pure_dict(nnx.state(self.task.build_model(nnx.Rngs(params=model_rng))))
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": self._init_opt(params),
            "rng": state_rng,
            "nonfinite_step": jnp.full((), -1, jnp.int32),
        }

    def _init_opt(self, params: Any) -> Any:
        """Dense: the optax state of all params. Sparse: ``{"dense": optax state of the other
        params, "rows": {"count": int32[], slot: {table path: [rows(, d)]}}}`` -- slot leaves end
        with their table's key path, so they are row-sharded like it."""
        if not self.sparse_tables:
            return self.tx.init(params)
        dense, _ = sparse.split_tables(params, self.sparse_paths + self.hash_paths)
        rows: dict[str, Any] = {"count": jnp.zeros((), jnp.int32)}
        for t in self.sparse_tables:
            for k, v in sparse.init_slots(self.cfg.optim.embedding, t.rows, t.dim).items():
                sparse.set_path(rows.setdefault(k, {}), t.path, v)
        return {"dense": self.tx.init(dense), "rows": rows}

    def batch_sharding(self, ndim: int) -> NamedSharding:
        lead = self.batch_axes if self.batch_axes else None
        return NamedSharding(self.mesh, PartitionSpec(lead, *([None] * (ndim - 1))))

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The task's global train batch with the batch shardings attached."""
        return {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.batch_sharding(len(a.shape)))
                for k, a in self.task.abstract_batch().items()}

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Process-local rows (this process's slice of each global batch) -> global arrays
        sharded over the batch axes."""
        p = jax.process_count()
        out = {}
        for k, x in local.items():
            x = np.asarray(x)
            out[k] = jax.make_array_from_process_local_data(
                self.batch_sharding(x.ndim), x, (x.shape[0] * p, *x.shape[1:]))
        return out

    def replicated_batch(self, arrays: list[np.ndarray]) -> list[jax.Array]:
        """Whole global batches that every process holds -> arrays sharded over the batch axes."""
        return [jax.make_array_from_callback(a.shape, self.batch_sharding(a.ndim), lambda i, a=a: a[i])
                for a in arrays]


def batch_axes(cfg: Config, mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in cfg.mesh.rules.get("batch", []) if mesh.shape[a] > 1)


def abstract_model(cfg: Config, task: Task) -> nnx.Module:
    return nnx.eval_shape(lambda: task.build_model(nnx.Rngs(params=jax.random.PRNGKey(0))))


def build_setup(cfg: Config, task: Task | None = None, devices: list[jax.Device] | None = None,
                total_steps: int | None = None) -> TrainSetup:
    """Everything derived from ``cfg`` and its task; ``total_steps`` (default: the task's)
    only shapes the learning-rate schedule."""
    task = task or get_task(cfg)
    mesh = make_mesh(cfg.mesh, devices)
    total = task.total_steps() if total_steps is None else total_steps
    with shd.use_rules(mesh, cfg.mesh.rules):  # embedding tables are planned for this mesh
        model = abstract_model(cfg, task)
    graphdef, abstract_params = nnx.split(model)
    logical_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    abstract_params = nnx.to_pure_dict(abstract_params)
    check_partitions(cfg, model, mesh)
    param_shardings = shd.tree_shardings(logical_specs, abstract_params, mesh, cfg.mesh.rules)
    groups = param_groups(model)
    paths = lookup_table_paths(model) if cfg.optim.embedding.update == "sparse" else ()
    tables = tuple(_sparse_table(p, abstract_params, param_shardings, mesh) for p in paths)
    dynamic = _dynamic_tables(cfg, model, tables)
    stacks = tuple(((*map(str, path), "tables", st.param), st) for path, node in nnx.iter_graph(model)
                   if isinstance(node, EmbeddingCollection) for st in node.stacks)
    if tables:
        sparse.slot_shapes(cfg.optim.embedding.name, 1, 1)  # a sparse rule, or a ConfigError
        tx = optim.make_optimizer(cfg.optim, total, sparse.split_tables(groups, paths)[0], clip=False)
    else:
        tx = optim.make_optimizer(cfg.optim, total, groups)

    setup = TrainSetup(cfg, task, mesh, graphdef, tx, total, groups, {}, {}, batch_axes(cfg, mesh), tables, dynamic,
                       stacks)
    with shd.use_rules(mesh, cfg.mesh.rules):
        abstract = jax.eval_shape(setup._init_fn, jax.random.PRNGKey(cfg.seed))
    replicated = NamedSharding(mesh, PartitionSpec())
    flat_params = {
        optim.path_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    }
    shardings = {
        "step": replicated,
        "params": param_shardings,
        "opt_state": opt_state_shardings(abstract["opt_state"], flat_params, mesh),
        "rng": replicated,
        "nonfinite_step": replicated,
    }
    setup.state_shardings = shardings
    setup.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    shards = setup.batch_shards
    if cfg.data.global_batch % shards or cfg.data.global_batch % jax.process_count():
        raise ConfigError(
            f"data.global_batch={cfg.data.global_batch} is not divisible by the {shards} batch "
            f"shards of mesh axes {setup.batch_axes} and the {jax.process_count()} process(es)"
        )
    return setup


def _sparse_table(path: tuple[str, ...], params: Any, shardings: Any, mesh: Mesh) -> SparseTable:
    leaf, sharding = sparse.get_path(params, path), sparse.get_path(shardings, path)
    axes = shd.leading_axes(sharding)
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    spec = tuple(sharding.spec)
    cols = shd.spec_axes(spec[1]) if len(spec) > 1 else ()
    return SparseTable(path, int(leaf.shape[0]), int(leaf.shape[1]), axes, shards, cols)


def check_partitions(cfg: Config, model: nnx.Module, mesh: Mesh) -> None:
    """A row-sharded dynamic table needs a partition count that its row shards divide (each
    device holds whole partitions with their rows)."""
    axes = shd.spec_axes(shd.logical_to_spec(("table_rows",), cfg.mesh.rules, mesh)[0])
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    for _, node in nnx.iter_graph(model):
        if isinstance(node, EmbeddingCollection) and node.layout is not None and node.layout.partitions % shards \
                and any(t.placement == "row_sharded" for t in node.specs):
            raise ConfigError(f"embedding.dynamic.partitions={node.layout.partitions} must be a multiple of the "
                              f"{shards} row shards of mesh axes {' x '.join(axes)} (each device holds whole "
                              "partitions with their rows), or use embedding.placement=replicated")


def _dynamic_tables(cfg: Config, model: nnx.Module, tables: tuple[SparseTable, ...]) -> tuple[DynamicTable, ...]:
    """The dynamic tables of every :class:`EmbeddingCollection` in ``model`` (they need sparse
    updates)."""
    by_path = {t.path: t for t in tables}
    out = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, EmbeddingCollection) or node.layout is None:
            continue
        if cfg.optim.embedding.update != "sparse":
            raise ConfigError("embedding.dynamic needs optim.embedding.update=sparse (fresh rows and their "
                              "optimizer slots are reset row by row)")
        path = tuple(str(k) for k in path)
        for spec in node.specs:
            rows = by_path[(*path, "tables", spec.name)]
            out.append(DynamicTable(rows, (*path, "hash", spec.name), tuple(node.table_columns(spec.name)),
                                    node.layout))
    return tuple(out)


def inspection_setup(cfg: Config, task: Task | None = None) -> TrainSetup:
    """The setup of commands that do not train (``recjax compile``, ``params``, ``eval``): the
    schedule's length changes no shape or compiled step, so no epoch's rows are read to count
    the steps."""
    return build_setup(cfg, task, total_steps=max(cfg.train.steps, 1))


def grouped_params(params: Any, groups: Any) -> list[tuple[tuple[str, ...], Any, str]]:
    """``(path, leaf, group)`` of every trained parameter (``groups`` has no entry for other
    variables, e.g. hash-table state)."""
    return [(path, sparse.get_path(params, path), group) for path, group in sparse.flat_paths(groups)]


def param_counts(params: Any, groups: Any) -> dict[str, int]:
    """Parameter counts split into embedding tables and dense weights."""
    counts = {"embedding": 0, "dense": 0}
    for _, leaf, group in grouped_params(params, groups):
        counts[group] += int(np.prod(leaf.shape))
    counts["total"] = counts["embedding"] + counts["dense"]
    return counts


def describe_model(setup: TrainSetup) -> dict[str, float]:
    """Parameter counts and analytic FLOPs per example (training = 3 x forward matmuls).

    ``params_active``: dense parameters one example uses (MoE: minus the unselected experts).
    """
    return _describe(setup.task, setup.abstract_state["params"], setup.groups)


def describe_config(cfg: Config, task: Task | None = None) -> dict[str, float]:
    """:func:`describe_model` from the config alone: no mesh, no devices, nothing allocated."""
    task = task or get_task(cfg)
    model = abstract_model(cfg, task)
    return _describe(task, nnx.to_pure_dict(nnx.state(model)), param_groups(model))


def _describe(task: Task, params: Any, groups: Any) -> dict[str, float]:
    counts = param_counts(params, groups)
    fwd = task.forward_flops_per_example()
    return {
        "params_dense": counts["dense"],
        "params_active": counts["dense"] - task.inactive_params(),
        "params_embedding": counts["embedding"],
        "fwd_flops_per_example": fwd,
        "train_flops_per_example": 3 * fwd,
    }
