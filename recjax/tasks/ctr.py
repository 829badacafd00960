"""Click-through-rate prediction: DLRM, DCNv2, RankMixer, TokenMixer-Large.

Data: the synthetic teacher stream or Criteo TSV files (``recjax.data.pipeline``), batches of
``dense [B, num_dense] f32``, ``sparse [B, F] int32`` (raw ids: ``[B, F, 2] uint32``), ``label [B] f32`` (``user_id [B]`` for
GAUC). Multi-task data (``data.synthetic.tasks = T``) has ``label [B, T]``, models registered
``multi_task`` give logits ``[B, T]``, and the BCE below becomes the weighted sum over tasks of
``recjax.tasks.multitask``. Loss, with ``z`` the model's logits and ``y`` the labels::

    loss  = mean_b BCE(z_b, y_b),   BCE(z, y) = softplus(z) - y z
    total = loss + w_aux mean_b BCE(z_aux_b, y_b)  (aux["aux_logits"], weight aux["aux_logits_weight"])
                 + aux["aux_loss"]                 (label-free model penalties, e.g. MoE balance)

Evaluation (split ``eval``): AUC, logloss, NE, GAUC and, on synthetic data, the Bayes logloss
(``recjax.tasks.metrics``), plus the out-of-vocabulary share of the lookups; per task and
their mean on multi-task data.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from recjax.config import Config
from recjax.data import pipeline
from recjax.data.spec import DEVICE_KEYS, FeatureSpec, feature_spec
from recjax.errors import ConfigError, DataError
from recjax.layers.embedding import present
from recjax.models import registry as models
from recjax.parallel import sharding as shd
from recjax.registry import TASKS
from recjax.tasks.base import Evaluator, Metrics, Task, scalar_metrics
from recjax.tasks.metrics import StreamingEval
from recjax.tasks.multitask import MultiTaskEval, bce, task_weights

SOURCES = ("synthetic", "criteo")


def oov_metrics(oov_ids: jax.Array, sparse: jax.Array) -> Metrics:
    """Out-of-vocabulary count and its share of the lookups (ids other than -1, "missing")."""
    lookups = jnp.sum(present(sparse), dtype=jnp.int32)
    return {"oov_ids": oov_ids, "oov_rate": oov_ids / jnp.maximum(lookups, 1)}


class CTRTask(Task):
    name = "ctr"

    @staticmethod
    def check_config(cfg: Config) -> None:
        if cfg.data.source not in SOURCES:
            raise ConfigError(f"data.source: the ctr task (model '{cfg.model.name}') reads one of "
                              f"{SOURCES}, got {cfg.data.source!r}")
        if cfg.train.epochs:
            raise ConfigError("train.epochs: the ctr task streams without epochs; set train.steps")
        tasks = feature_spec(cfg.data).tasks
        if tasks and not models.get(cfg.model.name).multi_task:
            multi = [n for n in models.MODELS.names() if models.get(n).multi_task]
            raise ConfigError(f"data.synthetic.tasks={tasks}: model '{cfg.model.name}' predicts one label; "
                              f"multi-task models: {multi}")
        task_weights(cfg, tasks or 1)

    @property
    def data_info(self) -> FeatureSpec:
        return feature_spec(self.cfg.data)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        g, f = self.cfg.data.global_batch, self.data_info
        out = {
            "dense": jax.ShapeDtypeStruct((g, f.num_dense), jnp.float32),
            "sparse": (jax.ShapeDtypeStruct((g, f.num_sparse, 2), jnp.uint32) if f.raw_ids
                       else jax.ShapeDtypeStruct((g, f.num_sparse), jnp.int32)),
            "label": jax.ShapeDtypeStruct((g, f.tasks) if f.tasks else (g,), jnp.float32),
        }
        if f.has_user_id:
            out["user_id"] = jax.ShapeDtypeStruct((g,), jnp.int32)
        if f.events:
            out["event_item"] = jax.ShapeDtypeStruct((g, f.events), jnp.int32)
            out["event_type"] = jax.ShapeDtypeStruct((g, f.events), jnp.int32)
            out["event_age"] = jax.ShapeDtypeStruct((g, f.events), jnp.float32)
        return out

    def loss(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng  # the CTR models are deterministic
        logits, aux = model(batch, train=True)
        aux = dict(aux)
        weights = task_weights(self.cfg, self.data_info.tasks or 1)
        loss, per_task = bce(logits, batch["label"], weights)
        if per_task is not None:
            aux["task_loss"] = per_task
        total = loss
        if "aux_logits" in aux:
            head, _ = bce(aux.pop("aux_logits"), batch["label"], weights)
            aux["aux_head_loss"] = head
            total = total + aux.pop("aux_logits_weight") * head
        if "aux_loss" in aux:
            total = total + aux["aux_loss"]
        metrics = scalar_metrics(aux)
        if "oov_ids" in aux:
            metrics.update(oov_metrics(aux["oov_ids"], batch["sparse"]))
        metrics["loss"] = loss
        if total is not loss:
            metrics["total_loss"] = total
        return total, metrics

    def train_iterator(self, process_index: int, process_count: int) -> pipeline.BatchIterator:
        return pipeline.make_iterator(self.cfg.data, "train", process_index=process_index,
                                      process_count=process_count)

    def evaluators(self, setup: Any) -> dict[str, Evaluator]:
        return {"eval": StreamEvaluator(self, setup)}

    def describe_data(self) -> dict[str, Any]:
        f = self.data_info
        return {"source": self.cfg.data.source, "sparse_features": f.num_sparse,
                "dense_features": f.num_dense, "global_batch": self.cfg.data.global_batch}

    def format_eval(self, split: str, step: int, m: dict[str, float]) -> str:
        parts = [f"{split} @ {step}: logloss {m['logloss']:.5f}"]
        if "bayes_logloss" in m:
            parts.append(f"(Bayes-optimal {m['bayes_logloss']:.5f}, gap {m['logloss'] - m['bayes_logloss']:+.5f}, "
                         f"excess KL {m['excess_kl']:.5f})")
        parts.append(f"| NE {m['ne']:.4f} | AUC {m['auc']:.4f}")
        if "gauc" in m:
            parts.append(f"| GAUC {m['gauc']:.4f}")
        tasks = self.data_info.tasks
        if tasks:
            parts[0] = f"{split} @ {step}: mean of {tasks} tasks: logloss {m['logloss']:.5f}"
            parts.append("| " + ", ".join(f"t{t} AUC {m[f't{t}/auc']:.4f}" + (
                f" excess KL {m[f't{t}/excess_kl']:.5f}" if f"t{t}/excess_kl" in m else "") for t in range(tasks)))
        parts.append(f"| {int(m['count'])} examples")
        if m.get("oov_rate", 0) > 0:
            parts.append(f"| OOV {100 * m['oov_rate']:.2f}%")
        return " ".join(parts)


class StreamEvaluator:
    """Streams the eval split through the model (sharded like training) and scores it."""

    def __init__(self, task: CTRTask, setup: Any):
        self.task, self.setup = task, setup
        replicated = NamedSharding(setup.mesh, PartitionSpec())

        def eval_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
            with shd.use_rules(setup.mesh, setup.cfg.mesh.rules):
                logits, aux = nnx.merge(setup.graphdef, params)(batch, train=False)
            out = {"prob": jax.nn.sigmoid(logits), "label": batch["label"],
                   "oov_ids": aux.get("oov_ids", jnp.zeros((), jnp.int32)),
                   "lookups": jnp.sum(present(batch["sparse"]), dtype=jnp.int32)}
            for key in ("user_id", "label_prob"):
                if key in batch:
                    out[key] = batch[key]
            return out

        self.step = jax.jit(eval_step, in_shardings=(setup.state_shardings["params"], None),
                            out_shardings=replicated)

    def __call__(self, params: Any) -> dict[str, float]:
        cfg = self.task.cfg
        it = pipeline.make_iterator(cfg.data, "eval", process_index=jax.process_index(),
                                    process_count=jax.process_count())
        tasks = self.task.data_info.tasks
        metrics = MultiTaskEval(tasks) if tasks else StreamingEval()
        oov = lookups = 0
        for local in it:
            batch = self.setup.global_batch({k: local[k] for k in (*DEVICE_KEYS, "label_prob") if k in local})
            out = jax.device_get(self.step(params, batch))
            metrics.update(out["prob"], out["label"], out.get("user_id"), out.get("label_prob"))
            oov += int(out["oov_ids"])
            lookups += int(out["lookups"])
        result = metrics.result()
        if result["count"] == 0:
            files = cfg.data.criteo.eval_files if cfg.data.source == "criteo" else "synthetic eval"
            raise DataError(f"the eval set ({files}) holds fewer examples than one global batch "
                            f"(data.global_batch={cfg.data.global_batch}); give it at least that many "
                            "rows or lower data.global_batch")
        result["oov_ids"] = float(oov)
        result["oov_rate"] = oov / max(lookups, 1)
        return result


TASKS.register("ctr", CTRTask)
