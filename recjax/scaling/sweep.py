"""Sweep specs: a base config, named model-size presets and axes, expanded into runs with ids.

A spec is YAML::

    name: dlrm_cpu                               # required; names out_dir and the table rows
    base: ../experiments/dlrm_synthetic.yaml     # config file, relative to the spec
    out_dir: runs/sweeps/dlrm_cpu                # default runs/sweeps/<name> (relative to cwd)
    overrides: {train.eval_every: 0}             # dotted keys applied to every run
    presets:                                     # named model sizes: dotted keys each
      s: {model.top_mlp: [64, 32]}
      m: {model.top_mlp: [256, 128]}
      l: {config: ../models/big.yaml, train.compute_dtype: bfloat16}  # its own base config
    grid: {preset: [s, m], examples: [1.0e5, 3.0e5]}   # cartesian product
    runs: [{preset: m, examples: 1.0e6}]               # explicit runs, added after the grid
    launch: {slurm: {...}, k8s: {...}}           # options of emitted cluster jobs (emit.py)

Axis keys are dotted config keys, plus three special ones:

- ``preset``: apply that preset's keys; a preset's ``config`` key (relative to the spec)
  replaces ``base`` for its runs, so existing model files can serve as presets, and its
  ``arch`` key names the architecture in the results table's ``model`` column (default: the
  model's name), so variants of one model (e.g. Kunlun and its baseline) fit separately;
- ``examples``: data budget; ``train.steps = round(examples / data.global_batch)``;
- ``flops``: training-compute budget ``C`` (IsoFLOP design);
  ``train.steps = round(C / (3 * fwd_flops_per_example * data.global_batch))`` with the
  task's analytic FLOPs (an example of the seqrec task is one training row, a sequence).

A budget sets ``train.steps`` and turns epoch-based training off (``train.epochs = 0``; the
sequential configs train for epochs by default). Without a budget an epoch-based run trains
its ``train.epochs`` (an axis or preset may set them) and may stop early
(``train.patience``); its results row then records the steps actually run.

Per run the layers are: base -> ``overrides`` -> preset -> axis values -> command-line
overrides. A key set both by a preset and by an axis, or by the command line and a
preset/axis, is an error (the run would not be what the spec says).

The run id is ``<preset or model>-<hash>``, the hash being :func:`config_hash` of the resolved
config: only the values that differ from the schema's defaults, without the keys that do not
change the result (``NO_HASH``). The same run keeps its id across sweeps, reorderings,
logging changes and schema additions.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import pathlib
from typing import Any

import yaml

from recjax.config import Config, load_config, model_entry
from recjax.errors import ConfigError

SPECIAL = ("preset", "examples", "flops")
SPEC_KEYS = ("name", "base", "out_dir", "overrides", "presets", "grid", "runs", "launch")
# resolved-config keys that do not change what a run computes
NO_HASH = (
    "name", "run_dir", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpoint", "train.tensorboard", "train.resume",
    "data.num_threads", "data.prefetch",
)


class SpecError(ConfigError):
    """A sweep spec problem; the message names the spec, the key and what to do."""


@dataclasses.dataclass(frozen=True)
class Run:
    run_id: str
    preset: str | None
    axes: dict[str, Any]  # the values this run's grid point / list entry set
    config: Config  # resolved; run_dir = <out_dir>/runs/<run_id>
    config_hash: str
    flops_budget: float | None
    arch: str | None = None  # the results' `model` column when a preset names it


@dataclasses.dataclass
class Sweep:
    name: str
    path: pathlib.Path
    base: pathlib.Path | None
    out_dir: pathlib.Path
    overrides: dict[str, Any]
    presets: dict[str, dict[str, Any]]
    points: list[dict[str, Any]]  # grid points then explicit runs, in order
    launch: dict[str, Any]

    @property
    def table(self) -> pathlib.Path:
        return self.out_dir / "results.csv"


def load_sweep(path: str | pathlib.Path, out_dir: str | None = None) -> Sweep:
    """Read and check a spec; ``out_dir`` replaces the spec's."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SpecError(f"sweep spec not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a sweep spec must be a mapping")
    for key in raw:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(SPEC_KEYS)}"
            raise SpecError(f"{path}: unknown sweep key '{key}': {hint}")
    if not raw.get("name"):
        raise SpecError(f"{path}: 'name' is required")
    presets = raw.get("presets") or {}
    for name, keys in presets.items():
        if not isinstance(keys, dict):
            raise SpecError(f"{path}: preset '{name}' must map dotted config keys to values")
    points = _grid_points(raw.get("grid") or {}, path) + list(raw.get("runs") or [])
    if not points:
        raise SpecError(f"{path}: no runs; give a 'grid' of axes or a 'runs' list")
    for p in points:
        if not isinstance(p, dict):
            raise SpecError(f"{path}: every run must be a mapping of axis keys, got {p!r}")
        if "preset" in p and p["preset"] not in presets:
            raise SpecError(f"{path}: unknown preset '{p['preset']}'; defined: {sorted(presets)}")
        if "examples" in p and "flops" in p:
            raise SpecError(f"{path}: a run sets both 'examples' and 'flops'; give one budget")
        for key in ("train.steps", "train.epochs"):
            if ("examples" in p or "flops" in p) and key in p:
                raise SpecError(f"{path}: a run sets '{key}' and a budget; give one")
    base = raw.get("base")
    return Sweep(
        name=str(raw["name"]),
        path=path,
        base=(path.parent / base) if base else None,
        out_dir=pathlib.Path(out_dir or raw.get("out_dir") or f"runs/sweeps/{raw['name']}"),
        overrides=dict(raw.get("overrides") or {}),
        presets=presets,
        points=points,
        launch=dict(raw.get("launch") or {}),
    )


