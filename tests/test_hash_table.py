"""The on-device hash table for raw 64-bit ids: no collisions below capacity (hypothesis),
and residency, counts and counters equal to a plain-Python reference on random traces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recjax.layers import hash_table as ht


def _device(ids: np.ndarray):
    hi, lo = ht.split_ids(np.maximum(ids, 0))
    return jnp.asarray(hi), jnp.asarray(lo), jnp.asarray(ids >= 0)


@settings(max_examples=25, deadline=None)
@given(
    capacity=st.sampled_from([1, 7, 64]),  # few static capacities: few compiles
    n_keys=st.integers(0, 64),
    same_home=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_no_collision_below_capacity(capacity, n_keys, same_home, seed):
    """Up to ``capacity`` distinct ids (optionally all with the same home slot) are all resident,
    each in its own slot, found again, and nothing is evicted."""
    n_keys = min(n_keys, capacity)
    slots = ht.slots_for(capacity)
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2**63 - 1, size=4 * (n_keys + 1), dtype=np.int64)
    if same_home:
        hi, lo = ht.split_ids(pool)
        homes = np.asarray(ht.home(jnp.asarray(hi), jnp.asarray(lo), slots))
        pool = pool[homes == np.bincount(homes).argmax()]
    keys = np.unique(pool)[:n_keys]
    state = ht.init(slots)
    # inserted over two steps, with duplicates in the batch
    batch = np.full(200, -1, np.int64)  # one shape for every example: one compile per capacity
    ids = np.concatenate([keys, keys[: len(keys) // 2]])
    batch[: len(ids)] = ids
    rng.shuffle(batch)
    for step, part in enumerate(np.split(batch, 2)):
        state, out = jax.jit(ht.update, static_argnames=("capacity", "policy", "threshold"))(
            state, *_device(part), step, capacity=capacity)
    hi, lo, valid = _device(keys)
    slot, probes = ht.find(state, hi, lo, valid)
    slot = np.asarray(slot)
    assert np.all(slot >= 0) and len(set(slot.tolist())) == len(keys)
    counters = dict(zip(ht.COUNTERS, np.asarray(state.counters).tolist(), strict=True))
    assert counters["evictions"] == 0 and counters["rejections"] == 0
    assert counters["insertions"] == len(keys) == int(state.size)
    assert np.all(np.asarray(probes) >= 1)


class Reference:
    """Plain-Python semantics of :func:`recjax.layers.hash_table.update`."""

    def __init__(self, capacity: int, policy: str, threshold: int):
        self.capacity, self.policy, self.threshold = capacity, policy, threshold
        self.keys: dict[int, list[int]] = {}  # id -> [count, last]
        self.counters = dict.fromkeys(ht.COUNTERS, 0)

    def update(self, ids: np.ndarray, step: int) -> None:
        mult: dict[int, int] = {}
        for i in ids.tolist():
            if i >= 0:
                mult[i] = mult.get(i, 0) + 1
        touched = set()
        for i, c in mult.items():
            if i in self.keys:
                before = self.keys[i][0]
                self.keys[i] = [before + c, step]
                touched.add(i)
                self.counters["admissions"] += before < self.threshold <= before + c
        new = [i for i in mult if i not in self.keys]
        need = max(len(self.keys) + len(new) - self.capacity, 0)
        cands = [i for i in self.keys if i not in touched]
        if self.policy == "lfu":
            cands.sort(key=lambda i: (self.keys[i][0], self.keys[i][1], i))
        else:
            cands.sort(key=lambda i: (self.keys[i][1], self.keys[i][0], i))
        for i in cands[:need]:
            del self.keys[i]
            self.counters["evictions"] += 1
        new.sort(key=lambda i: (-mult[i], i))
        room = self.capacity - len(self.keys)
        for i in new[:room]:
            self.keys[i] = [mult[i], step]
            self.counters["insertions"] += 1
            self.counters["admissions"] += mult[i] >= self.threshold
        self.counters["rejections"] += max(len(new) - room, 0)


@pytest.mark.parametrize("policy", ["lfu", "lru"])
@pytest.mark.parametrize("threshold", [1, 3])
def test_trace_matches_python_reference(policy, threshold):
    capacity, batch = 24, 40
    rng = np.random.default_rng(7)
    universe = rng.integers(0, 2**63 - 1, size=60, dtype=np.int64)  # few ids: heavy churn
    state = ht.init(ht.slots_for(capacity))
    ref = Reference(capacity, policy, threshold)
    step_fn = jax.jit(ht.update, static_argnames=("capacity", "policy", "threshold"))
    for step in range(30):
        ids = universe[(rng.zipf(1.3, batch) - 1) % len(universe)]
        ids[rng.random(batch) < 0.1] = -1
        state, out = step_fn(state, *_device(ids), step, capacity=capacity, policy=policy, threshold=threshold)
        ref.update(ids, step)
        hi, lo = np.asarray(state.key_hi).astype(np.uint64), np.asarray(state.key_lo).astype(np.uint64)
        occupied = np.asarray(state.state) == ht.OCCUPIED
        resident = {int((h << np.uint64(32)) | lo_): (int(c), int(t)) for h, lo_, c, t, o in
                    zip(hi, lo, np.asarray(state.count), np.asarray(state.last), occupied, strict=True) if o}
        assert resident == {k: tuple(v) for k, v in ref.keys.items()}, step
        assert dict(zip(ht.COUNTERS, np.asarray(state.counters).tolist(), strict=True)) == ref.counters, step
        # every valid id of the step is resident unless rejected; admitted means count >= threshold
        slot, admitted = np.asarray(out["slot"]), np.asarray(out["admitted"])
        for i, s, a in zip(ids.tolist(), slot, admitted, strict=True):
            if i < 0:
                assert s == -1 and not a
            elif i in ref.keys:
                assert s >= 0 and a == (ref.keys[i][0] >= threshold)
    assert ref.counters["evictions"] > 0 and ref.counters["admissions"] > 0
    assert float(out["occupancy"]) == len(ref.keys) / capacity


def test_empty_batch_changes_nothing():
    state = ht.init(ht.slots_for(4))
    empty = jnp.zeros((0,), jnp.uint32)
    new, out = ht.update(state, empty, empty, jnp.zeros((0,), bool), 0, capacity=4)
    assert new is state and out["slot"].shape == (0,)


def test_initial_rows_depend_only_on_the_id():
    hi, lo = ht.split_ids(np.array([5, 2**40 + 3, 5], np.int64))
    rows = np.asarray(ht.initial_rows(jnp.asarray(hi), jnp.asarray(lo), 8))
    np.testing.assert_array_equal(rows[0], rows[2])
    assert not np.allclose(rows[0], rows[1])
    assert rows.shape == (3, 8) and abs(rows.std() - 8**-0.5) < 0.2
