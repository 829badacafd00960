"""Embedding tables: resolution, lookup, OOV rules, combiners, sharing, sharding metadata."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.config import ConfigError, EmbeddingConfig, TableConfig
from recjax.data.spec import FeatureSpec, SparseFeature
from recjax.layers.embedding import EmbeddingCollection, TableSpec, resolve_tables


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
    emb, oov = call(m, ids)
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
    emb, count = call(m, ids)
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
    emb, count = call(m, ids)
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
        assert isinstance(nnx.state(m, nnx.Param)["tables"][keys[1]], nnx.Param)
