"""Criteo-format TSV files: streaming, resumable reader, row -> batch transform, test writer.

Row format (40 tab-separated columns, ``\\n`` or ``\\r\\n`` line ends)::

    label  I1 .. I13  C1 .. C26

- ``label``: ``0`` or ``1``.
- ``I1..I13``: decimal integers (may be negative) or empty (missing -> 0); the batch holds
  ``log1p(max(x, 0))`` as float32 ``[b, 13]``.
- ``C1..C26``: hex strings of at most 16 digits or empty (missing -> id ``-1``); the batch holds
  ``mix64((value mod 2^63) ^ salt(feature)) % vocab[feature]`` as int32 ``[b, 26]``.

Any other row (wrong column count, bad label, non-integer dense, non-hex categorical) raises
:class:`DataError` ``"{path}:{line}: {reason}"`` (1-based line), or, with ``skip_bad_rows``,
is skipped and counted. Record indices count valid rows only, over the files concatenated.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from recjax.data.spec import CRITEO_NUM_DENSE, CRITEO_NUM_SPARSE
from recjax.data.synthetic import mix64, zipf_ids
from recjax.errors import DataError

NUM_COLUMNS = 1 + CRITEO_NUM_DENSE + CRITEO_NUM_SPARSE
_ROW_RE = re.compile(
    rb"[01]" + rb"\t(?:-?[0-9]{1,18})?" * CRITEO_NUM_DENSE + rb"\t[0-9a-fA-F]{0,16}" * CRITEO_NUM_SPARSE
)
_INT_RE = re.compile(rb"(?:-?[0-9]{1,18})?")
_HEX_RE = re.compile(rb"[0-9a-fA-F]{0,16}")
_MASK63 = (1 << 63) - 1  # categorical values are taken mod 2^63 (int64, -1 stays "missing")
_DIGIT = np.zeros(256, np.int64)
for _c in b"0123456789abcdef":
    _DIGIT[_c] = _DIGIT[bytes([_c]).upper()[0]] = int(chr(_c), 16)
_POW10 = 10 ** np.arange(18, -1, -1, dtype=np.int64)  # [19]
_POW16 = 16 ** np.arange(15, -1, -1, dtype=np.int64)  # [16]
_SALT = mix64((np.arange(CRITEO_NUM_SPARSE, dtype=np.uint64) + np.uint64(1)) << np.uint64(56))




class Row(NamedTuple):
    """One record: raw dense ints (missing 0) and raw categorical values (mod 2^63, missing -1)."""

    label: int
    dense: list[int]  # [13]
    cats: list[int]  # [26]


def check_line(line: bytes) -> str | None:
    """``None`` if ``line`` (line end stripped) is a valid row, else the reason it is not."""
    if _ROW_RE.fullmatch(line):
        return None
    fields = line.split(b"\t")
    if len(fields) != NUM_COLUMNS:
        return f"expected {NUM_COLUMNS} tab-separated columns, got {len(fields)}"
    if fields[0] not in (b"0", b"1"):
        return f"label must be 0 or 1, got {fields[0]!r}"
    for i, tok in enumerate(fields[1 : 1 + CRITEO_NUM_DENSE]):
        if not _INT_RE.fullmatch(tok):
            return f"column I{i + 1}: not an integer: {tok!r}"
    for i, tok in enumerate(fields[1 + CRITEO_NUM_DENSE :]):
        if not _HEX_RE.fullmatch(tok):
            return f"column C{i + 1}: not a hex string of at most 16 digits: {tok!r}"
    return "malformed row"


def parse_lines(lines: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Valid lines (see :func:`check_line`) -> label i64 ``[n]``, dense raw i64 ``[n, 13]``
    (missing 0), categorical raw i64 ``[n, 26]`` (value mod 2^63, missing -1). Vectorised."""
    n = len(lines)
    if n == 0:
        z = np.zeros((0, NUM_COLUMNS), np.int64)
        return z[:, 0], z[:, 1 : 1 + CRITEO_NUM_DENSE], z[:, 1 + CRITEO_NUM_DENSE :]
    pad = b"\t" * 20  # tokens are read right-aligned in windows of up to 19 bytes
    buf = np.frombuffer(pad + b"\t".join(lines) + b"\t", np.uint8)  # every token ends at a tab
    ends = np.flatnonzero(buf == 9)[len(pad) :].reshape(n, NUM_COLUMNS).astype(np.int32)
    starts = np.empty_like(ends)
    starts.flat[0], starts.flat[1:] = len(pad), ends.flat[:-1] + 1
    label = buf[starts[:, 0]].astype(np.int64) - ord("0")
    d_sl, c_sl = slice(1, 1 + CRITEO_NUM_DENSE), slice(1 + CRITEO_NUM_DENSE, None)
    digits = _digits(buf, starts[:, d_sl], ends[:, d_sl])  # '-' reads as digit 0
    dense = digits @ _POW10[_POW10.size - digits.shape[-1] :]
    dense[buf[starts[:, d_sl]] == ord("-")] *= -1
    nibbles = _digits(buf, starts[:, c_sl], ends[:, c_sl])
    cats = (nibbles @ _POW16[_POW16.size - nibbles.shape[-1] :]) & _MASK63  # wraps mod 2^64
    cats[starts[:, c_sl] == ends[:, c_sl]] = -1
    return label, dense, cats


