"""Sequential recommendation: SASRec, BERT4Rec, LinRec, Cotten4Rec (``model.name: seqrec``).

Data (``recjax.data.seq_pipeline``): per-user sequences split leave-one-out; training rows
(next-item windows or prefixes, or cloze windows masked per batch), validation and test rows
whose model input ends at position ``lengths - 1`` (plus [MASK] for cloze).

Loss over the positions ``P`` with a target (``targets != 0``), mean over ``P``::

    full:        CE = logsumexp_{i in 1..N} z_i - z_y          z = h E_out^T + b_out
    sampled ce:  CE over {y} + negatives; bce: softplus(-z_y) + sum_j softplus(z_j)

``N = num_items``; pad (0), [MASK] (N + 1) and the item table's padding rows are never
classes. Sampled negatives: a fresh uniform draw of ``num_sampled`` items per step, shared by
every position of the batch (one ``[n, d]`` gather); a negative equal to a position's target
is dropped for that position. Prefix rows (``data.sequences.train_rows: prefixes``) have one
target, at ``lengths - 1``, so only that position is scored; for windows and cloze the positions
with a target are gathered, up to a cap set from the data (:attr:`SeqRecTask.scored_cap`), and
only they get logits (on ML-100k SASRec's stride-10 windows: 1,408 of 3,200 positions). The
mean is over the global batch's targets, so the loss does not depend on how the batch is split
over devices or processes.

Evaluation: leave-one-out ranking (``recjax.tasks.ranking``) of the validation split at the
trainer's eval cadence (``valid``) and of the test split once at the end on the best
parameters (``test``); the popularity baseline of both goes to report.json.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from recjax.config import Config
from recjax.data import seq_pipeline as sp
from recjax.errors import ConfigError, DataError
from recjax.models.seqrec import SeqRecConfig, SequenceInfo
from recjax.parallel import sharding as shd
from recjax.registry import TASKS
from recjax.tasks import ranking as rk
from recjax.tasks.base import Evaluator, Metrics, Task

VALID_NEGATIVES_SEED, TEST_NEGATIVES_SEED = 0, 1  # same candidates for every run and seed


@dataclasses.dataclass
class EvalSplit:
    rows: sp.EvalRows
    negatives: np.ndarray | None  # int32 [U', n], sampled protocol
    history: list[np.ndarray] | None  # unique past items per user, mask_history


def sequence_loss(model: Any, batch: dict[str, jax.Array], rng: jax.Array, mcfg: SeqRecConfig,
                  last_only: bool, scored_cap: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean loss over the scored positions with a target, their count, and the count of targets
    left unscored (see the module docstring).

    ``scored_cap`` (0 = off): logits only for the first ``scored_cap`` positions of the flattened
    ``[B * S]`` batch that have a target, gathered; targets past the cap are left out of the loss
    and counted (the third value), which :attr:`SeqRecTask.scored_cap` makes ~never happen.
    """
    model_rng, neg_rng = jax.random.split(rng)
    inputs, targets, lengths = batch["inputs"], batch["targets"], batch["lengths"]
    h = model.encode(inputs, lengths, train=True, rng=model_rng)
    if last_only:
        last = jnp.maximum(lengths - 1, 0)[:, None]
        h = jnp.take_along_axis(h, last[:, :, None], axis=1)[:, 0]  # [B, d]
        targets = jnp.take_along_axis(targets, last, axis=1)[:, 0]  # [B]
    h, targets = h.reshape(-1, h.shape[-1]), jnp.asarray(targets).reshape(-1)  # [P, d], [P]
    over = jnp.zeros((), jnp.int32)
    if 0 < scored_cap < targets.shape[0]:
        # a lax.cond to the full path for an over-cap batch would make this exact, but on CPU the
        # cond costs as much as the gather saves
        n = jnp.sum(targets != 0)
        idx = jnp.nonzero(targets != 0, size=scored_cap, fill_value=0)[0]
        h, targets = h[idx], jnp.where(jnp.arange(scored_cap) < n, targets[idx], 0)
        over = jnp.maximum(n - scored_cap, 0)
    count = jnp.sum(targets != 0)
    total = _summed_loss(model, mcfg, neg_rng, h, targets)
    return total / jnp.maximum(count, 1), count, over


