"""Training and leave-one-out evaluation of the sequential recommenders (``model.name: seqrec``).

Data (``recjax.data.seq_pipeline``): per-user sequences split leave-one-out; training rows
(next-item windows or prefixes, or cloze windows masked per batch), validation and test rows
whose model input ends at position ``lengths - 1`` (plus [MASK] for cloze).

Loss over the positions ``P`` with a target (``targets != 0``), mean over ``P``::

    full:        CE = logsumexp_{i in 1..N} z_i - z_y          z = h E_out^T + b_out
    sampled ce:  CE over {y} + negatives; bce: softplus(-z_y) + sum_j softplus(z_j)

``N = num_items``; pad (0) and [MASK] (N + 1) are never classes. Sampled negatives: a fresh
uniform draw of ``num_sampled`` items per step, shared by every position of the batch (one
``[n, d]`` gather); a negative equal to a position's target is dropped for that position.
Prefix rows (``data.sequences.train_rows: prefixes``) have one target, at ``lengths - 1``,
so only that position is scored; windows and cloze score all ``S`` positions.

Loop: one pass over the training rows per epoch; validation every
``ranking.eval_every_epochs`` epochs (and after the last); early stopping after
``ranking.patience`` validations without improvement of ``ranking.metric``; the best
parameters are checkpointed in ``run_dir/best`` and tested at the end. ``run_dir/checkpoints``
holds the state after each epoch (params, optimizer, step) with the loop's own state
(early stopping, timings) as its JSON data item, so a killed run resumes at the next epoch
and continues exactly: batches are seeded by ``(seed, epoch)`` and dropout keys by
``(seed, step)``.

Timing (summed over resumed sessions): ``train_sequences_per_s`` is non-empty training rows
per second of training time, which counts the train steps and the host's batch assembly
between them but not the compile (done ahead of time), evaluation or checkpoints.
``wall_time_to_best_s`` runs from the first epoch's start (after data preparation and
compile; evaluations and checkpoints included) to the end of the best epoch's validation,
``wall_time_total_s`` to the end of the last epoch; ``eval_time_s`` and
``checkpoint_time_s`` say how much of it went to validation and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recjax.config import Config, ConfigError, save_config
from recjax.models.seqrec import SeqRecConfig, build_seqrec, forward_flops_per_sequence
from recjax.train import flops as flops_lib
from recjax.train import optim
from recjax.train import ranking as rk
from recjax.train.checkpoint import Checkpointer
from recjax.train.logger import MetricsLogger
from recjax.train.loop import NonFiniteLossError, log0

if TYPE_CHECKING:
    from recjax.data import seq_pipeline as sp

VALID_NEGATIVES_SEED, TEST_NEGATIVES_SEED = 0, 1  # same candidates for every run and seed


class NoCheckpointError(FileNotFoundError):
    """``recjax eval`` found no best checkpoint to evaluate."""


# ----------------------------------------------------------------------------- data


@dataclass
class EvalSplit:
    rows: sp.EvalRows
    negatives: np.ndarray | None  # int32 [U', n], sampled protocol
    history: list[np.ndarray] | None  # unique past items per user, mask_history


@dataclass
class Prepared:
    data: sp.SequenceData
    split: sp.LeaveOneOut
    rows: sp.TrainRows | None
    batches: sp.TrainBatches | None
    valid: EvalSplit
    test: EvalSplit

    @property
    def num_items(self) -> int:
        return self.data.num_items

    def summary(self, cfg: Config) -> dict[str, Any]:
        s = cfg.data.sequences
        source = s.path or (
            f"synthetic (users {s.synthetic.num_users}, items {s.synthetic.num_items}, "
            f"seed {s.synthetic.seed})"
        )
        out = {
            "source": source,
            "users": int(self.data.num_users),
            "users_evaluated": int(len(self.split.users)),
            "users_dropped": int(self.split.dropped_users),
            "items": int(self.num_items),
            "interactions": int(len(self.data.items)),
            "max_len": s.max_len,
        }
        if self.rows is not None:
            out["train_rows"] = int(len(self.rows.lengths))
            cloze = cfg.model.objective == "cloze"  # type: ignore[attr-defined]
            out["train_row_mode"] = "cloze windows" if cloze else s.train_rows
            out["batches_per_epoch"] = len(self.batches)
        return out


def _eval_split(cfg: Config, split: sp.LeaveOneOut, which: str) -> EvalSplit:
    from recjax.data import seq_pipeline as sp

    mcfg: SeqRecConfig = cfg.model  # type: ignore[assignment]
    rows = sp.eval_rows(split, which, cfg.data.sequences.max_len, append_mask=mcfg.objective == "cloze")
    r = cfg.ranking
    negatives = history = None
    if r.protocol == "sampled":
        seed = VALID_NEGATIVES_SEED if which == "valid" else TEST_NEGATIVES_SEED
        negatives = sp.sample_negatives(split, rows, r.num_negatives, r.negatives, seed)
    elif r.mask_history:
        o = rows.history_offsets
        history = [np.unique(rows.history_items[o[i]:o[i + 1]]) for i in range(len(o) - 1)]
    return EvalSplit(rows, negatives, history)


def prepare(cfg: Config, *, train: bool = True) -> Prepared:
    """Load, split and build the rows of ``cfg.data.sequences`` (training rows if ``train``)."""
    from recjax.data import seq_pipeline as sp

    mcfg: SeqRecConfig = cfg.model  # type: ignore[assignment]
    s = cfg.data.sequences
    data = sp.load_for_config(s)
    split = sp.leave_one_out(data)
    rows = batches = None
    if train:
        rows = sp.train_rows(split, s.max_len, s.train_rows, mcfg.objective)
        if len(rows.lengths) == 0:
            from recjax.data.criteo import DataError

            raise DataError(
                f"{s.path or 'the synthetic generator'}: no training rows; every user's training "
                "part (all but the last two items) is too short. Use longer sequences.")
        batches = sp.TrainBatches(
            rows, cfg.data.global_batch, seed=cfg.seed, objective=mcfg.objective,
            num_items=data.num_items, mask_prob=s.mask_prob,
        )
    valid, test = _eval_split(cfg, split, "valid"), _eval_split(cfg, split, "test")
    return Prepared(data, split, rows, batches, valid, test)


# ----------------------------------------------------------------------------- loss and steps


def sequence_loss(model: Any, batch: dict[str, jax.Array], rng: jax.Array, mcfg: SeqRecConfig,
                  last_only: bool) -> tuple[jax.Array, jax.Array]:
    """Mean loss over the positions with a target, and their count (see the module docstring)."""
    model_rng, neg_rng = jax.random.split(rng)
    inputs, targets, lengths = batch["inputs"], batch["targets"], batch["lengths"]
    h = model.encode(inputs, lengths, train=True, rng=model_rng)
    if last_only:
        last = jnp.maximum(lengths - 1, 0)[:, None]
        h = jnp.take_along_axis(h, last[:, :, None], axis=1)[:, 0]  # [B, d]
        targets = jnp.take_along_axis(targets, last, axis=1)[:, 0]  # [B]
    weight = targets != 0
    labels = jnp.where(weight, targets, 1)
    n = model.num_items
    if mcfg.loss == "full":
        ids = jnp.arange(n + 2)
        logits = jnp.where((ids >= 1) & (ids <= n), model.item_logits(h), -jnp.inf)
        per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    else:
        negs = jax.random.randint(neg_rng, (mcfg.num_sampled,), 1, n + 1)
        neg_vec, neg_bias = model.output_rows(negs)
        pos_vec, pos_bias = model.output_rows(labels)
        hf = h.astype(jnp.float32)
        pos = jnp.sum(hf * pos_vec, axis=-1) + pos_bias
        neg = jnp.einsum("...d,nd->...n", hf, neg_vec) + neg_bias
        hit = negs == labels[..., None]
        if mcfg.sampled_loss == "ce":
            z = jnp.concatenate([pos[..., None], jnp.where(hit, -jnp.inf, neg)], axis=-1)
            per = jax.nn.logsumexp(z, axis=-1) - pos
        else:
            per = jax.nn.softplus(-pos) + jnp.sum(jnp.where(hit, 0.0, jax.nn.softplus(neg)), axis=-1)
    count = jnp.sum(weight)
    return jnp.sum(jnp.where(weight, per, 0.0)) / jnp.maximum(count, 1), count


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, cfg: Config):
    """``(params, opt_state, batch, step) -> (params, opt_state, loss, grad_norm)``, jitted with
    params and optimizer state donated; dropout and negatives keyed by ``(seed, step)``."""
    mcfg: SeqRecConfig = cfg.model  # type: ignore[assignment]
    last_only = mcfg.objective == "next_item" and cfg.data.sequences.train_rows == "prefixes"
    base = jax.random.key(cfg.seed, impl="rbg")  # see recjax.models.seqrec on rbg keys

    def step_fn(params, opt_state, batch, step):
        def loss_fn(p):
            rng = jax.random.fold_in(base, step)
            return sequence_loss(nnx.merge(graphdef, p), batch, rng, mcfg, last_only)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        grad_norm = optax.global_norm(grads)
        return optax.apply_updates(params, updates), opt_state, loss, grad_norm

    return jax.jit(step_fn, donate_argnums=(0, 1))


def make_eval_step(graphdef: Any, protocol: str):
    """``(params, inputs, lengths, targets, extra) -> (ranks, ties)`` int32 ``[B]``; ``extra`` is
    ``[B, n]`` sampled negatives (sampled), ``[B, H]`` excluded history ids or ``[B, 0]``."""

    def eval_fn(params, inputs, lengths, targets, extra):
        model = nnx.merge(graphdef, params)
        h = model.encode(inputs, lengths, train=False)
        last = jnp.maximum(lengths - 1, 0)
        h = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [B, d]
        if protocol == "sampled":
            cand = jnp.concatenate([targets[:, None], extra], axis=1)
            vec, bias = model.output_rows(cand)
            scores = jnp.einsum("bd,bnd->bn", h.astype(jnp.float32), vec) + bias
            return rk.sampled_ranks_jax(scores)
        exclude = extra if extra.shape[1] > 0 else None
        return rk.full_ranks_jax(model.item_logits(h), targets, exclude)

    return jax.jit(eval_fn)


def _pow2(n: int) -> int:
    return 16 if n <= 16 else 1 << (n - 1).bit_length()


def rank_split(eval_step, params: Any, ev: EvalSplit, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranks and ties ``[U']`` of every evaluation user, in batches of ``batch`` (padded)."""
    rows = ev.rows
    u = len(rows.targets)
    ranks, ties = [], []
    for lo in range(0, u, batch):
        hi = min(lo + batch, u)
        pad = batch - (hi - lo)
        inputs = np.pad(rows.inputs[lo:hi], ((0, pad), (0, 0)))
        inputs[hi - lo:, 0] = 1  # padding users: one item, discarded below
        lengths = np.pad(rows.lengths[lo:hi], (0, pad), constant_values=1)
        targets = np.pad(rows.targets[lo:hi], (0, pad), constant_values=1)
        if ev.negatives is not None:
            extra = np.pad(ev.negatives[lo:hi], ((0, pad), (0, 0)), constant_values=1)
        elif ev.history is not None:
            part = ev.history[lo:hi]
            extra = np.zeros((batch, _pow2(max(len(x) for x in part))), np.int32)
            for i, x in enumerate(part):
                extra[i, : len(x)] = x
        else:
            extra = np.zeros((batch, 0), np.int32)
        r, t = eval_step(params, inputs.astype(np.int32), lengths.astype(np.int32),
                         targets.astype(np.int32), extra.astype(np.int32))
        ranks.append(np.asarray(r)[: hi - lo])
        ties.append(np.asarray(t)[: hi - lo])
    return np.concatenate(ranks), np.concatenate(ties)