def _digits(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Right-aligned digit values ``[..., w]`` (int64) of the tokens ``buf[starts:ends]``,
    ``w`` the longest token's length (at least 1)."""
    width = max(int((ends - starts).max(initial=0)), 1)
    pos = ends[..., None] + np.arange(-width, 0, dtype=np.int32)
    return _DIGIT[buf[pos]] * (pos >= starts[..., None])


def parse_row(line: bytes) -> Row:
    """One valid line -> :class:`Row` (plain Python; batches use :func:`parse_lines`)."""
    f = line.split(b"\t")
    dense = [int(t) if t else 0 for t in f[1 : 1 + CRITEO_NUM_DENSE]]
    cats = [int(t, 16) & _MASK63 if t else -1 for t in f[1 + CRITEO_NUM_DENSE :]]
    return Row(int(f[0]), dense, cats)


def lines_to_batch(lines: Sequence[bytes], vocab_sizes: Sequence[int], first_record: int) -> dict[str, np.ndarray]:
    """Spec batch for ``n`` valid lines: dense f32 ``[n, 13]``, sparse i32 ``[n, 26]``, label f32
    ``[n]``, example_id i64 ``[n]`` = ``first_record + arange(n)``."""
    n = len(lines)
    chunks = [parse_lines(lines[i : i + 4096]) for i in range(0, n, 4096)]  # bounded temporaries
    label, dense, cats = (np.concatenate(x) for x in zip(*(chunks or [parse_lines([])]), strict=True))
    return {
        "dense": np.log1p(np.maximum(dense, 0).astype(np.float64)).astype(np.float32),
        "sparse": hash_categorical(cats, vocab_sizes),
        "label": label.astype(np.float32),
        "example_id": np.arange(first_record, first_record + n, dtype=np.int64),
    }


def hash_categorical(values: np.ndarray, vocab_sizes: Sequence[int]) -> np.ndarray:
    """Raw categorical values ``[n, 26]`` (int64, ``-1`` missing) -> int32 ids in each vocab."""
    h = mix64(values.astype(np.uint64) ^ _SALT) % np.asarray(vocab_sizes, np.uint64)
    return np.where(values == -1, -1, h.astype(np.int64)).astype(np.int32)


class CriteoReader:
    """Valid rows of ``files`` in order, as one concatenated sequence: :meth:`read_lines` gives
    raw lines (for :func:`lines_to_batch`), iteration gives :class:`Row` s.

    Reads line by line (never a whole file). ``loop=True`` starts over at the end of the last
    file (``epoch += 1``). :meth:`get_state` is a JSON-serialisable dict: ``file_index``,
    ``offset`` (bytes into that file), ``line`` (lines consumed in it), ``records`` (valid rows
    emitted, cumulative over epochs), ``bad_rows`` (skipped rows, cumulative), ``epoch``.
    """

    def __init__(self, files: Sequence[str], *, skip_bad_rows: bool = False, loop: bool = False):
        self.files = [os.fspath(f) for f in files]
        self.skip_bad_rows = skip_bad_rows
        self.loop = loop
        self._fh: Any = None
        self._epoch_records = 0
        self.set_state({"file_index": 0, "offset": 0, "line": 0, "records": 0, "bad_rows": 0, "epoch": 0})

    def get_state(self) -> dict[str, int]:
        return dict(self._state)

    def set_state(self, state: dict[str, Any]) -> None:
        keys = ("file_index", "offset", "line", "records", "bad_rows", "epoch")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"criteo reader state lacks {missing}: {state}")
        self._state = {k: int(state[k]) for k in keys}
        self._epoch_records = -1  # unknown after a restore: do not flag an empty epoch
        self.close()

    @property
    def records(self) -> int:
        return self._state["records"]

    @property
    def bad_rows(self) -> int:
        return self._state["bad_rows"]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __iter__(self) -> CriteoReader:
        return self

    def __next__(self) -> Row:
        lines = self.read_lines(1)
        if not lines:
            raise StopIteration
        return parse_row(lines[0])

    def read_lines(self, n: int) -> list[bytes]:
        """Up to ``n`` next valid lines, line ends stripped; fewer only at the end of a
        non-looping stream. Bad lines raise :class:`DataError` or are skipped and counted."""
        st, out = self._state, []
        fullmatch = _ROW_RE.fullmatch
        while len(out) < n:
            if st["file_index"] >= len(self.files):
                if not self.loop or not self.files:
                    break
                if self._epoch_records == 0:
                    raise DataError(f"no valid rows in {self.files}")
                st.update(file_index=0, offset=0, line=0, epoch=st["epoch"] + 1)
                self._epoch_records = 0
            path = self.files[st["file_index"]]
            if self._fh is None:
                self._fh = open(path, "rb")  # kept open across calls
                self._fh.seek(st["offset"])
            readline, start = self._fh.readline, len(out)
            offset, line_no, bad = st["offset"], st["line"], st["bad_rows"]
            raw = b""
            while len(out) < n:
                raw = readline()
                if not raw:
                    break
                offset += len(raw)
                line_no += 1
                line = raw.rstrip(b"\r\n")
                if fullmatch(line):
                    out.append(line)
                elif self.skip_bad_rows:
                    bad += 1
                else:
                    raise DataError(f"{path}:{line_no}: {check_line(line)}")
            st.update(offset=offset, line=line_no, bad_rows=bad, records=st["records"] + len(out) - start)
            self._epoch_records += len(out) - start
            if not raw:
                self.close()
                st.update(file_index=st["file_index"] + 1, offset=0, line=0)
        return out


