"""A fixed-capacity, collision-free hash table from raw 64-bit ids to embedding rows, on device.

Keys are 64-bit ids carried as two ``uint32`` halves ``(hi, lo)`` (jax runs without x64).
The table has ``K`` slots for at most ``C < K`` resident keys (``capacity``; ``K`` is ``C``
over the maximum load factor, so a probe always reaches a free slot). Open addressing with
linear probing from ``home(id) = fmix32(...) mod K``; every key is compared in full, so two
ids never share a slot (no collisions, unlike ``id mod V`` hashing). Slot states: ``EMPTY``
(never used: ends a probe), ``OCCUPIED``, ``TOMBSTONE`` (evicted: probes continue past it,
inserts reuse it). Rows never move.

One :func:`update` per train step, for the step's ids (in a fixed order, so replays agree):

1. the batch's distinct ids and their multiplicities ``c``;
2. resident ids: ``count += c``, ``last = step`` (the step clock);
3. ``m`` new ids: if ``size + m > C``, evict ``size + m - C`` resident ids not seen this step,
   lowest first by ``(count, last, key)`` (``lfu``) or ``(last, count, key)`` (``lru``); if
   too few can be evicted, the new ids with the smallest ``c`` (then the largest key) are
   rejected and counted;
4. the admitted-to-insert new ids, in (``c`` descending, key ascending) order, each take the
   first non-occupied slot of their probe: ``count = c``, ``last = step``; their slots are
   returned so the caller re-initialises those rows (:func:`initial_rows`) and their
   optimizer slots.

A key's row is *admitted* (looked up and trained) once ``count >= threshold``
(``admission``); before that its lookups return zeros and its row gets no gradient, but it
occupies a slot to count its frequency. Counters (cumulative): ``insertions``,
``evictions``, ``admissions`` (keys whose count reached the threshold), ``rejections``;
per call: occupancy ``size / C`` and the probe lengths of the lookups.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, OCCUPIED, TOMBSTONE = 0, 1, 2
Policy = Literal["lfu", "lru"]


class HashState(NamedTuple):
    """Slots ``[K]``: ``key_hi``, ``key_lo`` (uint32), ``state`` (int32: EMPTY/OCCUPIED/TOMBSTONE),
    ``count`` and ``last`` (int32); ``size`` (int32[]: occupied slots); ``counters`` int32
    ``[4]``: insertions, evictions, admissions, rejections."""

    key_hi: jax.Array
    key_lo: jax.Array
    state: jax.Array
    count: jax.Array
    last: jax.Array
    size: jax.Array
    counters: jax.Array


COUNTERS = ("insertions", "evictions", "admissions", "rejections")


def slots_for(capacity: int, max_load: float = 0.75) -> int:
    """Slots ``K`` for ``capacity`` keys at load at most ``max_load`` (``K > capacity``)."""
    if capacity < 1 or not 0 < max_load < 1:
        raise ValueError(f"hash table needs capacity >= 1 and 0 < max_load < 1, got {capacity}, {max_load}")
    return max(int(np.ceil(capacity / max_load)), capacity + 1)


def init(slots: int) -> HashState:
    z = jnp.zeros((slots,), jnp.int32)
    return HashState(jnp.zeros((slots,), jnp.uint32), jnp.zeros((slots,), jnp.uint32), z, z, z,
                     jnp.zeros((), jnp.int32), jnp.zeros((len(COUNTERS),), jnp.int32))


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64/uint64 ids -> (hi, lo) uint32 halves (host side)."""
    u = np.asarray(ids).astype(np.uint64)
    return (u >> np.uint64(32)).astype(np.uint32), (u & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser (a bijection with full avalanche)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def home(hi: jax.Array, lo: jax.Array, slots: int) -> jax.Array:
    """Home slot ``[N]`` int32 of ids ``(hi, lo)``."""
    h = fmix32(lo ^ fmix32(hi ^ jnp.uint32(0x9E3779B9)))
    return (h % jnp.uint32(slots)).astype(jnp.int32)


def find(st: HashState, hi: jax.Array, lo: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Slots ``[N]`` of ids ``(hi, lo)`` (``-1``: not resident or not ``valid``), and the number
    of slots each probe read ``[N]`` (0 for invalid ids)."""
    slots = st.state.shape[0]

    def cond(c):
        done, _, _, j = c
        return (j < slots) & ~jnp.all(done)

    def body(c):
        done, slot, probes, j = c
        p = (home(hi, lo, slots) + j) % slots
        s = st.state[p]
        match = (s == OCCUPIED) & (st.key_hi[p] == hi) & (st.key_lo[p] == lo)
        slot = jnp.where(~done & match, p, slot)
        probes = probes + (~done).astype(jnp.int32)
        done = done | match | (s == EMPTY)
        return done, slot, probes, j + 1

    n = hi.shape[0]
    init_c = (~valid, jnp.full((n,), -1, jnp.int32), jnp.zeros((n,), jnp.int32), jnp.zeros((), jnp.int32))
    _, slot, probes, _ = jax.lax.while_loop(cond, body, init_c)
    return slot, probes


def _distinct(hi: jax.Array, lo: jax.Array, valid: jax.Array):
    """Sorted ids with, at the first position of each distinct valid id, its multiplicity."""
    n = hi.shape[0]
    inv = (~valid).astype(jnp.int32)  # invalid ids sort last
    inv_s, hi_s, lo_s = jax.lax.sort((inv, hi, lo), num_keys=3)
    valid_s = inv_s == 0
    new = jnp.concatenate([jnp.ones((1,), bool),
                           (hi_s[1:] != hi_s[:-1]) | (lo_s[1:] != lo_s[:-1]) | (inv_s[1:] != inv_s[:-1])])
    first = valid_s & new
    starts = jnp.where(new, jnp.arange(n), 0)
    seg_start = jax.lax.cummax(starts)  # start of each position's segment
    seg_end = jnp.flip(jax.lax.cummin(jnp.flip(jnp.where(jnp.concatenate([new[1:], jnp.ones((1,), bool)]),
                                                         jnp.arange(n), n))))
    mult = jnp.where(first, seg_end - seg_start + 1, 0)
    return hi_s, lo_s, first, mult


def update(st: HashState, hi: jax.Array, lo: jax.Array, valid: jax.Array, step: jax.Array, *,
           capacity: int, policy: Policy = "lfu", threshold: int = 1) -> tuple[HashState, dict[str, jax.Array]]:
    """Count, evict and insert one step's ids ``(hi, lo) [N]`` (see the module docstring).

    Returns the new state and ``{"slot": [N] (-1: not resident), "admitted": [N] bool
    (resident with count >= threshold), "fresh": [N] slots inserted this step (-1 padded;
    re-initialise their rows), "probes": [N], "occupancy": float32}``.
    """
    slots = st.state.shape[0]
    if capacity >= slots:
        raise ValueError(f"capacity {capacity} must be below the {slots} slots")
    step = jnp.asarray(step, jnp.int32)
    n = hi.shape[0]
    if n == 0:
        none = jnp.zeros((0,), jnp.int32)
        return st, {"slot": none, "admitted": none.astype(bool), "fresh": none, "probes": none,
                    "occupancy": st.size.astype(jnp.float32) / capacity}
    hi_s, lo_s, first, mult = _distinct(hi, lo, valid)
    slot_s, _ = find(st, hi_s, lo_s, first)

    # 2. resident ids
    resident = first & (slot_s >= 0)
    upd = jnp.where(resident, slot_s, slots + jnp.arange(n))
    before = st.count[jnp.maximum(slot_s, 0)]
    count = st.count.at[upd].add(mult, mode="drop", unique_indices=True)
    last = st.last.at[upd].set(step, mode="drop", unique_indices=True)
    admitted_now = jnp.sum(resident & (before < threshold) & (before + mult >= threshold), dtype=jnp.int32)
    touched = jnp.zeros((slots,), bool).at[upd].set(True, mode="drop", unique_indices=True)

    # 3. evictions for the new ids
    is_new = first & (slot_s < 0)
    m = jnp.sum(is_new, dtype=jnp.int32)
    need = jnp.maximum(st.size + m - capacity, 0)
    candidate = (st.state == OCCUPIED) & ~touched
    big = jnp.iinfo(jnp.int32).max
    primary, secondary = (count, last) if policy == "lfu" else (last, count)

    def choose(_) -> tuple[jax.Array, jax.Array]:  # the [K] sort runs only on steps that evict
        *_, order = jax.lax.sort(
            (jnp.where(candidate, 0, 1), jnp.where(candidate, primary, big), jnp.where(candidate, secondary, big),
             st.key_hi, st.key_lo, jnp.arange(slots, dtype=jnp.int32)), num_keys=5)
        n = jnp.minimum(need, jnp.sum(candidate, dtype=jnp.int32))
        return jnp.zeros((slots,), bool).at[order].set(jnp.arange(slots) < n, unique_indices=True), n

    evict, n_evict = jax.lax.cond(need > 0, choose, lambda _: (jnp.zeros((slots,), bool), jnp.zeros((), jnp.int32)),
                                  None)
    state = jnp.where(evict, TOMBSTONE, st.state)
    size = st.size - n_evict

    # 4. inserts, by (multiplicity desc, key asc); the tail past free room is rejected
    room = capacity - size
    n_insert = jnp.minimum(m, room)
    _, _, _, _, ins_hi, ins_lo, ins_c = jax.lax.sort(
        ((~is_new).astype(jnp.int32), -mult, hi_s, lo_s, hi_s, lo_s, mult), num_keys=4)

    def insert(i, c):
        key_hi, key_lo, state, count, last, fresh = c
        h_i, l_i = ins_hi[i], ins_lo[i]
        start = home(h_i[None], l_i[None], slots)[0]
        p = jax.lax.while_loop(lambda p: state[p] == OCCUPIED, lambda p: (p + 1) % slots, start)
        return (key_hi.at[p].set(h_i), key_lo.at[p].set(l_i), state.at[p].set(OCCUPIED),
                count.at[p].set(ins_c[i]), last.at[p].set(step), fresh.at[i].set(p))

    fresh = jnp.full((n,), -1, jnp.int32)
    key_hi, key_lo, state, count, last, fresh = jax.lax.fori_loop(
        0, n_insert, insert, (st.key_hi, st.key_lo, state, count, last, fresh))
    admitted_new = jnp.sum((jnp.arange(n) < n_insert) & (ins_c >= threshold), dtype=jnp.int32)
    counters = st.counters + jnp.stack([n_insert, n_evict, admitted_now + admitted_new, m - n_insert])
    new = HashState(key_hi, key_lo, state, count, last, size + n_insert, counters)

    slot, probes = find(new, hi, lo, valid)
    admitted = (slot >= 0) & (new.count[jnp.maximum(slot, 0)] >= threshold)
    return new, {"slot": slot, "admitted": admitted, "fresh": fresh, "probes": probes,
                 "occupancy": new.size.astype(jnp.float32) / capacity}


def initial_rows(hi: jax.Array, lo: jax.Array, dim: int, seed: int = 0) -> jax.Array:
    """``[N, dim]`` fp32 rows ``N(0, 1/dim)`` drawn from each id alone, so an id evicted and
    inserted again starts from the same row on any shard and after any resume."""
    base = jax.random.key(seed)

    def one(h: jax.Array, lo_: jax.Array) -> jax.Array:
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(base, h), lo_), (dim,)) / jnp.sqrt(dim)

    return jax.vmap(one)(hi, lo)