def evaluate_split(eval_step, params: Any, ev: EvalSplit, cfg: Config) -> dict[str, float]:
    ranks, ties = rank_split(eval_step, params, ev, cfg.ranking.batch)
    return rk.ranking_metrics(ranks, cfg.ranking.ks, ties)


def popularity_metrics(prep: Prepared, ev: EvalSplit, cfg: Config) -> dict[str, float]:
    """The same protocol scored by training-part item counts (a baseline every model must beat)."""
    counts = prep.split.item_counts.astype(np.float64)
    rows = ev.rows
    if ev.negatives is not None:
        ranks = rk.sampled_ranks(counts[rows.targets], counts[ev.negatives])
    else:
        ranks = []
        step = 1024
        for lo in range(0, len(rows.targets), step):
            hi = min(lo + step, len(rows.targets))
            scores = np.broadcast_to(counts, (hi - lo, counts.size))
            exclude = None
            if ev.history is not None:
                hist = ev.history[lo:hi]
                offsets = np.concatenate([[0], np.cumsum([len(x) for x in hist])])
                exclude = (offsets, np.concatenate(hist) if hist else np.zeros(0, np.int64))
            ranks.append(rk.target_ranks(scores, rows.targets[lo:hi], exclude))
        ranks = np.concatenate(ranks)
    return rk.ranking_metrics(ranks, cfg.ranking.ks)


