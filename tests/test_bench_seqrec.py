"""`recjax bench seqrec`: memory and step time vs max length of the four attention types."""

from __future__ import annotations

import json

import pytest

from recjax.bench.seqrec import _run_child, loglog_slope, summarize
from recjax.cli import main
from tests.conftest import run_cli

# A tiny backbone where the S x S scores outweigh the parameters and the item softmax at S = 512
# (dropout off: it is the same code path and compiles slower)
TINY = ["--batch", "2", "--num-items", "50", "--hidden", "16", "--layers", "1", "--heads", "2",
        "--inner", "64", "--iters", "1", "--warmup", "1"]
TYPES = ("sasrec", "bert4rec", "linrec", "cotten4rec")


def test_bench_seqrec_memory_scales_with_attention_type(tmp_path):
    out = tmp_path / "seqrec.json"
    stdout = run_cli(["bench", "seqrec", *TINY, "--lengths", "512", "32", "--out", str(out), "--",
                      "model.dropout=0", "model.attn_dropout=0"]).stdout
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "seqrec" and doc["device_kind"] == "cpu" and doc["versions"]["jax"]
    assert doc["complete"] is True
    assert "bench seqrec" in doc["command"] and "--lengths 512 32" in doc["command"]
    assert "last valid position" in doc["loss"]
    cfg = doc["config"]
    assert cfg["lengths"] == [32, 512] and cfg["batch"] == 2 and cfg["hidden"] == 16
    assert cfg["isolate"] is False and cfg["compute_dtype"] == "float32"
    assert cfg["model"]["dropout"] == cfg["model"]["attn_dropout"] == 0.0
    assert {t: (v["attention"], v["causal"]) for t, v in cfg["types"].items()} == {
        "sasrec": ("softmax", True), "bert4rec": ("softmax", False),
        "linrec": ("elu_l2", True), "cotten4rec": ("cosine", False)}

    rows = {(r["type"], r["max_len"]): r for r in doc["rows"]}
    assert sorted(rows) == sorted((t, s) for t in TYPES for s in (32, 512))
    for r in rows.values():
        assert "error" not in r and "skipped" not in r, r
        assert r["median_step_s"] > 0 and r["batch"] == 2 and r["compile_s"] > 0
        assert r["sequences_per_s"] == pytest.approx(2 / r["median_step_s"])
        assert r["tokens_per_s"] == pytest.approx(2 * r["max_len"] / r["median_step_s"])
        assert "allocator_peak_bytes" not in r  # CPU has no allocator peak
    assert rows[("linrec", 32)]["attention_impl"] == "xla"
    assert rows[("sasrec", 32)]["attention_impl"].startswith("einsum")
    # same parameter count for one type at every length, up to the position table [S, d]
    assert rows[("sasrec", 512)]["params"] - rows[("sasrec", 32)]["params"] == (512 - 32) * 16

    mem = {k: r["compiled_memory_bytes"] for k, r in rows.items()}
    for t in TYPES:
        assert mem[(t, 512)] > mem[(t, 32)]
    for soft in ("sasrec", "bert4rec"):
        for lin in ("linrec", "cotten4rec"):
            assert mem[(soft, 512)] > 2.5 * mem[(lin, 512)], (soft, lin, mem)

    summary = doc["summary"]
    ratios = summary["ratio_softmax_over_linear"]
    assert ratios["sasrec/linrec"]["max_len"] == 512
    assert ratios["sasrec/linrec"]["compiled_memory"] == pytest.approx(
        mem[("sasrec", 512)] / mem[("linrec", 512)])
    assert ratios["bert4rec/cotten4rec"]["compiled_memory"] > 2.5
    slopes = {t: e["compiled_memory"] for t, e in summary["slope_vs_max_len"].items()}
    assert slopes["sasrec"] > 1.3 and slopes["bert4rec"] > 1.3, slopes
    assert 0.5 < slopes["linrec"] < 1.2 and 0.5 < slopes["cotten4rec"] < 1.2, slopes
    assert "sasrec/linrec at max_len 512" in stdout and "log-log slope" in stdout
    assert stdout.count(" softmax ") >= 4  # the progress table: one line per softmax row


def test_isolated_rows_come_back_from_the_child_process_even_when_it_dies(monkeypatch):
    spec = {"type": "linrec", "max_len": 16, "batch": 2, "num_items": 50, "hidden": 16,
            "layers": 1, "heads": 2, "inner": 64, "overrides": ["model.dropout=2.0"], "iters": 1,
            "warmup": 1, "seed": 0, "memory_cap_bytes": 2**30}
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    (row,) = _run_child([spec])  # the row fails inside the child and says why
    assert row["type"] == "linrec" and row["max_len"] == 16
    assert "model.dropout must be in [0, 1)" in row["error"]

    monkeypatch.setenv("JAX_PLATFORMS", "no_such_backend")  # the child dies before any row
    rows = list(_run_child([spec, {**spec, "type": "sasrec", "max_len": 32}]))
    assert [(r["type"], r["max_len"]) for r in rows] == [("linrec", 16), ("sasrec", 32)]
    assert all(r["error"].startswith("row process exited with status 1") for r in rows)
    assert "no_such_backend" in rows[0]["error"]


