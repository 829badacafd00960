"""Sparse row-wise embedding updates (``optim.embedding.update=sparse``) against the dense path.

The dense path (autodiff's ``[rows, d]`` table gradient and optax) is the oracle: for sgd and
row-wise Adagrad the two must give the same parameters within 1e-6 after 20 steps,
on one device and on 8 virtual devices (rows split over two mesh axes); element-wise Adagrad
within 1e-5 (see ``TOL``). Lazy Adam differs from
dense Adam by design and is checked against its own NumPy reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import run_python

STEPS = 20
# Element-wise Adagrad divides by sqrt(g^2 + eps) per element: a 1-ulp difference in how XLA
# fuses the two paths (seen at step 2) grows to ~1.4e-6 by step 20 where an element's
# accumulator is tiny. Row-wise Adagrad and SGD stay within 1e-6.
TOL = {"sgd": 1e-6, "rowwise_adagrad": 1e-6, "adagrad": 1e-5, "sgd_all_to_all_mixed": 1e-6}
# Two shared-vocab features in one table, oov ids, missing ids, a table whose rows divide by 8.
OVERRIDES = [
    "data.global_batch=64", "data.synthetic.num_sparse=4", "data.synthetic.vocab_sizes=[64,40,24,16]",
    "data.synthetic.num_users=32", "optim.warmup_steps=2", "train.compute_dtype=float32",
    "embedding.pad_rows_to=8", "optim.embedding.lr=0.3", "optim.grad_clip_norm=0.5",
]

# Shared by the in-process test and the 8-device subprocess.
HELPERS = '''
import numpy as np, jax, jax.numpy as jnp
from recjax.config import load_config
from recjax.train.state import build_setup
from recjax.train.step import make_train_step
from recjax.train import sparse_update as sparse

def setup_for(overrides, update, name, devices=None):
    cfg = load_config("configs/models/dcnv2.yaml", [*overrides, f"optim.embedding.update={update}",
                                                   f"optim.embedding.name={name}", "train.steps=20"])
    return build_setup(cfg, devices=devices)

def batches(setup, n, seed=0):
    """Zipf ids over every table's vocabulary with some missing (-1) and out-of-vocabulary ids."""
    rng = np.random.default_rng(seed)
    ab = setup.abstract_batch()
    out = []
    for _ in range(n):
        b = {}
        for k, a in ab.items():
            if k == "sparse":
                ids = (rng.zipf(1.3, a.shape) - 1) % 70
                ids[rng.random(a.shape) < 0.1] = -1
                b[k] = ids.astype(a.dtype)
            elif k == "label":
                b[k] = (rng.random(a.shape) < 0.3).astype(a.dtype)
            elif np.issubdtype(a.dtype, np.integer):
                b[k] = rng.integers(0, 32, a.shape).astype(a.dtype)
            else:
                b[k] = rng.normal(size=a.shape).astype(a.dtype)
        out.append(dict(zip(ab, setup.replicated_batch([b[k] for k in ab]))))
    return out

def train(setup, n, seed=0):
    step, state = make_train_step(setup), setup.init_state()
    losses = []
    for b in batches(setup, n, seed):
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    return jax.device_get(state), losses

def flat(params):
    return {"/".join(map(str, p)): np.asarray(v) for p, v in sparse.flat_paths(params)}

def max_param_diff(a, b):
    fa, fb = flat(a["params"]), flat(b["params"])
    assert fa.keys() == fb.keys()
    return max(float(np.max(np.abs(fa[k] - fb[k]))) for k in fa)
