"""Dynamic (raw-id) embedding tables in training: the raw-id stream, the partitioned hash
update and lookup against per-partition references, config errors, training with counters, and a
kill-and-resume that leaves every table, hash state and optimizer slot bit-identical."""

from __future__ import annotations

import functools
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax.config import DynamicTableConfig, SyntheticDataConfig, load_config
from recjax.data.synthetic import SyntheticCTR
from recjax.errors import ConfigError
from recjax.layers import dynamic_table as dyn
from recjax.layers import hash_table as ht
from tests.conftest import KILL_DRIVER, REPO, read_losses, run_cli, tiny, with_overrides

RAW = ["data.synthetic.raw_ids=true", "embedding.dynamic.capacity=300", "embedding.dynamic.partitions=2",
       "embedding.dynamic.threshold=2"]


def test_raw_id_stream_is_the_vocabulary_stream_spread_over_63_bits():
    cfg = SyntheticDataConfig(num_sparse=3, vocab_sizes=[50])
    plain = SyntheticCTR(cfg).examples(np.arange(4096))
    raw = SyntheticCTR(SyntheticDataConfig(num_sparse=3, vocab_sizes=[50], raw_ids=True)).examples(np.arange(4096))
    assert raw["sparse"].dtype == np.uint32 and raw["sparse"].shape == (4096, 4, 2)
    np.testing.assert_array_equal(raw["label"], plain["label"])
    assert np.all(raw["sparse"][..., 0] < 2**31)  # ids < 2^63: never the missing marker
    ids = (raw["sparse"][..., 0].astype(np.uint64) << np.uint64(32)) | raw["sparse"][..., 1]
    for c in range(4):  # one raw id per vocabulary id, per column, and no id shared across columns
        pairs = set(zip(plain["sparse"][:, c].tolist(), ids[:, c].tolist(), strict=True))
        assert len(pairs) == len({v for v, _ in pairs}) == len({r for _, r in pairs})
    assert len(np.unique(ids)) == sum(len(np.unique(plain["sparse"][:, c])) for c in range(4))


def _raw(n: int, seed: int, distinct: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2**63, size=distinct, dtype=np.uint64)
    hi, lo = ht.split_ids(pool[rng.zipf(1.3, size=n) % distinct])
    return jnp.asarray(hi), jnp.asarray(lo)


def test_partitioned_update_matches_one_hash_table_per_partition():
    """Each partition holds exactly its own ids, updated as a lone hash table would be; fresh
    slots get ``initial_rows`` of their id and reset optimizer slots; lookups return admitted rows."""
    cfg = DynamicTableConfig(capacity=24, partitions=4, threshold=2, policy="lru")
    lay = dyn.Layout.of(cfg)
    state = dyn.init_state(lay)
    table = jnp.full((lay.rows, 4), 7.0)
    slots = {"acc": jnp.full((lay.rows,), 3.0)}
    refs = [ht.init(lay.slots) for _ in range(lay.partitions)]
    update = jax.jit(functools.partial(dyn.update_partitions, layout=lay, cfg=cfg, fills={"acc": 0.5}, mesh=None,
                                       row_axes=(), batch_axes=()))
    reference = jax.jit(functools.partial(ht.update, capacity=lay.capacity, policy="lru", threshold=2))
    for step in range(5):
        hi, lo = _raw(40, step, 60)
        before = table
        state, table, slots, m = update(state, table, slots, hi, lo, jnp.int32(step), jnp.bool_(True))
        owner = dyn.partition_of(hi, lo, lay.partitions)
        inserted = 0
        for p in range(lay.partitions):
            refs[p], out = reference(refs[p], hi, lo, owner == p, jnp.int32(step))
            for f in dyn.FIELDS:
                np.testing.assert_array_equal(state[f][p], getattr(refs[p], f), err_msg=f"{f}, partition {p}")
            fresh = np.asarray(out["fresh"])
            fresh = fresh[fresh >= 0]
            inserted += len(fresh)
            rows = p * lay.slots + fresh
            keys = refs[p].key_hi[fresh], refs[p].key_lo[fresh]
            np.testing.assert_allclose(table[rows], ht.initial_rows(*keys, 4, cfg.seed), rtol=0, atol=0)
            np.testing.assert_array_equal(slots["acc"][rows], 0.5)
        changed = np.flatnonzero(np.any(np.asarray(table != before), axis=1))
        assert len(changed) <= inserted == int(m["table_insertions"])
        found = dyn.find_rows(state, hi, lo, layout=lay, threshold=2, row_sharded=False)
        resident = np.asarray(found) >= 0
        p_of = np.asarray(owner)
        local = np.asarray(found) - p_of * lay.slots
        assert np.all(local[resident] < lay.slots)
        # a found row holds the looked-up id and that id has been seen at least twice
        kh = np.asarray(state["key_hi"])[p_of[resident], local[resident]]
        np.testing.assert_array_equal(kh, np.asarray(hi)[resident])
        assert np.all(np.asarray(state["count"])[p_of[resident], local[resident]] >= 2)
    assert int(m["table_evictions"]) >= 0 and float(m["table_occupancy"]) <= 1.0
    assert int(sum(int(r.counters[1]) for r in refs)) > 0  # the trace did evict


