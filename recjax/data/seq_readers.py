"""Readers of user-item interaction logs: MovieLens, Amazon reviews, RecBole atomic files.

Every reader returns :class:`Interactions`: one row per interaction, the raw user and item ids
factorised into sorted vocabularies (numerically when every id of the column is a canonical
integer, as in MovieLens, else byte-wise), and the timestamp as float64. Other columns
(ratings, review text) are not kept.

Formats (``read_interactions(path, fmt)``; ``fmt="auto"`` picks by file name, then by content):

========== ============================================= ===========================================
fmt        file                                          line
========== ============================================= ===========================================
movielens  ``u.data`` (ml-100k), ``*.data``              ``user<TAB>item<TAB>rating<TAB>timestamp``
movielens  ``ratings.dat`` (ml-1m, ml-10m), ``*.dat``    ``user::item::rating::timestamp``
movielens  ``ratings.csv`` (ml-20m, ml-25m, latest)      header ``userId,movieId,rating,timestamp``
amazon     ``*.json``, ``*.jsonl`` (+ ``.gz``)           one JSON object with ``reviewerID``,
                                                         ``asin``, ``unixReviewTime`` (2014, 2018)
amazon     ``*.csv`` (+ ``.gz``) without a header        ``user,item,rating,timestamp``
recbole    ``*.inter``                                   tab-separated, typed header naming
                                                         ``user_id``, ``item_id``, ``timestamp``
========== ============================================= ===========================================

Files are read in blocks of whole lines (``.gz`` is decompressed on the fly) and each block is
parsed with whole-block byte operations and numpy casts; only a block that fails a vectorised
check is re-scanned line by line to find the first bad line. Empty lines are skipped. A bad
line raises :class:`DataError` ``"path:line: what was wrong (the line, shortened)"``.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterator

import numpy as np

from recjax.errors import DataError

FORMATS = ("auto", "movielens", "amazon", "recbole")
BLOCK_BYTES = 32 << 20  # bytes read per block (plus the rest of the last line)
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark at the start of a file is skipped


@dataclasses.dataclass
class Interactions:
    """Interactions in file order, ids factorised: interaction ``j`` is user
    ``user_vocab[user_index[j]]`` with item ``item_vocab[item_index[j]]`` at ``timestamps[j]``.
    Vocabularies are sorted (see the module docstring) and may hold ids no row uses."""

    user_index: np.ndarray  # int64 [n]
    item_index: np.ndarray  # int64 [n]
    timestamps: np.ndarray  # float64 [n]
    user_vocab: np.ndarray  # str [num user ids]
    item_vocab: np.ndarray  # str [num item ids]
    source: str  # what was read, e.g. "movielens ratings.dat (user::item::rating::timestamp)"
    fmt: str = ""  # reader: movielens | amazon | recbole | synthetic

    @property
    def users(self) -> np.ndarray:
        """Raw user id of every interaction, str ``[n]``."""
        return self.user_vocab[self.user_index]

    @property
    def items(self) -> np.ndarray:
        """Raw item id of every interaction, str ``[n]``."""
        return self.item_vocab[self.item_index]

    def __len__(self) -> int:
        return int(self.user_index.shape[0])

    @classmethod
    def from_raw(cls, users, items, timestamps, source: str = "in memory", fmt: str = "") -> Interactions:
        """Build from raw ids (sequences of str or int) and timestamps, one entry per interaction."""
        users, items = np.asarray(users), np.asarray(items)
        timestamps = np.asarray(timestamps, dtype=np.float64)
        if not users.shape == items.shape == timestamps.shape or users.ndim != 1:
            raise ValueError(f"users, items, timestamps must be 1-D of one length, got shapes "
                             f"{users.shape}, {items.shape}, {timestamps.shape}")
        user_index, user_vocab = factorize(users)
        item_index, item_vocab = factorize(items)
        return cls(user_index, item_index, timestamps, user_vocab, item_vocab, source, fmt)

    def counts(self) -> dict[str, int]:
        """Distinct users and items that occur, and the number of interactions."""
        return {
            "users": int(np.count_nonzero(np.bincount(self.user_index, minlength=1))),
            "items": int(np.count_nonzero(np.bincount(self.item_index, minlength=1))),
            "interactions": len(self),
        }


def read_interactions(path: str | os.PathLike, fmt: str = "auto") -> Interactions:
    """Read an interactions file; ``fmt`` is ``auto | movielens | amazon | recbole``."""
    path = pathlib.Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown interactions format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if fmt == "auto":
        fmt = detect_format(path)
    return {"movielens": read_movielens, "amazon": read_amazon, "recbole": read_recbole}[fmt](path)


def detect_format(path: str | os.PathLike) -> str:
    """The reader family of ``path`` by its name (``ratings.csv`` is MovieLens, other ``.csv``
    files are Amazon ratings-only dumps)."""
    path = pathlib.Path(path)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".inter"):
        return "recbole"
    if name.endswith((".data", ".dat")):
        return "movielens"
    if name.endswith((".json", ".jsonl")):
        return "amazon"
    if name.endswith(".csv"):
        return "movielens" if _first_line(path).startswith(b"userId,") else "amazon"
    raise DataError(
        f"{path}: cannot tell the format from the file name; pass --format movielens|amazon|recbole "
        "(MovieLens u.data / ratings.dat / ratings.csv, Amazon *.json[.gz] / *.csv, RecBole *.inter)"
    )


# ----------------------------------------------------------------------------- readers


def read_movielens(path: str | os.PathLike) -> Interactions:
    """MovieLens ``u.data`` (tabs), ``ratings.dat`` (``::``) or ``ratings.csv`` (header)."""
    path = pathlib.Path(path)
    first = _first_line(path)
    if first.startswith(b"userId,"):
        names = first.rstrip(b"\r").split(b",")
        cols = _named_columns(path, names, {"user": b"userId", "item": b"movieId", "time": b"timestamp"})
        return _read_delimited(path, b",", len(names), cols, header=True, fmt="movielens",
                               source=f"movielens {path.name} (userId,movieId,rating,timestamp)")
    if b"::" in first:
        return _read_delimited(path, b"::", 4, (0, 1, 3), header=False, fmt="movielens",
                               source=f"movielens {path.name} (user::item::rating::timestamp)")
    if b"\t" in first:
        return _read_delimited(path, b"\t", 4, (0, 1, 3), header=False, fmt="movielens",
                               source=f"movielens {path.name} (user item rating timestamp, tabs)")
    raise DataError(
        f"{path}:1: not a MovieLens file: expected tab-separated u.data, '::'-separated ratings.dat "
        f"or ratings.csv with a userId,movieId,rating,timestamp header ({_shorten(first)})"
    )


def read_amazon(path: str | os.PathLike) -> Interactions:
    """Amazon review dump: JSON lines (2014/2018 5-core) or the ratings-only CSV."""
    path = pathlib.Path(path)
    if _first_line(path).lstrip().startswith(b"{"):
        return _read_json_lines(path)
    return _read_delimited(path, b",", 4, (0, 1, 3), header=False, fmt="amazon",
                           source=f"amazon {path.name} (user,item,rating,timestamp)")


def read_recbole(path: str | os.PathLike) -> Interactions:
    """RecBole atomic ``.inter`` file: header ``name:type`` columns, tab-separated."""
    path = pathlib.Path(path)
    header = _first_line(path).rstrip(b"\r")
    names = [h.split(b":", 1)[0] for h in header.split(b"\t")]
    cols = _named_columns(path, names, {"user": b"user_id", "item": b"item_id", "time": b"timestamp"})
    return _read_delimited(path, b"\t", len(names), cols, header=True, fmt="recbole",
                           source=f"recbole {path.name} ({header.decode(errors='replace').replace(chr(9), ' ')})")


# ----------------------------------------------------------------------------- delimited text


def _read_delimited(path: pathlib.Path, sep: bytes, ncols: int, cols: tuple[int, int, int], *,
                    header: bool, fmt: str, source: str) -> Interactions:
    uc, ic, tc = cols
    users, items, times = [], [], []
    for line_no, original in _blocks(path, skip_first=header):
        block = original.replace(sep, b"\t") if sep != b"\t" else original
        fields = _split_fields(block, ncols)
        try:
            if fields is None:
                raise ValueError
            u, it = np.array(fields[uc::ncols], dtype=bytes), np.array(fields[ic::ncols], dtype=bytes)
            t = np.array(fields[tc::ncols], dtype=bytes).astype(np.float64)
            if not (np.isfinite(t).all() and np.char.str_len(u).all() and np.char.str_len(it).all()):
                raise ValueError
        except ValueError:
            _raise_first_bad_line(path, line_no, original, lambda f: _check_fields(f, ncols, cols, sep))
            raise AssertionError("a block failed a vectorised check but no line did") from None
        users.append(u)
        items.append(it)
        times.append(t)
    return _build(path, users, items, times, fmt, source)


def _split_fields(block: bytes, ncols: int) -> list[bytes] | None:
    """All fields of a block of ``\\n``-terminated, tab-separated lines, row-major, empty lines
    dropped; ``None`` if some line has the wrong number of fields."""
    arr = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(arr == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    tabs = np.diff(np.searchsorted(np.flatnonzero(arr == 9), ends), prepend=0)  # per line
    empty = ends == starts
    if (tabs[~empty] != ncols - 1).any():
        return None
    if empty.any():
        block = b"\n".join(line for line in block.split(b"\n") if line) + b"\n"
        if block == b"\n":
            return []
    return block[:-1].replace(b"\n", b"\t").split(b"\t")


def _check_fields(line: bytes, ncols: int, cols: tuple[int, int, int], sep: bytes) -> str | None:
    """Why one line fails the checks of :func:`_read_delimited` (the same casts), or ``None``."""
    fields = line.replace(sep, b"\t").split(b"\t") if sep != b"\t" else line.split(b"\t")
    shown = "tab" if sep == b"\t" else repr(sep.decode())
    if len(fields) != ncols:
        return f"expected {ncols} {shown}-separated fields, got {len(fields)}"
    uc, ic, tc = cols
    if not fields[uc].rstrip(b"\0"):
        return f"empty user id (field {uc + 1})"
    if not fields[ic].rstrip(b"\0"):
        return f"empty item id (field {ic + 1})"
    try:
        t = np.array([fields[tc]], dtype=bytes).astype(np.float64)[0]
    except ValueError:
        return f"timestamp (field {tc + 1}) is not a number: {fields[tc].decode(errors='replace')!r}"
    if not np.isfinite(t):
        return f"timestamp (field {tc + 1}) is not finite: {fields[tc].decode(errors='replace')!r}"
    return None


def _named_columns(path: pathlib.Path, names: list[bytes], want: dict[str, bytes]) -> tuple[int, int, int]:
    found = []
    for key in ("user", "item", "time"):
        if want[key] not in names:
            have = ", ".join(n.decode(errors="replace") for n in names)
            raise DataError(f"{path}:1: header has no {want[key].decode()!r} column (columns: {have})")
        found.append(names.index(want[key]))
    return tuple(found)


# ----------------------------------------------------------------------------- JSON lines

# the dumps are written with ": " after keys; other spacing takes the per-line json.loads path
_JSON_SEPS = (b'"reviewerID": "', b'"asin": "', b'"unixReviewTime": ')
_JSON_NUM = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?(?=\s*[,}])")
_JSON_KEYS = ("reviewerID", "asin", "unixReviewTime")


def _read_json_lines(path: pathlib.Path) -> Interactions:
    users, items, times = [], [], []
    for line_no, block in _blocks(path, skip_first=False):
        cols = _json_fast(block)
        if cols is None:
            cols = _json_slow(path, line_no, block)
        users.append(cols[0])
        items.append(cols[1])
        times.append(cols[2])
    return _build(path, users, items, times, "amazon",
                  f"amazon {path.name} (JSON lines: reviewerID, asin, unixReviewTime)")


def _json_fast(block: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The three keys cut out by splitting the block on ``"key": `` (no per-line JSON parse),
    accepted only if every non-empty line is ``{...}`` and holds each key exactly once with a
    plain value; ``None`` sends the block to the per-line JSON parser. A key inside a string
    value cannot match: its quotes are escaped there."""
    arr = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(arr == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    nonempty = np.flatnonzero(ends > starts)
    if nonempty.size and ((arr[starts[nonempty]] != ord("{")) | (arr[ends[nonempty] - 1] != ord("}"))).any():
        return None
    out = []
    for sep in _JSON_SEPS:
        pieces = block.split(sep)
        if len(pieces) - 1 != nonempty.size:
            return None
        sizes = np.fromiter(map(len, pieces), np.int64, len(pieces))
        where = np.cumsum(sizes[:-1]) + np.arange(len(pieces) - 1) * len(sep)  # offset of each match
        if not np.array_equal(np.searchsorted(ends, where), nonempty):
            return None
        if sep is _JSON_SEPS[2]:
            matches = [_JSON_NUM.match(p) for p in pieces[1:]]
            if None in matches:
                return None
            out.append(np.array([m.group() for m in matches], dtype=bytes).astype(np.float64))
            continue
        cut = [p.find(b'"') for p in pieces[1:]]
        if -1 in cut:
            return None
        values = [p[:c] for p, c in zip(pieces[1:], cut, strict=True)]
        joined = b"".join(values)
        if b"\\" in joined or b"\n" in joined or b"" in values:  # escapes, runaway or empty ids
            return None
        out.append(np.array(values, dtype=bytes))
    return out[0], out[1], out[2]


def _json_slow(path: pathlib.Path, first_line: int, block: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cols: tuple[list, list, list] = ([], [], [])
    for k, line in enumerate(block.split(b"\n")[:-1]):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{first_line + k}: not valid JSON: {e} ({_shorten(line)})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{first_line + k}: expected a JSON object ({_shorten(line)})")
        for key, col in zip(_JSON_KEYS, cols, strict=True):
            if key not in obj:
                raise DataError(f"{path}:{first_line + k}: missing key {key!r} ({_shorten(line)})")
            value = obj[key]
            if key == "unixReviewTime":
                if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
                    raise DataError(f"{path}:{first_line + k}: {key} must be a number, got {value!r} "
                                    f"({_shorten(line)})")
                col.append(float(value))
            else:
                if not isinstance(value, str | int) or value == "":
                    raise DataError(f"{path}:{first_line + k}: {key} must be a non-empty string, got "
                                    f"{value!r} ({_shorten(line)})")
                col.append(str(value).encode())
    return (np.array(cols[0], dtype=bytes), np.array(cols[1], dtype=bytes),
            np.array(cols[2], dtype=np.float64))


# ----------------------------------------------------------------------------- shared


def _open(path: pathlib.Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _first_line(path: pathlib.Path) -> bytes:
    with _open(path) as f:
        try:
            return f.readline(1 << 20).removeprefix(_BOM).rstrip(b"\r\n")
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: cannot read: {e}") from None


def _blocks(path: pathlib.Path, skip_first: bool) -> Iterator[tuple[int, bytes]]:
    """Blocks of whole lines, each ending in ``\\n`` with ``\\r`` removed, with the 1-based
    number of the block's first line."""
    line_no = 1
    rest = b""
    with _open(path) as f:
        if f.peek(3)[:3] == _BOM:
            f.read(3)
        if skip_first:
            f.readline()
            line_no = 2
        while True:
            try:
                data = f.read(BLOCK_BYTES)
            except (OSError, EOFError) as e:
                raise DataError(f"{path}: cannot read (corrupt or truncated file?): {e}") from None
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            block, rest = data[:cut], data[cut:]
            yield line_no, block.replace(b"\r", b"") if b"\r" in block else block
            line_no += block.count(b"\n")
    if rest:
        yield line_no, rest.replace(b"\r", b"") + b"\n"


def _raise_first_bad_line(path: pathlib.Path, first_line: int, block: bytes,
                          check: Callable[[bytes], str | None]) -> None:
    for k, line in enumerate(block.split(b"\n")[:-1]):
        if line:
            reason = check(line)
            if reason is not None:
                raise DataError(f"{path}:{first_line + k}: {reason} ({_shorten(line)})")


def _shorten(line: bytes, limit: int = 120) -> str:
    text = line.decode(errors="replace").replace("\t", "\\t")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _build(path: pathlib.Path, users: list[np.ndarray], items: list[np.ndarray], times: list[np.ndarray],
           fmt: str, source: str) -> Interactions:
    users_b = np.concatenate(users) if users else np.zeros(0, "S1")
    items_b = np.concatenate(items) if items else np.zeros(0, "S1")
    if users_b.size == 0:
        raise DataError(f"{path}: no interactions (empty file?)")
    user_index, user_vocab = factorize(users_b)
    item_index, item_vocab = factorize(items_b)
    return Interactions(user_index, item_index, np.concatenate(times), user_vocab, item_vocab, source, fmt)


def factorize(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw ids (bytes array ``[n]``, or anything ``np.asarray(..., str)`` accepts) -> (index int64
    ``[n]``, vocabulary str ``[m]``) with ``vocabulary[index] == raw``. The vocabulary is sorted
    numerically when every id is a canonical integer (as ``str(int)`` writes it), else by UTF-8
    bytes (= code points)."""
    raw = np.asarray(raw)
    if raw.dtype.kind != "S":
        raw = np.array([str(v).encode("utf-8", errors="surrogateescape") for v in raw.tolist()], dtype=bytes)
    if raw.size and raw.dtype.itemsize <= 18:
        try:
            as_int = raw.astype(np.int64)
        except (ValueError, OverflowError):
            as_int = None
        if as_int is not None:
            values, index = _unique_ints(as_int)
            if np.array_equal(values.astype(raw.dtype)[index], raw):  # canonical: int <-> text is 1:1
                return index.reshape(-1).astype(np.int64), values.astype(str)
    values, index = np.unique(raw, return_inverse=True)
    vocab = np.array([v.decode("utf-8", errors="surrogateescape") for v in values.tolist()], dtype=str)
    return index.reshape(-1).astype(np.int64), vocab


def _unique_ints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)``, by counting when the range is small (ids)."""
    if values.size == 0:
        return values, values
    lo, hi = int(values.min()), int(values.max())
    if hi - lo >= max(1 << 24, 4 * values.size):
        values, index = np.unique(values, return_inverse=True)
        return values, index.reshape(-1)
    present = np.bincount(values - lo, minlength=hi - lo + 1) > 0
    rank = np.cumsum(present) - 1
    return np.flatnonzero(present) + lo, rank[values - lo]
