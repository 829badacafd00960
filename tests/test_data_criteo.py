from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

from recjax.data.criteo import (
    CriteoReader,
    hash_categorical,
    lines_to_batch,
    parse_lines,
    parse_row,
    write_criteo_tsv,
)
from recjax.errors import DataError

VOCABS = [7, 1000, 10**6, 2**31 - 1] * 6 + [3, 50]


def _line(label="1", dense=None, cats=None) -> bytes:
    dense = dense if dense is not None else ["1"] * 13
    cats = cats if cats is not None else ["0a"] * 26
    return "\t".join([label, *dense, *cats]).encode()


def test_parse_known_values():
    dense = ["5", "", "-3", "0", "123456789012345678", "-0", "7", "", "", "1", "2", "3", "999"]
    cats = ["", "ffffffffffffffff", "0", "A1b2", "00000001", *["deadbeef"] * 21]
    lines = [_line("1", dense, cats), _line("0")]
    label, raw_dense, raw_cats = parse_lines(lines)
    assert label.tolist() == [1, 0]
    assert raw_dense[0].tolist() == [5, 0, -3, 0, 123456789012345678, 0, 7, 0, 0, 1, 2, 3, 999]
    assert raw_cats[0, :5].tolist() == [-1, (1 << 63) - 1, 0, 0xA1B2, 1]
    assert raw_cats[0, 5] == 0xDEADBEEF and (raw_cats[1] == 10).all()
    ref = parse_row(lines[0])  # plain-Python reference parser
    assert ref.dense == raw_dense[0].tolist() and ref.cats == raw_cats[0].tolist()

    b = lines_to_batch(lines, VOCABS, first_record=40)
    assert b["dense"].dtype == np.float32 and b["dense"].shape == (2, 13)
    expect = [math.log1p(max(x, 0)) for x in raw_dense[0].tolist()]
    np.testing.assert_allclose(b["dense"][0], expect, rtol=1e-6)
    assert b["sparse"].dtype == np.int32 and b["sparse"][0, 0] == -1
    assert b["label"].tolist() == [1.0, 0.0] and b["example_id"].tolist() == [40, 41]


def test_generated_file_vectorised_matches_reference(tmp_path: pathlib.Path):
    path = tmp_path / "a.tsv"
    write_criteo_tsv(path, rows=3000, seed=3, missing_rate=0.2)
    lines = [ln.rstrip(b"\n") for ln in path.read_bytes().splitlines()]
    assert len(lines) == 3000
    label, dense, cats = parse_lines(lines)
    rows = [parse_row(ln) for ln in lines]
    assert label.tolist() == [r.label for r in rows]
    assert dense.tolist() == [r.dense for r in rows]
    assert cats.tolist() == [r.cats for r in rows]
    assert 0.15 < (cats == -1).mean() < 0.25  # missing categoricals -> -1
    assert (dense < 0).any() and 0.05 < label.mean() < 0.6
    b = lines_to_batch(lines, VOCABS, 0)
    assert ((b["sparse"] == -1) == (cats == -1)).all()
    present = b["sparse"] >= 0
    assert (b["sparse"] < np.array(VOCABS)).all() and (b["sparse"][:, 0][present[:, 0]] < 7).all()
    assert len(np.unique(b["sparse"][:, 2])) > 100  # hashing keeps distinct ids apart
    assert b["dense"].min() >= 0.0


def test_hash_is_deterministic_per_feature():
    vals = np.full((4, 26), 12345, np.int64)
    h = hash_categorical(vals, [2**31 - 1])
    assert (h == hash_categorical(vals, [2**31 - 1])).all()
    assert len(set(h[0].tolist())) == 26  # the feature index is mixed in
    assert hash_categorical(np.full((1, 26), -1, np.int64), [10]).tolist() == [[-1] * 26]