def _summed_loss(model: Any, mcfg: SeqRecConfig, neg_rng: jax.Array, h: jax.Array,
                 targets: jax.Array) -> jax.Array:
    """Sum of the per-position losses of ``h [P, d]`` against ``targets [P]`` (0 = no target)."""
    weight = targets != 0
    labels = jnp.where(weight, targets, 1)
    n = model.num_items
    if mcfg.loss == "full":
        logits = model.item_logits(h)
        ids = jnp.arange(logits.shape[-1])
        logits = jnp.where((ids >= 1) & (ids <= n), logits, -jnp.inf)
        per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    else:
        negs = jax.random.randint(neg_rng, (mcfg.num_sampled,), 1, n + 1)
        neg_vec, neg_bias = model.output_rows(negs)
        pos_vec, pos_bias = model.output_rows(labels)
        hf = h.astype(jnp.float32)
        pos = jnp.sum(hf * pos_vec, axis=-1) + pos_bias
        neg = jnp.einsum("pd,nd->pn", hf, neg_vec) + neg_bias
        hit = negs == labels[:, None]
        if mcfg.sampled_loss == "ce":
            z = jnp.concatenate([pos[:, None], jnp.where(hit, -jnp.inf, neg)], axis=-1)
            per = jax.nn.logsumexp(z, axis=-1) - pos
        else:
            per = jax.nn.softplus(-pos) + jnp.sum(jnp.where(hit, 0.0, jax.nn.softplus(neg)), axis=-1)
    return jnp.sum(jnp.where(weight, per, 0.0))


