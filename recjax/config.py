"""Typed run configuration: YAML layering, ``dotted.key=value`` overrides, strict validation.

Resolution order (later wins):

1. ``configs/base.yaml`` (always the root of the chain),
2. the files named by ``base:`` keys, outermost first (a ``base:`` path is relative to
   the file that names it, and chains),
3. the ``--config`` file itself,
4. command-line overrides ``section.key=value`` (values parsed as YAML scalars/lists).

Every key is checked against the dataclass schema below: an unknown key raises a
``ConfigError`` naming the closest valid key, a wrong type names the key, the
expected type and the given value. The ``model`` section is validated against the
dataclass registered for ``model.name`` and the whole config against the model's task
(``recjax.registry``: looked up by name, so this module imports no model or task code).
Cross-key checks that need no devices (positive sizes, mesh rule axes, eval cadence) run
here too, so a bad value fails before anything is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from recjax import registry
from recjax.errors import ConfigError

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"




# ----------------------------------------------------------------------------- schema


@dataclass
class MeshConfig:
    """Device mesh degrees over the fixed axes; -1 means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    # logical axis name -> mesh axes it is sharded over (empty list = replicated)
    rules: dict[str, list[str]] = field(
        default_factory=lambda: {
            "batch": ["data", "fsdp", "expert"],
            "table_rows": ["data", "fsdp", "expert"],
            "table_cols": ["data", "fsdp", "expert"],
            "embed": ["fsdp"],
            "mlp": ["tensor"],
            "heads": ["tensor"],
            "experts": ["expert"],
            "tokens": [],
            "seq": [],
        }
    )


@dataclass
class SyntheticDataConfig:
    """Synthetic CTR stream with a hidden teacher (see ``recjax.data.synthetic``)."""

    num_sparse: int = 8
    vocab_sizes: list[int] = field(default_factory=lambda: [10_000])  # one per feature, or one for all
    # one for every column, or one per column (the user column last when user_id)
    zipf_exponent: float | list[float] = 1.05
    num_dense: int = 4
    user_id: bool = True
    num_users: int = 2_000
    teacher_rank: int = 8
    teacher_hidden: int = 16
    # teacher logit terms: linear, fm (pairwise), dense_mlp, and optionally deep (a tanh MLP
    # over all features' latent vectors and the dense features: interactions of every order)
    # and capacity (a wide tanh MLP over the same inputs whose output weights fall as a power
    # law, so a model's error on it falls with its width)
    # and sequence (needs events > 0: recency- and type-weighted matches between the target item,
    # column C1, and the items of the example's event sequence)
    teacher_terms: list[Literal["linear", "fm", "dense_mlp", "deep", "capacity", "sequence"]] = field(
        default_factory=lambda: ["linear", "fm", "dense_mlp"]
    )
    teacher_logit_scale: float = 1.0  # scales the teacher's interaction terms
    capacity_width: int = 1024  # hidden units of the capacity term
    capacity_spectrum: float = 1.0  # gamma: output weight of hidden unit k (1-based) ~ k^-gamma
    capacity_share: float | None = None  # its share of the logit variance; None = an equal share
    # event sequences (recjax.data.synthetic): up to `events` typed events per example with
    # item ids (column C1's vocabulary and law), ages in hours; 0 = none
    events: int = 0
    event_min: int = 1  # fewest events of an example
    event_types: int = 3  # e.g. impression, click, conversion; type k has probability ~ 0.3^k
    event_match_prob: float = 0.2  # chance an event's item is the example's target item
    event_gap_hours: float = 12.0  # mean gap between events (exponential)
    sequence_share: float | None = None  # the sequence term's share of the logit variance
    # multi-task labels (recjax.data.synthetic): T labels per example (``label [B, T]``), each
    # with its own base rate and a task-specific teacher part; 0 = one label ``[B]``
    tasks: int = 0
    task_ctr: list[float] = field(default_factory=lambda: [0.25])  # base rate: one for all, or one per task
    task_shared_share: float = 0.5  # share of each task's logit variance from the shared teacher
    base_ctr: float = 0.25
    seed: int = 1234
    # raw-id mode: every sparse id v of column c is sent as the 63-bit id mix64(v, c) (uint32
    # hi/lo halves, ``sparse`` uint32 [B, F, 2]); models need embedding.dynamic tables
    raw_ids: bool = False


@dataclass
class CriteoDataConfig:
    """Criteo-format TSV files: label, 13 integer and 26 hex categorical columns."""

    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    vocab_sizes: list[int] = field(default_factory=lambda: [100_000])  # 26, or one for all


