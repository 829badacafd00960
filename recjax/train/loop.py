"""The training loop: resume, AOT compile, step, log, evaluate, checkpoint.

Host syncs happen only at logging, eval and checkpoint intervals. Throughput excludes
time spent in eval and checkpointing. Every process runs this loop; only process 0
prints and writes logs, every process takes part in checkpoints.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import jax
import numpy as np

from recjax.config import Config, save_config
from recjax.data import pipeline
from recjax.data.spec import DEVICE_KEYS
from recjax.train import flops as flops_lib
from recjax.train import optim
from recjax.train.checkpoint import Checkpointer
from recjax.train.logger import MetricsLogger, format_line
from recjax.train.metrics import StreamingEval
from recjax.train.state import TrainSetup, build_setup, describe_model
from recjax.train.step import abstract_batch, make_eval_step, make_train_step

# model diagnostics printed on the console line when the model reports them
CONSOLE_EXTRAS = ("total_loss", "moe_load_max_over_mean", "router_active_ratio")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the message names the step."""


def log0(*args: Any) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def global_batch(setup: TrainSetup, local: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, jax.Array]:
    """Assemble process-local numpy batches into global arrays sharded over the batch axes."""
    g = setup.cfg.data.global_batch
    out = {}
    for k in keys:
        if k in local:
            x = np.asarray(local[k])
            sharding = setup.batch_sharding(x.ndim)
            out[k] = jax.make_array_from_process_local_data(sharding, x, (g, *x.shape[1:]))
    return out