# ----------------------------------------------------------------------------- early stopping


@dataclass
class EarlyStopping:
    """Tracks the best validation value (higher is better); ``stop`` after ``patience``
    validations in a row without a strict improvement (``patience`` 0: never)."""

    patience: int
    best: float = -math.inf
    best_epoch: int = 0
    bad: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def update(self, epoch: int, value: float) -> bool:
        """Record one validation; True if it is a new best."""
        self.history.append({"epoch": epoch, "value": value})
        if value > self.best:
            self.best, self.best_epoch, self.bad = value, epoch, 0
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state(self) -> dict[str, Any]:
        return {"patience": self.patience, "best": self.best if math.isfinite(self.best) else None,
                "best_epoch": self.best_epoch, "bad": self.bad, "history": self.history}

    @classmethod
    def from_state(cls, s: dict[str, Any], patience: int) -> EarlyStopping:
        best = -math.inf if s.get("best") is None else float(s["best"])
        return cls(patience, best, int(s["best_epoch"]), int(s["bad"]), list(s.get("history", [])))


# ----------------------------------------------------------------------------- model setup


def _check_ranking(cfg: Config) -> None:
    r = cfg.ranking
    names = [f"{m}@{k}" for k in r.ks for m in ("hr", "ndcg")] + ["mrr"]
    if r.metric not in names:
        raise ConfigError(f"ranking.metric {r.metric!r} is not computed; with ranking.ks={r.ks} "
                          f"choose one of {names}")
    if r.batch <= 0 or r.eval_every_epochs <= 0:
        raise ConfigError("ranking.batch and ranking.eval_every_epochs must be positive")