@pytest.mark.parametrize(
    "line,reason",
    [
        (_line()[:-5], "expected 40 tab-separated columns, got 39"),
        (_line(label="2"), "label must be 0 or 1"),
        (_line(dense=["1.5"] + ["1"] * 12), "column I1: not an integer"),
        (_line(cats=["1"] * 25 + ["xyz"]), "column C26: not a hex string"),
        (_line(cats=["1"] * 25 + ["1" * 17]), "column C26: not a hex string"),
        (b"", "expected 40 tab-separated columns, got 1"),
    ],
)
def test_bad_row_message(tmp_path: pathlib.Path, line: bytes, reason: str):
    path = tmp_path / "bad.tsv"
    path.write_bytes(_line() + b"\n" + _line() + b"\n" + line + b"\n" + _line() + b"\n")
    reader = CriteoReader([str(path)])
    with pytest.raises(DataError) as e:
        reader.read_lines(10)
    assert str(e.value).startswith(f"{path}:3: ") and reason in str(e.value)
    skipping = CriteoReader([str(path)], skip_bad_rows=True)
    assert len(skipping.read_lines(10)) == 3 and skipping.bad_rows == 1 and skipping.records == 3


def test_writer_bad_rows_and_skip_mode(tmp_path: pathlib.Path):
    path = tmp_path / "b.tsv"
    bad = [0, 5, 6, 99]
    write_criteo_tsv(path, rows=100, seed=1, bad_rows=bad)
    with pytest.raises(DataError, match=rf"^{path}:1: expected 40"):
        CriteoReader([str(path)]).read_lines(200)
    reader = CriteoReader([str(path)], skip_bad_rows=True)
    got = reader.read_lines(200)
    good = [ln for i, ln in enumerate(path.read_bytes().splitlines()) if i not in bad]
    assert got == good and reader.bad_rows == 4 and reader.records == 96
    messages = []
    for i in bad:
        lines = path.read_bytes().splitlines()
        single = tmp_path / f"one{i}.tsv"
        single.write_bytes(lines[i] + b"\n")
        with pytest.raises(DataError) as e:
            CriteoReader([str(single)]).read_lines(1)
        messages.append(str(e.value).split(": ", 1)[1])
    assert [m.split(":")[0].split(" ")[0] for m in messages] == ["expected", "label", "column", "column"]


def test_resume_mid_file_and_multi_file(tmp_path: pathlib.Path):
    files = []
    for i, n in enumerate([37, 0, 50, 13]):
        files.append(str(tmp_path / f"part{i}.tsv"))
        write_criteo_tsv(files[-1], rows=n, seed=i, bad_rows=[3] if n > 3 else [])
    concat = tmp_path / "all.tsv"
    concat.write_bytes(b"".join(pathlib.Path(f).read_bytes() for f in files))
    whole = CriteoReader([str(concat)], skip_bad_rows=True).read_lines(1000)
    reader = CriteoReader(files, skip_bad_rows=True)
    assert reader.read_lines(1000) == whole and len(whole) == 100 - 3 and reader.bad_rows == 3

    for cut in [0, 1, 20, 34, 35, 60, 96, 97]:
        reader = CriteoReader(files, skip_bad_rows=True)
        head = reader.read_lines(cut)
        state = json.loads(json.dumps(reader.get_state()))
        tail = reader.read_lines(1000)
        resumed = CriteoReader(files, skip_bad_rows=True)
        resumed.read_lines(5)  # a used reader, too
        resumed.set_state(state)
        assert head + tail == whole and resumed.read_lines(1000) == tail
        assert resumed.get_state() == reader.get_state()
    rows = list(CriteoReader(files, skip_bad_rows=True))
    assert [r.cats for r in rows] == [parse_row(ln).cats for ln in whole]


def test_loop_epochs_and_crlf(tmp_path: pathlib.Path):
    path = tmp_path / "crlf.tsv"
    path.write_bytes(b"\r\n".join([_line("0"), _line("1"), _line("1")]))  # no final newline
    reader = CriteoReader([str(path)], loop=True)
    lines = reader.read_lines(7)
    assert [ln[:1] for ln in lines] == [b"0", b"1", b"1"] * 2 + [b"0"]
    state = reader.get_state()
    assert state["epoch"] == 2 and state["records"] == 7 and state["line"] == 1
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="no valid rows"):
        CriteoReader([str(empty)], loop=True).read_lines(1)
