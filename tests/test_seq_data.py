from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib

import numpy as np
import pytest

from recjax import cli
from recjax.config import SequenceDataConfig, SyntheticSequenceConfig
from recjax.data import seq_pipeline, seq_readers
from recjax.data.seq_pipeline import (
    TrainBatches,
    TrainIterator,
    eval_rows,
    leave_one_out,
    load_for_config,
    sample_negatives,
    train_rows,
)
from recjax.data.seq_prepare import (
    SequenceData,
    build_sequences,
    k_core,
    load_sequences,
    save_sequences,
)
from recjax.data.seq_readers import Interactions, read_interactions
from recjax.data.seq_synthetic import generate_sequences
from recjax.errors import ConfigError, DataError

# (user, item, rating, timestamp); user 10 sorts after 2 numerically; user 2 has a timestamp tie
ROWS = [(2, 50, 4, 300), (10, 7, 3, 100), (2, 7, 5, 100), (1, 50, 1, 200), (2, 8, 2, 300), (10, 50, 5, 50)]


def _lines(rows, sep: str, end: str = "\n") -> str:
    return "".join(sep.join(map(str, r)) + end for r in rows)


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def _check_rows(inter: Interactions, rows=ROWS) -> None:
    assert inter.users.tolist() == [str(r[0]) for r in rows]
    assert inter.items.tolist() == [str(r[1]) for r in rows]
    assert inter.timestamps.dtype == np.float64
    assert inter.timestamps.tolist() == [float(r[3]) for r in rows]
    assert inter.user_vocab.tolist() == ["1", "2", "10"]  # numeric order for integer ids
    assert inter.item_vocab.tolist() == ["7", "8", "50"]


@pytest.fixture
def movielens_files(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    return {
        "u.data": _write(tmp_path / "u.data", _lines(ROWS, "\t")),
        "ratings.dat": _write(tmp_path / "ratings.dat", _lines(ROWS, "::", end="\r\n")),
        "ratings.csv": _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n"
                              + _lines([(u, i, r + 0.5, t) for u, i, r, t in ROWS], ",")),
    }


def test_movielens_formats(movielens_files):
    for name, path in movielens_files.items():
        inter = read_interactions(path)
        assert inter.fmt == "movielens" and name in inter.source
        _check_rows(inter)
        assert inter.counts() == {"users": 3, "items": 3, "interactions": 6}


def _amazon_json_lines() -> list[str]:
    lines = []
    for k, (u, i, _, t) in enumerate(ROWS):
        if k % 2:  # 2014 key order
            obj = {"reviewerID": str(u), "asin": str(i), "reviewerName": "x", "helpful": [0, 0],
                   "reviewText": 'says "asin": "B000FAKE" and "reviewerID": "no"', "overall": 5.0,
                   "summary": "s", "unixReviewTime": t, "reviewTime": "01 1, 2014"}
        else:  # 2018 key order, nested style dict
            obj = {"overall": 4.0, "verified": True, "reviewTime": "01 1, 2018", "reviewerID": str(u),
                   "asin": str(i), "style": {"Size:": " Large"}, "reviewerName": "y",
                   "reviewText": "fine", "summary": "ok", "unixReviewTime": t}
        lines.append(json.dumps(obj))
    return lines


