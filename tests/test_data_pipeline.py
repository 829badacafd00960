from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib

import numpy as np
import pytest

from recjax.config import CriteoDataConfig, DataConfig, SyntheticDataConfig
from recjax.data import pipeline
from recjax.data.criteo import write_criteo_tsv
from recjax.data.synthetic import EVAL_OFFSET
from recjax.errors import ConfigError, DataError

SYN = DataConfig(
    global_batch=64, eval_batches=3, num_threads=2, prefetch=2,
    synthetic=SyntheticDataConfig(num_sparse=4, vocab_sizes=[500], num_users=100),
)


@pytest.fixture(params=["grain", "plain"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "grain":
        pytest.importorskip("grain")
        assert pipeline.grain is not None
    else:
        monkeypatch.setattr(pipeline, "grain", None)
    return request.param


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(it, n))


def _cat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _assert_same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _union(cfg: DataConfig, split: str, procs: int, n: int) -> list[dict[str, np.ndarray]]:
    """Global batches reassembled from ``procs`` process-local iterators."""
    its = [pipeline.make_iterator(cfg, split, process_index=p, process_count=procs) for p in range(procs)]
    local = [_take(it, n) for it in its]
    assert all(len(x) == len(local[0]) for x in local)
    return [_cat([local[p][i] for p in range(procs)]) for i in range(len(local[0]))]


def _resume_check(cfg: DataConfig, split: str = "train", before: int = 3, after: int = 4, **kw) -> None:
    it = pipeline.make_iterator(cfg, split, **kw)
    _take(it, before)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, after)
    fresh = pipeline.make_iterator(cfg, split, **kw)
    fresh.set_state(state)
    _assert_same(_take(fresh, after), expected)
    used = pipeline.make_iterator(cfg, split, **kw)
    _take(used, before + 2)
    used.set_state(state)
    _assert_same(_take(used, after), expected)


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_batches_and_union_over_processes(backend: str):
    ref = _take(pipeline.make_iterator(SYN, "train"), 3)
    for i, b in enumerate(ref):
        assert b["sparse"].shape == (64, 5) and b["dense"].shape == (64, 4)
        np.testing.assert_array_equal(b["example_id"], np.arange(i * 64, (i + 1) * 64))
    for procs in (2, 4):
        _assert_same(_union(SYN, "train", procs, 3), ref)
        local = pipeline.make_iterator(SYN, "train", process_index=1, process_count=procs)
        assert next(local)["label"].shape == (64 // procs,)


def test_synthetic_resume(backend: str):
    _resume_check(SYN)
    _resume_check(SYN, process_index=1, process_count=2)
    _resume_check(SYN, "eval", before=1, after=2)


def test_state_portable_between_grain_and_plain(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("grain")
    it = pipeline.make_iterator(SYN, "train")
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 2)
    monkeypatch.setattr(pipeline, "grain", None)
    plain = pipeline.make_iterator(SYN, "train")
    plain.set_state(state)
    _assert_same(_take(plain, 2), expected)


def test_synthetic_eval_stable_and_disjoint(backend: str):
    runs = [list(pipeline.make_iterator(SYN, "eval")) for _ in range(2)]
    assert len(runs[0]) == SYN.eval_batches
    _assert_same(runs[0], runs[1])
    ids = _cat(runs[0])["example_id"]
    np.testing.assert_array_equal(ids, EVAL_OFFSET + np.arange(3 * 64))
    _assert_same(_union(SYN, "eval", 4, 10), runs[0])
    train_ids = _cat(_take(pipeline.make_iterator(SYN, "train"), 3))["example_id"]
    assert not set(ids.tolist()) & set(train_ids.tolist())


def test_config_errors():
    with pytest.raises(ConfigError, match="multiple of the process count 3"):
        pipeline.make_iterator(SYN, "train", process_count=3)
    with pytest.raises(ConfigError, match="process_index"):
        pipeline.make_iterator(SYN, "train", process_index=2, process_count=2)
    it = pipeline.make_iterator(SYN, "train")
    with pytest.raises(ConfigError, match="split"):
        it.set_state(pipeline.make_iterator(SYN, "eval").get_state())
    with pytest.raises(ConfigError, match="multiple of data.global_batch"):
        it.set_state({"source": "synthetic", "split": "train", "next_record": 65})
    crit = dataclasses.replace(SYN, source="criteo")
    with pytest.raises(ConfigError, match="train_files is empty"):
        pipeline.make_iterator(crit, "train")
    crit.criteo = CriteoDataConfig(train_files=["/nonexistent/x.tsv"])
    with pytest.raises(ConfigError, match="not found"):
        pipeline.make_iterator(crit, "train")


# ------------------------------------------------------------------------------ criteo


@pytest.fixture
def criteo_cfg(tmp_path: pathlib.Path) -> DataConfig:
    train = [str(tmp_path / f"train{i}.tsv") for i in range(3)]
    for i, (f, n) in enumerate(zip(train, [70, 45, 90], strict=True)):
        write_criteo_tsv(f, rows=n, seed=i, bad_rows=[2, 30] if i == 1 else [])
    evals = str(tmp_path / "eval.tsv")
    write_criteo_tsv(evals, rows=100, seed=9)
    return DataConfig(
        source="criteo", global_batch=16, eval_batches=100, skip_bad_rows=True,
        criteo=CriteoDataConfig(train_files=train, eval_files=[evals], vocab_sizes=[1000]),
    )


def test_criteo_union_exactly_once_and_epochs(criteo_cfg: DataConfig):
    n_valid = 70 + 43 + 90  # 203 valid rows per pass
    ref = _take(pipeline.make_iterator(criteo_cfg, "train"), 30)  # 480 records: 2 passes + 74
    ids = _cat(ref)["example_id"]
    np.testing.assert_array_equal(ids, np.arange(480))
    first, second = _cat(ref)["sparse"][:n_valid], _cat(ref)["sparse"][n_valid : 2 * n_valid]
    np.testing.assert_array_equal(first, second)  # the second pass repeats the first
    assert ref[0]["sparse"].shape == (16, 26) and ref[0]["dense"].shape == (16, 13)
    assert set(ref[0]) == {"dense", "sparse", "label", "example_id"}
    for procs in (2, 4):
        _assert_same(_union(criteo_cfg, "train", procs, 30), ref)
    it = pipeline.make_iterator(criteo_cfg, "train", process_index=3, process_count=4)
    _take(it, 30)
    assert it.bad_rows == 2 + 2 + 1 and it.get_state()["reader"]["epoch"] == 2


def test_criteo_resume(criteo_cfg: DataConfig):
    for before in (1, 4, 7, 13):  # mid-file, across file boundaries and into the next epoch
        _resume_check(criteo_cfg, before=before, after=3)
    _resume_check(criteo_cfg, before=2, after=2, process_index=1, process_count=2)
    _resume_check(criteo_cfg, "eval", before=2, after=5)


def test_criteo_eval_drops_partial_batch(criteo_cfg: DataConfig):
    batches = list(pipeline.make_iterator(criteo_cfg, "eval"))
    assert len(batches) == 100 // 16
    np.testing.assert_array_equal(_cat(batches)["example_id"], np.arange(96))
    _assert_same(list(pipeline.make_iterator(criteo_cfg, "eval")), batches)
    _assert_same(_union(criteo_cfg, "eval", 2, 100), batches)
    limited = dataclasses.replace(criteo_cfg, eval_batches=2)
    assert len(list(pipeline.make_iterator(limited, "eval"))) == 2


def test_criteo_strict_mode_raises_in_every_process(criteo_cfg: DataConfig):
    strict = dataclasses.replace(criteo_cfg, skip_bad_rows=False)
    bad_file = strict.criteo.train_files[1]
    for p in range(2):
        it = pipeline.make_iterator(strict, "train", process_index=p, process_count=2)
        with pytest.raises(DataError, match=rf"^{bad_file}:3: "):
            _take(it, 10)
