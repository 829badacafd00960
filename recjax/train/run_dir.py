"""The run directory: never destroy an earlier run, resume only what matches.

Layout (any ``etils.epath`` path: local, ``gs://``, ...)::

    run_dir/config.yaml, config.json    the resolved config (written after the resume check)
    run_dir/checkpoints/<step>/         orbax: state, loop (data position, hooks), config
    run_dir/best/checkpoints/<step>/    the best parameters (train.best_metric)
    run_dir/metrics.jsonl, tb/          logs (metrics.jsonl cut back to the resumed step)
    run_dir/report.json                 the final report

Rules (:func:`prepare`): a directory with checkpoints and ``train.resume=false`` is refused
unless ``overwrite`` (which deletes the old run's checkpoints, logs and report first, and
starts over even with ``train.resume=true``); a
resume whose config differs from the saved one in keys outside :data:`MAY_CHANGE` lists the
keys and is refused unless ``accept_changes``. :func:`truncate_metrics` cuts the log back to
what the resumed checkpoint accounts for; rerunning a command whose run finished
(:func:`finished_report`) changes nothing.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from recjax.config import Config
from recjax.errors import ConfigError, RunDirError

# keys a resumed run may change: how long, how often, where and on what it runs
MAY_CHANGE = (
    "name", "run_dir", "train.steps", "train.epochs", "train.log_every", "train.eval_every",
    "train.eval_every_epochs", "train.checkpoint_every", "train.checkpoint_every_epochs",
    "train.keep_checkpoints", "train.async_checkpoint", "train.tensorboard", "train.resume",
    "train.patience", "data.num_threads", "data.prefetch", "data.eval_batches", "ranking.batch",
    "mesh.",
)
# object stores a run directory may be on: orbax writes arrays through TensorStore's gcs driver
# for gs://, and refuses other URLs ("Checkpoint path should be absolute") when it builds specs
REMOTE_PREFIXES = ("gs://",)
RUN_FILES = ("checkpoints", "best", "metrics.jsonl", "tb", "report.json", "config.yaml", "config.json")


def run_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``; a local path becomes absolute (orbax needs it; ``~`` is
    expanded), any other (``gs://b/run``) is kept as it is (``pathlib``'s ``resolve`` would
    turn it into a local ``gs:/b/run``)."""
    text = os.fspath(path)
    if "://" not in text:
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    if not text.startswith(REMOTE_PREFIXES):
        raise ConfigError(
            f"run_dir={text!r}: checkpoints can be written to a local path or a gs:// bucket "
            "(orbax builds TensorStore specs for those only; s3:// and others fail there); "
            "use one of those")
    return epath.Path(text)


def checkpoint_steps(directory: epath.Path) -> list[int]:
    """Finished checkpoint steps in ``directory`` (orbax's step folders; temporaries skipped)."""
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def changed_keys(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every key that differs and may not change."""
    a, b = _flat(saved), _flat(new)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key, "<absent>") != b.get(key, "<absent>") and not any(
            key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE
        ):
            out.append((key, a.get(key, "<absent>"), b.get(key, "<absent>")))
    return out


def saved_config(run_dir: epath.Path) -> dict[str, Any] | None:
    path = run_dir / "config.json"
    return json.loads(path.read_text()) if path.exists() else None


def prepare(cfg: Config, run_dir: epath.Path, *, overwrite: bool, accept_changes: bool,
            is_writer: bool) -> int | None:
    """Check ``run_dir`` before anything is written; returns the step to resume from (None:
    start fresh). Only ``is_writer`` (process 0) deletes on ``overwrite``."""
    steps = checkpoint_steps(run_dir / "checkpoints")
    if not steps:
        return None
    if not cfg.train.resume or overwrite:  # --overwrite: start over whatever train.resume says
        if not overwrite:
            raise RunDirError(
                f"{run_dir} holds checkpoints of an earlier run (steps {steps[0]}..{steps[-1]}) and "
                "train.resume=false: pass --overwrite to delete that run and start over, or choose "
                "another run_dir (nothing was changed)")
        if is_writer:
            for name in RUN_FILES:
                path = run_dir / name
                if path.is_dir():
                    path.rmtree()
                elif path.exists():
                    path.unlink()
        return None
    saved = saved_config(run_dir)
    if saved is not None:
        changes = changed_keys(saved, cfg.to_dict())
        if changes and not accept_changes:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:12])
            more = f" (+{len(changes) - 12} more)" if len(changes) > 12 else ""
            raise RunDirError(
                f"resuming {run_dir} (step {steps[-1]}) with a config that changes {listed}{more}. "
                "Resume with the saved config (run_dir/config.yaml), pass --accept-config-changes "
                "to continue with these values, or use another run_dir (nothing was changed)")
    return steps[-1]


def truncate_metrics(run_dir: epath.Path, step: int, *, evals_through: int | None = None,
                     drop_splits: tuple[str, ...] = ()) -> None:
    """Cut ``metrics.jsonl`` back to what the checkpoint at ``step`` accounts for, so that a
    resumed run logs no step twice: ``train`` records up to ``step``, evaluation records up to
    ``evals_through`` (default ``step``; the trainer passes ``step - 1`` when the evaluation of
    ``step`` is still pending; a fresh start, ``step`` -1, keeps nothing), and none of
    ``drop_splits`` (the final evaluators', which run again at the end). A line cut short by a
    crash is dropped."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    if evals_through is None:
        evals_through = step
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            s = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        split = record.get("split")
        if split not in drop_splits and s <= (step if split == "train" else evals_through):
            kept.append(line)
    tmp = run_dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def finished_report(run_dir: epath.Path, step: int | None) -> dict[str, Any] | None:
    """The report of a run that already finished at ``step`` (``report.json`` says so), else
    None (no report, an older one, or a final evaluation that did not complete)."""
    path = run_dir / "report.json"
    if step is None or not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
    except ValueError:
        return None
    return report if isinstance(report, dict) and report.get("steps") == step else None


def write_json(path: epath.Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON through a temporary file and a rename (never half a file)."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)