def test_amazon_formats(tmp_path: pathlib.Path, monkeypatch):
    lines = _amazon_json_lines()
    plain = _write(tmp_path / "Beauty_5.json", "\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]))  # blank line
    gz = tmp_path / "reviews_Beauty_5.json.gz"
    with gzip.open(gz, "wt") as f:
        f.write("\n".join(lines) + "\n")
    csv = _write(tmp_path / "ratings_Beauty.csv", _lines(ROWS, ","))
    with monkeypatch.context() as m:  # well-formed dumps take the whole-block path
        m.setattr(seq_readers, "_json_slow", lambda *a: pytest.fail("per-line JSON fallback used"))
        for path in (plain, gz, csv):
            inter = read_interactions(path)
            assert inter.fmt == "amazon"
            _check_rows(inter)
    # string ids sort by bytes; escapes in ids are decoded
    text = '{"reviewerID": "A2\\u00e9", "asin": "B01", "unixReviewTime": 5}\n' \
           '{"asin": "B00", "reviewerID": "A1", "unixReviewTime": 7}\n'
    inter = read_interactions(_write(tmp_path / "x.jsonl", text))
    assert inter.user_vocab.tolist() == ["A1", "A2\u00e9"] and inter.users.tolist() == ["A2\u00e9", "A1"]
    assert inter.items.tolist() == ["B01", "B00"] and inter.timestamps.tolist() == [5.0, 7.0]


def test_recbole_inter(tmp_path: pathlib.Path):
    header = "item_id:token\trating:float\tuser_id:token\ttimestamp:float\n"
    body = _lines([(i, r, u, float(t)) for u, i, r, t in ROWS], "\t")
    inter = read_interactions(_write(tmp_path / "ml.inter", header + body))
    assert inter.fmt == "recbole"
    _check_rows(inter)
    bom = tmp_path / "bom.inter"
    bom.write_bytes(b"\xef\xbb\xbf" + (header + body).encode())
    _check_rows(read_interactions(bom))
    bad = _write(tmp_path / "bad.inter", "user_id:token\titem_id:token\trating:float\n1\t2\t3\n")
    with pytest.raises(DataError, match=r"bad\.inter:1: header has no 'timestamp' column"):
        read_interactions(bad)


def test_format_detection_and_override(tmp_path: pathlib.Path):
    odd = _write(tmp_path / "interactions.txt", _lines(ROWS, "::"))
    with pytest.raises(DataError, match="--format"):
        read_interactions(odd)
    _check_rows(read_interactions(odd, fmt="movielens"))
    with pytest.raises(DataError, match="unknown interactions format"):
        read_interactions(odd, fmt="netflix")
    with pytest.raises(DataError, match="no such file"):
        read_interactions(tmp_path / "missing.dat")


@pytest.mark.parametrize(
    "name, text, line, reason",
    [
        ("u.data", "1\t2\t3\t4\n1\t2\t3\t5\n1\t2\t3\n", 3, "expected 4 tab-separated fields, got 3"),
        ("ratings.dat", "1::2::3::4\n\n1::2::3::x9\n", 3, "timestamp (field 4) is not a number"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3,4\n,2,3,4\n", 4, "empty user id"),
        ("r.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\tinf\n", 3, "not finite"),
        ("a.json", '{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}\n{"reviewerID": "a", "asin"\n', 2,
         "not valid JSON"),
        ("b.json", '{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}\n{"reviewerID": "a", "asin": "b"}\n',
         2, "missing key 'unixReviewTime'"),
        ("c.json", '{"reviewerID": "a", "asin": "b", "unixReviewTime": "soon"}\n', 1, "must be a number"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: pathlib.Path, name, text, line, reason):
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError) as err:
        read_interactions(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}: ") and reason in msg
    shown = text.splitlines()[line - 1].replace("\t", "\\t")
    assert f"({shown})" in msg  # the offending line is quoted


def test_bad_line_number_across_blocks(tmp_path: pathlib.Path, monkeypatch):
    monkeypatch.setattr(seq_readers, "BLOCK_BYTES", 64)  # many blocks, lines split across reads
    lines = [f"{u}::{u % 7}::5::{1000 + u}" for u in range(200)]
    path = _write(tmp_path / "ratings.dat", "\n".join(lines))  # no final newline
    inter = read_interactions(path)
    assert len(inter) == 200 and inter.timestamps[-1] == 1199.0 and inter.users[-1] == "199"
    lines[150] = "150::3::5"
    _write(path, "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ratings\.dat:151: expected 4 '::'-separated fields, got 3 \(150::3::5\)"):
        read_interactions(path)


def test_cli_prints_data_errors_without_traceback(tmp_path: pathlib.Path, capsys):
    path = _write(tmp_path / "u.data", "1\t2\t3\t4\n1\t2\n")
    assert cli.main(["data", "prepare", str(path), str(tmp_path / "out")]) == 1
    assert f"error: {path}:2: expected 4 tab-separated fields, got 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- prepare


def test_k_core_is_iterative():
    # k = 2: d has 1 interaction -> D falls to 1 -> c falls to 1 -> C falls to 1 -> only A, B remain
    pairs = [("A", "a"), ("A", "b"), ("B", "a"), ("B", "b"), ("C", "a"), ("C", "c"), ("D", "c"), ("D", "d")]
    inter = Interactions.from_raw([p[0] for p in pairs], [p[1] for p in pairs], np.arange(len(pairs)))
    out = k_core(inter, 2)
    assert sorted(zip(out.users.tolist(), out.items.tolist(), strict=True)) == sorted(pairs[:4])
    assert out.user_vocab.tolist() == ["A", "B"] and out.item_vocab.tolist() == ["a", "b"]
    assert out.timestamps.tolist() == [0, 1, 2, 3]
    assert k_core(inter, 1) is inter and k_core(inter, 0) is inter
    assert len(k_core(inter, 3)) == 0  # nothing survives a 3-core


def test_build_sequences_orders_by_time_and_remaps_ids():
    inter = Interactions.from_raw([r[0] for r in ROWS], [r[1] for r in ROWS], [r[3] for r in ROWS])
    data = build_sequences(inter)
    assert data.user_ids == ["1", "2", "10"] and data.item_ids == ["7", "8", "50"] and data.num_items == 3
    assert data.offsets.tolist() == [0, 1, 4, 6]
    # user 2: (7 @100), then the tie at 300 in file order: 50 then 8
    assert [data.item_ids[i - 1] for i in data.sequence(1)] == ["7", "50", "8"]
    assert data.sequence(1).tolist() == [1, 3, 2] and data.timestamps[1:4].tolist() == [100, 300, 300]
    assert data.sequence(2).tolist() == [3, 1]  # user 10: 50 @50, 7 @100
    assert data.items.dtype == np.int32 and data.items.min() == 1  # 0 stays free for padding


def _toy_sequences() -> SequenceData:
    rng = np.random.default_rng(0)
    lengths = np.array([1, 2, 3, 4, 7, 12, 25, 3, 9, 40])
    items = rng.integers(1, 16, lengths.sum()).astype(np.int32)  # repeats on purpose
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return SequenceData(offsets, items, np.arange(lengths.sum(), dtype=np.float64), 20,
                        [f"u{i}" for i in range(10)], [f"i{i}" for i in range(1, 21)])


def test_save_load_round_trip_and_manifest(tmp_path: pathlib.Path):
    data = _toy_sequences()
    out = tmp_path / "prepared"
    manifest_path = save_sequences(out, data, {"k_core": 0, "sources": []})
    assert manifest_path == out / "manifest.json"
    back = load_sequences(out)
    for name in ("offsets", "items", "timestamps"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
        assert getattr(back, name).dtype == getattr(data, name).dtype
    assert back.user_ids == data.user_ids and back.item_ids == data.item_ids and back.num_items == 20
    m = json.loads(manifest_path.read_text())
    assert m["format"] == "recjax-sequences" and m["format_version"] == 1 and m["k_core"] == 0
    assert (m["num_users"], m["num_items"], m["num_interactions"]) == (10, 20, 106)
    assert m["sequence_length"] == {"min": 1, "median": 5.5, "mean": 10.6, "max": 40}
    assert m["recjax_version"] and m["created"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no temporary left behind

    with pytest.raises(DataError, match="already exists"):
        save_sequences(out, data, {})
    save_sequences(out, dataclasses.replace(data, num_items=40, item_ids=[str(i) for i in range(40)]), {},
                   overwrite=True)
    assert load_sequences(out).num_items == 40
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a `recjax data prepare` directory; not replacing"):
        save_sequences(tmp_path / "other", data, {}, overwrite=True)

    with pytest.raises(DataError, match="no such directory"):
        load_sequences(tmp_path / "nope")
    with pytest.raises(DataError, match="no manifest.json"):
        load_sequences(tmp_path / "other")
    m["format_version"] = 99
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(DataError, match="format version 99"):
        load_sequences(out)


def test_cli_prepare_movielens(tmp_path: pathlib.Path, movielens_files, capsys):
    out = tmp_path / "ml"
    assert cli.main(["data", "prepare", str(movielens_files["u.data"]), str(out), "--k-core", "0"]) == 0
    printed = capsys.readouterr().out
    assert "users         3" in printed and "interactions  6" in printed and str(out / "manifest.json") in printed
    data = load_sequences(out)
    assert data.user_ids == ["1", "2", "10"] and data.sequence(1).tolist() == [1, 3, 2]
    m = json.loads((out / "manifest.json").read_text())
    assert m["reader"]["format"] == "movielens"
    assert m["sources"][0]["bytes"] == movielens_files["u.data"].stat().st_size
    assert len(m["sources"][0]["sha256"]) == 64
    assert m["before_filter"] == m["after_filter"] == {"users": 3, "items": 3, "interactions": 6}

    # 2-core drops user 1 (one interaction), then item 8 (one left), then nothing more
    assert cli.main(["data", "prepare", str(movielens_files["ratings.csv"]), str(tmp_path / "k2"),
                     "--k-core", "2"]) == 0
    m = json.loads((tmp_path / "k2" / "manifest.json").read_text())
    assert m["k_core"] == 2 and m["after_filter"] == {"users": 2, "items": 2, "interactions": 4}


def test_cli_prepare_synthetic_and_load_for_config(tmp_path: pathlib.Path):
    assert cli.main(["data", "prepare", "synthetic", str(tmp_path / "s"), "--num-users", "30",
                     "--num-items", "40", "--seed", "5"]) == 0
    synthetic = SyntheticSequenceConfig(num_users=30, num_items=40, seed=5)
    from_disk = load_for_config(SequenceDataConfig(path=str(tmp_path / "s")))
    generated = load_for_config(SequenceDataConfig(synthetic=synthetic))
    for data in (from_disk, generated):
        np.testing.assert_array_equal(data.items, generate_sequences(synthetic).items)
        assert data.num_items == 40 and data.num_users == 30
    with pytest.raises(DataError, match="no such directory"):
        load_for_config(SequenceDataConfig(path=str(tmp_path / "missing")))


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_sizes_and_learnable():
    cfg = SyntheticSequenceConfig(num_users=1000, num_items=300, min_length=5, max_length=30, seed=3)
    a, b = generate_sequences(cfg), generate_sequences(cfg)
    for name in ("offsets", "items", "timestamps"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.items[:200], generate_sequences(dataclasses.replace(cfg, seed=4)).items[:200])
    assert a.num_users == 1000 and a.num_items == 300 and len(a.item_ids) == 300 and len(a.user_ids) == 1000
    assert a.lengths.min() >= 5 and a.lengths.max() <= 30 and a.lengths.min() < 8 and a.lengths.max() > 27
    assert a.items.min() >= 1 and a.items.max() <= 300
    within = np.diff(a.timestamps)[np.ones(a.num_interactions - 1, bool) & ~np.isin(
        np.arange(1, a.num_interactions), a.offsets[1:-1])]
    assert (within > 0).all()  # time increases within each user

    # hit rate @10 on each user's last item: global popularity vs counts of "item y followed x"
    last = a.offsets[1:] - 1
    train = np.ones(a.num_interactions, bool)
    train[last] = False
    pop = np.bincount(a.items[train], minlength=301)
    pairs = train[1:] & train[:-1] & ~np.isin(np.arange(1, a.num_interactions), a.offsets[1:-1])
    follow = np.zeros((301, 301))
    np.add.at(follow, (a.items[:-1][pairs], a.items[1:][pairs]), 1.0)
    target, prev = a.items[last], a.items[last - 1]
    top_pop = np.argsort(-pop[1:])[:10] + 1
    hr_pop = np.isin(target, top_pop).mean()
    scores = follow[prev] + 1e-3 * pop
    scores[:, 0] = -1
    hr_seq = (np.argsort(-scores, axis=1)[:, :10] == target[:, None]).any(axis=1).mean()
    assert hr_seq > 1.8 * hr_pop and hr_pop > 0.05, (hr_seq, hr_pop)

    with pytest.raises(ConfigError, match="min_length"):
        generate_sequences(dataclasses.replace(cfg, min_length=0))


# ----------------------------------------------------------------------------- split and rows


def _position_coded(data: SequenceData) -> SequenceData:
    """Same users and lengths, item at global position p = p + 1 (every value names its position)."""
    nnz = data.num_interactions
    return dataclasses.replace(data, items=np.arange(1, nnz + 1, dtype=np.int32), num_items=nnz,
                               item_ids=[str(i) for i in range(nnz)])


def test_leave_one_out():
    data = _toy_sequences()
    split = leave_one_out(data)
    assert split.users.tolist() == [2, 3, 4, 5, 6, 7, 8, 9] and split.dropped_users == 2
    expected = np.zeros(22, np.int64)
    for u in split.users:
        np.add.at(expected, data.sequence(u)[:-2], 1)
    np.testing.assert_array_equal(split.item_counts, expected)
    assert split.item_counts.shape == (data.num_items + 2,)
    short = SequenceData(np.array([0, 2, 4]), np.array([1, 2, 2, 1], np.int32), np.zeros(4), 2, ["a", "b"],
                         ["x", "y"])
    with pytest.raises(DataError, match="none of the 2 users has the 3 interactions"):
        leave_one_out(short)


@pytest.mark.parametrize("max_len,stride", [(1, 0), (3, 0), (5, 0), (50, 0), (5, 2), (5, 1), (4, 4)])
def test_windows_cover_training_targets_once_without_leaks(max_len, stride):
    data = _toy_sequences()
    coded = _position_coded(data)
    split = leave_one_out(coded)
    rows = train_rows(split, max_len, "windows", "next_item", stride)
    real = train_rows(leave_one_out(data), max_len, "windows", "next_item", stride)
    k = stride or max_len
    assert rows.inputs.shape == rows.targets.shape == (len(rows), max_len)
    owner = np.searchsorted(coded.offsets, np.arange(coded.num_interactions), side="right") - 1
    seen_targets = []
    for r in range(len(rows)):
        n = int(rows.lengths[r])
        assert 1 <= n <= max_len
        assert (rows.inputs[r, n:] == 0).all() and (rows.targets[r, n:] == 0).all()
        pos_in, scored = rows.inputs[r, :n] - 1, rows.targets[r, :n] > 0
        u = owner[pos_in[0]]
        assert (pos_in == pos_in[0] + np.arange(n)).all()  # consecutive items of one user
        first = pos_in[0] == coded.offsets[u]
        # a user's first window scores every position; the others their last k, with full context
        assert scored.all() if first else (n == max_len and (scored == (np.arange(n) >= n - k)).all())
        pos_tg = rows.targets[r, :n][scored] - 1
        assert (pos_tg == pos_in[scored] + 1).all()  # each target is the next item
        assert (owner[pos_tg] == u).all() and pos_tg.max() < coded.offsets[u + 1] - 2  # no leak
        seen_targets.extend(pos_tg.tolist())
        # the real rows hold the items at those positions
        np.testing.assert_array_equal(real.inputs[r, :n], data.items[pos_in])
        np.testing.assert_array_equal(real.targets[r, :n][scored], data.items[pos_tg])
    expected = [p for u in split.users for p in range(coded.offsets[u] + 1, coded.offsets[u + 1] - 2)]
    assert sorted(seen_targets) == expected  # every training target exactly once
    assert len(rows) == sum(1 + max(0, -(-(int(m) - max_len - 1) // k)) for m in split.train_lengths if m >= 2)
    if stride in (0, max_len):
        assert len(rows) == sum(-(-(int(m) - 1) // max_len) for m in split.train_lengths)


def test_prefix_rows_one_per_target():
    data = _toy_sequences()
    coded = _position_coded(data)
    split = leave_one_out(coded)
    s = 4
    rows = train_rows(split, s, "prefixes", "next_item")
    assert len(rows) == int((split.train_lengths - 1).sum())
    targets = []
    for r in range(len(rows)):
        n = int(rows.lengths[r])
        assert (rows.targets[r, : n - 1] == 0).all() and (rows.targets[r, n:] == 0).all()
        tgt = rows.targets[r, n - 1] - 1
        u = np.searchsorted(coded.offsets, tgt, side="right") - 1
        start = max(coded.offsets[u], tgt - s)
        np.testing.assert_array_equal(rows.inputs[r, :n] - 1, np.arange(start, tgt))  # last s items before it
        assert tgt < coded.offsets[u + 1] - 2
        targets.append(tgt)
    assert sorted(targets) == [p for u in split.users for p in range(coded.offsets[u] + 1, coded.offsets[u + 1] - 2)]


def test_cloze_rows_are_windows_without_targets():
    coded = _position_coded(_toy_sequences())
    split = leave_one_out(coded)
    rows = train_rows(split, 5, "windows", "cloze")
    assert (rows.targets == 0).all()
    covered = np.sort(np.concatenate([rows.inputs[r, : rows.lengths[r]] - 1 for r in range(len(rows))]))
    expected = [p for u in split.users for p in range(coded.offsets[u], coded.offsets[u + 1] - 2)]
    assert covered.tolist() == expected
    assert len(rows) == int((-(-split.train_lengths // 5)).sum())
    # overlapping windows (stride 2): every window of a long user is full, the last starts at x_1
    rows2 = train_rows(split, 5, "windows", "cloze", 2)
    starts = {}
    for r in range(len(rows2)):
        n, pos = int(rows2.lengths[r]), rows2.inputs[r, : rows2.lengths[r]] - 1
        u = np.searchsorted(coded.offsets, pos[0], side="right") - 1
        assert (pos == pos[0] + np.arange(n)).all() and pos[-1] < coded.offsets[u + 1] - 2
        assert n == 5 or pos[0] == coded.offsets[u]
        starts.setdefault(u, []).append(pos[0] - coded.offsets[u])
    for u, m in zip(split.users, split.train_lengths, strict=True):
        assert sorted(starts[u]) == sorted({max(0, int(m) - 5 - 2 * j) for j in range(-(-max(0, int(m) - 5) // 2) + 1)})
    # RecBole's BERT4Rec rows: the inputs of the next-item prefixes, no targets (masked per batch)
    prefixes, nexts = train_rows(split, 5, "prefixes", "cloze"), train_rows(split, 5, "prefixes", "next_item")
    assert (prefixes.targets == 0).all()
    np.testing.assert_array_equal(prefixes.inputs, nexts.inputs)
    np.testing.assert_array_equal(prefixes.lengths, nexts.lengths)


def test_train_batches_shuffle_pad_and_resume():
    split = leave_one_out(_toy_sequences())
    rows = train_rows(split, 3, "windows", "next_item")
    batches = TrainBatches(rows, 4, seed=7, objective="next_item", num_items=20)
    assert len(batches) == -(-len(rows) // 4)
    epoch0 = list(batches.epoch(0))
    assert len(epoch0) == len(batches)
    for b in epoch0:
        assert b["inputs"].shape == b["targets"].shape == (4, 3) and b["lengths"].shape == (4,)
        assert b["inputs"].dtype == b["targets"].dtype == b["lengths"].dtype == np.int32
    stacked = np.concatenate([np.concatenate([b["inputs"], b["targets"]], 1) for b in epoch0])
    lengths = np.concatenate([b["lengths"] for b in epoch0])
    pad = len(batches) * 4 - len(rows)
    assert (lengths == 0).sum() == pad and (stacked[lengths == 0] == 0).all()
    ref = np.concatenate([rows.inputs, rows.targets], 1)
    key = lambda a: sorted(map(tuple, a.tolist()))
    assert key(stacked[lengths > 0]) == key(ref)  # each row exactly once per epoch
    epoch1 = list(batches.epoch(1))
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(epoch0, epoch1, strict=True))
    resumed = list(TrainBatches(rows, 4, seed=7, objective="next_item", num_items=20).epoch(1, start=2))
    for x, y in zip(epoch1[2:], resumed, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_train_iterator_slices_processes_and_resumes_from_a_global_position():
    """The trainer's iterator: epochs from 1, process slices of each global batch, and a state
    (a global position) that resumes mid-epoch and on another process count."""
    split = leave_one_out(_toy_sequences())
    rows = train_rows(split, 3, "windows", "next_item")
    batches = TrainBatches(rows, 4, seed=7, objective="next_item", num_items=20)
    n = len(batches)
    assert n >= 3
    expected = list(batches.epoch(1)) + list(batches.epoch(2))
    it = TrainIterator(batches)
    got = [next(it) for _ in range(2 * n)]
    for x, y in zip(got, expected, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert it.get_state() == {"source": "sequences", "split": "train", "epoch": 2, "next_batch": n}

    def same(a, b):
        return all(np.array_equal(a[k], b[k]) for k in a)

    one = TrainIterator(batches)
    for _ in range(n - 1):  # stop one batch before the end of epoch 1
        next(one)
    state = json.loads(json.dumps(one.get_state()))
    assert state["epoch"] == 1 and state["next_batch"] == n - 1
    resumed = TrainIterator(batches)
    resumed.set_state(state)
    for i in range(3):  # across the epoch boundary
        assert same(next(resumed), expected[n - 1 + i])
    # two processes: each holds half of every global batch, with the same global state
    procs = [TrainIterator(batches, p, 2) for p in range(2)]
    for p in procs:
        p.set_state(state)
    for i in range(3):
        a, b = (next(p) for p in procs)
        assert a["inputs"].shape == (2, 3)
        assert same({k: np.concatenate([a[k], b[k]]) for k in a}, expected[n - 1 + i])
    assert procs[0].get_state() == procs[1].get_state() == resumed.get_state()
    with pytest.raises(ConfigError, match="multiple of the process count 3"):
        TrainIterator(batches, 0, 3)
    with pytest.raises(ConfigError, match="source='synthetic'"):
        resumed.set_state({"source": "synthetic", "split": "train", "next_record": 0})


def test_cloze_masking_statistics_and_determinism():
    n_items = 1000
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 21, 400)
    data = SequenceData(np.concatenate([[0], np.cumsum(lengths + 2)]), rng.integers(1, n_items + 1,
                        (lengths + 2).sum()).astype(np.int32), np.zeros((lengths + 2).sum()), n_items,
                        [str(i) for i in range(400)], [str(i) for i in range(n_items)])
    rows = train_rows(leave_one_out(data), 20, "windows", "cloze")
    batches = TrainBatches(rows, 64, seed=3, objective="cloze", num_items=n_items, mask_prob=0.2)
    valid_total = selected = to_mask = to_random = kept = 0
    for epoch in range(12):
        for b in batches.epoch(epoch):
            valid = np.arange(20)[None, :] < b["lengths"][:, None]
            sel = b["targets"] > 0
            assert not (sel & ~valid).any() and (b["inputs"][~valid] == 0).all()  # padding never masked
            assert (sel.any(axis=1) | (b["lengths"] == 0)).all()  # >= 1 target per non-empty row
            valid_total += valid.sum()
            selected += sel.sum()
            to_mask += (b["inputs"][sel] == n_items + 1).sum()
            kept += (b["inputs"][sel] == b["targets"][sel]).sum()
            to_random += ((b["inputs"][sel] != n_items + 1) & (b["inputs"][sel] != b["targets"][sel])).sum()
            assert ((b["inputs"][sel] >= 1) & (b["inputs"][sel] <= n_items + 1)).all()
    assert selected > 5000
    assert 0.2 <= selected / valid_total < 0.26  # 0.2 plus the forced position of short rows
    assert abs(to_mask / selected - 0.8) < 0.02
    assert abs(to_random / selected - 0.1) < 0.015 and abs(kept / selected - 0.1) < 0.015
    again = TrainBatches(rows, 64, seed=3, objective="cloze", num_items=n_items, mask_prob=0.2)
    x, y = batches.batch(2, 3), again.batch(2, 3)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(batches.batch(2, 3)["targets"], batches.batch(2, 4)["targets"])
    other_seed = TrainBatches(rows, 64, seed=4, objective="cloze", num_items=n_items).batch(2, 3)
    assert not np.array_equal(x["targets"], other_seed["targets"])


def test_recbole_cloze_masks_and_last_item_batches():
    rng = np.random.default_rng(2)
    n_items, s = 500, 12
    lengths = rng.integers(1, 30, 300)
    data = SequenceData(np.concatenate([[0], np.cumsum(lengths + 2)]), rng.integers(1, n_items + 1,
                        (lengths + 2).sum()).astype(np.int32), np.zeros((lengths + 2).sum()), n_items,
                        [str(i) for i in range(300)], [str(i) for i in range(n_items)])
    rows = train_rows(leave_one_out(data), s, "windows", "cloze")
    mask_only = TrainBatches(rows, 32, seed=0, objective="cloze", num_items=n_items, mask_replace="mask")
    for b in mask_only.epoch(1):
        sel = b["targets"] > 0
        assert (b["inputs"][sel] == n_items + 1).all() and sel.sum() > 0
    # mask_last_prob: a batch either masks each row's last item only, or is an ordinary cloze batch
    uncut = dataclasses.replace(rows, spans=None)  # no end cuts: the other positions stay as they were
    mixed = TrainBatches(uncut, 32, seed=0, objective="cloze", num_items=n_items, mask_replace="mask",
                         mask_last_prob=0.5)
    last_batches = 0
    for epoch in range(1, 9):
        order = mixed.order(epoch)
        for i, b in enumerate(mixed.epoch(epoch)):
            sel, n = b["targets"] > 0, b["lengths"]
            last = np.arange(s)[None, :] == (n - 1)[:, None]
            if (sel == last).all():  # a last-item batch: [MASK] there, every other position unchanged
                last_batches += 1
                original = np.zeros_like(b["inputs"])
                take = order[i * 32:(i + 1) * 32]
                original[: take.size] = rows.inputs[take]
                np.testing.assert_array_equal(b["targets"][last], original[last])
                assert (b["inputs"][last] == n_items + 1).all()
                np.testing.assert_array_equal(b["inputs"][~last], original[~last])
    total = 8 * len(mixed)
    assert 0.3 < last_batches / total < 0.7, (last_batches, total)
    # windows of stride 3: a last-item batch cuts each row's end back by 0..span-1 items (span 3,
    # or the whole length for a user's first window), so every training item becomes a target
    rows3 = train_rows(leave_one_out(data), s, "windows", "cloze", 3)
    cut = TrainBatches(rows3, 32, seed=0, objective="cloze", num_items=n_items, mask_last_prob=1.0)
    targets_seen, cuts = set(), []
    for epoch in range(1, 41):
        order = cut.order(epoch)
        for i, b in enumerate(cut.epoch(epoch)):
            take = order[i * 32:(i + 1) * 32]
            n, full, span = b["lengths"][: take.size], rows3.lengths[take], rows3.spans[take]
            assert ((n >= 1) & (n > full - span) & (n <= full)).all()
            for r, row in enumerate(take):
                np.testing.assert_array_equal(b["inputs"][r, : n[r] - 1], rows3.inputs[row, : n[r] - 1])
                assert b["inputs"][r, n[r] - 1] == n_items + 1
                assert b["targets"][r, n[r] - 1] == rows3.inputs[row, n[r] - 1]
                assert (b["inputs"][r, n[r]:] == 0).all() and (b["targets"][r] > 0).sum() == 1
                targets_seen.add((int(row), int(n[r])))
            cuts.append(((full - n) / span)[full == s])
    assert 0.2 < np.concatenate(cuts).mean() < 0.45  # uniform over 0..2 of 3: mean 1/3
    # the (window, end) pairs drawn are the possible ones, and 40 epochs draw nearly all of them
    possible = {(r, e) for r in range(len(rows3))
                for e in range(int(rows3.lengths[r] - rows3.spans[r]) + 1, int(rows3.lengths[r]) + 1)}
    assert targets_seen <= possible and len(targets_seen) > 0.9 * len(possible)


@pytest.mark.parametrize("which", ["valid", "test"])
@pytest.mark.parametrize("append_mask", [False, True])
def test_eval_rows(which, append_mask):
    data = _toy_sequences()
    split = leave_one_out(data)
    s = 6
    rows = eval_rows(split, which, s, append_mask=append_mask)
    assert rows.users.tolist() == split.users.tolist() and rows.inputs.shape == (len(split.users), s)
    for k, u in enumerate(rows.users):
        seq = data.sequence(u)
        history = seq[:-2] if which == "valid" else seq[:-1]
        assert rows.targets[k] == (seq[-2] if which == "valid" else seq[-1])
        np.testing.assert_array_equal(rows.history_items[rows.history_offsets[k]:rows.history_offsets[k + 1]],
                                      history)
        n = int(rows.lengths[k])
        if append_mask:
            kept = history[-(s - 1):]
            np.testing.assert_array_equal(rows.inputs[k, : n - 1], kept)
            assert n == len(kept) + 1 and rows.inputs[k, n - 1] == data.num_items + 1
        else:
            np.testing.assert_array_equal(rows.inputs[k, :n], history[-s:])
            assert n == min(len(history), s)
        assert (rows.inputs[k, n:] == 0).all()


def test_eval_rows_drop_first_is_recboles_bert4rec_test_input():
    """RecBole appends [MASK] at position len of the padded history and drops column 0."""
    data = _toy_sequences()
    split = leave_one_out(data)
    s = 6
    rows = eval_rows(split, "test", s, append_mask=True, drop_first=True)
    for k, u in enumerate(rows.users):
        history = list(data.sequence(u)[:-1])
        padded = (history[-s:] + [0] * s)[:s]  # RecBole's item_seq: the last s items, left-aligned
        n = min(len(history), s)
        recbole = (padded + [0])
        recbole[n] = data.num_items + 1
        recbole = recbole[1:]
        np.testing.assert_array_equal(rows.inputs[k], recbole)
        assert rows.lengths[k] == n  # the model scores position n - 1: the [MASK]


@pytest.mark.parametrize("dense_below", [seq_pipeline.DENSE_BELOW, 1.1])  # 1.1: every row by keys
def test_sample_negatives(monkeypatch, dense_below):
    monkeypatch.setattr(seq_pipeline, "DENSE_BELOW", dense_below)
    rng = np.random.default_rng(5)
    n_users, n_items = 300, 200
    # popularity: item i drawn with weight ~ 1 / i in users' histories
    p = 1.0 / np.arange(1, n_items + 1)
    lengths = rng.integers(3, 30, n_users)
    items = rng.choice(np.arange(1, n_items + 1), size=lengths.sum(), p=p / p.sum()).astype(np.int32)
    data = SequenceData(np.concatenate([[0], np.cumsum(lengths)]), items, np.zeros(lengths.sum()), n_items,
                        [str(i) for i in range(n_users)], [str(i) for i in range(n_items)])
    split = leave_one_out(data)
    rows = eval_rows(split, "test", 10, append_mask=False)
    freq = {}
    for kind in ("uniform", "popularity"):
        neg = sample_negatives(split, rows, 50, kind, seed=11)
        assert neg.shape == (len(rows), 50) and neg.dtype == np.int32
        for k, u in enumerate(rows.users):
            assert len(set(neg[k].tolist())) == 50  # without replacement
            assert not set(neg[k].tolist()) & set(data.sequence(u).tolist())  # never seen, never the target
            assert rows.targets[k] not in neg[k]
        assert neg.min() >= 1 and neg.max() <= n_items
        np.testing.assert_array_equal(neg, sample_negatives(split, rows, 50, kind, seed=11))
        assert not np.array_equal(neg, sample_negatives(split, rows, 50, kind, seed=12))
        freq[kind] = np.bincount(neg.ravel(), minlength=n_items + 1)
        if kind == "popularity":
            assert (freq[kind][split.item_counts[: n_items + 1] == 0] == 0).all()
    # among items a user never saw, popularity sampling favours the popular ones; uniform does not
    eligible = np.array([[i not in set(data.sequence(u).tolist()) for i in range(n_items + 1)] for u in rows.users])
    rate = {k: f / np.maximum(eligible.sum(0), 1) for k, f in freq.items()}
    popular, rare = np.argsort(-split.item_counts[1 : n_items + 1])[:10] + 1, np.arange(150, 200)
    assert rate["popularity"][popular].mean() > 3 * rate["popularity"][rare].mean()
    assert 0.5 < rate["uniform"][popular].mean() / rate["uniform"][rare].mean() < 2.0

    with pytest.raises(ConfigError, match="lower ranking.num_negatives"):
        sample_negatives(split, rows, n_items, "uniform", seed=0)
