"""Interactions -> per-user item sequences (CSR), k-core filtering, and their on-disk form.

:class:`SequenceData` holds ``U`` users' time-ordered item sequences in CSR form:
user ``u``'s items are ``items[offsets[u]:offsets[u + 1]]`` (int32, ``1..num_items``; 0 is
reserved for padding and ``num_items + 1`` for the [MASK] token, so neither occurs here).

:func:`build_sequences` orders interactions by (user, timestamp), stable, so equal timestamps
keep file order; users are numbered in sorted raw-id order and items ``1..num_items`` in sorted
raw-id order (numerical for integer ids, see :func:`recjax.data.seq_readers.factorize`).
Ordering by id rather than by first appearance keeps an item's number independent of the
timestamps, so two preparations of the same catalogue agree.

On disk (written by ``recjax data prepare``; :func:`save_sequences` / :func:`load_sequences`)::

    OUT/
      manifest.json     format name + version, sources (path, size, sha256), reader, k-core,
                        counts before/after filtering, sequence length stats, created, version
      offsets/          zarr int64 [U + 1]   (tensorstore)
      items/            zarr int32 [nnz]
      timestamps/       zarr float64 [nnz]
      user_ids.json     [U] raw user ids
      item_ids.json     [num_items] raw item ids (item i is item_ids[i - 1])

A directory is written under a temporary name next to ``OUT`` and renamed into place, so
``OUT`` either holds a complete preparation or does not exist.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from recjax.data.seq_readers import Interactions
from recjax.errors import DataError

FORMAT = "recjax-sequences"
FORMAT_VERSION = 1
_ARRAYS = {"offsets": np.int64, "items": np.int32, "timestamps": np.float64}
_CHUNK = 1 << 20  # zarr chunk length (elements)


@dataclasses.dataclass
class SequenceData:
    offsets: np.ndarray  # int64 [U + 1]; user u's interactions are [offsets[u], offsets[u+1])
    items: np.ndarray  # int32 [nnz], in 1..num_items, time-ordered within each user
    timestamps: np.ndarray  # float64 [nnz]
    num_items: int
    user_ids: list[str]  # raw id of user u
    item_ids: list[str]  # item_ids[i - 1] = raw id of item i

    @property
    def num_users(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def num_interactions(self) -> int:
        return int(self.items.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``[U]`` interactions per user."""
        return np.diff(self.offsets)

    def sequence(self, u: int) -> np.ndarray:
        """Items of user ``u`` in time order, int32 ``[len_u]``."""
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def validate(self, where: str = "sequence data") -> None:
        """Raise :class:`DataError` if the arrays are inconsistent."""
        o = self.offsets
        problems = []
        if o.ndim != 1 or o.size < 1 or o[0] != 0 or (np.diff(o) < 0).any():
            problems.append("offsets must start at 0 and never decrease")
        elif o[-1] != self.items.size:
            problems.append(f"offsets end at {o[-1]} but there are {self.items.size} items")
        if self.timestamps.shape != self.items.shape:
            problems.append(f"{self.timestamps.size} timestamps for {self.items.size} items")
        if self.items.size and (self.items.min() < 1 or self.items.max() > self.num_items):
            problems.append(f"item ids must lie in 1..{self.num_items}, "
                            f"found {self.items.min()}..{self.items.max()}")
        if len(self.user_ids) != o.size - 1:
            problems.append(f"{len(self.user_ids)} user ids for {o.size - 1} users")
        if len(self.item_ids) != self.num_items:
            problems.append(f"{len(self.item_ids)} item ids for {self.num_items} items")
        if problems:
            raise DataError(f"{where}: " + "; ".join(problems))

    def length_stats(self) -> dict[str, float]:
        lengths = self.lengths
        if lengths.size == 0:
            return {"min": 0, "median": 0, "mean": 0, "max": 0}
        return {"min": int(lengths.min()), "median": float(np.median(lengths)),
                "mean": float(lengths.mean()), "max": int(lengths.max())}


# ----------------------------------------------------------------------------- filtering


def k_core(inter: Interactions, k: int) -> Interactions:
    """Drop interactions until every remaining user and item has at least ``k`` of them
    (repeated interactions count; iterated, since dropping an item can push a user below ``k``
    and back). ``k <= 1`` returns ``inter`` unchanged. Vocabularies keep only ids still used."""
    if k <= 1:
        return inter
    users, items = inter.user_index, inter.item_index
    keep = np.ones(users.size, bool)
    while True:
        u_count = np.bincount(users[keep], minlength=inter.user_vocab.size)
        i_count = np.bincount(items[keep], minlength=inter.item_vocab.size)
        new_keep = keep & (u_count[users] >= k) & (i_count[items] >= k)
        if new_keep.sum() == keep.sum():
            break
        keep = new_keep
    return _select(inter, keep)