def test_inactive_update_changes_nothing():
    cfg = DynamicTableConfig(capacity=16, partitions=2)
    lay = dyn.Layout.of(cfg)
    state, table = dyn.init_state(lay), jnp.ones((lay.rows, 2))
    hi, lo = _raw(20, 0, 30)
    new, t2, _, m = dyn.update_partitions(state, table, {}, hi, lo, jnp.int32(0), jnp.bool_(False), layout=lay,
                                          cfg=cfg, fills={}, mesh=None, row_axes=(), batch_axes=())
    for f in dyn.FIELDS:
        np.testing.assert_array_equal(new[f], state[f])
    np.testing.assert_array_equal(t2, table)
    assert int(m["table_insertions"]) == 0


@pytest.mark.parametrize("overrides, message", [
    (["data.synthetic.raw_ids=true"], "raw 64-bit ids need dynamic tables"),
    (["embedding.dynamic.capacity=100"], "raw 64-bit ids need dynamic tables"),
    ([*RAW, "optim.embedding.update=dense"], "embedding.dynamic needs optim.embedding.update=sparse"),
])
def test_config_errors(overrides: list[str], message: str):
    from recjax.train.state import inspection_setup

    cfg = load_config("configs/experiments/dlrm_synthetic.yaml", tiny(*overrides))
    with pytest.raises(ConfigError, match=message):
        inspection_setup(cfg)


def test_partitions_must_divide_over_the_row_shards():
    out = run_cli(["compile", "--devices", "4", "--config", "configs/experiments/dlrm_synthetic.yaml",
                   *tiny(*with_overrides(RAW, "embedding.dynamic.partitions=6"), "mesh.data=4")], check=False)
    assert out.returncode != 0
    assert "embedding.dynamic.partitions=6 must be a multiple of the 4 row shards of mesh axes data" in out.stdout + out.stderr


STEPS, SAVE_EVERY, KILL_AT = 24, 8, 19
ARGS = ["--config", "configs/experiments/dlrm_synthetic.yaml",
        *tiny(*RAW, f"train.steps={STEPS}", f"train.checkpoint_every={SAVE_EVERY}", "train.eval_every=0",
              "train.keep_checkpoints=5", "train.async_checkpoint=false")]

def _final_state(run_dir: pathlib.Path) -> dict[str, np.ndarray]:
    code = f"""
import pathlib
import numpy as np
from recjax.config import load_config
from recjax.train.checkpoint import Checkpointer
from recjax.train.state import inspection_setup
from tests.conftest import tiny
cfg = load_config("configs/experiments/dlrm_synthetic.yaml", tiny(*{RAW!r}, "run_dir={run_dir}"))
setup = inspection_setup(cfg)
ckpt = Checkpointer(pathlib.Path("{run_dir}") / "checkpoints", keep=5, async_save=False)
state, _ = ckpt.restore({STEPS}, setup.abstract_state)
import jax
flat = {{jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}}
np.savez("{run_dir}/final.npz", **flat)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                   capture_output=True, text=True)
    with np.load(run_dir / "final.npz") as f:
        return {k: f[k] for k in f.files}


def test_kill_and_resume_leaves_dynamic_tables_bit_identical(tmp_path: pathlib.Path):
    """SIGKILL after the step-16 checkpoint, relaunch the same command: the final hash states
    (keys, counts, clocks, counters), rows and optimizer slots equal an uninterrupted run's
    bit for bit, and so do the losses after the resume."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = run_cli(["train", *ARGS, f"run_dir={straight}"]).stdout
    assert "dynamic: 300 ids in 2 partition(s)" in out, out[-3000:]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "KILL_AT_BATCH": str(KILL_AT), "KILL_MARKER": str(tmp_path / "killed")}
    killed = subprocess.run([sys.executable, "-c", KILL_DRIVER, "train", *ARGS, f"run_dir={resumed}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    out = run_cli(["train", *ARGS, f"run_dir={resumed}"]).stdout
    assert f"at step {2 * SAVE_EVERY}" in out, out[-3000:]

    a, b = _final_state(straight), _final_state(resumed)
    assert sorted(a) == sorted(b)
    hash_keys = [k for k in a if "'hash'" in k]
    assert len(hash_keys) == 5 * len(dyn.FIELDS)  # 4 features + user, every field
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    counters = sum(a[k].sum(axis=0) for k in hash_keys if k.endswith("['counters']"))
    print(f"final counters (insertions, evictions, admissions, rejections) over 5 tables: {counters.tolist()}")
    assert counters[0] > 0 and counters[1] > 0  # the run inserted and evicted
    la, lb = read_losses(straight), read_losses(resumed)
    assert all(la[s] == lb[s] for s in range(2 * SAVE_EVERY + 1, STEPS + 1))


def test_training_reports_table_metrics_and_learns(tmp_path: pathlib.Path):
    run_cli(["train", *with_overrides(ARGS, f"run_dir={tmp_path}", "train.eval_every=24", "train.checkpoint_every=0")])
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    first, last = train[0], train[-1]
    # step 1: every distinct id is inserted, none admitted (threshold 2) unless seen twice already
    assert first["table_insertions"] > 0 and first["cold_ids"] > 0
    assert sum(r["table_admissions"] for r in train) <= sum(r["table_insertions"] for r in train)
    assert 0 < last["table_occupancy"] <= 1 and last["table_probe_mean"] >= 1
    assert last["cold_ids"] < first["cold_ids"]
    assert evals[-1]["logloss"] < evals[0]["logloss"], (evals[0], evals[-1])