'''

_ns: dict = {}
exec(HELPERS, _ns)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad"])
def test_sparse_equals_dense_one_device(name):
    import jax

    setup = _ns["setup_for"](OVERRIDES, "sparse", name)
    sparse_state, sparse_losses = _ns["train"](setup, STEPS)
    dense_state, dense_losses = _ns["train"](_ns["setup_for"](OVERRIDES, "dense", name), STEPS)
    diff = _ns["max_param_diff"](sparse_state, dense_state)
    print(f"{name}: max |param(sparse) - param(dense)| after {STEPS} steps: {diff:.3g}")
    assert diff < TOL[name]
    np.testing.assert_allclose(sparse_losses, dense_losses, atol=1e-6)
    init = jax.device_get(setup.init_state())
    tables = [p for p in _ns["flat"](init["params"]) if "/tables/" in p]
    moved = [np.max(np.abs(_ns["flat"](sparse_state["params"])[p] - _ns["flat"](init["params"])[p])) for p in tables]
    assert len(tables) == 5 and min(moved) > 1e-3, dict(zip(tables, moved, strict=True))
    # the sparse state holds the row slots, not an optax state of the tables
    rows = sparse_state["opt_state"]["rows"]
    assert int(rows["count"]) == STEPS
    if name != "sgd":
        assert set(_ns["flat"](rows["acc"])) == set(tables)  # slots sit at their table's key path


def test_sparse_equals_dense_on_8_devices():
    """Rows split over data x fsdp (4 x 2), batch over both: each shard updates the rows it owns;
    also with all-to-all lookups and the small tables replicated (``placement=auto``)."""
    code = HELPERS + f'''
OVR = {OVERRIDES!r}
for name in ("rowwise_adagrad", "sgd"):
    one, _ = train(setup_for(OVR + ["mesh.data=1"], "dense", name, devices=jax.devices()[:1]), {STEPS})
    s8 = setup_for(OVR + ["mesh.data=4", "mesh.fsdp=2"], "sparse", name)
    assert {{t.shards for t in s8.sparse_tables}} == {{8}}, s8.sparse_tables
    eight, _ = train(s8, {STEPS})
    print(name, max_param_diff(one, eight))
# all-to-all lookups into the row-sharded tables, the two smallest tables replicated
mixed = setup_for(OVR + ["mesh.data=4", "mesh.fsdp=2", "embedding.exchange=all_to_all", "embedding.placement=auto",
                         "embedding.replicate_max_bytes=1600"], "sparse", "sgd")