@dataclass
class SyntheticSequenceConfig:
    """Latent-interest Markov process over items (``recjax.data.seq_synthetic``): each user
    follows a chain of interests, and each interest draws items from its own Zipf catalogue."""

    num_users: int = 1_000
    num_items: int = 500
    num_interests: int = 10
    min_length: int = 10  # interactions per user, uniform in [min_length, max_length]
    max_length: int = 60
    switch_prob: float = 0.2  # chance the current interest changes before each interaction
    zipf_exponent: float = 1.1  # item popularity within an interest
    follow_prob: float = 0.5  # chance (interest kept) the next item is the last one's successor in the interest's ranking
    seed: int = 1234


@dataclass
class SequenceDataConfig:
    """Per-user item sequences for the sequential recommenders (``data.source: sequences``)."""

    path: str = ""  # a directory written by `recjax data prepare`; "" = the synthetic generator
    max_len: int = 50  # model input length; longer histories keep their most recent items
    train_rows: Literal["windows", "prefixes"] = "windows"  # prefixes = RecBole's augmentation
    window_stride: int = 0  # windows: step between window ends; 0 = max_len (no overlap)
    mask_prob: float = 0.2  # cloze: share of positions selected for prediction
    mask_replace: Literal["bert", "mask"] = "bert"  # cloze: 80% [MASK]/10% random/10% kept, or all [MASK]
    mask_last_prob: float = 0.0  # cloze: share of batches that mask only each row's last item (RecBole ft_ratio)
    eval_drop_first: bool = False  # cloze eval input shifted left by one as RecBole's BERT4Rec does
    synthetic: SyntheticSequenceConfig = field(default_factory=SyntheticSequenceConfig)


@dataclass
class DataConfig:
    source: Literal["synthetic", "criteo", "sequences"] = "synthetic"
    global_batch: int = 512
    eval_batches: int = 16  # global batches per evaluation
    num_threads: int = 2  # grain read threads
    prefetch: int = 4  # batches prefetched per process
    skip_bad_rows: bool = False  # count and skip malformed rows instead of failing
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    criteo: CriteoDataConfig = field(default_factory=CriteoDataConfig)
    sequences: SequenceDataConfig = field(default_factory=SequenceDataConfig)


@dataclass
class TableConfig:
    """One embedding table; several features may share it."""

    name: str = ""
    vocab_size: int = 0
    dim: int = 0  # 0 -> embedding.dim
    features: list[str] = field(default_factory=list)
    placement: Literal["default", "auto", "replicated", "row_sharded", "column_sharded", "table_wise"] = "default"


@dataclass
class DynamicTableConfig:
    """Collision-free hash tables for raw 64-bit ids (``recjax.layers.dynamic_table``); with
    ``capacity > 0`` every embedding table is one, and the batch's ``sparse`` ids are raw."""

    capacity: int = 0  # resident ids per table (0: static tables indexed by vocabulary ids)
    partitions: int = 1  # hash partitions per table, by id; a multiple of the table's row shards
    policy: Literal["lfu", "lru"] = "lfu"  # eviction order when full
    threshold: int = 1  # occurrences before an id's row is looked up and trained
    max_load: float = 0.75  # slots = capacity / max_load
    seed: int = 0  # fresh rows are drawn from (id, seed) alone


@dataclass
class EmbeddingConfig:
    dim: int = 16
    combiner: Literal["sum", "mean"] = "sum"  # over the ids of one multi-hot feature
    # auto: replicated up to replicate_max_bytes (fp32 rows), else row_sharded (column_sharded
    # where the rows do not divide over the shards and the dim does), within memory_budget_bytes
    placement: Literal["auto", "replicated", "row_sharded", "column_sharded", "table_wise"] = "row_sharded"
    replicate_max_bytes: int = 16 * 2**20
    # auto: tables above replicate_max_bytes and up to this go whole to one device, stacked per
    # dim (0: auto never places table-wise)
    table_wise_max_bytes: int = 0
    # table bytes per device the plan may use (0: no limit); over it, auto-placed replicated
    # tables are sharded, largest first, and a plan that still does not fit is refused
    memory_budget_bytes: int = 0
    oov: Literal["hash", "drop"] = "hash"  # out-of-vocabulary ids: modulo-hash, or zero vector
    # table rows are rounded up to a multiple of this, so a row-sharded table divides over its
    # shards (the trainer refuses one that does not); padding rows are never looked up
    pad_rows_to: int = 1
    # lookups into row-sharded tables: a GSPMD gather (all-gather of the ids, all-reduce of the
    # rows), or an explicit all-to-all when the batch is split over the table's row axes
    exchange: Literal["gspmd", "all_to_all"] = "gspmd"
    # all-to-all slots per destination: 0 = every local id (exact); f > 0 = ceil(f * local ids /
    # shards), distinct ids past that return zeros and are counted (exchange_overflow)
    exchange_capacity: float = 0.0
    # explicit tables; empty = one table per feature, sized by the data's vocabulary
    tables: list[TableConfig] = field(default_factory=list)
    dynamic: DynamicTableConfig = field(default_factory=DynamicTableConfig)