def evaluate(setup: TrainSetup, eval_step: Any, params: Any) -> dict[str, float]:
    """Stream the eval split through the model; AUC, logloss, NE, GAUC and the Bayes logloss."""
    it = pipeline.make_iterator(
        setup.cfg.data, "eval", process_index=jax.process_index(), process_count=jax.process_count()
    )
    metrics = StreamingEval()
    for local in it:
        out = jax.device_get(eval_step(params, global_batch(setup, local, (*DEVICE_KEYS, "label_prob"))))
        metrics.update(out["prob"], out["label"], out.get("user_id"), out.get("label_prob"))
    return metrics.result()


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the final train and eval metrics."""
    run_dir = pathlib.Path(cfg.run_dir)
    log0(f"# resolved config ({run_dir / 'config.yaml'})\n{cfg.to_yaml()}")
    if jax.process_index() == 0:
        save_config(cfg, run_dir)

    setup = build_setup(cfg)
    info = describe_model(setup)
    log0(
        f"model {cfg.model.name}: {info['params_dense']:,} dense ({info['params_active']:,} active) + "
        f"{info['params_embedding']:,} embedding params; "
        f"{info['fwd_flops_per_example'] / 1e6:.3f} MFLOP forward per example"
    )
    log0(f"mesh {dict(setup.mesh.shape)} over {setup.n_devices} {jax.devices()[0].device_kind} device(s), "
         f"{jax.process_count()} process(es)")

    ckpt = Checkpointer(run_dir, keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoint)
    data = pipeline.make_iterator(
        cfg.data, "train", process_index=jax.process_index(), process_count=jax.process_count()
    )
    start = ckpt.latest_step() if cfg.train.resume else None
    if start is not None:
        state, data_state = ckpt.restore(start, setup.abstract_state)
        data.set_state(data_state)
        log0(f"resumed from {ckpt.directory / str(start)} at step {start}")
    else:
        start = 0
        state = setup.init_state()

    train_step = make_train_step(setup)
    t0 = time.perf_counter()
    compiled = train_step.lower(setup.abstract_state, abstract_batch(setup)).compile()
    mem = flops_lib.memory_report(compiled)
    log0(
        f"compiled train step in {time.perf_counter() - t0:.1f}s; per-device memory: "
        + ", ".join(f"{k} {flops_lib.format_bytes(v)}" for k, v in mem.items())
    )
    eval_step = make_eval_step(setup)
    logger = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard, enabled=jax.process_index() == 0)
    peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind)
    learning_rates = optim.optimizer_lrs(cfg.optim, cfg.train.steps)
    train_flops_per_step_per_device = info["train_flops_per_example"] * cfg.data.global_batch / setup.n_devices

    def every(n: int, step: int) -> bool:
        return step == cfg.train.steps or (n > 0 and step % n == 0)

    pending: list[dict[str, jax.Array]] = []
    last_log_time, last_log_step, excluded = time.perf_counter(), start, 0.0
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    try:
        if start == 0 and cfg.train.eval_every > 0:  # the untrained model: where the curve starts
            eval_metrics = evaluate(setup, eval_step, state["params"])
            logger.log(0, eval_metrics, "eval")
            log0(format_eval(0, eval_metrics))
            last_log_time = time.perf_counter()
        for step in range(start + 1, cfg.train.steps + 1):
            batch = global_batch(setup, next(data), DEVICE_KEYS)
            state, metrics = compiled(state, batch)
            pending.append(metrics)

            if every(cfg.train.log_every, step):
                fetched = jax.device_get(pending)
                pending.clear()
                check_finite(state)
                now = time.perf_counter()
                elapsed = now - last_log_time - excluded
                steps_done = step - last_log_step
                step_time = elapsed / steps_done
                train_metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                train_metrics["oov_ids"] = float(np.sum([m.get("oov_ids", 0) for m in fetched]))
                train_metrics.update(learning_rates(step - 1))  # rate used by this step
                train_metrics["step_time_s"] = step_time
                train_metrics["examples_per_s"] = cfg.data.global_batch / step_time
                train_metrics["tflops_per_device"] = train_flops_per_step_per_device / step_time / 1e12
                mfu = flops_lib.mfu(train_flops_per_step_per_device, step_time, peak)
                if mfu is not None:
                    train_metrics["mfu"] = mfu
                if getattr(data, "bad_rows", 0):
                    train_metrics["bad_rows"] = float(data.bad_rows)
                logger.log(step, train_metrics, "train")
                shown = ("loss", "grad_norm", *(k for k in CONSOLE_EXTRAS if k in train_metrics))
                log0(format_line(step, cfg.train.steps, train_metrics, shown))
                last_log_time, last_log_step, excluded = time.perf_counter(), step, 0.0

            if every(cfg.train.eval_every, step):
                t = time.perf_counter()
                eval_metrics = evaluate(setup, eval_step, state["params"])
                logger.log(step, eval_metrics, "eval")
                log0(format_eval(step, eval_metrics))
                excluded += time.perf_counter() - t

            if every(cfg.train.checkpoint_every, step):
                t = time.perf_counter()
                check_finite(state)
                ckpt.save(step, state, data.get_state(), cfg)
                excluded += time.perf_counter() - t
        ckpt.wait()
    finally:
        logger.close()
        ckpt.close()
    log0(f"done: {cfg.train.steps} steps; checkpoints in {ckpt.directory}; metrics in {run_dir / 'metrics.jsonl'}")
    return {"train": train_metrics, "eval": eval_metrics, "model": info, "memory": mem}


def check_finite(state: dict[str, Any]) -> None:
    bad = int(jax.device_get(state["nonfinite_step"]))
    if bad >= 0:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {bad}; stopping. The state was frozen at "
            f"step {bad - 1} and nothing after it was saved: the last checkpoint in the run "
            "directory is the last good one. Lower the learning rate or check the data."
        )


def format_eval(step: int, m: dict[str, float]) -> str:
    parts = [f"eval @ {step}: logloss {m['logloss']:.5f}"]
    if "bayes_logloss" in m:
        parts.append(f"(Bayes-optimal {m['bayes_logloss']:.5f}, gap {m['logloss'] - m['bayes_logloss']:+.5f})")
    parts.append(f"| NE {m['ne']:.4f} | AUC {m['auc']:.4f}")
    if "gauc" in m:
        parts.append(f"| GAUC {m['gauc']:.4f}")
    parts.append(f"| {int(m['count'])} examples")
    return " ".join(parts)
