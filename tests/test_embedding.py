"""Embedding tables: resolution, lookup, OOV rules, combiners, sharing, sharding metadata."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import recjax.layers.embedding as embedding
from recjax.config import DynamicTableConfig, EmbeddingConfig, TableConfig
from recjax.data.spec import FeatureSpec, SparseFeature
from recjax.errors import ConfigError
from recjax.layers.embedding import EmbeddingCollection, TableSpec, gather_rows, resolve_tables
from tests.conftest import run_python


@pytest.fixture(autouse=True)
def _lazy_sharding():
    with nnx.use_eager_sharding(False):
        yield


def spec(*vocabs: int, num_dense: int = 2) -> FeatureSpec:
    return FeatureSpec(
        tuple(SparseFeature(f"C{i + 1}", v) for i, v in enumerate(vocabs)), num_dense
    )


def table(m: EmbeddingCollection, name: str) -> np.ndarray:
    return np.asarray(m.tables[name][...])


def call(m: nnx.Module, ids, method: str = "__call__"):
    """``m.method(ids)`` under one jit (a single compile is far cheaper than eager op-by-op)."""
    graphdef, params = nnx.split(m)
    return jax.jit(lambda p, x: getattr(nnx.merge(graphdef, p), method)(x))(
        params, jnp.asarray(ids)
    )


# ----------------------------------------------------------------------------- resolve_tables


def test_resolve_default_one_table_per_feature():
    tables = resolve_tables(spec(10, 20), EmbeddingConfig(dim=8, placement="replicated"))
    assert tables == [
        TableSpec("C1", 10, 8, ("C1",), "replicated"),
        TableSpec("C2", 20, 8, ("C2",), "replicated"),
    ]


def test_resolve_explicit_defaults_and_sharing():
    cfg = EmbeddingConfig(
        dim=8,
        placement="row_sharded",
        tables=[
            TableConfig(name="shared", features=["C1", "C3"]),  # vocab 0 -> max of features
            TableConfig(name="t2", vocab_size=5, dim=4, features=["C2"], placement="replicated"),
        ],
    )
    tables = resolve_tables(spec(10, 20, 30), cfg)
    assert tables == [
        TableSpec("shared", 30, 8, ("C1", "C3"), "row_sharded"),
        TableSpec("t2", 5, 4, ("C2",), "replicated"),  # smaller than the feature's 20: allowed
    ]


@pytest.mark.parametrize(
    "tables, match",
    [
        ([TableConfig(name="a", features=["C1"])], r"features in no table: \['C2'\]"),
        (
            [TableConfig(name="a", features=["C1", "C2"]), TableConfig(name="b", features=["C2"])],
            "'C2' is in tables 'a' and 'b'",
        ),
        ([TableConfig(name="a", features=["C1", "C2", "nope"])], "unknown feature 'nope'"),
        (
            [TableConfig(name="a", features=["C1"]), TableConfig(name="a", features=["C2"])],
            "duplicate",
        ),
        ([TableConfig(name="", features=["C1", "C2"])], "needs a name"),
        (
            [TableConfig(name="a", features=[]), TableConfig(name="b", features=["C1", "C2"])],
            "no features",
        ),
    ],
)
def test_resolve_errors(tables, match):
    with pytest.raises(ConfigError, match=match):
        resolve_tables(spec(10, 20), EmbeddingConfig(tables=tables))


# ----------------------------------------------------------------------------- lookup


def test_shapes_dtype_and_values():
    m = EmbeddingCollection(
        spec(10, 20, 20), EmbeddingConfig(dim=4), rngs=nnx.Rngs(0), dtype=jnp.bfloat16
    )
    ids = jnp.array([[1, 2, 3], [9, 19, 18]], jnp.int32)
    emb, stats = call(m, ids)
    oov = stats["oov_ids"]
    assert emb.shape == (2, 3, 4) and emb.dtype == jnp.bfloat16
    assert int(oov) == 0
    np.testing.assert_allclose(np.asarray(emb[1, 2], np.float32), table(m, "C3")[18], rtol=1e-2)
    # init: normal with std 1/sqrt(d), independent per table
    values = np.concatenate([table(m, n).ravel() for n in ("C1", "C2", "C3")])
    assert abs(values.std() - 0.5) < 0.1
    assert not np.allclose(table(m, "C2"), table(m, "C3"))


@pytest.mark.parametrize("oov", ["hash", "drop"])
def test_oov_and_missing(oov):
    m = EmbeddingCollection(spec(10, 20), EmbeddingConfig(dim=4, oov=oov), rngs=nnx.Rngs(0))
    ids = jnp.array([[3, -1], [12, 25], [-5, 7]], jnp.int32)  # OOV: 12, 25, -5; -1 missing
    emb, stats = call(m, ids)
    count = stats["oov_ids"]
    emb = np.asarray(emb)
    t1, t2 = table(m, "C1"), table(m, "C2")
    assert int(count) == 3 and count.dtype == jnp.int32
    np.testing.assert_array_equal(emb[0, 1], 0.0)  # missing -> zero, not counted
    np.testing.assert_allclose(emb[0, 0], t1[3])
    np.testing.assert_allclose(emb[2, 1], t2[7])
    if oov == "hash":
        np.testing.assert_allclose(emb[1, 0], t1[12 % 10])
        np.testing.assert_allclose(emb[1, 1], t2[25 % 20])
        np.testing.assert_allclose(emb[2, 0], t1[-5 % 10])  # python mod: 5
    else:
        np.testing.assert_array_equal(emb[1], 0.0)
        np.testing.assert_array_equal(emb[2, 0], 0.0)


@pytest.mark.parametrize("combiner", ["sum", "mean"])
@pytest.mark.parametrize("oov", ["hash", "drop"])
def test_multi_hot_combiner(combiner, oov):
    m = EmbeddingCollection(
        spec(10, 20), EmbeddingConfig(dim=4, combiner=combiner, oov=oov), rngs=nnx.Rngs(1)
    )
    ids = np.array(
        [
            [[1, 2, -1], [4, -1, -1]],
            [[-1, -1, -1], [5, 6, 30]],  # all missing; one OOV (30 in a vocab of 20)
        ],
        np.int32,
    )
    emb, stats = call(m, ids)
    count = stats["oov_ids"]
    assert emb.shape == (2, 2, 4)
    assert int(count) == 1
    tables = [table(m, "C1"), table(m, "C2")]
    for b in range(2):
        for f in range(2):
            rows = []
            for i in ids[b, f]:
                if 0 <= i < tables[f].shape[0]:
                    rows.append(tables[f][i])
                elif i != -1 and oov == "hash":
                    rows.append(tables[f][i % tables[f].shape[0]])
            want = (
                np.zeros(4)
                if not rows
                else np.sum(rows, 0) / (len(rows) if combiner == "mean" else 1)
            )
            np.testing.assert_allclose(np.asarray(emb[b, f]), want, rtol=1e-5, atol=1e-6)


def test_table_sharing():
    cfg = EmbeddingConfig(
        dim=4,
        tables=[
            TableConfig(name="shared", features=["C1", "C2"]),
            TableConfig(name="own", features=["C3"]),
        ],
    )
    m = EmbeddingCollection(spec(10, 10, 10), cfg, rngs=nnx.Rngs(0))
    assert set(m.tables.keys()) == {"shared", "own"}
    emb, _ = call(m, np.array([[4, 4, 4], [1, 2, 1]], np.int32))
    np.testing.assert_array_equal(emb[0, 0], emb[0, 1])  # same table, same id, same vector
    assert not np.allclose(emb[0, 0], emb[0, 2])
    np.testing.assert_allclose(emb[1, 1], table(m, "shared")[2])
    # the gradient of a shared row collects both features' contributions
    graphdef, params = nnx.split(m)

    def f(params):
        return jnp.sum(nnx.merge(graphdef, params)(jnp.array([[4, 4, 0]], jnp.int32))[0])

    grads = jax.jit(jax.grad(f))(params)
    np.testing.assert_allclose(np.asarray(grads["tables"]["shared"][...])[4], 2.0)


def test_unequal_dims_lookup_list():
    cfg = EmbeddingConfig(
        dim=4,
        tables=[
            TableConfig(name="a", features=["C1"]),
            TableConfig(name="b", dim=6, features=["C2"]),
        ],
    )
    m = EmbeddingCollection(spec(10, 10), cfg, rngs=nnx.Rngs(0))
    assert m.uniform_dim is None and m.feature_dims == (4, 6)
    vecs, _ = call(m, np.array([[1, 2]], np.int32), "lookup")
    assert [v.shape for v in vecs] == [(1, 4), (1, 6)]
    with pytest.raises(ValueError, match="different dims"):
        m(jnp.array([[1, 2]], jnp.int32))


def test_bad_ids_shape():
    m = EmbeddingCollection(spec(10, 10), EmbeddingConfig(dim=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"sparse ids must be"):
        m(jnp.zeros((2, 3), jnp.int32))


# ----------------------------------------------------------------------------- params/sharding


@pytest.mark.parametrize("oov", ["hash", "drop"])
def test_padded_rows_are_never_looked_up(oov):
    """``pad_rows_to``: rows rounded up (13 -> 16, 20 -> 24 for 8); ids keep the vocabulary's
    meaning (OOV hashes mod the vocabulary, not the padded rows), padding rows get no gradient."""
    assert [embedding.padded_rows(v, 8) for v in (1, 8, 13, 20)] == [8, 8, 16, 24]
    assert embedding.padded_rows(13, 1) == 13
    with pytest.raises(ConfigError, match="pad_rows_to must be >= 1"):
        embedding.padded_rows(13, 0)
    m = EmbeddingCollection(spec(13, 20), EmbeddingConfig(dim=4, oov=oov, pad_rows_to=8), rngs=nnx.Rngs(0))
    assert table(m, "C1").shape == (16, 4) and table(m, "C2").shape == (24, 4)
    ids = jnp.array([[12, 19], [13, 20], [15, 23], [-1, 45], [-3, 7]], jnp.int32)  # OOV: 13, 20, 15, 23, 45, -3
    emb, stats = call(m, ids)
    count = stats["oov_ids"]
    emb = np.asarray(emb)
    assert int(count) == 6
    np.testing.assert_allclose(emb[0, 0], table(m, "C1")[12])
    np.testing.assert_allclose(emb[0, 1], table(m, "C2")[19])
    if oov == "hash":
        np.testing.assert_allclose(emb[1, 0], table(m, "C1")[0])  # 13 mod 13, not padding row 13
        np.testing.assert_allclose(emb[2, 0], table(m, "C1")[2])
        np.testing.assert_allclose(emb[2, 1], table(m, "C2")[3])
        np.testing.assert_allclose(emb[3, 1], table(m, "C2")[45 % 20])
    else:
        np.testing.assert_array_equal(emb[1:3], 0.0)
    graphdef, params = nnx.split(m)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(ids)[0] ** 2)))(params)
    for name, vocab in (("C1", 13), ("C2", 20)):
        g = np.asarray(grads["tables"][name][...])
        np.testing.assert_array_equal(g[vocab:], 0.0)
        assert np.abs(g[:vocab]).sum() > 0


@pytest.mark.parametrize(
    "placement, axes", [("row_sharded", ("table_rows", "embed")), ("replicated", (None, "embed"))]
)
def test_param_paths_and_partition_specs(placement, axes):
    m = EmbeddingCollection(
        spec(10, 20), EmbeddingConfig(dim=4, placement=placement), rngs=nnx.Rngs(0)
    )
    graphdef, state, *rest = nnx.split(m)
    assert not rest  # only Params
    specs = nnx.get_partition_spec(state)
    leaves = jax.tree_util.tree_flatten_with_path(specs)[0]
    assert len(leaves) == 2
    for path, pspec in leaves:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        assert "tables" in keys
        assert tuple(pspec) == axes
        # the variable type the optimizer routes to the embedding group (a Param subtype)
        assert isinstance(nnx.state(m, nnx.Param)["tables"][keys[1]], embedding.EmbeddingTable)


# ----------------------------------------------------------------------------- dedup gradient


def take_rows(table, ids):
    """Reference gather: plain ``jnp.take``, whose autodiff is a duplicate-index scatter-add."""
    return jnp.take(table, ids, axis=0, mode="clip")


def assert_sums_close(got, want, abs_sum, rtol=1e-6):
    """``got`` and ``want`` are the same sums of float32 terms added in different orders.

    Reordering a sum of ``k`` terms moves it by up to ~``k * eps`` times the sum of the terms'
    magnitudes (``abs_sum``), so with cancellation no tolerance relative to the sum itself
    holds; the bound here is relative to ``abs_sum`` (>= ``|want|``).
    """
    got, want, abs_sum = (np.asarray(a, np.float64) for a in (got, want, abs_sum))
    assert got.shape == want.shape
    bad = np.abs(got - want) > rtol * abs_sum + 1e-30
    assert not bad.any(), (np.argwhere(bad)[:5], got[bad][:5], want[bad][:5], abs_sum[bad][:5])


def zipf_ids(rng: np.random.Generator, shape, vocab: int) -> np.ndarray:
    """Zipf-like ids in ``[0, 2 * vocab)`` (so some are OOV) with ~15% ``-1`` (missing)."""
    ids = (rng.zipf(1.3, size=shape) - 1) % (2 * vocab)
    ids = np.where(rng.random(shape) < 0.1, -rng.integers(2, 9, size=shape), ids)  # id < -1
    return np.where(rng.random(shape) < 0.15, -1, ids).astype(np.int32)


def layer_grads(m: EmbeddingCollection, ids, w, gather):
    """(outputs, table grads) of ``sum(m(ids) * w)`` with the layer's gather set to ``gather``."""
    graphdef, params = nnx.split(m)

    def loss(p, x):
        out, _ = nnx.merge(graphdef, p)(x)
        return jnp.sum(out * w), out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embedding, "gather_rows", gather)
        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, jnp.asarray(ids))
    return out, {k: np.asarray(v[...]) for k, v in grads["tables"].items()}