@dataclass
class DenseOptimConfig:
    name: Literal["adamw", "adam", "sgd", "adagrad"] = "adamw"
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class EmbeddingOptimConfig:
    # sparse rules: sgd, adagrad, rowwise_adagrad, lazy_adam; dense: sgd, adagrad, rowwise_adagrad, adam
    name: Literal["rowwise_adagrad", "adagrad", "sgd", "adam", "lazy_adam"] = "rowwise_adagrad"
    lr: float = 0.05
    eps: float = 1e-8
    initial_accumulator: float = 0.0
    b1: float = 0.9  # adam / lazy_adam
    b2: float = 0.999
    # sparse: lookup tables update only the rows a batch touched, on the shard that owns them
    # (recjax.train.sparse_update); dense: autodiff's [rows, d] table gradient and optax
    update: Literal["sparse", "dense"] = "sparse"


@dataclass
class OptimConfig:
    dense: DenseOptimConfig = field(default_factory=DenseOptimConfig)
    embedding: EmbeddingOptimConfig = field(default_factory=EmbeddingOptimConfig)
    warmup_steps: int = 100
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip_norm: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps; ignored when epochs > 0
    epochs: int = 0  # passes over a finite training set (sequential tasks); 0 = train.steps
    log_every: int = 50
    eval_every: int = 250  # steps; 0: only at the end (unless eval_every_epochs)
    eval_every_epochs: int = 0  # epochs between evaluations (epoch-based runs); 0: off
    checkpoint_every: int = 250  # steps; 0: only at the end (unless checkpoint_every_epochs)
    checkpoint_every_epochs: int = 0  # epochs between checkpoints; 0: off
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # multi-task data (data.synthetic.tasks = T): loss weight per task, [] = 1 for every task
    task_weights: list[float] = field(default_factory=list)
    tensorboard: bool = True
    resume: bool = True  # continue from the newest checkpoint in run_dir
    # best checkpoint and early stopping on an eval metric "split/name", e.g. valid/ndcg@10
    best_metric: str = ""  # "": no best checkpoint; the final evaluation uses the last params
    best_mode: Literal["max", "min"] = "max"
    patience: int = 0  # evaluations without improvement of best_metric before stopping; 0 = never


@dataclass
class RankingConfig:
    """Leave-one-out ranking evaluation of the sequential recommenders (``recjax.tasks.ranking``)."""

    protocol: Literal["full", "sampled"] = "full"  # all items, or the target vs sampled negatives
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])  # cut-offs of HR@K and NDCG@K
    mask_history: bool = False  # full ranking: drop the user's past items (off = RecBole)
    num_negatives: int = 100  # sampled protocol
    negatives: Literal["uniform", "popularity"] = "uniform"  # sampled protocol
    batch: int = 256  # users per evaluation batch (global, over all processes)


@dataclass
class ModelConfig:
    """Base of every model's config; ``name`` selects the registered model."""

    name: str = "dlrm"