class SeqRecTask(Task):
    name = "seqrec"
    example_name = "sequences"

    @staticmethod
    def check_config(cfg: Config) -> None:
        if cfg.data.source != "sequences":
            raise ConfigError(f"data.source: the seqrec task reads per-user sequences; set "
                              f"data.source=sequences (got {cfg.data.source!r})")
        r, t = cfg.ranking, cfg.train
        positive = {"ranking.batch": r.batch, "data.sequences.max_len": cfg.data.sequences.max_len}
        if r.protocol == "sampled":
            positive["ranking.num_negatives"] = r.num_negatives
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if not r.ks or min(r.ks) <= 0:
            raise ConfigError(f"ranking.ks must be positive cut-offs, e.g. [5, 10, 20]; got {r.ks}")
        names = [f"{m}@{k}" for k in r.ks for m in ("hr", "ndcg")] + ["mrr"]
        if t.best_metric:
            split, _, metric = t.best_metric.partition("/")
            if split != "valid" or metric not in names:
                raise ConfigError(f"train.best_metric {t.best_metric!r} is not computed; with "
                                  f"ranking.ks={r.ks} choose one of "
                                  + ", ".join(f"valid/{n}" for n in names))

    # --------------------------------------------------------------------------- data
    @functools.cached_property
    def data(self) -> sp.SequenceData:
        return sp.load_for_config(self.cfg.data.sequences)

    @functools.cached_property
    def split(self) -> sp.LeaveOneOut:
        return sp.leave_one_out(self.data)

    @property
    def mcfg(self) -> SeqRecConfig:
        return self.cfg.model  # type: ignore[return-value]

    @functools.cached_property
    def data_info(self) -> SequenceInfo:
        return SequenceInfo(self.data.num_items, self.cfg.data.sequences.max_len)

    @functools.cached_property
    def batches(self) -> sp.TrainBatches:
        s = self.cfg.data.sequences
        rows = sp.train_rows(self.split, s.max_len, s.train_rows, self.mcfg.objective, s.window_stride)
        if len(rows.lengths) == 0:
            raise DataError(
                f"{s.path or 'the synthetic generator'}: no training rows; every user's training "
                "part (all but the last two items) is too short. Use longer sequences.")
        return sp.TrainBatches(rows, self.cfg.data.global_batch, seed=self.cfg.seed,
                               objective=self.mcfg.objective, num_items=self.data.num_items,
                               mask_prob=s.mask_prob, mask_replace=s.mask_replace,
                               mask_last_prob=s.mask_last_prob)

    @functools.cached_property
    def scored_cap(self) -> int:
        """How many positions of a global batch get logits (:func:`sequence_loss`; 0 = all
        ``B * S``): a batch's expected target count plus 6 standard deviations (rows drawn at
        random; cloze positions selected with ``mask_prob``), rounded up to a multiple of 128.
        Targets past it would be left out and counted as ``targets_over_cap`` in
        metrics.jsonl (summed per logging interval)."""
        if self.last_only:
            return 0
        s = self.cfg.data.sequences
        rows, b = self.batches.rows, self.cfg.data.global_batch
        if self.mcfg.objective == "cloze":
            length = rows.lengths.astype(np.float64)
            per_row = s.mask_prob * length + (1 - s.mask_prob) ** length  # + the forced position
            noise = float(np.mean(s.mask_prob * (1 - s.mask_prob) * length))
        else:
            per_row, noise = np.count_nonzero(rows.targets, axis=1).astype(np.float64), 0.0
        bound = b * per_row.mean() + 6.0 * np.sqrt(b * (per_row.var() + noise))
        cap = max(int(-(-bound // 128)) * 128, b)  # last-item cloze batches score b positions
        return 0 if cap >= b * s.max_len else cap

    @property
    def last_only(self) -> bool:
        """Next-item prefix rows: only position ``lengths - 1`` has a target."""
        return self.mcfg.objective == "next_item" and self.cfg.data.sequences.train_rows == "prefixes"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def train_iterator(self, process_index: int, process_count: int) -> sp.TrainIterator:
        return sp.TrainIterator(self.batches, process_index, process_count)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        b, s = self.cfg.data.global_batch, self.cfg.data.sequences.max_len
        return {"inputs": jax.ShapeDtypeStruct((b, s), jnp.int32),
                "targets": jax.ShapeDtypeStruct((b, s), jnp.int32),
                "lengths": jax.ShapeDtypeStruct((b,), jnp.int32)}

    def forward_flops_per_example(self) -> float:
        from recjax.models.seqrec import forward_flops_per_sequence

        s = self.cfg.data.sequences.max_len
        scored = 1 if self.last_only else (self.scored_cap / self.cfg.data.global_batch) or None
        return forward_flops_per_sequence(self.mcfg, self.data.num_items, s, scored)

    # --------------------------------------------------------------------------- loss
    def loss(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        loss, count, over = sequence_loss(model, batch, rng, self.mcfg, self.last_only, self.scored_cap)
        return loss, {"loss": loss, "targets": count.astype(jnp.float32),
                      "targets_over_cap": over.astype(jnp.float32)}

    # --------------------------------------------------------------------------- evaluation
    @functools.cache  # noqa: B019  (one task per run; the split's rows are built once)
    def eval_split(self, which: str) -> EvalSplit:
        rows = sp.eval_rows(self.split, which, self.cfg.data.sequences.max_len,
                            append_mask=self.mcfg.objective == "cloze",
                            drop_first=self.cfg.data.sequences.eval_drop_first)
        r = self.cfg.ranking
        negatives = history = None
        if r.protocol == "sampled":
            seed = VALID_NEGATIVES_SEED if which == "valid" else TEST_NEGATIVES_SEED
            negatives = sp.sample_negatives(self.split, rows, r.num_negatives, r.negatives, seed)
        elif r.mask_history:
            o = rows.history_offsets
            history = [np.unique(rows.history_items[o[i]:o[i + 1]]) for i in range(len(o) - 1)]
        return EvalSplit(rows, negatives, history)

    def evaluators(self, setup: Any) -> dict[str, Evaluator]:
        return {"valid": RankingEvaluator(self, setup, "valid")}

    def final_evaluators(self, setup: Any) -> dict[str, Evaluator]:
        return {"test": RankingEvaluator(self, setup, "test")}

    @property
    def protocol(self) -> str:
        return rk.protocol_name(self.cfg.ranking, self.data.num_items)

    def popularity(self, which: str) -> dict[str, float]:
        """The ranking protocol scored by training-part item counts (a baseline every model must beat)."""
        ev = self.eval_split(which)
        counts = self.split.item_counts.astype(np.float64)
        rows = ev.rows
        if ev.negatives is not None:
            ranks = rk.sampled_ranks(counts[rows.targets], counts[ev.negatives])
        else:
            parts = []
            for lo in range(0, len(rows.targets), 1024):
                hi = min(lo + 1024, len(rows.targets))
                scores = np.broadcast_to(counts, (hi - lo, counts.size))
                exclude = None
                if ev.history is not None:
                    hist = ev.history[lo:hi]
                    offsets = np.concatenate([[0], np.cumsum([len(x) for x in hist])])
                    exclude = (offsets, np.concatenate(hist) if hist else np.zeros(0, np.int64))
                parts.append(rk.target_ranks(scores, rows.targets[lo:hi], exclude))
            ranks = np.concatenate(parts)
        return rk.ranking_metrics(ranks, self.cfg.ranking.ks)

    def describe_data(self) -> dict[str, Any]:
        s = self.cfg.data.sequences
        source = s.path or (f"synthetic (users {s.synthetic.num_users}, items {s.synthetic.num_items}, "
                            f"seed {s.synthetic.seed})")
        return {
            "source": source,
            "users": int(self.data.num_users),
            "users_evaluated": int(len(self.split.users)),
            "users_dropped": int(self.split.dropped_users),
            "items": int(self.data.num_items),
            "interactions": int(len(self.data.items)),
            "max_len": s.max_len,
            "train_rows": int(len(self.batches.rows.lengths)),
            "train_row_mode": ("cloze " if self.mcfg.objective == "cloze" else "") + s.train_rows
                              + (f" (stride {s.window_stride})" if s.train_rows == "windows" and s.window_stride else ""),
            "batches_per_epoch": len(self.batches),
            "scored_positions_per_batch": self.scored_cap or (self.cfg.data.global_batch
                                                              * (1 if self.last_only else s.max_len)),
            "protocol": self.protocol,
            "popularity_baseline": {"valid": self.popularity("valid"), "test": self.popularity("test")},
        }

    def format_eval(self, split: str, step: int, m: dict[str, float]) -> str:
        keys = dict.fromkeys([self.cfg.train.best_metric.partition("/")[2] or "ndcg@10",
                              "ndcg@10", "hr@10", "mrr"])
        epoch = step / self.steps_per_epoch
        shown = " ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)
        return f"{split} @ {step} (epoch {epoch:g}): {shown}"


def _pow2(n: int) -> int:
    return 16 if n <= 16 else 1 << (n - 1).bit_length()


class RankingEvaluator:
    """Ranks of every evaluation user in global batches of ``ranking.batch`` users (padded to a
    multiple of the batch shards); parameters stay sharded as in training, each batch is
    split over the batch axes, the ranks come back replicated to every process."""

    def __init__(self, task: SeqRecTask, setup: Any, which: str):
        self.task, self.setup, self.which = task, setup, which
        shards = setup.batch_shards
        self.batch = -(-task.cfg.ranking.batch // shards) * shards
        protocol, num_items = task.cfg.ranking.protocol, task.data.num_items
        mesh, rules = setup.mesh, setup.cfg.mesh.rules

        def eval_fn(params, inputs, lengths, targets, extra):
            with shd.use_rules(mesh, rules):
                model = nnx.merge(setup.graphdef, params)
                h = model.encode(inputs, lengths, train=False)
                last = jnp.maximum(lengths - 1, 0)
                h = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [B, d]
                if protocol == "sampled":
                    cand = jnp.concatenate([targets[:, None], extra], axis=1)
                    vec, bias = model.output_rows(cand)
                    scores = jnp.einsum("bd,bnd->bn", h.astype(jnp.float32), vec) + bias
                    return rk.sampled_ranks_jax(scores)
                exclude = extra if extra.shape[1] > 0 else None
                return rk.full_ranks_jax(model.item_logits(h), targets, exclude, num_items=num_items)

        rows = [setup.batch_sharding(n) for n in (2, 1, 1, 2)]
        self.step = jax.jit(eval_fn, in_shardings=(setup.state_shardings["params"], *rows),
                            out_shardings=NamedSharding(mesh, PartitionSpec()))

    def _batches(self, ev: EvalSplit):
        rows, batch = ev.rows, self.batch
        u = len(rows.targets)
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
            yield hi - lo, [a.astype(np.int32) for a in (inputs, lengths, targets, extra)]

    def __call__(self, params: Any) -> dict[str, float]:
        ev = self.task.eval_split(self.which)
        ranks, ties = [], []
        for n, arrays in self._batches(ev):
            r, t = jax.device_get(self.step(params, *self.setup.replicated_batch(arrays)))
            ranks.append(np.asarray(r)[:n])
            ties.append(np.asarray(t)[:n])
        return rk.ranking_metrics(np.concatenate(ranks), self.task.cfg.ranking.ks, np.concatenate(ties))


TASKS.register("seqrec", SeqRecTask)