def init_params(cfg: Config, num_items: int) -> tuple[Any, Any, Any]:
    """(graphdef, abstract params, a function key -> params), nothing allocated yet."""
    def make(key):
        return build_seqrec(cfg, num_items, nnx.Rngs(params=key))

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make(jax.random.PRNGKey(0))))
    init = jax.jit(lambda key: nnx.to_pure_dict(nnx.split(make(key))[1]))
    return graphdef, nnx.to_pure_dict(abstract), init


def _with_sharding(tree: Any) -> Any:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), tree)


def _environment() -> dict[str, Any]:
    from recjax.bench.timing import environment

    env = environment()
    return {"device": f"{env['device_kind']} ({env['platform']}) x{env['device_count']}",
            "versions": env["versions"], "command": env["command"], "date": env["date"]}


def _fmt(m: dict[str, float], keys: list[str]) -> str:
    return " ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)


def _shown(cfg: Config) -> list[str]:
    keys = [cfg.ranking.metric]
    for k in ("ndcg@10", "hr@10", "mrr"):
        if k not in keys:
            keys.append(k)
    return keys


# ----------------------------------------------------------------------------- training


def train_seqrec(cfg: Config) -> dict[str, Any]:
    """Train (or resume) a sequential recommender; writes and returns ``run_dir/report.json``."""
    if not isinstance(cfg.model, SeqRecConfig):
        raise ConfigError(f"data.source: sequences needs model.name: seqrec, got {cfg.model.name!r}")
    _check_ranking(cfg)
    t_setup = time.perf_counter()
    run_dir = pathlib.Path(cfg.run_dir)
    log0(f"# resolved config ({run_dir / 'config.yaml'})\n{cfg.to_yaml()}")
    save_config(cfg, run_dir)
    mcfg: SeqRecConfig = cfg.model
    prep = prepare(cfg)
    protocol = rk.protocol_name(cfg.ranking, prep.num_items)
    summary = prep.summary(cfg)
    log0(f"data: {summary}")
    log0(f"protocol: {protocol}")

    spe = len(prep.batches)
    if cfg.train.epochs > 0:
        total_steps, epochs = cfg.train.epochs * spe, cfg.train.epochs
    else:
        total_steps, epochs = cfg.train.steps, max(1, -(-cfg.train.steps // spe))
    tx = optim.make_optimizer(cfg.optim, total_steps)
    graphdef, abstract_params, init = init_params(cfg, prep.num_items)
    abstract_state = _with_sharding(jax.eval_shape(
        lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)}, abstract_params))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_params))
    fwd = forward_flops_per_sequence(mcfg, prep.num_items, cfg.data.sequences.max_len)
    log0(f"model seqrec ({mcfg.attention}, {'causal' if mcfg.causal else 'bidirectional'}, "
         f"{mcfg.objective}): {n_params:,} params; {fwd / 1e6:.2f} MFLOP forward per sequence")

    async_save = cfg.train.async_checkpoint
    ckpt = Checkpointer(run_dir, keep=max(cfg.train.keep_checkpoints, 1), async_save=async_save)
    best_ckpt = Checkpointer(run_dir / "best", keep=1, async_save=async_save)
    latest = ckpt.latest_step() if cfg.train.resume else None
    if latest is not None:
        state, loop = ckpt.restore(latest, abstract_state)
        params, opt_state = state["params"], state["opt_state"]
        stopper = EarlyStopping.from_state(loop["early_stopping"], cfg.ranking.patience)
        start_epoch = int(loop["epoch"]) + 1
        clock = dict(loop["clock"])
        log0(f"resumed from {ckpt.directory / str(latest)}: continuing at epoch {start_epoch}")
    else:
        params = init(jax.random.key(cfg.seed, impl="rbg"))
        opt_state = jax.jit(tx.init)(params)
        stopper = EarlyStopping(cfg.ranking.patience)
        start_epoch = 1
        clock = {"train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0, "wall_s": 0.0, "rows": 0,
                 "wall_to_best_s": None, "train_to_best_s": None}

    train_step = make_train_step(graphdef, tx, cfg)
    b, s = cfg.data.global_batch, cfg.data.sequences.max_len
    abstract_batch = {"inputs": jax.ShapeDtypeStruct((b, s), jnp.int32),
                      "targets": jax.ShapeDtypeStruct((b, s), jnp.int32),
                      "lengths": jax.ShapeDtypeStruct((b,), jnp.int32)}
    t0 = time.perf_counter()
    step_arg = jax.ShapeDtypeStruct((), jnp.int32)
    compiled = train_step.lower(params, opt_state, abstract_batch, step_arg).compile()
    memory = flops_lib.memory_report(compiled)
    log0(f"compiled train step in {time.perf_counter() - t0:.1f}s ({spe} batches of {b} per epoch, "
         f"{total_steps} steps); memory: "
         + ", ".join(f"{k} {flops_lib.format_bytes(v)}" for k, v in memory.items()))
    eval_step = make_eval_step(graphdef, cfg.ranking.protocol)
    logger = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard)
    lrs = optim.optimizer_lrs(cfg.optim, total_steps)
    shown = _shown(cfg)

    popularity = {"valid": popularity_metrics(prep, prep.valid, cfg),
                  "test": popularity_metrics(prep, prep.test, cfg)}
    log0(f"popularity baseline, valid: {_fmt(popularity['valid'], shown)}")
    setup_s = time.perf_counter() - t_setup

    epochs_run = start_epoch - 1
    try:
        wall0 = time.perf_counter() - clock["wall_s"]
        for epoch in range(start_epoch, epochs + 1):
            if stopper.stop:
                break
            first = (epoch - 1) * spe
            steps = min(spe, total_steps - first)
            t_epoch = time.perf_counter()
            losses, rows = [], 0
            for i, batch in enumerate(prep.batches.epoch(epoch)):
                if i >= steps:
                    break
                rows += int(np.count_nonzero(batch["lengths"]))
                params, opt_state, loss, gnorm = compiled(params, opt_state, batch, np.int32(first + i))
                losses.append((loss, gnorm))
            fetched = np.asarray(jax.device_get(losses), np.float64)
            epoch_s = time.perf_counter() - t_epoch
            clock["train_s"] += epoch_s
            clock["rows"] += rows
            loss_mean, gnorm_mean = fetched.mean(axis=0)
            if not math.isfinite(loss_mean):
                raise NonFiniteLossError(
                    f"non-finite training loss in epoch {epoch}; stopping. The last checkpoint in "
                    f"{ckpt.directory} (end of epoch {epoch - 1}) is the last good state. Lower "
                    "optim.dense.lr or check the data.")
            # every seqrec parameter is in the dense group (no "tables"), so only its rate applies
            train_metrics = {"loss": loss_mean, "grad_norm": gnorm_mean, "sequences_per_s": rows / epoch_s,
                             "lr_dense": lrs(first + steps - 1)["lr_dense"]}
            logger.log(epoch, train_metrics, "train")
            line = (f"epoch {epoch:>{len(str(epochs))}}/{epochs} | loss {loss_mean:.4f} | "
                    f"{rows / epoch_s:,.0f} seq/s")

            if epoch % cfg.ranking.eval_every_epochs == 0 or epoch == epochs:
                t = time.perf_counter()
                valid = evaluate_split(eval_step, params, prep.valid, cfg)
                clock["eval_s"] += time.perf_counter() - t
                logger.log(epoch, valid, "valid")
                if stopper.update(epoch, valid[cfg.ranking.metric]):
                    clock["wall_to_best_s"] = time.perf_counter() - wall0
                    clock["train_to_best_s"] = clock["train_s"]
                    t = time.perf_counter()
                    if best_ckpt.latest_step() == epoch:  # re-run of an epoch after a crash
                        best_ckpt.manager.delete(epoch)
                    best_ckpt.save(epoch, {"params": params}, {"epoch": epoch, "valid": valid}, cfg)
                    clock["checkpoint_s"] += time.perf_counter() - t
                line += (f" | valid {_fmt(valid, shown)} | best {cfg.ranking.metric} "
                         f"{stopper.best:.4f} @ {stopper.best_epoch} ({stopper.bad}/{cfg.ranking.patience})")
            log0(line)
            t = time.perf_counter()
            clock["wall_s"] = t - wall0
            ckpt.save(epoch, {"step": jnp.asarray(first + steps, jnp.int32), "params": params,
                              "opt_state": opt_state},
                      {"epoch": epoch, "early_stopping": stopper.state(), "clock": clock}, cfg)
            clock["checkpoint_s"] += time.perf_counter() - t
            epochs_run = epoch
            if stopper.stop:
                log0(f"early stop: {cfg.ranking.metric} has not improved for {cfg.ranking.patience} "
                     f"validations (best {stopper.best:.4f} at epoch {stopper.best_epoch})")
        ckpt.wait()
        best_ckpt.wait()
        if best_ckpt.latest_step() is None:
            raise NoCheckpointError(
                f"no validation was run, so there is no best checkpoint in {best_ckpt.directory}")
        best_epoch = best_ckpt.latest_step()
        restored, best_info = best_ckpt.restore(best_epoch, {"params": _with_sharding(abstract_params)})
        valid_best = best_info["valid"]
        test = evaluate_split(eval_step, restored["params"], prep.test, cfg)
        logger.log(best_epoch, test, "test")
    finally:
        logger.close()
        ckpt.close()
        best_ckpt.close()

    report = {
        "protocol": protocol,
        "model": dataclasses.asdict(cfg.model),
        "data": summary,
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "stopped_early": stopper.stop,
        "valid": valid_best,
        "test": test,
        "popularity_baseline": popularity,
        "train_sequences_per_s": clock["rows"] / clock["train_s"] if clock["train_s"] > 0 else None,
        "train_time_s": clock["train_s"],
        "eval_time_s": clock["eval_s"],
        "checkpoint_time_s": clock["checkpoint_s"],
        "train_time_to_best_s": clock["train_to_best_s"],
        "wall_time_to_best_s": clock["wall_to_best_s"],
        "wall_time_total_s": clock["wall_s"],
        "setup_time_s": setup_s,
        "params": n_params,
        "forward_flops_per_sequence": fwd,
        "train_step_memory_bytes": memory,
        "optimizer_steps": total_steps,
        **_environment(),
    }
    _write_report(run_dir, report)
    log0(f"best epoch {best_epoch} of {epochs_run}: valid {_fmt(valid_best, shown)}")
    log0(f"test ({protocol}): {_fmt(test, shown)}")
    log0(f"report: {run_dir / 'report.json'}")
    return report


