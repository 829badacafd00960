"""The trainer's one data entry point: :func:`make_iterator`.

Global batch ``i`` holds global records ``[i * G, (i + 1) * G)`` (``G = cfg.global_batch``);
process ``p`` of ``P`` yields rows ``[p * b, (p + 1) * b)`` of it, ``b = G // P``, as a numpy
dict following :mod:`recjax.data.spec`. Over all processes every record appears exactly once,
and the stream does not depend on ``P``.

- synthetic train: unbounded; record ``r`` is example id ``r`` of :class:`SyntheticCTR`.
  Uses a grain ``MapDataset`` (threads + prefetch) when grain is importable, else a plain
  iterator with the same state.
- synthetic eval: ``cfg.eval_batches`` global batches of ids ``EVAL_OFFSET + r``; the same
  every call.
- criteo train: the train files as one looping stream of valid rows (``epoch`` counts passes;
  ``example_id`` keeps counting across passes). Every process validates every line but converts
  only its own rows, so all agree on record indices, also when bad rows are skipped. No
  prefetch; ``num_threads``/``prefetch`` are unused.
- criteo eval: the eval files, at most ``cfg.eval_batches`` global batches; a final partial
  global batch is dropped (so every process yields the same number of batches).

``get_state()`` is a JSON-serialisable dict; ``set_state(s)`` on a fresh or used iterator makes
it yield exactly what the original yielded after ``s`` was taken. The state is a global stream
position (the next global record, or the file position every process reads to), identical on
every process and independent of the process count: a state saved by ``P`` processes resumes on
any other count at the same global batch.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Protocol

import numpy as np

from recjax.config import DataConfig, SyntheticDataConfig
from recjax.data.criteo import CriteoReader, lines_to_batch
from recjax.data.spec import CRITEO_NUM_SPARSE, broadcast_vocab
from recjax.data.synthetic import EVAL_OFFSET, SyntheticCTR
from recjax.errors import ConfigError

try:
    import grain
except ImportError:  # e.g. GPU hosts without grain: plain iterator, no prefetch
    grain = None

Batch = dict[str, np.ndarray]
UNBOUNDED = 2**62  # length of the synthetic train "map" dataset


class BatchIterator(Protocol):
    bad_rows: int

    def __iter__(self) -> BatchIterator: ...
    def __next__(self) -> Batch: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


def make_iterator(
    cfg: DataConfig,
    split: Literal["train", "eval"],
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> BatchIterator:
    """Process-local batches of ``cfg.global_batch // process_count`` examples (see module doc)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} is not in [0, process_count={process_count})")
    g = cfg.global_batch
    if g < 1 or g % process_count:
        raise ConfigError(
            f"data.global_batch={g} must be a positive multiple of the process count {process_count}"
        )
    b = g // process_count
    if cfg.source == "synthetic":
        return _SyntheticBatches(cfg, split, process_index * b, b)
    if cfg.source == "criteo":
        return _CriteoBatches(cfg, split, process_index * b, b)
    raise ConfigError(f"data.source must be 'synthetic' or 'criteo', got {cfg.source!r}")


_GENERATORS: dict[str, SyntheticCTR] = {}


def _generator(cfg: SyntheticDataConfig) -> SyntheticCTR:
    """Shared, immutable generators (construction calibrates the teacher, ~0.2 s)."""
    key = repr(cfg)
    if key not in _GENERATORS:
        if len(_GENERATORS) >= 8:
            _GENERATORS.clear()
        _GENERATORS[key] = SyntheticCTR(cfg)
    return _GENERATORS[key]


class _SyntheticSource:
    """Random access: item ``i`` is this process's slice of global batch ``i``."""

    def __init__(self, gen: SyntheticCTR, offset: int, length: int, global_batch: int, lo: int, b: int):
        self.gen, self.offset, self.length = gen, offset, length
        self.global_batch, self.lo, self.b = global_batch, lo, b

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Batch:
        start = self.offset + int(i) * self.global_batch + self.lo
        return self.gen.examples(np.arange(start, start + self.b, dtype=np.int64))