def write_criteo_tsv(
    path: str | os.PathLike[str],
    rows: int,
    seed: int = 0,
    bad_rows: Iterable[int] = (),
    missing_rate: float = 0.1,
) -> None:
    """Write ``rows`` realistic Criteo-format lines to ``path``; rows in ``bad_rows`` (0-based)
    are malformed (cycling through: wrong column count, bad label, non-integer dense, non-hex
    categorical). Ids are Zipf-like per column, hex-encoded as 8 digits; integers are
    heavy-tailed, sometimes negative in I2; labels follow a logistic model of a few columns."""
    rng = np.random.default_rng(seed)
    bad = sorted(set(bad_rows))
    bad_kind = {r: k % 4 for k, r in enumerate(bad)}
    vocabs = np.array([[10, 100, 1000, 10_000, 100_000, 1_000_000][i % 6] for i in range(CRITEO_NUM_SPARSE)])
    col_salt = mix64(np.arange(CRITEO_NUM_SPARSE, dtype=np.uint64) + np.uint64(seed % (1 << 32) << 8))
    with open(path, "wb") as f:
        for start in range(0, rows, 8192):
            n = min(8192, rows - start)
            ranks = zipf_ids(rng.random((n, CRITEO_NUM_SPARSE)), vocabs, 1.1)
            cats = (mix64(ranks.astype(np.uint64) ^ col_salt) >> np.uint64(32)).astype(np.int64)
            ints = np.floor(rng.lognormal(1.0, 1.5, (n, CRITEO_NUM_DENSE))).astype(np.int64)
            ints[:, 1] -= rng.integers(0, 3, n) * (rng.random(n) < 0.1)
            w = ((cats[:, :4] % 1000) / 1000.0 - 0.5).sum(axis=1) + 0.2 * np.log1p(ints[:, 0])
            labels = rng.random(n) < 1.0 / (1.0 + np.exp(-(w - 1.2)))
            miss_d = rng.random((n, CRITEO_NUM_DENSE)) < missing_rate
            miss_c = rng.random((n, CRITEO_NUM_SPARSE)) < missing_rate
            hexes = np.frombuffer(cats.astype(">u4").tobytes().hex().encode(), "S8").reshape(n, -1)
            table = np.concatenate(
                [labels[:, None].astype(np.int8).astype("S1"), np.where(miss_d, b"", ints.astype("S20")),
                 np.where(miss_c, b"", hexes)], axis=1,
            ).tolist()
            for i in (r - start for r in bad if start <= r < start + n):
                fields, kind = table[i], bad_kind[start + i]
                if kind == 0:
                    fields[-3:] = []
                else:
                    fields[(0, 3, 20)[kind - 1]] = (b"2", b"1.5", b"xyz")[kind - 1]
            f.write(b"".join(b"\t".join(fields) + b"\n" for fields in table))