def _write_report(run_dir: pathlib.Path, report: dict[str, Any]) -> None:
    path = run_dir / "report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float))
    tmp.replace(path)


# ----------------------------------------------------------------------------- evaluation


def evaluate_seqrec(cfg: Config) -> dict[str, Any]:
    """Evaluate the best checkpoint of ``cfg.run_dir`` on validation and test; prints and returns."""
    if not isinstance(cfg.model, SeqRecConfig):
        raise ConfigError(f"data.source: sequences needs model.name: seqrec, got {cfg.model.name!r}")
    _check_ranking(cfg)
    best_dir = pathlib.Path(cfg.run_dir) / "best"
    if not (best_dir / "checkpoints").is_dir():
        raise NoCheckpointError(f"no best checkpoint under {best_dir / 'checkpoints'}; train first "
                                "with `recjax train` and the same config and run_dir")
    best_ckpt = Checkpointer(best_dir, keep=1, async_save=False)
    try:
        epoch = best_ckpt.latest_step()
        if epoch is None:
            raise NoCheckpointError(f"no finished best checkpoint in {best_ckpt.directory}")
        prep = prepare(cfg, train=False)
        graphdef, abstract_params, _ = init_params(cfg, prep.num_items)
        restored, _ = best_ckpt.restore(epoch, {"params": _with_sharding(abstract_params)})
    finally:
        best_ckpt.close()
    eval_step = make_eval_step(graphdef, cfg.ranking.protocol)
    protocol = rk.protocol_name(cfg.ranking, prep.num_items)
    out = {"protocol": protocol, "best_epoch": epoch,
           "valid": evaluate_split(eval_step, restored["params"], prep.valid, cfg),
           "test": evaluate_split(eval_step, restored["params"], prep.test, cfg)}
    shown = _shown(cfg)
    log0(f"protocol: {protocol}")
    log0(f"epoch {epoch}: valid {_fmt(out['valid'], shown)} | test {_fmt(out['test'], shown)}")
    return out