@pytest.mark.parametrize("combiner", ["sum", "mean"])
@pytest.mark.parametrize("oov", ["hash", "drop"])
@pytest.mark.parametrize("hot", [1, 5])
def test_layer_gradient_matches_plain_take(combiner, oov, hot):
    cfg = EmbeddingConfig(
        dim=8,
        combiner=combiner,
        oov=oov,
        tables=[
            TableConfig(name="shared", features=["C1", "C2"]),  # two features, one table
            TableConfig(name="own", features=["C3"]),
        ],
    )
    m = EmbeddingCollection(spec(40, 40, 7), cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(hot)
    ids = zipf_ids(rng, (64, 3, hot) if hot > 1 else (64, 3), 40)
    w = jnp.asarray(rng.normal(size=(64, 3, 8)), jnp.float32)
    out, got = layer_grads(m, ids, w, gather_rows)
    ref_out, want = layer_grads(m, ids, w, take_rows)
    _, abs_sum = layer_grads(m, ids, jnp.abs(w), take_rows)  # combiner weights are >= 0
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
    for name in ("shared", "own"):
        assert np.count_nonzero(np.abs(want[name]).sum(1)) > 1  # the check is not vacuous
        assert_sums_close(got[name], want[name], abs_sum[name])


def scatters(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if '"stablehlo.scatter"' in line]


def test_backward_has_one_unique_scatter_per_table():
    m = EmbeddingCollection(spec(30, 30, 9), EmbeddingConfig(dim=4), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(m)
    ids = jnp.asarray(zipf_ids(np.random.default_rng(0), (32, 3, 4), 30))

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p)(ids)[0] ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
    found = scatters(hlo)
    assert len(found) == 3, found  # one per table, nothing else scatters
    assert all("unique_indices = true" in line for line in found), found

    # gather_rows alone: exactly one scatter, unique; the plain take's is not marked unique
    table = jnp.zeros((30, 4))
    for fn, unique in ((gather_rows, "true"), (take_rows, "false")):
        grad_fn = jax.grad(lambda t, fn=fn: jnp.sum(fn(t, ids.ravel() % 30)))
        hlo = jax.jit(grad_fn).lower(table).as_text()
        found = scatters(hlo)
        assert len(found) == 1 and f"unique_indices = {unique}" in found[0], found


@jax.jit
def _vjps(table, ids, g):
    """(out, grad) of ``gather_rows``; the same for ``take_rows``; and ``take_rows``' grad at |g|."""
    out, vjp = jax.vjp(lambda t: gather_rows(t, ids), table)
    ref_out, ref_vjp = jax.vjp(lambda t: take_rows(t, ids), table)
    return out, vjp(g)[0], ref_out, ref_vjp(g)[0], ref_vjp(jnp.abs(g))[0]


@settings(max_examples=25, deadline=None)
@given(
    vocab=st.integers(1, 64),
    n=st.integers(0, 300),
    pool=st.integers(1, 64),  # distinct ids drawn from: small pool -> many duplicates
    dim=st.sampled_from([1, 3, 8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_gather_rows_property(vocab, n, pool, dim, seed):
    rng = np.random.default_rng(seed)
    # mostly valid ids; a few out of range, which gather_rows clips like jnp.take(mode="clip")
    choices = rng.integers(-2, vocab + 2, size=min(pool, vocab + 4))
    ids = jnp.asarray(rng.choice(choices, size=n), jnp.int32)
    table = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    out, got, ref_out, want, abs_sum = _vjps(table, ids, g)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
    assert got.shape == table.shape and got.dtype == jnp.float32
    assert_sums_close(got, want, abs_sum)
    # rows no id touched get exactly zero
    untouched = np.setdiff1d(np.arange(vocab), np.clip(np.asarray(ids), 0, vocab - 1))
    np.testing.assert_array_equal(np.asarray(got)[untouched], 0.0)


def test_gather_rows_row_sharded_gspmd():
    """Row-sharded table, batch-sharded ids, gradient constrained to the table's sharding."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from recjax.layers.embedding import gather_rows
mesh = Mesh(np.array(jax.devices()), ("x",))
rows, batch = NamedSharding(mesh, P("x", None)), NamedSharding(mesh, P("x"))
rng = np.random.default_rng(0)
ids = (rng.zipf(1.2, 512) - 1) % 64
table = rng.normal(size=(64, 8)).astype(np.float32)
w = rng.normal(size=(512, 8)).astype(np.float32)
grad = jax.jit(
    jax.grad(lambda t, i, w: jnp.sum(gather_rows(t, i) * w)),
    in_shardings=(rows, batch, NamedSharding(mesh, P("x", None))),
    out_shardings=rows,
)(jax.device_put(table, rows), jax.device_put(jnp.asarray(ids, jnp.int32), batch), w)
want = np.zeros_like(table)
np.add.at(want, ids, w)
assert grad.sharding.is_equivalent_to(rows, 2), grad.sharding
np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-5)
print("ok", len(jax.devices()))
"""
    assert "ok 4" in run_python(code, devices=4)


def test_auto_placement_replicates_small_tables():
    cfg = EmbeddingConfig(dim=4, placement="auto", replicate_max_bytes=100 * 4 * 4)
    specs = resolve_tables(spec(100, 101), cfg)
    assert [(t.vocab_size, t.placement) for t in specs] == [(100, "replicated"), (101, "row_sharded")]
    explicit = EmbeddingConfig(dim=4, placement="row_sharded", replicate_max_bytes=10**9,
                               tables=[TableConfig(name="t", features=["C1", "C2"], placement="auto")])
    assert resolve_tables(spec(100, 101), explicit)[0].placement == "replicated"


def test_plan_shards_by_rows_or_columns_and_fits_the_budget():
    """``auto`` on 8 row / 8 column shards: small tables replicated; a large table whose padded
    rows divide over the shards is row-sharded, one whose rows do not (but whose dim does) is
    column-sharded; a budget shards replicated tables, largest first, until the plan fits, and
    a plan that cannot fit is refused with every table's bytes per device."""
    from recjax.layers.embedding import Shards, plan_placements, table_bytes_per_device

    shards = Shards(rows=8, cols=8, known=True)
    cfg = EmbeddingConfig(placement="auto", replicate_max_bytes=64 * 16 * 4)
    tables = [("small", 64, 16, "auto"), ("mid", 40, 16, "auto"), ("big_rows", 800, 16, "auto"),
              ("big_odd", 801, 16, "auto"), ("pinned", 5000, 16, "replicated")]
    plan = plan_placements(tables, cfg, shards)
    assert plan == {"small": "replicated", "mid": "replicated", "big_rows": "row_sharded",
                    "big_odd": "column_sharded", "pinned": "replicated"}
    assert table_bytes_per_device("row_sharded", 800, 16, shards) == 800 * 16 * 4 // 8

    def per_device(p):
        return sum(table_bytes_per_device(p[n], r, d, shards) for n, r, d, _ in tables)

    before = per_device(plan)
    budget = before - 64 * 16 * 4 + 64 * 16 * 4 // 8  # room once the largest replicated auto table shards
    plan2 = plan_placements(tables, EmbeddingConfig(placement="auto", replicate_max_bytes=64 * 16 * 4,
                                                    memory_budget_bytes=budget), shards)
    assert plan2["small"] == "row_sharded" and plan2["mid"] == "replicated" and per_device(plan2) <= budget
    with pytest.raises(ConfigError, match=r"(?s)over embedding.memory_budget_bytes=1,000.*pinned: 5,000 x 16 replicated"):
        plan_placements(tables, EmbeddingConfig(placement="auto", memory_budget_bytes=1000), shards)
    # without a mesh (e.g. parameter counting) nothing is checked
    assert plan_placements(tables, EmbeddingConfig(placement="auto", memory_budget_bytes=1000), Shards())


def test_column_sharded_partition_spec_and_dynamic_refusal():
    m = EmbeddingCollection(spec(10, 20), EmbeddingConfig(dim=4, placement="column_sharded"), rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(m))
    assert tuple(nnx.to_pure_dict(specs)["tables"]["C1"]) == (None, "table_cols")
    with pytest.raises(ConfigError, match="dynamic tables are row_sharded or replicated"):
        resolve_tables(FeatureSpec(sparse=(SparseFeature("C1", 10),), num_dense=0, raw_ids=True),
                       EmbeddingConfig(placement="column_sharded", dynamic=DynamicTableConfig(capacity=10)))


def test_table_wise_stack_reads_like_separate_tables():
    """Table-wise tables packed on 2 shards: each table lies whole in one shard, shards are
    balanced (largest first to the emptiest), and the stacked lookup equals separate tables with
    the same initial rows (each table is drawn alone)."""
    from recjax.layers.embedding import pack_table_wise

    (st4, st8) = pack_table_wise([("a", 10, 4), ("b", 7, 4), ("c", 5, 4), ("d", 3, 8)], 2)
    assert (st4.param, st4.rows_per_shard, st4.rows) == ("table_wise_4", 12, 24)
    assert dict(st4.shard_of) == {"a": 0, "b": 1, "c": 1} and dict(st4.offset) == {"a": 0, "b": 12, "c": 19}
    assert dict(st8.offset) == {"d": 0} and st8.rows == 6
    for name, rows in (("a", 10), ("b", 7), ("c", 5)):
        first = dict(st4.offset)[name]
        assert first // st4.rows_per_shard == (first + rows - 1) // st4.rows_per_shard == dict(st4.shard_of)[name]

    feats = spec(13, 20, 7)
    separate = EmbeddingCollection(feats, EmbeddingConfig(dim=4, placement="replicated"), rngs=nnx.Rngs(0))
    stacked = EmbeddingCollection(feats, EmbeddingConfig(dim=4, placement="table_wise"), rngs=nnx.Rngs(0))
    assert list(stacked.tables) == ["table_wise_4"]
    ids = jnp.asarray(np.random.default_rng(0).integers(-1, 25, size=(6, 3)))
    (a, sa), (b, sb) = separate(ids), stacked(ids)
    np.testing.assert_array_equal(a, b)
    assert int(sa["oov_ids"]) == int(sb["oov_ids"]) > 0
    cfg = EmbeddingConfig(placement="auto", replicate_max_bytes=0, table_wise_max_bytes=20 * 16 * 4)
    assert {t.name: t.placement for t in resolve_tables(feats, cfg)} == {
        "C1": "table_wise", "C2": "table_wise", "C3": "table_wise"}
