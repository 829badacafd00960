"""What a data stream feeds the model: sparse features with vocabularies, dense width, user id.

The batch contract shared by every stream and model (numpy on the host, one entry per
example of the *process-local* batch ``b``):

- ``dense``: float32 ``[b, num_dense]``
- ``sparse``: int32 ``[b, F]`` ids (hashed into each feature's vocabulary by the stream
  when the source has no vocabulary of its own; ``-1`` = missing); with ``raw_ids`` (synthetic
  ``raw_ids: true``) uint32 ``[b, F, 2]``: raw 64-bit ids as ``(hi, lo)`` halves, missing =
  ``hi == 0xFFFFFFFF``, read through dynamic tables (``embedding.dynamic``)
- ``label``: float32 ``[b]`` in {0, 1}; ``[b, T]`` with synthetic multi-task labels
  (``data.synthetic.tasks = T``)
- ``user_id``: int32 ``[b]`` (only when ``has_user_id``; the same id is also the last
  column of ``sparse``, feature ``user``, so models embed it like any other feature)
- with synthetic event sequences (``data.synthetic.events = L``): ``event_item`` int32
  ``[b, L]`` (ids of feature C1's vocabulary, oldest first, ``-1`` past the example's
  length), ``event_type`` int32 ``[b, L]`` (``-1`` there) and ``event_age`` float32 ``[b, L]``
  (hours before the request; 0 there)
- host-only keys, never sent to devices: ``example_id`` int64 ``[b]`` (global position in
  the stream) and, for synthetic data, ``label_prob`` float32 shaped as ``label`` (the teacher's
  probability, from which the Bayes-optimal logloss is computed).
"""

from __future__ import annotations

from dataclasses import dataclass

from recjax.config import DataConfig
from recjax.errors import ConfigError

DEVICE_KEYS = ("dense", "sparse", "label", "user_id", "event_item", "event_type", "event_age")
HOST_KEYS = ("example_id", "label_prob")
CRITEO_NUM_DENSE = 13
CRITEO_NUM_SPARSE = 26


@dataclass(frozen=True)
class SparseFeature:
    name: str
    vocab_size: int


@dataclass(frozen=True)
class FeatureSpec:
    sparse: tuple[SparseFeature, ...]
    num_dense: int
    has_user_id: bool = False
    raw_ids: bool = False  # sparse ids are raw 64-bit (hi, lo) pairs
    events: int = 0  # L: event-sequence length (event_* batch keys); 0 = none
    event_types: int = 0
    tasks: int = 0  # T: labels per example (``label [B, T]``); 0 = one label ``[B]``

    @property
    def num_sparse(self) -> int:
        return len(self.sparse)


def broadcast_vocab(vocab_sizes: list[int], n: int, key: str) -> list[int]:
    """One vocabulary size per feature: a list of ``n`` or a single size for all."""
    if len(vocab_sizes) == 1:
        vocab_sizes = vocab_sizes * n
    if len(vocab_sizes) != n:
        raise ConfigError(f"{key}: expected 1 or {n} vocabulary sizes, got {len(vocab_sizes)}")
    if any(v <= 0 for v in vocab_sizes):
        raise ConfigError(f"{key}: vocabulary sizes must be positive, got {vocab_sizes}")
    return vocab_sizes


def feature_spec(cfg: DataConfig) -> FeatureSpec:
    if cfg.source == "synthetic":
        s = cfg.synthetic
        vocabs = broadcast_vocab(s.vocab_sizes, s.num_sparse, "data.synthetic.vocab_sizes")
        sparse = [SparseFeature(f"C{i + 1}", v) for i, v in enumerate(vocabs)]
        if s.user_id:
            sparse.append(SparseFeature("user", s.num_users))
        return FeatureSpec(sparse=tuple(sparse), num_dense=s.num_dense, has_user_id=s.user_id, raw_ids=s.raw_ids,
                           events=s.events, event_types=s.event_types if s.events else 0, tasks=s.tasks)
    vocabs = broadcast_vocab(cfg.criteo.vocab_sizes, CRITEO_NUM_SPARSE, "data.criteo.vocab_sizes")
    return FeatureSpec(
        sparse=tuple(SparseFeature(f"C{i + 1}", v) for i, v in enumerate(vocabs)),
        num_dense=CRITEO_NUM_DENSE,
        has_user_id=False,
    )