assert sorted(t.shards for t in mixed.sparse_tables) == [1, 1, 8, 8, 8], mixed.sparse_tables
eight, _ = train(mixed, {STEPS})
print("sgd_all_to_all_mixed", max_param_diff(one, eight))
'''
    out = run_python(code, devices=8)
    diffs = dict(line.split() for line in out.strip().splitlines())
    print("max |param(8 devices, sparse) - param(1 device, dense)| after 20 steps:", diffs)
    assert set(diffs) == {"rowwise_adagrad", "sgd", "sgd_all_to_all_mixed"}
    for name, d in diffs.items():
        assert float(d) < TOL[name], (name, d)


def _lazy_adam_reference(table, steps, lr, b1, b2, eps):
    """NumPy lazy Adam: per step, ids [N] and per-lookup grads [N, d]; only looked-up rows move."""
    w = table.astype(np.float64).copy()
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, (ids, grads) in enumerate(steps, start=1):
        g = np.zeros_like(w)
        np.add.at(g, ids[ids >= 0], grads[ids >= 0])
        touched = np.unique(ids[ids >= 0])
        m[touched] = b1 * m[touched] + (1 - b1) * g[touched]
        v[touched] = b2 * v[touched] + (1 - b2) * g[touched] ** 2
        mh, vh = m[touched] / (1 - b1**t), v[touched] / (1 - b2**t)
        w[touched] -= lr * mh / (np.sqrt(vh) + eps)
    return w


def test_lazy_adam_matches_its_reference_and_differs_from_dense_adam():
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh

    from recjax.config import EmbeddingOptimConfig
    from recjax.train import sparse_update as sparse

    cfg = EmbeddingOptimConfig(name="lazy_adam", lr=0.01)
    rows, dim, n = 32, 4, 48
    rng = np.random.default_rng(0)
    table0 = rng.normal(size=(rows, dim)).astype(np.float32)
    steps = []
    for _ in range(6):
        ids = ((rng.zipf(1.5, n) - 1) % (rows - 4)).astype(np.int32)  # rows 28..31 never looked up
        ids[rng.random(n) < 0.2] = -1
        steps.append((ids, rng.normal(size=(n, dim)).astype(np.float32)))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    rule = sparse.row_rule(cfg)
    table = jnp.asarray(table0)
    slots = sparse.init_slots(cfg, rows, dim)
    dense_adam, dense_w = optax.adam(cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), jnp.asarray(table0)
    dense_state = dense_adam.init(dense_w)

    @jax.jit  # one compile for the six steps
    def step(table, slots, ids, grads, count):
        loc, sums, _ = sparse.owned_row_grads(ids, grads, mesh=mesh, batch_axes=(), row_axes=(), rows_per_shard=rows)
        return sparse.apply_rows(table, slots, loc, sums, rule=rule, lr=jnp.float32(cfg.lr), count=count,
                                 clip=lambda g: g, ok=jnp.bool_(True), mesh=mesh, row_axes=())

    for c, (ids, grads) in enumerate(steps):
        table, slots = step(table, slots, jnp.asarray(ids), jnp.asarray(grads), jnp.int32(c))
        g = np.zeros((rows, dim), np.float32)
        np.add.at(g, ids[ids >= 0], grads[ids >= 0])
        upd, dense_state = dense_adam.update(jnp.asarray(g), dense_state)
        dense_w = optax.apply_updates(dense_w, upd)
    want = _lazy_adam_reference(table0, steps, cfg.lr, cfg.b1, cfg.b2, cfg.eps)
    np.testing.assert_allclose(np.asarray(table), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(table)[28:], table0[28:])  # never looked up: unchanged
    # Dense Adam keeps moving a row that was looked up once and then not again (momentum);
    # lazy Adam leaves it where its last lookup put it.
    last_seen = {int(i): s for s, (ids, _) in enumerate(steps) for i in ids if i >= 0}
    stale = [r for r, s in last_seen.items() if s < len(steps) - 1]
    assert stale
    assert np.max(np.abs(np.asarray(dense_w)[stale] - np.asarray(table)[stale])) > 1e-4


def test_nonfinite_step_writes_no_row():
    """A NaN loss freezes the whole state, tables and row slots included."""
    import jax

    setup = _ns["setup_for"](OVERRIDES, "sparse", "rowwise_adagrad")
    step, state = _ns["make_train_step"](setup), setup.init_state()
    b0, b1 = _ns["batches"](setup, 2)
    state, _ = step(state, b0)
    before = jax.device_get(state)
    bad = dict(b1, dense=b1["dense"] * np.nan)
    state, m = step(state, bad)
    after = jax.device_get(state)
    assert not np.isfinite(float(m["loss"]))
    assert int(after["nonfinite_step"]) == 2
    assert _ns["max_param_diff"](before, after) == 0.0
    for (p, a), (_, b) in zip(sparse_paths(after["opt_state"]), sparse_paths(before["opt_state"]), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=p)


def sparse_paths(tree):
    import jax

    return [(jax.tree_util.keystr(p), np.asarray(v)) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_sparse_step_has_no_table_sized_temporaries():
    """The compiled sparse step's temporaries do not grow with table rows (dense: 2+ table copies)."""
    temps = {}
    for update in ("sparse", "dense"):
        setup = _ns["setup_for"](
            ["data.global_batch=256", "data.synthetic.num_sparse=2", "data.synthetic.vocab_sizes=[1000000,100]",
             "embedding.dim=16"], update, "rowwise_adagrad")
        step = _ns["make_train_step"](setup)
        mem = step.lower(setup.abstract_state, setup.abstract_batch()).compile().memory_analysis()
        temps[update] = mem.temp_size_in_bytes
    table_bytes = 1_000_000 * 16 * 4
    assert temps["sparse"] < table_bytes / 10, temps
    assert temps["dense"] > table_bytes, temps


@pytest.mark.parametrize("name", ["adam"])
def test_dense_only_rule_is_refused_for_sparse_tables(name):
    from recjax.errors import ConfigError

    with pytest.raises(ConfigError, match="lazy_adam"):
        _ns["setup_for"](OVERRIDES, "sparse", name)