class _PlainIterator:
    """Sequential reads of a random-access source; grain's ``{"next_index": i}`` state."""

    def __init__(self, source: _SyntheticSource):
        self._source, self._next = source, 0

    def __next__(self) -> Batch:
        if self._next >= len(self._source):
            raise StopIteration
        out = self._source[self._next]
        self._next += 1
        return out

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        self._next = int(state["next_index"])


class _SyntheticBatches:
    bad_rows = 0

    def __init__(self, cfg: DataConfig, split: str, lo: int, b: int):
        self._split, self._g = split, cfg.global_batch
        train = split == "train"
        source = _SyntheticSource(
            _generator(cfg.synthetic), 0 if train else EVAL_OFFSET,
            UNBOUNDED if train else max(cfg.eval_batches, 0), cfg.global_batch, lo, b,
        )
        if grain is not None:
            opts = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
            self._it = iter(grain.MapDataset.source(source).to_iter_dataset(opts))
        else:
            self._it = _PlainIterator(source)

    def __iter__(self) -> _SyntheticBatches:
        return self

    def __next__(self) -> Batch:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        n = int(self._it.get_state()["next_index"])
        return {"source": "synthetic", "split": self._split, "next_record": n * self._g}

    def set_state(self, state: dict[str, Any]) -> None:
        _check_state(state, "synthetic", self._split)
        n, rem = divmod(int(state["next_record"]), self._g)
        if rem:
            raise ConfigError(
                f"cannot resume synthetic data at record {state['next_record']}: not a multiple of "
                f"data.global_batch={self._g}"
            )
        self._it.set_state({"next_index": n})


class _CriteoBatches:
    def __init__(self, cfg: DataConfig, split: str, lo: int, b: int):
        key = f"data.criteo.{split}_files"
        files = cfg.criteo.train_files if split == "train" else cfg.criteo.eval_files
        if not files:
            raise ConfigError(f"{key} is empty: list the Criteo TSV files to read")
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ConfigError(f"{key}: file(s) not found: {missing}")
        self._split, self._g, self._lo, self._b = split, cfg.global_batch, lo, b
        self._vocabs = broadcast_vocab(cfg.criteo.vocab_sizes, CRITEO_NUM_SPARSE, "data.criteo.vocab_sizes")
        self._limit = None if split == "train" else cfg.eval_batches
        self._done = False
        self._reader = CriteoReader(files, skip_bad_rows=cfg.skip_bad_rows, loop=split == "train")
        self._batches = 0

    @property
    def bad_rows(self) -> int:
        return self._reader.bad_rows

    def __iter__(self) -> _CriteoBatches:
        return self

    def __next__(self) -> Batch:
        if self._done or (self._limit is not None and self._batches >= self._limit):
            raise StopIteration
        first = self._reader.records
        rows = self._reader.read_lines(self._g)  # every process validates the whole global batch
        if len(rows) < self._g:  # end of the (non-looping) eval files: drop the partial batch
            self._done = True
            raise StopIteration
        self._batches += 1
        return lines_to_batch(rows[self._lo : self._lo + self._b], self._vocabs, first + self._lo)

    def get_state(self) -> dict[str, Any]:
        return {
            "source": "criteo", "split": self._split, "batches": self._batches,
            "reader": self._reader.get_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        _check_state(state, "criteo", self._split)
        self._reader.set_state(state["reader"])
        self._batches = int(state["batches"])
        self._done = False


def _check_state(state: dict[str, Any], source: str, split: str) -> None:
    if state.get("source") != source or state.get("split") != split:
        raise ConfigError(
            f"data state is for source={state.get('source')!r} split={state.get('split')!r}, "
            f"but this iterator reads source={source!r} split={split!r}"
        )
