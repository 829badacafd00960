"""Sequential-recommender data: leave-one-out split, training rows and batches, evaluation rows.

Conventions: items ``1..N`` (``N = num_items``), 0 = padding, ``N + 1`` = [MASK]. Rows are
left-aligned and right-padded to ``S = max_len``: row ``b`` holds ``lengths[b]`` valid positions.

Leave-one-out (:func:`leave_one_out`), per user with items ``x_1..x_n`` in time order, ``n >= 3``
(shorter users are dropped and counted): training part ``x_1..x_{n-2}``; validation target
``x_{n-1}`` with history ``x_1..x_{n-2}``; test target ``x_n`` with history ``x_1..x_{n-1}``.

Training rows (:func:`train_rows`) over a training part ``x_1..x_m``:

- ``next_item`` / ``windows``: chunks of up to ``S + 1`` items whose ends step back from
  ``x_m`` by ``k`` (``stride``, default ``S``); chunk ``w`` gives ``inputs = w[:-1]`` and
  targets ``w[1:]`` at its last ``k`` positions only, except the first chunk of the user (it
  starts at ``x_1``), which keeps all of them; so each of ``x_2..x_m`` is a target exactly once,
  ``1 + max(0, ceil((m - S - 1) / k))`` rows per user. With ``k = S`` the chunks do not
  overlap (neighbours share one item); a smaller ``k`` gives every target of a long user at
  least ``S - k`` items of context at positions ``>= S - k``, as evaluation (the last ``S``
  items) and prefix rows have, for ``S / k`` times the rows of long users.
- ``next_item`` / ``prefixes`` (RecBole): for ``i = 1..m-1`` the last ``S`` items of
  ``x_1..x_i`` with the single target ``x_{i+1}`` at position ``len - 1``; ``m - 1`` rows per
  user, ``R * S * 8`` bytes in all (one row per training interaction).
- ``cloze`` / ``windows``: chunks of up to ``S`` items whose ends step back from ``x_m`` by
  ``k`` (``stride``, default ``S``; the last chunk of a user starts at ``x_1``), targets 0; the
  masking is drawn per batch by :class:`TrainBatches`. ``k = 1`` gives RecBole's prefix rows
  for every prefix of at least ``S`` items.
- ``cloze`` / ``prefixes`` (RecBole's BERT4Rec): the inputs of the next-item prefixes (the last
  ``S`` items of ``x_1..x_i``, ``i = 1..m-1``), targets 0, masked per batch.

Evaluation rows (:func:`eval_rows`) hold the last ``S`` history items (``append_mask``: the last
``S - 1`` and [MASK]; with ``drop_first`` the last ``min(h - 1, S - 1)`` of the ``h`` history
items and [MASK], which is RecBole's BERT4Rec test input: it shifts the padded history left by
one, dropping the first item of histories shorter than ``S``), the target, and the whole history
as CSR for masking seen items.
:func:`sample_negatives` draws per user ``n`` distinct items the user never interacted with,
uniformly or proportionally to training popularity, by successive sampling (exact sampling
without replacement) in vectorised rounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from recjax.config import SequenceDataConfig
from recjax.data.seq_prepare import SequenceData, load_sequences
from recjax.errors import ConfigError, DataError

OBJECTIVES = ("next_item", "cloze")
MODES = ("windows", "prefixes")
DENSE_BELOW = 0.25  # sample_negatives: rows whose eligible items hold less of the weight use keys


def load_for_config(cfg: SequenceDataConfig) -> SequenceData:
    """``cfg.path`` (a ``recjax data prepare`` directory), or the synthetic generator if empty."""
    if not cfg.path:
        from recjax.data.seq_synthetic import generate_sequences

        return generate_sequences(cfg.synthetic)
    return load_sequences(cfg.path)


# ----------------------------------------------------------------------------- split


@dataclasses.dataclass
class LeaveOneOut:
    data: SequenceData
    users: np.ndarray  # int64 [U'] users kept (>= 3 interactions); the others are counted in `dropped_users`
    dropped_users: int
    item_counts: np.ndarray  # int64 [num_items + 2], interactions per item in the TRAINING part only

    @property
    def num_items(self) -> int:
        return self.data.num_items

    @property
    def train_lengths(self) -> np.ndarray:
        """int64 ``[U']`` length ``m = n - 2`` of each kept user's training part."""
        return self.data.lengths[self.users] - 2


def leave_one_out(data: SequenceData) -> LeaveOneOut:
    """Split each user's sequence: last item test, second-to-last validation, rest training."""
    lengths = data.lengths
    keep = lengths >= 3
    users = np.flatnonzero(keep).astype(np.int64)
    if users.size == 0:
        raise DataError(f"none of the {data.num_users} users has the 3 interactions leave-one-out needs "
                        "(training, validation, test)")
    pos, owner = _positions(data.offsets)
    in_train = keep[owner] & (pos < lengths[owner] - 2)
    counts = np.bincount(data.items[in_train], minlength=data.num_items + 2).astype(np.int64)
    return LeaveOneOut(data, users, int(data.num_users - users.size), counts)


def _positions(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every interaction: its 0-based position within its user, and the user, int64 ``[nnz]``."""
    lengths = np.diff(offsets)
    owner = np.repeat(np.arange(lengths.size), lengths)
    return np.arange(offsets[-1], dtype=np.int64) - offsets[owner], owner


# ----------------------------------------------------------------------------- training rows


@dataclasses.dataclass
class TrainRows:
    inputs: np.ndarray  # int32 [R, S]   S = max_len, left-aligned, 0-padded
    targets: np.ndarray  # int32 [R, S]   item to predict at each position, 0 = no loss there
    lengths: np.ndarray  # int32 [R]
    # int32 [R] or None (all 1): how many end positions a cloze row stands for -- the stride for
    # an overlapping window, the whole length for a user's first window, 1 for a prefix row
    spans: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.lengths.shape[0])


def train_rows(split: LeaveOneOut, max_len: int, mode: str, objective: str, stride: int = 0) -> TrainRows:
    """Training rows of every kept user's training part (see the module docstring);
    ``stride`` (windows; 0 = ``max_len``) steps the windows' ends."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if mode not in MODES:
        raise ConfigError(f"data.sequences.train_rows must be one of {MODES}, got {mode!r}")
    if max_len < 1:
        raise ConfigError(f"data.sequences.max_len must be >= 1, got {max_len}")
    s = max_len
    k = stride or s
    if mode == "windows" and not 1 <= k <= s:
        raise ConfigError(f"data.sequences.window_stride must lie in [1, max_len={s}] (0 = max_len), got {stride}")
    base = split.data.offsets[split.users]  # first interaction of each kept user
    m = split.train_lengths
    if objective == "cloze" and mode == "windows":
        # chunk j (from the end) covers [max(0, m - j k - S), m - j k); the last one starts at 0
        per_user = np.where(m >= 1, 1 + np.maximum(0, -(-(m - s) // k)), 0)
        user, j = _expand(per_user)
        end = m[user] - j * k
        start = np.maximum(0, end - s)
        inputs = _gather(split.data.items, base[user] + start, end - start, s)
        spans = np.where(start > 0, np.minimum(k, end - start), end - start)
        return TrainRows(inputs, np.zeros_like(inputs), (end - start).astype(np.int32), spans.astype(np.int32))
    if mode == "windows":
        # chunk j covers [max(0, m - j k - S - 1), m - j k); the last one per user starts at 0
        per_user = np.where(m >= 2, 1 + np.maximum(0, -(-(m - s - 1) // k)), 0)
        user, j = _expand(per_user)
        end = m[user] - j * k
        start = np.maximum(0, end - s - 1)
        length = end - start - 1
        inputs = _gather(split.data.items, base[user] + start, length, s)
        targets = _gather(split.data.items, base[user] + start + 1, length, s)
        earlier = (start > 0)[:, None] & (np.arange(s)[None, :] < (length - k)[:, None])
        targets[earlier] = 0  # an overlapping chunk's earlier targets belong to the chunks before it
        return TrainRows(inputs, targets, length.astype(np.int32))
    # prefixes: target index t = 1..m-1 (0-based), inputs [max(0, t - S), t)
    user, t = _expand(np.maximum(m - 1, 0), reverse=False)
    t = t + 1
    length = np.minimum(t, s)
    inputs = _gather(split.data.items, base[user] + t - length, length, s)
    targets = np.zeros_like(inputs)
    if objective == "next_item":
        targets[np.arange(t.size), length - 1] = split.data.items[base[user] + t]
    return TrainRows(inputs, targets, length.astype(np.int32))


def _expand(counts: np.ndarray, reverse: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Rows for ``counts[k]`` items of each group ``k``: (group, index within the group). With
    ``reverse`` the index counts down to 0, so chunks cut from the end come out in time order."""
    group = np.repeat(np.arange(counts.size), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    index = np.arange(group.size, dtype=np.int64) - first[group]
    if reverse:
        index = counts[group] - 1 - index
    return group, index


def _gather(items: np.ndarray, start: np.ndarray, length: np.ndarray, s: int) -> np.ndarray:
    """int32 ``[R, s]``: row r holds ``items[start[r] : start[r] + length[r]]``, then zeros."""
    cols = np.arange(s)
    valid = cols[None, :] < length[:, None]
    idx = np.where(valid, start[:, None] + cols[None, :], 0)
    return np.where(valid, items[idx] if items.size else 0, 0).astype(np.int32)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**64, *keys])


class TrainBatches:
    """Fixed-size batches of :class:`TrainRows`, reshuffled every epoch (seeded by (seed, epoch)).

    The last partial batch is padded with all-zero rows (length 0, no targets). For ``cloze``
    each valid position of a batch is selected with probability ``mask_prob`` (at least one per
    non-empty row); selected positions get ``targets = item`` and the input becomes [MASK]
    (``num_items + 1``), with ``mask_replace="bert"`` only with probability 0.8 (0.1 a uniform
    random item, 0.1 kept). With probability ``mask_last_prob`` a batch instead selects each
    row's last valid position only, always replaced by [MASK] (RecBole's BERT4Rec
    "fine-tuning" batches, ``ft_ratio``): the evaluation task. Such a batch first cuts each
    window's end back by a uniform ``0..spans - 1`` items (:class:`TrainRows`), so every
    training item, not only each window's last, can be the last-item target, with the context
    RecBole's prefix row for it has (``S - k`` items or more on a long user's windows of stride
    ``k``); prefix rows are not cut. Every batch is a pure function
    of (seed, epoch, batch index), so a resumed run can start mid-epoch with
    ``epoch(e, start=b)``.
    """

    def __init__(self, rows: TrainRows, batch_size: int, *, seed: int, objective: str,
                 num_items: int, mask_prob: float = 0.2, mask_replace: str = "bert",
                 mask_last_prob: float = 0.0):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if objective == "cloze" and not 0.0 < mask_prob <= 1.0:
            raise ConfigError(f"data.sequences.mask_prob must lie in (0, 1], got {mask_prob}")
        if not 0.0 <= mask_last_prob <= 1.0:
            raise ConfigError(f"data.sequences.mask_last_prob must lie in [0, 1], got {mask_last_prob}")
        if mask_replace not in ("bert", "mask"):
            raise ConfigError(f"data.sequences.mask_replace must be 'bert' or 'mask', got {mask_replace!r}")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.objective, self.num_items, self.mask_prob = objective, num_items, mask_prob
        self.mask_replace, self.mask_last_prob = mask_replace, mask_last_prob

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The row order of ``epoch``: a permutation seeded by ``(seed, epoch)``."""
        return _rng(self.seed, 1, epoch).permutation(len(self.rows))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``start..len(self) - 1`` of ``epoch``."""
        order = self.order(epoch)
        for b in range(start, len(self)):
            yield self.batch(epoch, b, order)

    def batch(self, epoch: int, index: int, order: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Batch ``index`` of ``epoch``."""
        if order is None:
            order = self.order(epoch)
        take = order[index * self.batch_size : (index + 1) * self.batch_size]
        pad = self.batch_size - take.size
        inputs = np.pad(self.rows.inputs[take], ((0, pad), (0, 0)))
        spans = None if self.rows.spans is None else np.pad(self.rows.spans[take], (0, pad), constant_values=1)
        targets = np.pad(self.rows.targets[take], ((0, pad), (0, 0)))
        lengths = np.pad(self.rows.lengths[take], (0, pad))
        if self.objective == "cloze":
            inputs, targets, lengths = self._mask(inputs, lengths, spans, _rng(self.seed, 2, epoch, index))
        return {"inputs": inputs, "targets": targets, "lengths": lengths}

    def _mask(self, inputs: np.ndarray, lengths: np.ndarray, spans: np.ndarray | None,
              rng: np.random.Generator):
        b, s = inputs.shape
        cols = np.arange(s)[None, :]
        if self.mask_last_prob > 0 and rng.random() < self.mask_last_prob:
            if spans is not None:
                cut = (rng.random(b) * spans).astype(lengths.dtype)
                lengths = np.where(lengths > 0, np.maximum(lengths - cut, 1), 0).astype(lengths.dtype)
                inputs = np.where(cols < lengths[:, None], inputs, 0)
            last = cols == (lengths - 1)[:, None]
            targets = np.where(last, inputs, 0).astype(np.int32)
            return np.where(last, self.num_items + 1, inputs).astype(np.int32), targets, lengths
        valid = cols < lengths[:, None]
        selected = (rng.random((b, s)) < self.mask_prob) & valid
        forced = (rng.random(b) * lengths).astype(np.int64)  # one position of each row, if none drawn
        empty = ~selected.any(axis=1) & (lengths > 0)
        selected[np.flatnonzero(empty), forced[empty]] = True
        action = rng.random((b, s))
        random_items = rng.integers(1, self.num_items + 1, size=(b, s), dtype=np.int32)
        targets = np.where(selected, inputs, 0).astype(np.int32)
        keep_mask = 1.0 if self.mask_replace == "mask" else 0.8
        masked = np.where(action < keep_mask, self.num_items + 1, np.where(action < 0.9, random_items, inputs))
        return np.where(selected, masked, inputs).astype(np.int32), targets, lengths


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalRows:
    users: np.ndarray  # int64 [U']
    inputs: np.ndarray  # int32 [U', S]: the last S items of the history (append_mask: the last S-1 then MASK)
    lengths: np.ndarray  # int32 [U']; the model scores position lengths - 1
    targets: np.ndarray  # int32 [U']
    history_offsets: np.ndarray  # int64 [U' + 1]  CSR of ALL items the user interacted with before the target
    history_items: np.ndarray  # int32            (for --mask-history; may contain repeats)

    def __len__(self) -> int:
        return int(self.users.shape[0])


def eval_rows(split: LeaveOneOut, which: str, max_len: int, *, append_mask: bool,
              drop_first: bool = False) -> EvalRows:
    """Validation (``which="valid"``) or test (``"test"``) rows of the kept users."""
    if which not in ("valid", "test"):
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
    if max_len < 1 or (append_mask and max_len < 2):
        raise ConfigError(f"data.sequences.max_len must be >= {2 if append_mask else 1}, got {max_len}")
    data = split.data
    base = data.offsets[split.users]
    history = data.lengths[split.users] - (2 if which == "valid" else 1)
    if append_mask and drop_first:
        keep = np.minimum(history - 1, max_len - 1)
    else:
        keep = np.minimum(history, max_len - 1 if append_mask else max_len)
    inputs = _gather(data.items, base + history - keep, keep, max_len)
    lengths = keep
    if append_mask:
        inputs[np.arange(keep.size), keep] = data.num_items + 1
        lengths = keep + 1
    pos, owner = _positions(data.offsets)
    limit = np.full(data.num_users, -1, np.int64)
    limit[split.users] = history
    return EvalRows(
        users=split.users,
        inputs=inputs,
        lengths=lengths.astype(np.int32),
        targets=data.items[base + history].astype(np.int32),
        history_offsets=np.concatenate([[0], np.cumsum(history)]).astype(np.int64),
        history_items=data.items[pos < limit[owner]].astype(np.int32),
    )


def sample_negatives(split: LeaveOneOut, rows: EvalRows, n: int, kind: str, seed: int) -> np.ndarray:
    """int32 ``[U', n]``: per row, ``n`` distinct items the user never interacted with (whole
    sequence, so never the target), uniformly (``"uniform"``) or proportionally to
    ``split.item_counts`` (``"popularity"``; never-trained items are then never drawn), in the
    order drawn by successive sampling (= sampling without replacement).

    Rows are processed in chunks with a dense ``[chunk, N + 1]`` mask of excluded items. Rows
    whose eligible items keep at least ``DENSE_BELOW`` of the weight draw with replacement and
    reject excluded or repeated items (vectorised rounds); the others (heavy users under
    popularity sampling) take the ``n`` largest Efraimidis-Spirakis keys ``log(u) / w`` over
    all items. Both give the law of successive sampling without replacement."""
    if kind not in ("uniform", "popularity"):
        raise ConfigError(f"ranking.negatives must be 'uniform' or 'popularity', got {kind!r}")
    data, num = split.data, split.data.num_items
    r = len(rows)
    out = np.zeros((r, max(n, 0)), np.int32)
    if n <= 0 or r == 0:
        return out
    weight = np.ones(num + 1) if kind == "uniform" else split.item_counts[: num + 1].astype(np.float64)
    weight[0] = 0.0
    total = weight.sum()

    # sorted unique (row, item) keys of every item each row's user interacted with
    lengths = data.lengths[rows.users]
    row_of = np.repeat(np.arange(r, dtype=np.int64), lengths)
    pos = np.arange(row_of.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    seen = np.sort(row_of * (num + 1) + data.items[data.offsets[rows.users][row_of] + pos])
    seen = seen[np.concatenate([[True], seen[1:] != seen[:-1]])]  # np.unique: hash-based, slower here
    seen_row, seen_item = seen // (num + 1), seen % (num + 1)
    eligible = np.count_nonzero(weight) - np.bincount(seen_row, weights=weight[seen_item] > 0, minlength=r)
    if eligible.min() < n:
        worst = int(np.argmin(eligible))
        raise ConfigError(
            f"user {data.user_ids[rows.users[worst]]!r} has only {int(eligible[worst])} items it never "
            f"interacted with{' that occur in training' if kind == 'popularity' else ''}, fewer than "
            f"ranking.num_negatives={n}; lower ranking.num_negatives"
            + (" or use ranking.negatives=uniform" if kind == "popularity" else "")
        )
    accept = 1.0 - np.bincount(seen_row, weights=weight[seen_item], minlength=r) / total

    cdf = np.cumsum(weight)
    last = int(np.flatnonzero(weight)[-1])
    chunk = max(1, (1 << 22) // (num + 1))
    row_start = np.searchsorted(seen_row, np.arange(0, r + chunk, chunk))
    for c, lo in enumerate(range(0, r, chunk)):
        hi = min(r, lo + chunk)
        rng = _rng(seed, 3, c)
        mask = np.zeros((hi - lo, num + 1), bool)
        mask[:, weight == 0] = True
        mask[seen_row[row_start[c] : row_start[c + 1]] - lo, seen_item[row_start[c] : row_start[c + 1]]] = True
        dense = np.flatnonzero(accept[lo:hi] < DENSE_BELOW)
        if dense.size:
            keys = np.log(rng.random((dense.size, num + 1))) / np.where(mask[dense], 1.0, weight)
            keys[mask[dense]] = -np.inf
            top = np.argpartition(-keys, n - 1, axis=1)[:, :n]
            order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
            out[lo + dense] = np.take_along_axis(top, order, axis=1)
        filled = np.zeros(hi - lo, np.int64)
        pending = np.flatnonzero(accept[lo:hi] >= DENSE_BELOW)
        while pending.size:
            draws = int(np.ceil(n / accept[lo + pending].min() * 1.25)) + 8
            cand = np.minimum(np.searchsorted(cdf, rng.random((pending.size, draws)) * total, side="right"), last)
            ok = ~mask[pending[:, None], cand]
            first = np.zeros(cand.size, bool)
            first[np.unique(pending[:, None] * (num + 1) + cand, return_index=True)[1]] = True
            ok &= first.reshape(cand.shape)
            rank = np.cumsum(ok, axis=1)
            take = ok & (rank <= (n - filled[pending])[:, None])
            row_idx = pending[np.nonzero(take)[0]]
            out[lo + row_idx, filled[row_idx] + rank[take] - 1] = cand[take]
            mask[row_idx, cand[take]] = True
            filled[pending] += take.sum(axis=1)
            pending = pending[filled[pending] < n]
    return out


class TrainIterator:
    """Process-local slices of :class:`TrainBatches`' global batches, epoch after epoch.

    Process ``p`` of ``P`` yields rows ``[p * b, (p + 1) * b)`` (``b = G / P``) of global batch
    ``i`` of epoch ``e`` (epochs count from 1). The state ``{"epoch": e, "next_batch": i}`` is a
    global position, the same on every process, so a run resumes mid-epoch and on any
    process count with the same global batch.
    """

    def __init__(self, batches: TrainBatches, process_index: int = 0, process_count: int = 1):
        g = batches.batch_size
        if g % process_count:
            raise ConfigError(f"data.global_batch={g} must be a multiple of the process count {process_count}")
        self.batches = batches
        b = g // process_count
        self._rows = slice(process_index * b, (process_index + 1) * b)
        self.epoch, self.next_batch = 1, 0
        self._order: tuple[int, np.ndarray] | None = None

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.next_batch >= len(self.batches):
            self.epoch, self.next_batch = self.epoch + 1, 0
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, self.batches.order(self.epoch))
        batch = self.batches.batch(self.epoch, self.next_batch, self._order[1])
        self.next_batch += 1
        return {k: v[self._rows] for k, v in batch.items()}

    def get_state(self) -> dict[str, int | str]:
        return {"source": "sequences", "split": "train", "epoch": self.epoch, "next_batch": self.next_batch}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("source") != "sequences":
            raise ConfigError(f"data state is for source={state.get('source')!r}, but this run reads "
                              "sequences")
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])
