"""MetricsLogger: JSONL records, TensorBoard scalars read back, disabled no-op, console line."""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from recjax.train.logger import MetricsLogger, format_line


def read_tb_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    """Parse TFRecord event files (u64 len, u32 crc, data, u32 crc) with tensorboardX's proto."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    assert files and all(f.stat().st_size > 0 for f in files)
    for f in files:
        buf = f.read_bytes()
        i = 0
        while i < len(buf):
            (n,) = struct.unpack("<Q", buf[i : i + 8])
            ev = event_pb2.Event.FromString(buf[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_jsonl_and_tensorboard(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True)
    log.log(1, {"loss": 0.5, "auc": np.float32(0.75), "n": np.int64(3)})
    log.log(2, {"loss": float("nan"), "note": "hello", "inf": math.inf}, split="eval")
    # records are on disk before close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    log.close()
    a, b = (json.loads(line) for line in lines)
    assert a["step"] == 1 and a["split"] == "train" and a["loss"] == 0.5 and a["n"] == 3
    assert abs(a["auc"] - 0.75) < 1e-7 and isinstance(a["time"], float)
    assert b == {**b, "step": 2, "split": "eval", "loss": None, "note": "hello", "inf": None}

    scalars = read_tb_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 0.5)]
    assert scalars["train/auc"] == [(1, 0.75)]
    assert scalars["train/n"] == [(1, 3.0)]
    assert not any(tag.startswith("eval/") for tag in scalars)  # nan/inf/str skipped


def test_appends_across_instances_and_no_tb(tmp_path):
    for step in (1, 2):
        with MetricsLogger(tmp_path, tensorboard=False) as log:
            log.log(step, {"loss": 1.0 / step})
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and not (tmp_path / "tb").exists()


def test_disabled_is_noop(tmp_path):
    run = tmp_path / "run"
    log = MetricsLogger(run, enabled=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not run.exists()


def test_format_line():
    m = {"loss": 0.48213, "examples_per_s": 25_100.0, "tflops_per_device": 0.1234}
    assert (
        format_line(200, 2000, m)
        == "step  200/2000 | loss 0.4821 | 25.1k ex/s | 0.12 TFLOP/s/dev | MFU n/a"
    )
    line = format_line(
        5, 10, {"loss": 1.0, "grad_norm": 2.5, "mfu": 0.412}, keys=("loss", "grad_norm", "x")
    )
    assert line == "step  5/10 | loss 1.0000 | grad_norm 2.5000 | MFU 41.2%"