def _select(inter: Interactions, keep: np.ndarray) -> Interactions:
    """Rows where ``keep``, vocabularies compacted to the ids still used (order kept)."""
    user_index, user_vocab = _compact(inter.user_index[keep], inter.user_vocab)
    item_index, item_vocab = _compact(inter.item_index[keep], inter.item_vocab)
    return dataclasses.replace(inter, user_index=user_index, item_index=item_index,
                               timestamps=inter.timestamps[keep], user_vocab=user_vocab, item_vocab=item_vocab)


def _compact(index: np.ndarray, vocab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    used = np.bincount(index, minlength=vocab.size) > 0
    return (np.cumsum(used) - 1)[index].astype(np.int64), vocab[used]


# ----------------------------------------------------------------------------- sequences


def build_sequences(inter: Interactions) -> SequenceData:
    """Per-user time-ordered sequences; users and items numbered in vocabulary (sorted raw id)
    order, ids no interaction uses dropped, items numbered from 1."""
    inter = _select(inter, np.ones(len(inter), bool))
    order = np.lexsort((inter.timestamps, inter.user_index))  # stable: ties keep file order
    users = inter.user_index[order]
    counts = np.bincount(users, minlength=inter.user_vocab.size)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    data = SequenceData(
        offsets=offsets,
        items=(inter.item_index[order] + 1).astype(np.int32),
        timestamps=inter.timestamps[order].astype(np.float64),
        num_items=int(inter.item_vocab.size),
        user_ids=inter.user_vocab.tolist(),
        item_ids=inter.item_vocab.tolist(),
    )
    data.validate()
    return data


# ----------------------------------------------------------------------------- disk


def describe_file(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of a source file, for the manifest."""
    path = pathlib.Path(path).resolve()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def save_sequences(out_dir: str | os.PathLike, data: SequenceData, manifest: dict[str, Any], *,
                   overwrite: bool = False) -> pathlib.Path:
    """Write ``data`` and ``manifest`` (extended with format, counts, length stats, created time
    and recjax version) to ``out_dir`` atomically; return the manifest's path. An existing
    ``out_dir`` is replaced only with ``overwrite`` and only if it is empty or a previous
    preparation."""
    import recjax

    data.validate()
    out = pathlib.Path(out_dir).resolve()
    if out.exists():
        if not overwrite:
            raise DataError(f"{out} already exists; choose another output directory or pass --overwrite")
        if not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file()):
            raise DataError(f"{out} exists and is not a `recjax data prepare` directory; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **manifest,
        "num_users": data.num_users,
        "num_items": data.num_items,
        "num_interactions": data.num_interactions,
        "sequence_length": data.length_stats(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "recjax_version": recjax.__version__,
    }
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        for name, dtype in _ARRAYS.items():
            _write_array(tmp / name, np.ascontiguousarray(getattr(data, name), dtype=dtype))
        (tmp / "user_ids.json").write_text(json.dumps(data.user_ids))
        (tmp / "item_ids.json").write_text(json.dumps(data.item_ids))
        (tmp / "manifest.json").write_text(json.dumps(full, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "manifest.json"


def load_sequences(path: str | os.PathLike) -> SequenceData:
    """Read a directory written by ``recjax data prepare``."""
    path = pathlib.Path(path)
    hint = "write one with `recjax data prepare SOURCE OUT`"
    if not path.is_dir():
        raise DataError(f"{path}: no such directory ({hint})")
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{path}: not a `recjax data prepare` directory: no manifest.json ({hint})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as e:
        raise DataError(f"{manifest_path}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_path}: not a {FORMAT} manifest ({hint})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{manifest_path}: format version {manifest.get('format_version')!r}, this recjax "
                        f"reads version {FORMAT_VERSION}; prepare the data again with this version")
    arrays = {name: _read_array(path / name, dtype) for name, dtype in _ARRAYS.items()}
    try:
        user_ids = json.loads((path / "user_ids.json").read_text())
        item_ids = json.loads((path / "item_ids.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the id lists: {e}") from None
    if not isinstance(manifest.get("num_items"), int):
        raise DataError(f"{manifest_path}: no integer num_items; prepare the data again")
    data = SequenceData(**arrays, num_items=manifest["num_items"], user_ids=user_ids, item_ids=item_ids)
    data.validate(str(path))
    return data


def _write_array(path: pathlib.Path, values: np.ndarray) -> None:
    import tensorstore as ts

    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {"shape": [values.size], "chunks": [max(1, min(_CHUNK, values.size))],
                     "dtype": np.dtype(values.dtype).newbyteorder("<").str,
                     "compressor": {"id": "zstd", "level": 3}},
    }
    store = ts.open(spec, create=True).result()
    if values.size:
        store.write(values).result()


def _read_array(path: pathlib.Path, dtype: type) -> np.ndarray:
    import tensorstore as ts

    try:
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}},
                        open=True).result()
        values = store.read().result()
    except ValueError as e:
        reason = str(e).split(" [tensorstore_spec")[0]
        raise DataError(f"{path}: cannot read the zarr array ({reason}); prepare the data again") from None
    return np.asarray(values, dtype=dtype)