@dataclass
class Config:
    name: str = "run"
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def _read_yaml(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    out = dict(dst)
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_chain(path: pathlib.Path, seen: tuple[pathlib.Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"circular 'base:' chain: {chain}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    merged: dict[str, Any] = {}
    for b in bases:
        bpath = (path.parent / b) if not pathlib.Path(b).is_absolute() else pathlib.Path(b)
        if bpath.resolve() != BASE_CONFIG.resolve():
            merged = _deep_merge(merged, _load_chain(bpath, (*seen, path)))
    return _deep_merge(merged, data)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict; the same key twice with different values is an error."""
    flat: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if key in flat and flat[key] != value:
            raise ConfigError(f"override {key!r} given twice with different values: {flat[key]!r} and {value!r}")
        flat[key] = value
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return nested


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve base.yaml -> ``base:`` chain -> ``path`` -> overrides into a validated Config."""
    raw = _read_yaml(BASE_CONFIG) if BASE_CONFIG.is_file() else {}
    raw.pop("base", None)
    if path is not None:
        raw = _deep_merge(raw, _load_chain(pathlib.Path(path)))
    if overrides:
        raw = _deep_merge(raw, parse_overrides(overrides))
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = {**raw, "model": raw.get("model") or {}}  # always validate through the model's own class
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def task_name(cfg: Config) -> str:
    """The task that trains ``cfg.model`` (each registered model names its task)."""
    return model_entry(cfg.model.name).task


def model_entry(name: str) -> Any:
    try:
        return registry.MODELS.get(name)
    except registry.UnknownNameError as e:
        raise ConfigError(f"model.name: {e}") from None


def validate(cfg: Config) -> None:
    """Cross-key checks that need no devices; then the task's own checks of its sections."""
    t, d = cfg.train, cfg.data
    positive = {"data.global_batch": d.global_batch, "data.eval_batches": d.eval_batches}
    if t.epochs == 0:
        positive["train.steps"] = t.steps
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key in ("epochs", "log_every", "eval_every", "eval_every_epochs", "checkpoint_every",
                "checkpoint_every_epochs", "patience"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {getattr(t, key)}")
    for key, value, low in (("embedding.dim", cfg.embedding.dim, 1),
                            ("embedding.pad_rows_to", cfg.embedding.pad_rows_to, 1),
                            ("optim.dense.lr", cfg.optim.dense.lr, 0),
                            ("optim.embedding.lr", cfg.optim.embedding.lr, 0),
                            ("optim.warmup_steps", cfg.optim.warmup_steps, 0),
                            ("optim.grad_clip_norm", cfg.optim.grad_clip_norm, 0)):
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    if t.patience > 0 and not t.best_metric:
        raise ConfigError("train.patience needs train.best_metric (the metric to watch), "
                          "e.g. train.best_metric=valid/ndcg@10")
    if t.best_metric and "/" not in t.best_metric:
        raise ConfigError(f"train.best_metric must be 'split/metric' (e.g. valid/ndcg@10 or "
                          f"eval/auc), got {t.best_metric!r}")
    axes = [f.name for f in dataclasses.fields(MeshConfig) if f.name != "rules"]
    for logical, mesh_axes in cfg.mesh.rules.items():
        for a in mesh_axes:
            if a not in axes:
                close = difflib.get_close_matches(a, axes, n=1, cutoff=0.0)
                raise ConfigError(f"mesh.rules.{logical}: unknown mesh axis '{a}'; did you mean "
                                  f"'{close[0]}'? (mesh axes: {', '.join(axes)})")
    try:
        task = registry.TASKS.get(task_name(cfg))
    except registry.UnknownNameError as e:
        raise ConfigError(f"model '{cfg.model.name}': {e}") from None
    task.check_config(cfg)


def _valid_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        ftype = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            keys.extend(_valid_keys(ftype, prefix + f.name + "."))
    return keys


def _closest(key: str, cls: type, prefix: str) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if match:
        return f"did you mean '{prefix}{match[0]}'?"
    full = difflib.get_close_matches(prefix + key, _valid_keys(Config, ""), n=1, cutoff=0.6)
    if full:
        return f"did you mean '{full[0]}'?"
    return "valid keys here: " + ", ".join(prefix + n for n in names)


_TYPE_CACHE: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _TYPE_CACHE:
        _TYPE_CACHE[cls] = typing.get_type_hints(cls)
    return _TYPE_CACHE[cls]


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "<root>"
        raise ConfigError(f"config key '{where}' must be a mapping, got {raw!r}")
    if cls is ModelConfig or (isinstance(cls, type) and issubclass(cls, ModelConfig)):
        cls = model_entry(raw.get("name", ModelConfig.name)).config_cls
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}': {_closest(key, cls, prefix)}")
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(
            f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError:
                continue
        raise bad()
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad()
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise bad()
        return {_coerce(ktp, k, key): _coerce(vtp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads exponent forms such as 1e-3 as strings
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if tp is Any:
        return value
    raise ConfigError(f"config key '{key}': unsupported schema type {tp}")


def save_config(cfg: Config, run_dir: Any) -> Any:
    """Write the resolved config as YAML (for people) and JSON (for tools) into ``run_dir``
    (an ``etils.epath.Path`` or anything it accepts: local paths and object stores)."""
    from etils import epath

    run_dir = epath.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return run_dir / "config.yaml"
