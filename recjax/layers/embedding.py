"""Declarative embedding tables and their lookup.

Tables are resolved from the data's :class:`~recjax.data.spec.FeatureSpec` and the
``embedding`` config section (:func:`resolve_tables`): with ``embedding.tables`` empty,
every sparse feature gets its own table sized by its vocabulary; otherwise the listed
tables are used and several features may share one table.

:class:`EmbeddingCollection` holds every table as a :class:`LookupTable` ``[R, d]`` (fp32),
an :class:`EmbeddingTable` (``nnx.Param`` subtype): the optimizer routes every variable of
that type (in any model, e.g. the sequential recommenders' item table) to the embedding
optimizer, and a :class:`LookupTable` -- read only through lookups -- may be updated
row-wise (``optim.embedding.update=sparse``, :class:`LookupTape`). Placements, planned per
table for the active mesh by :func:`plan_placements` (``embedding.placement``, per-table
overrides, ``auto`` within ``embedding.memory_budget_bytes``): row-sharded tables are annotated
``("table_rows", "embed")``, column-sharded ones ``(None, "table_cols")`` (every device holds
every row's slice of ``d / shards`` columns), replicated ones ``(None, "embed")``.
``R = padded_rows(V, embedding.pad_rows_to)`` rows: the vocabulary rounded up so a table
divides over its shards (the trainer refuses a row-sharded table that does not); the padding
rows are never looked up.

With ``embedding.dynamic.capacity > 0`` every table is *dynamic*
(:mod:`recjax.layers.dynamic_table`): the batch's ``sparse`` ids are raw 64-bit ids (uint32
``(hi, lo)`` pairs), each table holds a collision-free hash table (:class:`HashSlots`
variables) whose slots index its rows, and a lookup first finds each id's row (``-1``, a zero
vector, for ids not resident or not yet admitted: ``cold_ids``). The train step inserts and
evicts ids before the forward pass (``recjax.train.step``).

Id semantics, per table of vocabulary ``V``:

- ``-1``: missing; contributes a zero vector, not counted as out-of-vocabulary;
- ``0 <= id < V``: looked up;
- ``id >= V`` or ``id < -1``: counted in ``oov_ids``, then ``oov="hash"`` looks up
  ``id mod V`` (always in ``[0, V)``), ``oov="drop"`` contributes a zero vector.

Multi-hot ids ``[B, F, H]`` (padded with ``-1``) are combined over ``H`` by ``combiner``:
``sum`` of the vectors, or their ``mean`` over the ids that contributed a vector (zero
when none did).

A lookup into a row-sharded table is an explicit all-to-all with ``embedding.exchange=
all_to_all`` when the batch is split over the table's row axes
(:mod:`recjax.parallel.table_exchange`); otherwise it goes through :func:`gather_rows`, a
gather whose backward deduplicates the ids before writing the table gradient (one scatter with
unique indices instead of the duplicate-index scatter-add that autodiff of ``jnp.take``
produces; see its docstring). Lookups return ``stats``: ``oov_ids``, and ``exchange_overflow``
with the all-to-all.

Tables may have different dims. :meth:`EmbeddingCollection.lookup` returns one ``[B, d_f]``
array per feature and always works; ``__call__`` stacks them into ``[B, F, d]`` and raises
``ValueError`` when the dims differ (models that need equal dims, e.g. DLRM, check
:attr:`EmbeddingCollection.uniform_dim` at build time and raise ``ConfigError``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.config import EmbeddingConfig
from recjax.data.spec import FeatureSpec
from recjax.errors import ConfigError
from recjax.layers import dynamic_table as dyn
from recjax.layers.dynamic_table import HashSlots, Layout
from recjax.parallel import sharding as shd
from recjax.parallel.sharding import constrain
from recjax.parallel.table_exchange import capacity, exchange_axes, exchange_lookup

Placement = Literal["replicated", "row_sharded", "column_sharded", "table_wise"]
Gather = Callable[[jax.Array, jax.Array], jax.Array]  # (table [R, d], ids [N]) -> rows [N, d]


class EmbeddingTable(nnx.Param):
    """An embedding table ``[rows, dim]``: the variable type the embedding optimizer updates."""


class LookupTable(EmbeddingTable):
    """A table read only through :meth:`EmbeddingCollection.lookup`: its gradient touches only
    the looked-up rows, so ``optim.embedding.update=sparse`` updates it row-wise
    (``recjax.train.sparse_update``). Tables used any other way (e.g. the sequential models'
    item table, which also scores every item) stay :class:`EmbeddingTable` and are updated densely.
    """


@dataclass
class LookupTape:
    """What the sparse train step needs from one forward pass, per :class:`LookupTable` name.

    While a tape is recording (:func:`recording`), every lookup into table ``name`` returns
    ``take(stop_gradient(table), ids) + deltas[name][k]`` for its ``k``-th call and appends its
    ids to ``ids[name]`` (``-1`` where the lookup contributes nothing: missing or dropped ids).
    The deltas are zeros, so values are unchanged; the gradient of the loss with respect to
    ``deltas[name][k]`` ``[N_k, d]`` is the per-lookup row gradient, and no ``[rows, d]`` table
    gradient exists. ``deltas=None`` records ids only (the shape-discovery pass).
    ``exchange_caps[name][k]``: the per-destination slots of call ``k``'s all-to-all (0: GSPMD
    gather), so the row gradients go back the way the rows came.
    """

    deltas: dict[str, list[jax.Array]] | None = None
    ids: dict[str, list[jax.Array]] = field(default_factory=dict)
    exchange_caps: dict[str, list[int]] = field(default_factory=dict)

    def lookup(self, name: str, table: jax.Array, ids: jax.Array, gather: Gather, cap: int) -> jax.Array:
        """``ids [N]`` (``-1``: contributes nothing) -> ``gather(table, ids)`` rows ``[N, d]``."""
        calls = self.ids.setdefault(name, [])
        rows = gather(jax.lax.stop_gradient(table), ids)
        if self.deltas is not None:
            rows = rows + self.deltas[name][len(calls)]
        calls.append(ids)
        self.exchange_caps.setdefault(name, []).append(cap)
        return rows


_TAPE: contextvars.ContextVar[LookupTape | None] = contextvars.ContextVar("lookup_tape", default=None)


@contextlib.contextmanager
def recording(tape: LookupTape) -> Iterator[LookupTape]:
    """Route every :class:`LookupTable` lookup traced inside the block through ``tape``."""
    token = _TAPE.set(tape)
    try:
        yield tape
    finally:
        _TAPE.reset(token)


def _columns(x: jax.Array, cols: list[int]) -> jax.Array:
    return x[:, cols[0] : cols[0] + 1] if len(cols) == 1 else x[:, jnp.asarray(cols)]


def present(sparse: jax.Array) -> jax.Array:
    """Which ids of a batch's ``sparse`` are looked up: ``!= -1``, or for raw uint32 ``[..., 2]``
    ids a ``hi`` half other than the missing marker -> bool ``[B, F(, H)]``."""
    return dyn.present(sparse[..., 0]) if sparse.dtype == jnp.uint32 else sparse != -1


def padded_rows(vocab: int, multiple: int) -> int:
    """``vocab`` rounded up to a multiple of ``multiple`` (``embedding.pad_rows_to``)."""
    if multiple < 1:
        raise ConfigError(f"embedding.pad_rows_to must be >= 1, got {multiple}")
    return -(-vocab // multiple) * multiple


@jax.custom_vjp
def gather_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]`` for ``table [V, d]`` and valid int ``ids [N]`` (``0 <= id < V``) -> ``[N, d]``.

    The forward is ``jnp.take``. The backward is the deduplicated embedding gradient (as
    TorchRec/FBGEMM do): autodiff of ``jnp.take`` is a scatter-add with one index per
    looked-up id, and under Zipf traffic most of them repeat. On GPU, jaxlib 0.10.2-0.11.0
    compiles such an f32 scatter-add into a compare-and-swap loop that is up to ~450x slower
    under index contention (openxla/xla#46225, jax-ml/jax#38806). Here the rows of the same
    id are summed first and the table is written once per distinct id (see
    ``_gather_rows_bwd``). Out-of-range ids are clipped into ``[0, V)`` (as ``jnp.take(...,
    mode="clip")``, whose values and gradient this matches for any ids).
    """
    return jnp.take(table, _clip(ids, table.shape[0]), axis=0)