def test_rows_measured_before_a_run_is_stopped_are_on_disk(tmp_path, monkeypatch):
    """A time limit that kills the sweep mid-way keeps every row measured so far."""
    import recjax.bench.seqrec as bench

    class Stopped(Exception):
        pass

    measured = []

    def fake_row(spec, cache=None):
        if measured:
            raise Stopped  # the second row never finishes
        measured.append({"type": spec["type"], "attention": "softmax", "causal": True,
                         "max_len": spec["max_len"], "batch": spec["batch"],
                         "compiled_memory_bytes": 1234, "median_step_s": 0.5, "sequences_per_s": 4.0})
        return measured[-1]

    monkeypatch.setattr(bench, "measure_row", fake_row)
    out = tmp_path / "partial.json"
    with pytest.raises(Stopped):
        main(["bench", "seqrec", *TINY, "--types", "sasrec", "--lengths", "8", "16", "--isolate", "no",
              "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and doc["rows"] == measured
    assert [r["max_len"] for r in doc["rows"]] == [8] and not list(tmp_path.glob("*.tmp"))


def test_bench_seqrec_rejects_overrides_of_per_row_keys(capsys):
    assert main(["bench", "seqrec", "--quick", "model.attention=softmax", "model.hidden=8"]) == 2
    err = capsys.readouterr().err
    assert "'model.attention=softmax' sets a key that each row sets" in err and "model.hidden" in err


def test_summary_ratios_and_slopes():
    def row(t, s, mem, sec=None, peak=None, own=True):
        r = {"type": t, "max_len": s, "compiled_memory_bytes": mem}
        if sec is not None:
            r["median_step_s"] = sec
        if peak is not None:
            r.update(allocator_peak_bytes=peak, allocator_peak_own=own)
        return r

    rows = [row("sasrec", s, 10 * s * s, 1e-3 * s * s) for s in (100, 200, 400)]
    rows.append(row("sasrec", 800, 10 * 800 * 800, sec=None))  # compiled, not run (memory cap)
    rows += [row("linrec", s, 7 * s, 1e-3 * s) for s in (100, 200)]
    rows.append({"type": "linrec", "max_len": 400, "error": "RuntimeError: out of memory"})
    summary = summarize(rows, fit_last=2)
    ratio = summary["ratio_softmax_over_linear"]["sasrec/linrec"]
    assert ratio == pytest.approx({"max_len": 200, "compiled_memory": 10 * 200 / 7, "step_time": 200})
    slopes = summary["slope_vs_max_len"]
    assert slopes["sasrec"].pop("max_lens") == [400, 800]  # 800 has no step time
    assert slopes["sasrec"] == pytest.approx({"compiled_memory": 2.0})
    assert slopes["linrec"].pop("max_lens") == [100, 200]
    assert slopes["linrec"] == pytest.approx({"compiled_memory": 1.0, "step_time": 1.0})
    assert loglog_slope([1, 10, 100], [3, 30, 300]) == pytest.approx(1.0)

    # allocator peaks count only where they are the row's own (the process peak rose in it)
    rows = [row("bert4rec", s, 5 * s * s, 1.0, peak=2 * s * s) for s in (10, 20)]
    rows += [row("cotten4rec", 10, 50, 1.0, peak=30), row("cotten4rec", 20, 100, 1.0, peak=60, own=False)]
    summary = summarize(rows, fit_last=3)
    assert summary["slope_vs_max_len"]["bert4rec"]["allocator_peak"] == pytest.approx(2.0)
    assert "allocator_peak" not in summary["slope_vs_max_len"]["cotten4rec"]
    assert "allocator_peak" not in summary["ratio_softmax_over_linear"]["bert4rec/cotten4rec"]
    assert summarize(rows[:2] + rows[2:3], 3)["ratio_softmax_over_linear"]["bert4rec/cotten4rec"][
        "allocator_peak"] == pytest.approx(200 / 30)


def test_bench_types_match_the_model_presets():
    """The benchmark's four settings are those of configs/models/<type>.yaml."""
    from recjax.bench.seqrec import TYPES as BENCH_TYPES
    from recjax.config import CONFIG_DIR, load_config

    for name, (attention, causal, objective) in BENCH_TYPES.items():
        m = load_config(CONFIG_DIR / "models" / f"{name}.yaml").model
        assert (m.attention, m.causal, m.objective) == (attention, causal, objective), name


def test_gpu_preset_sets_gpu_sizes_and_flags_still_win(tmp_path):
    """`--gpu` is the one command for a lent GPU; here compile-only (--memory-cap-gb 0) on CPU."""
    from recjax.bench.seqrec import GPU

    out = tmp_path / "gpu.json"
    assert main(["bench", "seqrec", "--gpu", "--types", "linrec", "--lengths", "32", "--memory-cap-gb", "0",
                 "--isolate", "no", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["lengths"] == [32]  # given flag wins
    for key in ("batch", "num_items", "hidden", "layers", "inner", "iters", "warmup"):
        assert doc["config"][key] == GPU[key], key
    (row,) = doc["rows"]
    assert row["compiled_memory_bytes"] > 0 and "median_step_s" not in row  # over the cap: compiled only
    assert main(["bench", "seqrec", "--gpu", "--quick"]) == 2