def _grid_points(grid: dict[str, Any], path: pathlib.Path) -> list[dict[str, Any]]:
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{path}: grid axis '{key}' must be a non-empty list, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def _as_overrides(keys: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in keys.items()]


def _changed(d: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that differ from ``default`` (recursively)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and isinstance(default.get(k), dict):
            sub = _changed(v, default[k])
            if sub:
                out[k] = sub
        elif k not in default or default[k] != v:
            out[k] = v
    return out


def default_config_dict(model: str) -> dict[str, Any]:
    """The schema's defaults with ``model``'s own defaults, unvalidated (the defaults of a
    sequential model are no valid config by themselves: ``data.source`` is a CTR one)."""
    d = Config().to_dict()
    d["model"] = dataclasses.asdict(model_entry(model).config_cls())
    return d


def config_hash(cfg: Config) -> str:
    """SHA-1 (10 hex digits) of the resolved values that differ from the schema's defaults,
    without ``NO_HASH``; a new config key added with its default leaves every id unchanged."""
    d = _changed(cfg.to_dict(), default_config_dict(cfg.model.name))
    for key in NO_HASH:
        node = d
        *parents, last = key.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def _steps_for(cfg: Config, point: dict[str, Any]) -> int | None:
    batch = cfg.data.global_batch
    if "examples" in point:
        return max(1, round(float(point["examples"]) / batch))
    if "flops" in point:
        from recjax.tasks import get_task

        fwd = get_task(cfg).forward_flops_per_example()
        return max(1, round(float(point["flops"]) / (3.0 * fwd * batch)))
    return None


def expand(sweep: Sweep, cli_overrides: list[str] | None = None) -> list[Run]:
    """Every run of the sweep, in spec order, duplicates (same resolved config) dropped."""
    cli = [o.split("=", 1)[0] for o in cli_overrides or []]
    runs: dict[str, Run] = {}
    for point in sweep.points:
        preset = point.get("preset")
        preset_keys = dict(sweep.presets.get(preset, {})) if preset else {}
        base = sweep.base
        if "config" in preset_keys:
            base = sweep.path.parent / str(preset_keys.pop("config"))
        arch = preset_keys.pop("arch", None)
        axis_keys = {k: v for k, v in point.items() if k not in SPECIAL}
        clash = set(preset_keys) & set(axis_keys)
        if clash:
            raise SpecError(f"{sweep.path}: preset '{preset}' and an axis both set {sorted(clash)}")
        swept = set(preset_keys) | set(axis_keys)
        if {"examples", "flops"} & set(point):
            swept |= {"train.steps", "train.epochs"}
        clash = set(cli) & swept
        if clash:
            raise SpecError(f"command-line override(s) {sorted(clash)} would change swept keys")
        layered = {**sweep.overrides, **preset_keys, **axis_keys}
        layered = {k: v for k, v in layered.items() if k not in cli}  # the command line wins
        try:
            cfg = load_config(base, _as_overrides(layered) + list(cli_overrides or []))
        except ConfigError as e:
            raise SpecError(f"{sweep.path}: run {point}: {e}") from None
        steps = _steps_for(cfg, point)
        if steps is not None:
            cfg.train.steps, cfg.train.epochs = steps, 0
        digest = config_hash(cfg)
        run_id = f"{preset or cfg.model.name}-{digest}"
        cfg.name = f"{sweep.name}/{run_id}"
        cfg.run_dir = str(sweep.out_dir / "runs" / run_id)
        budget = float(point["flops"]) if "flops" in point else None
        runs.setdefault(run_id, Run(run_id, preset, dict(point), cfg, digest, budget, arch))
    return list(runs.values())