def _clip(ids: jax.Array, vocab: int) -> jax.Array:
    return jnp.clip(ids, 0, vocab - 1)


def _gather_rows_fwd(table: jax.Array, ids: jax.Array):
    ids = _clip(ids, table.shape[0])
    # The backward only needs the table's shape/dtype; keeping the (already live) table as the
    # residual costs no memory.
    return jnp.take(table, ids, axis=0), (ids, table)


def _segmented_add(a, b):
    """Combine of a segmented inclusive prefix sum over ``(starts_segment [N], value [N, d])``.

    ``b`` is the later element: if it starts a segment, the prefix restarts at ``b``.
    Associative, so ``lax.associative_scan`` may regroup it freely.
    """
    fa, va = a
    fb, vb = b
    return fa | fb, jnp.where(fb[..., None], vb, va + vb)


def sum_duplicate_rows(ids: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Deduplicate ``ids [N]`` with rows ``[N, d]`` -> ``(sorted_ids [N], sums [N, d], last [N])``.

    ``sums[i]`` at a position with ``last[i]`` is the fp32 total of every row whose id equals
    ``sorted_ids[i]`` (each distinct id is ``last`` exactly once); other positions hold partial
    sums and must be ignored. No scatter is involved:

    1. One stable key-value sort of the ids gives the sorted ids and the permutation; the rows
       are gathered in that order, so equal ids form contiguous segments.
    2. Each segment is summed by a segmented inclusive prefix sum (``lax.associative_scan``):
       slices, adds and selects only, hence no contention however often an id repeats. Sums
       never cross a segment boundary, so unlike a global-cumsum difference there is no
       cancellation against other ids' rows. (``jax.ops.segment_sum`` would be a scatter-add
       with duplicate indices -- the slow op itself, and it regressed too, jax-ml/jax#39959 --
       and ``jnp.unique(..., return_inverse=True)`` adds a scatter of its own for the inverse.)
    """
    n = ids.shape[0]
    sorted_ids, order = jax.lax.sort((ids, jnp.arange(n, dtype=jnp.int32)), num_keys=1)
    sorted_rows = rows.astype(jnp.promote_types(rows.dtype, jnp.float32))[order]
    change = sorted_ids[1:] != sorted_ids[:-1]
    starts = jnp.concatenate([jnp.ones((1,), bool), change])
    last = jnp.concatenate([change, jnp.ones((1,), bool)])
    _, sums = jax.lax.associative_scan(_segmented_add, (starts, sorted_rows))
    return sorted_ids, sums, last


def _gather_rows_bwd(res, g: jax.Array):
    """Table cotangent: ``zeros.at[ids].add(g)``, computed without duplicate scatter indices.

    :func:`sum_duplicate_rows` gives each id's total at the last position of its segment. ONE
    scatter writes the table: index ``id`` at segment ends, and a distinct out-of-range index
    ``V + i`` at every other position ``i`` (dropped by ``mode="drop"``), so all N indices are
    unique and the scatter may be marked ``unique_indices=True`` (no atomics).

    Plain jnp/lax ops, so GSPMD partitions it like any other computation (a row-sharded
    table's gradient is a scatter into a row-sharded zeros; the sort sees all ids).
    """
    ids, table = res  # ids already clipped into [0, V)
    vocab = table.shape[0]
    n = ids.shape[0]
    acc = jnp.promote_types(table.dtype, jnp.float32)
    if n == 0:
        return jnp.zeros(table.shape, table.dtype), None
    if vocab + n > jnp.iinfo(ids.dtype).max:
        raise ValueError(f"gather_rows: vocab {vocab} + {n} ids overflows {ids.dtype}")
    sorted_ids, sums, last = sum_duplicate_rows(ids, g)
    # V + i cannot collide with a valid id nor with each other (no overflow: checked above).
    dest = jnp.where(last, sorted_ids, vocab + jnp.arange(n, dtype=sorted_ids.dtype))
    grad = jnp.zeros(table.shape, acc).at[dest].add(sums, unique_indices=True, mode="drop")
    return grad.astype(table.dtype), None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@dataclass(frozen=True)
class TableSpec:
    """One resolved embedding table ``[vocab_size, dim]`` shared by ``features``, with its
    placement (planned by :func:`resolve_tables`)."""

    name: str
    vocab_size: int
    dim: int
    features: tuple[str, ...]
    placement: Placement

    @property
    def logical_axes(self) -> tuple[str | None, str | None]:
        if self.placement in ("row_sharded", "table_wise"):  # table-wise: rows of a stack
            return ("table_rows", "embed")
        return (None, "table_cols") if self.placement == "column_sharded" else (None, "embed")


@dataclass(frozen=True)
class Shards:
    """How many ways the active mesh splits a table's rows (``table_rows``) and columns
    (``table_cols``); ``known``: a mesh is active (else both are 1 and no budget is checked)."""

    rows: int = 1
    cols: int = 1
    known: bool = False

    @classmethod
    def active(cls) -> Shards:
        ctx = shd.active()
        if ctx is None:
            return cls()
        mesh, rules = ctx

        def count(name: str) -> int:
            return math.prod(mesh.shape[a] for a in shd.spec_axes(shd.logical_to_spec((name,), rules, mesh)[0]))

        return cls(count("table_rows"), count("table_cols"), True)


def table_bytes_per_device(placement: Placement, rows: int, dim: int, shards: Shards) -> int:
    """fp32 bytes of one table ``[rows, dim]`` on each device under ``placement`` (table-wise:
    on the device that holds it)."""
    per = {"replicated": 1, "row_sharded": shards.rows, "column_sharded": shards.cols, "table_wise": 1}[placement]
    return rows * dim * 4 // per


@dataclass(frozen=True)
class Stack:
    """Table-wise tables of one dim stacked into one row-sharded param ``[shards * rows_per_shard,
    dim]``: table ``name`` occupies rows ``offset[name] + [0, rows)`` (global), all on one shard."""

    param: str
    dim: int
    rows_per_shard: int
    shards: int
    offset: tuple[tuple[str, int], ...]  # (table, first row); tuples keep the module hashable
    shard_of: tuple[tuple[str, int], ...]

    @property
    def rows(self) -> int:
        return self.shards * self.rows_per_shard


def pack_table_wise(tables: list[tuple[str, int, int]], shards: int) -> list[Stack]:
    """Stacks for table-wise tables ``(name, rows, dim)``: per dim, each table (largest first) goes
    whole to the shard holding the fewest rows so far; every shard is padded to the fullest."""
    stacks = []
    for dim in sorted({d for _, _, d in tables}):
        load = [0] * shards
        offset, shard_of = {}, {}
        for name, rows, _ in sorted((t for t in tables if t[2] == dim), key=lambda t: (-t[1], t[0])):
            b = min(range(shards), key=lambda i: (load[i], i))
            shard_of[name], offset[name] = b, load[b]
            load[b] += rows
        per = max(load)
        stacks.append(Stack(f"table_wise_{dim}", dim, per, shards,
                            tuple((n, shard_of[n] * per + o) for n, o in offset.items()), tuple(shard_of.items())))
    return stacks


def plan_placements(tables: list[tuple[str, int, int, str]], cfg: EmbeddingConfig, shards: Shards,
                    dynamic: bool = False) -> dict[str, Placement]:
    """Placement of each ``(name, rows, dim, requested)`` table (``rows`` already padded).

    Requested placements other than ``auto`` are kept. ``auto``: ``replicated`` up to
    ``cfg.replicate_max_bytes`` (no lookup traffic; every device updates its copy), else sharded:
    ``table_wise`` up to ``cfg.table_wise_max_bytes`` (whole on one device, stacked with the
    other table-wise tables of its dim: one lookup for all of them), ``column_sharded`` where the
    rows do not divide over the row shards but the dim divides over the column shards (no
    padding), else ``row_sharded`` (always for dynamic tables, whose rows belong to hash
    partitions). With ``cfg.memory_budget_bytes`` and an active mesh,
    auto-placed replicated tables are sharded, largest first, until the tables' bytes per device
    fit; a plan that still does not fit raises ``ConfigError`` listing it.
    """
    def sharded(rows: int, dim: int) -> Placement:
        if dynamic:
            return "row_sharded"
        if rows * dim * 4 <= cfg.table_wise_max_bytes:
            return "table_wise"
        if rows % shards.rows and shards.cols > 1 and dim % shards.cols == 0:
            return "column_sharded"
        return "row_sharded"

    out: dict[str, Placement] = {}
    for name, rows, dim, want in tables:
        if want != "auto":
            out[name] = want  # type: ignore[assignment]
        else:
            out[name] = "replicated" if rows * dim * 4 <= cfg.replicate_max_bytes else sharded(rows, dim)
    if cfg.memory_budget_bytes <= 0 or not shards.known:
        return out
    size = {name: (rows, dim) for name, rows, dim, _ in tables}

    def total() -> int:
        stacked = pack_table_wise([(n, *size[n]) for n in out if out[n] == "table_wise"], shards.rows)
        return (sum(table_bytes_per_device(out[n], *size[n], shards) for n in out if out[n] != "table_wise")
                + sum(st.rows_per_shard * st.dim * 4 for st in stacked))

    movable = sorted((n for n, _, _, want in tables if want == "auto" and out[n] == "replicated"),
                     key=lambda n: -size[n][0] * size[n][1])
    for name in movable:
        if total() <= cfg.memory_budget_bytes:
            break
        out[name] = sharded(*size[name])
    if total() > cfg.memory_budget_bytes:
        lines = [f"  {n}: {size[n][0]:,} x {size[n][1]} {out[n]}, "
                 f"{table_bytes_per_device(out[n], *size[n], shards):,} B per device" for n in out]
        raise ConfigError(f"embedding tables need {total():,} B per device, over embedding.memory_budget_bytes="
                          f"{cfg.memory_budget_bytes:,} ({shards.rows} row / {shards.cols} column shards):\n"
                          + "\n".join(lines) + "\nshard more tables, use more devices or raise the budget")
    return out


def resolve_tables(features: FeatureSpec, cfg: EmbeddingConfig, shards: Shards | None = None) -> list[TableSpec]:
    """Tables for ``features`` under ``cfg``, placed by :func:`plan_placements` for ``shards``
    (default: the active mesh's); raises ``ConfigError`` on an inconsistent layout.

    Explicit tables: ``dim: 0`` -> ``cfg.dim``; ``placement: default`` -> ``cfg.placement``;
    ``vocab_size: 0`` -> the largest vocabulary of its features. A vocabulary smaller than a
    feature's is allowed (its larger ids follow the ``oov`` rule). Every feature must be in
    exactly one table, and every named feature must exist.
    """
    shards = Shards.active() if shards is None else shards
    specs = _resolve_layout(features, cfg)
    dynamic = cfg.dynamic.capacity > 0
    rows = {t.name: t.vocab_size if dynamic else padded_rows(t.vocab_size, cfg.pad_rows_to) for t in specs}
    if dynamic and any(t.placement in ("column_sharded", "table_wise") for t in specs):
        raise ConfigError("embedding.placement: dynamic tables are row_sharded or replicated "
                          "(their rows belong to hash partitions)")
    clash = {t.name for t in specs} & {f"table_wise_{t.dim}" for t in specs}
    if clash:
        raise ConfigError(f"embedding.tables: the names {sorted(clash)} are reserved for table-wise stacks")
    plan = plan_placements([(t.name, rows[t.name], t.dim, t.placement) for t in specs], cfg, shards, dynamic)
    return [replace(t, placement=plan[t.name]) for t in specs]


def _resolve_layout(features: FeatureSpec, cfg: EmbeddingConfig) -> list[TableSpec]:
    """The tables of ``features`` with their requested placements (``auto`` not yet planned)."""
    if cfg.dim <= 0:
        raise ConfigError(f"embedding.dim must be positive, got {cfg.dim}")
    vocab = {f.name: f.vocab_size for f in features.sparse}
    if features.raw_ids != (cfg.dynamic.capacity > 0):
        raise ConfigError("raw 64-bit ids need dynamic tables and dynamic tables need raw ids: set "
                          "data.synthetic.raw_ids and embedding.dynamic.capacity > 0 together")
    if cfg.dynamic.capacity > 0:  # every table has the rows of its hash table's slots
        rows = Layout.of(cfg.dynamic).rows
        if any(t.vocab_size for t in cfg.tables):
            raise ConfigError("embedding.tables[*].vocab_size: dynamic tables are sized by "
                              "embedding.dynamic.capacity; leave vocab_size 0")
        vocab = dict.fromkeys(vocab, rows)
    if not cfg.tables:
        return [
            TableSpec(f.name, vocab[f.name], cfg.dim, (f.name,), cfg.placement)  # type: ignore[arg-type]
            for f in features.sparse
        ]

    out: list[TableSpec] = []
    owner: dict[str, str] = {}
    for i, t in enumerate(cfg.tables):
        where = f"embedding.tables[{i}]"
        if not t.name:
            raise ConfigError(f"{where}: table needs a name")
        if any(s.name == t.name for s in out):
            raise ConfigError(f"{where}: duplicate table name '{t.name}'")
        if not t.features:
            raise ConfigError(f"{where} ('{t.name}'): table lists no features")
        for f in t.features:
            if f not in vocab:
                raise ConfigError(
                    f"{where} ('{t.name}'): unknown feature '{f}'; features: {sorted(vocab)}"
                )
            if f in owner:
                raise ConfigError(
                    f"{where}: feature '{f}' is in tables '{owner[f]}' and '{t.name}'"
                )
            owner[f] = t.name
        if t.vocab_size < 0 or t.dim < 0:
            raise ConfigError(f"{where} ('{t.name}'): vocab_size and dim must be >= 0")
        v = t.vocab_size or max(vocab[f] for f in t.features)
        d = t.dim or cfg.dim
        placement = cfg.placement if t.placement == "default" else t.placement
        out.append(TableSpec(t.name, v, d, tuple(t.features), placement))  # type: ignore[arg-type]
    missing = [f for f in vocab if f not in owner]
    if missing:
        raise ConfigError(f"embedding.tables: features in no table: {missing}")
    return out


class EmbeddingCollection(nnx.Module):
    """All embedding tables of a model; ``__call__(ids [B, F(, H)]) -> ([B, F, d], stats)``."""

    def __init__(
        self,
        features: FeatureSpec,
        cfg: EmbeddingConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.specs = tuple(resolve_tables(features, cfg))
        self.feature_names = tuple(f.name for f in features.sparse)
        self.combiner = cfg.combiner
        self.oov = cfg.oov
        self.exchange = cfg.exchange
        self.exchange_capacity = cfg.exchange_capacity
        self.dtype = dtype
        table_of = {f: t.name for t in self.specs for f in t.features}
        # feature i -> the name of its table (static)
        self.feature_table = tuple(table_of[f] for f in self.feature_names)
        self.dynamic = cfg.dynamic if cfg.dynamic.capacity > 0 else None
        self.layout = Layout.of(cfg.dynamic) if self.dynamic else None
        rows = {t.name: t.vocab_size if self.dynamic or t.placement == "table_wise"
                else padded_rows(t.vocab_size, cfg.pad_rows_to) for t in self.specs}
        if self.layout is not None:  # hash state per table, split like its rows
            self.hash = nnx.Dict({
                t.name: nnx.Dict({f: HashSlots(v, out_sharding=dyn.logical_axes(f, t.placement == "row_sharded"))
                                  for f, v in dyn.init_state(self.layout).items()})
                for t in self.specs
            })
        stacks = pack_table_wise([(t.name, rows[t.name], t.dim) for t in self.specs if t.placement == "table_wise"],
                                 Shards.active().rows)
        self.stacks = tuple(stacks)
        # param name -> the tables it holds (one, or a table-wise stack); table -> its first row
        offsets = {n: o for st in stacks for n, o in st.offset}
        self.groups = tuple([(t.name, (t,)) for t in self.specs if t.placement != "table_wise"]
                            + [(st.param, tuple(t for t in self.specs if t.name in dict(st.offset))) for st in stacks])
        self.row_offset = tuple((t.name, offsets.get(t.name, 0)) for t in self.specs)
        # each table's rows are drawn alone, in table order, then stacked: the values do not
        # depend on the placement or the packing (padding rows of a stack are zeros)
        init = {t.name: jax.random.normal(rngs.params(), (rows[t.name], t.dim), jnp.float32) / jnp.sqrt(t.dim)
                for t in self.specs}
        for st in stacks:
            stacked = jnp.zeros((st.rows, st.dim), jnp.float32)
            for name, offset in st.offset:
                stacked = jax.lax.dynamic_update_slice_in_dim(stacked, init.pop(name), offset, axis=0)
            init[st.param] = stacked
        self.tables = nnx.Dict({name: LookupTable(init[name], out_sharding=members[0].logical_axes)
                                for name, members in self.groups})

    @property
    def feature_dims(self) -> tuple[int, ...]:
        dims = {t.name: t.dim for t in self.specs}
        return tuple(dims[t] for t in self.feature_table)

    @property
    def uniform_dim(self) -> int | None:
        """The common dim of every feature's vector, or None if tables differ in dim."""
        dims = set(self.feature_dims)
        return dims.pop() if len(dims) == 1 else None

    def table_columns(self, name: str) -> list[int]:
        """The feature columns (of the batch's ``sparse``) that table ``name`` embeds."""
        return [i for i, t in enumerate(self.feature_table) if t == name]

    def lookup(self, ids: jax.Array) -> tuple[list[jax.Array], dict[str, jax.Array]]:
        """``ids`` int ``[B, F]`` or ``[B, F, H]`` (dynamic tables: raw ids, uint32 ``[B, F(, H), 2]``)
        -> (F arrays ``[B, d_f]`` in ``dtype``, stats).

        ``stats``: int32 ``oov_ids``; with ``embedding.exchange=all_to_all`` the int32
        ``exchange_overflow`` (distinct ids an all-to-all could not send; their lookups are zeros);
        with dynamic tables the int32 ``cold_ids`` (raw ids not resident or not yet admitted:
        zero vectors).
        """
        f = len(self.feature_names)
        if self.dynamic:
            if ids.dtype != jnp.uint32 or ids.ndim not in (3, 4) or ids.shape[1] != f or ids.shape[-1] != 2:
                raise ValueError(f"dynamic tables read raw ids uint32 [B, {f}(, H), 2], got {ids.dtype} {ids.shape}")
            raw = ids if ids.ndim == 4 else ids[:, :, None]
        elif ids.ndim not in (2, 3) or ids.shape[1] != f:
            raise ValueError(f"sparse ids must be [B, {f}] or [B, {f}, H], got shape {ids.shape}")
        else:
            ids = ids.astype(jnp.int32)
            if ids.ndim == 2:
                ids = ids[:, :, None]
        out: list[jax.Array | None] = [None] * len(self.feature_names)
        stats = {"oov_ids": jnp.zeros((), jnp.int32)}
        if self.exchange == "all_to_all":
            stats["exchange_overflow"] = jnp.zeros((), jnp.int32)
        if self.dynamic:
            stats["cold_ids"] = jnp.zeros((), jnp.int32)
        for param, members in self.groups:  # one read per param: a table, or a table-wise stack
            prepared = []
            for spec in members:
                cols = self.table_columns(spec.name)
                if self.dynamic:
                    r = _columns(raw, cols)  # [B, n, H, 2]
                    rows = dyn.find_rows({k: v[...] for k, v in self.hash[spec.name].items()},
                                         r[..., 0].reshape(-1), r[..., 1].reshape(-1), layout=self.layout,
                                         threshold=self.dynamic.threshold,
                                         row_sharded=spec.placement == "row_sharded")
                    tid = rows.reshape(r.shape[:-1])
                    stats["cold_ids"] += jnp.sum(dyn.present(r[..., 0]) & (tid < 0), dtype=jnp.int32)
                else:
                    tid = _columns(ids, cols)  # [B, n, H]
                idx, used, oov = self._rows_of(spec, tid)
                stats["oov_ids"] += oov
                prepared.append((cols, idx, used))
            # joined per example ([B, sum n H]), so each device's ids stay on it
            joined = jnp.concatenate([p[1] for p in prepared], axis=1)
            flat, overflow = self._read(param, members[0].placement, joined.reshape(-1))
            if overflow is not None:
                stats["exchange_overflow"] += overflow
            rows, start = flat.reshape(*joined.shape, -1), 0
            for cols, idx, used in prepared:
                vecs = self._combine(rows[:, start:start + idx.shape[1]].reshape(*used.shape, -1), used)
                start += idx.shape[1]
                for j, c in enumerate(cols):
                    out[c] = vecs[:, j]
        return out, stats  # type: ignore[return-value]

    def lookup_positions(self, feature: str, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Ids ``[B, L]`` of ``feature``'s vocabulary (a sequence of its items; ``-1``: padding)
        -> (one row per position ``[B, L, d]`` in ``dtype``, int32 out-of-vocabulary count).

        Reads ``feature``'s table like :meth:`lookup` (same placement, exchange and sparse
        update), without combining: e.g. the event sequence's items in the target item's table.
        """
        if self.dynamic:
            raise ValueError("lookup_positions reads vocabulary ids; dynamic (raw-id) tables are not supported")
        if feature not in self.feature_names:
            raise ValueError(f"lookup_positions: unknown feature {feature!r}; features: {list(self.feature_names)}")
        table = self.feature_table[self.feature_names.index(feature)]
        spec = next(t for t in self.specs if t.name == table)
        param = next(p for p, members in self.groups if any(t.name == table for t in members))
        idx, used, oov = self._rows_of(spec, ids.astype(jnp.int32)[:, :, None])
        flat, _ = self._read(param, spec.placement, idx.reshape(-1))
        rows = flat.reshape(*ids.shape, -1) * used[..., 0, None].astype(flat.dtype)
        return rows.astype(self.dtype), oov

    def _gather(self, placement: Placement, table: jax.Array, n_ids: int,
                overflow: list[jax.Array]) -> tuple[Gather, int]:
        """How to read ``table`` for ``n_ids`` ids, and the all-to-all's slots per destination:
        the exchange when configured for a row-split table (row-sharded or a table-wise stack)
        and the active mesh splits the batch over exactly its row axes, else
        (:func:`gather_rows`, 0)."""
        local = (lambda t, i: gather_rows(t, jnp.maximum(i, 0))), 0
        ctx = shd.active()
        if self.exchange != "all_to_all" or placement not in ("row_sharded", "table_wise") or ctx is None:
            return local
        mesh, rules = ctx
        rows = shd.spec_axes(tuple(shd.fit_spec(shd.logical_to_spec(("table_rows",), rules, mesh), table.shape[:1], mesh))[0])
        batch = shd.spec_axes(shd.logical_to_spec(("batch",), rules, mesh)[0])
        axes = exchange_axes(rows, batch)
        if axes is None:
            return local
        shards = math.prod(mesh.shape[a] for a in axes)
        cap = capacity(n_ids // shards, shards, self.exchange_capacity)

        def gather(t: jax.Array, i: jax.Array) -> jax.Array:
            rows, lost = exchange_lookup(t, i, mesh=mesh, axes=axes, cap=cap)
            overflow.append(lost)
            return rows

        return gather, cap

    def _rows_of(self, spec: TableSpec, ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Ids ``[B, n, H]`` of table ``spec`` -> (rows of its param ``[B, n H]``, ``-1``: nothing
        read; which ids contribute ``[B, n, H]``; int32 out-of-vocabulary count), by the ``oov``
        rule; a table-wise table's rows start at its offset in the stack."""
        vocab = spec.vocab_size
        in_vocab = (ids >= 0) & (ids < vocab)
        is_oov = (ids != -1) & ~in_vocab
        oov = jnp.sum(is_oov, dtype=jnp.int32)
        if self.oov == "hash":
            used = in_vocab | is_oov
            idx = jnp.where(in_vocab, ids, jnp.mod(ids, vocab))
        else:
            used = in_vocab
            idx = ids
        idx = jnp.where(used, idx + dict(self.row_offset)[spec.name], -1)
        return idx.reshape(idx.shape[0], -1), used, oov

    def _read(self, param: str, placement: Placement, idx: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Rows ``[N, d]`` fp32 of param ``param`` at ``idx [N]`` (zeros at ``-1``), through the
        recording tape when one is active, and the all-to-all's overflow count (None without one)."""
        table = self.tables[param][...]
        overflow: list[jax.Array] = []
        gather, cap = self._gather(placement, table, idx.shape[0], overflow)
        tape = _TAPE.get()
        flat = gather(table, idx) if tape is None else tape.lookup(param, table, idx, gather, cap)
        return flat, overflow[0] if overflow else None

    def _combine(self, vecs: jax.Array, used: jax.Array) -> jax.Array:
        """``[B, n, H, d]`` rows and their ``used`` mask -> ``[B, n, d]`` in ``dtype`` by ``combiner``."""
        weights = used.astype(jnp.float32)
        if self.combiner == "mean":
            weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)
        return jnp.sum(vecs * weights[..., None], axis=2).astype(self.dtype)  # elementwise; no matmul

    def __call__(self, ids: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``ids`` -> (``[B, F, d]`` in ``dtype``, stats as in :meth:`lookup`); needs equal table dims."""
        if self.uniform_dim is None:
            raise ValueError(
                f"tables have different dims {sorted(set(self.feature_dims))}; use lookup() for per-feature vectors"
            )
        vecs, stats = self.lookup(ids)
        return constrain(jnp.stack(vecs, axis=1), ("batch", None, None)), stats
