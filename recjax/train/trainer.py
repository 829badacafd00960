"""The one trainer: every task, every model, one process or many.

``train(cfg)`` runs (or resumes) a run:

1. check the run directory (:func:`recjax.train.run_dir.prepare`): refuse to overwrite an
   earlier run or to resume with changed keys, before anything is written;
2. build the setup (mesh, sharded abstract state, optimizer groups) from the config and the
   task; print the model, the mesh and the placement of every embedding table;
3. restore the newest checkpoint (state, data position, hooks) or initialise; write the
   config; AOT-compile the train step and report its per-device memory;
4. loop over steps: one jitted step; at their cadences log, evaluate (every ``eval_every``
   steps or ``eval_every_epochs`` epochs; the best checkpoint and early stopping follow
   ``train.best_metric``), checkpoint; at each step boundary check for preemption;
5. at the last step save the final checkpoint, *then* evaluate; run the task's final
   evaluators (e.g. the test split) on the best parameters (or the last ones); write
   ``report.json``.

On SIGTERM (one process or many) the run saves at the next step boundary, waits for the
save and raises :class:`Preempted`, which the CLI turns into exit code
:data:`~recjax.train.preemption.PREEMPTED_EXIT_CODE`; relaunching the same command resumes.
Host syncs happen only at logging, eval and checkpoint intervals; throughput excludes time
in eval and checkpoints. Only process 0 prints and writes logs, config and report; every
process takes part in checkpoints.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from recjax.bench.timing import environment
from recjax.config import Config, save_config
from recjax.errors import NoCheckpointError, NonFiniteLossError, UserError
from recjax.tasks import get_task
from recjax.train import flops as flops_lib
from recjax.train import optim
from recjax.train import run_dir as rd
from recjax.train.checkpoint import Checkpointer
from recjax.train.compile import format_placement, table_placement
from recjax.train.hooks import BestTracker, Clock
from recjax.train.logger import MetricsLogger, format_line
from recjax.train.preemption import PREEMPTED_EXIT_CODE, PreemptionWatch
from recjax.train.state import State, build_setup, describe_model, inspection_setup
from recjax.train.step import make_train_step

# model diagnostics printed on the console line when the model reports them
CONSOLE_EXTRAS = ("total_loss", "moe_load_max_over_mean", "router_active_ratio", "table_occupancy")
OOV_WARN_RATE = 0.01
# Steps dispatched ahead of the host. Unbounded, a long log interval queues hundreds of
# executions, and on virtual CPU devices their collectives then deadlock (XLA:CPU's
# rendezvous saw 5 of 8 devices for 40 s and aborted, all-to-all lookups, log_every=200);
# a few steps of lookahead keep accelerators busy all the same.
MAX_STEPS_IN_FLIGHT = 4
# metrics summed over a logging interval (others: mean)
SUMMED = ("oov_ids", "exchange_overflow", "cold_ids", "targets", "targets_over_cap", "table_insertions",
          "table_evictions", "table_admissions", "table_rejections")


class Preempted(UserError):
    """The run was asked to stop (SIGTERM) and saved its state at ``step``."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, step: int, directory: Any):
        super().__init__(f"preempted: saved step {step} in {directory}; run the same command "
                         f"again to resume (exit code {PREEMPTED_EXIT_CODE})")
        self.step = step


def log0(*args: Any) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def check_finite(state: State) -> None:
    bad = int(jax.device_get(state["nonfinite_step"]))
    if bad >= 0:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {bad}; stopping. The state was frozen at "
            f"step {bad - 1} and nothing after it was saved: the last checkpoint in the run "
            "directory is the last good one. Lower the learning rate or check the data."
        )


class Trainer:
    """One run of ``cfg`` (see the module docstring); :meth:`run` returns the report."""

    def __init__(self, cfg: Config, *, overwrite: bool = False, accept_config_changes: bool = False):
        self.cfg = cfg
        self.is_writer = jax.process_index() == 0
        self.run_dir = rd.run_path(cfg.run_dir)
        self.start = rd.prepare(cfg, self.run_dir, overwrite=overwrite,
                                accept_changes=accept_config_changes, is_writer=self.is_writer)
        if overwrite and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("recjax run_dir prepared")
        self.task = get_task(cfg)
        self.setup = build_setup(cfg, self.task)
        self.total = self.setup.total_steps
        self.info = describe_model(self.setup)
        self.best = BestTracker.from_config(cfg.train)
        self.clock = Clock()
        self.warned_oov = False
        self.warned_overflow = False

    # --------------------------------------------------------------------------- cadence
    def _due(self, steps: int, epochs: int, step: int) -> bool:
        spe = self.task.steps_per_epoch
        return (steps > 0 and step % steps == 0) or (epochs > 0 and spe is not None and step % (epochs * spe) == 0)

    # --------------------------------------------------------------------------- pieces
    def _save(self, step: int, state: State, data: Any, eval_pending: bool = False) -> None:
        """Checkpoint ``step``; ``eval_pending``: the evaluation due at ``step`` has not run yet
        (the final checkpoint, saved first), so a run resumed from it evaluates ``step`` first."""
        t = time.perf_counter()
        check_finite(state)
        loop = {"data": data.get_state(), "best": self.best.state(), "clock": self.clock.state(),
                "eval_pending": eval_pending}
        self.ckpt.save(step, state, loop, self.cfg)
        self.saved_step = step
        self.clock.checkpoint_s += time.perf_counter() - t

    def _evaluate(self, evaluators: dict[str, Any], step: int, params: Any) -> dict[str, dict[str, float]]:
        t = time.perf_counter()
        results = {}
        for split, evaluate in evaluators.items():
            m = evaluate(params)
            results[split] = m
            self.logger.log(step, m, split)
            log0(self.task.format_eval(split, step, m))
            self._warn_oov(split, m)
        self.clock.eval_s += time.perf_counter() - t
        return results

    def _warn_oov(self, split: str, m: dict[str, float]) -> None:
        rate = m.get("oov_rate", 0.0)
        if rate > OOV_WARN_RATE and not self.warned_oov:
            self.warned_oov = True
            log0(f"warning: {100 * rate:.1f}% of the {split} lookups are out of vocabulary "
                 f"(embedding.oov={self.cfg.embedding.oov}); raise the vocabulary sizes or check the ids")

    def _log_train(self, step: int, pending: list[dict[str, Any]], seconds: float, data: Any) -> dict[str, float]:
        fetched = jax.device_get(pending)
        steps = len(fetched)
        step_time = seconds / steps
        m = {k: float(np.sum([f[k] for f in fetched]) if k in SUMMED else np.mean([f[k] for f in fetched]))
             for k in fetched[0]}
        m.update(self.lrs(step - 1))  # the rate used by this step
        g = self.cfg.data.global_batch
        flops_dev = self.info["train_flops_per_example"] * g / self.setup.n_devices
        m["step_time_s"] = step_time
        m["examples_per_s"] = g / step_time
        m["tflops_per_device"] = flops_dev / step_time / 1e12
        mfu = flops_lib.mfu(flops_dev, step_time, self.peak)
        if mfu is not None:
            m["mfu"] = mfu
        if getattr(data, "bad_rows", 0):
            m["bad_rows"] = float(data.bad_rows)
        spe = self.task.steps_per_epoch
        if spe:
            m["epoch"] = step / spe
        self.logger.log(step, m, "train")
        shown = ("loss", "grad_norm", *(k for k in CONSOLE_EXTRAS if k in m))
        log0(format_line(step, self.total, m, shown))
        self._warn_oov("train", m)
        if m.get("exchange_overflow", 0) > 0 and not self.warned_overflow:
            self.warned_overflow = True
            log0(f"warning: {int(m['exchange_overflow'])} distinct ids did not fit their all-to-all bucket in "
                 f"the last {steps} steps and were looked up as zeros; raise embedding.exchange_capacity "
                 f"(0 = exact)")
        return m

    def _eval_and_track(self, evaluators: dict[str, Any], step: int, state: State,
                        best_ckpt: Checkpointer | None) -> dict[str, dict[str, float]]:
        """Evaluate ``step``; a new best of ``train.best_metric`` goes to ``best_ckpt``."""
        results = self._evaluate(evaluators, step, state["params"])
        if self.best.update(step, results):
            self.clock.best_now()
            if best_ckpt is not None:
                self._save_best(best_ckpt, step, state, results)
        if self.best.stop:
            t = self.cfg.train
            log0(f"early stop at step {step}: {t.best_metric} has not improved for {t.patience} "
                 f"evaluations (best {self.best.best:.4f} at step {self.best.best_step})")
        return results

    def _save_best(self, best_ckpt: Checkpointer, step: int, state: State,
                   metrics: dict[str, dict[str, float]]) -> None:
        t = time.perf_counter()
        if best_ckpt.latest_step() == step:  # re-run of a step after a crash
            best_ckpt.manager.delete(step)
        best_ckpt.save(step, {"params": state["params"]}, {"step": step, **metrics}, self.cfg)
        self.clock.checkpoint_s += time.perf_counter() - t

    # --------------------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        cfg, setup, task = self.cfg, self.setup, self.task
        finished = rd.finished_report(self.run_dir, self.start) if (self.start or 0) >= self.total else None
        if finished is not None:  # rerunning a finished command changes nothing in its run_dir
            log0(f"{self.run_dir} already finished at step {self.start} (report.json): nothing to do; "
                 "raise train.steps (or train.epochs) to train on, or use another run_dir")
            return finished
        log0(f"# resolved config ({self.run_dir / 'config.yaml'})\n{cfg.to_yaml()}")
        info = self.info
        log0(f"task {task.name}, model {cfg.model.name}: {info['params_dense']:,} dense "
             f"({info['params_active']:,} active) + {info['params_embedding']:,} embedding params; "
             f"{info['fwd_flops_per_example'] / 1e6:.3f} MFLOP forward per {task.example_name[:-1]}")
        data_summary = task.describe_data()
        log0("data: " + ", ".join(f"{k} {v}" for k, v in data_summary.items() if not isinstance(v, dict)))
        log0(f"mesh {dict(setup.mesh.shape)} over {setup.n_devices} {jax.devices()[0].device_kind} "
             f"device(s), {jax.process_count()} process(es); {self.total} steps"
             + (f" ({task.steps_per_epoch} per epoch)" if task.steps_per_epoch else ""))
        tables = format_placement(table_placement(setup))
        log0("embedding tables:\n" + "\n".join(tables) if tables else "embedding tables: none")

        keep, async_save = cfg.train.keep_checkpoints, cfg.train.async_checkpoint
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", keep=keep, async_save=async_save)
        best_ckpt = (Checkpointer(self.run_dir / "best" / "checkpoints", keep=1, async_save=async_save)
                     if cfg.train.best_metric else None)
        data = task.train_iterator(jax.process_index(), jax.process_count())
        start, eval_pending = self.start, False
        if start is not None:
            state, loop = self.ckpt.restore(start, setup.abstract_state)
            data.set_state(loop["data"])
            self.best.load(loop["best"])
            self.clock.load(loop["clock"])
            eval_pending = bool(loop.get("eval_pending", False))
            log0(f"resumed from {self.ckpt.directory / str(start)} at step {start}")
        else:
            start = 0
            state = setup.init_state()
        self.saved_step = start
        evaluators, final_evaluators = task.evaluators(setup), task.final_evaluators(setup)
        if self.is_writer:
            save_config(cfg, self.run_dir)
            # the log keeps what the checkpoint accounts for: a pending eval at `start` runs
            # again, and the final evaluators run again at the end
            rd.truncate_metrics(self.run_dir, start if self.start is not None else -1,
                                evals_through=start - 1 if eval_pending else None,
                                drop_splits=tuple(final_evaluators))

        t0 = time.perf_counter()
        compiled = make_train_step(setup).lower(setup.abstract_state, setup.abstract_batch()).compile()
        memory = flops_lib.memory_report(compiled)
        log0(f"compiled train step in {time.perf_counter() - t0:.1f}s; per-device memory: "
             + ", ".join(f"{k} {flops_lib.format_bytes(v)}" for k, v in memory.items()))
        self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.train.tensorboard, enabled=self.is_writer)
        self.peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind)
        self.lrs = optim.optimizer_lrs(cfg.optim, self.total)
        watch = PreemptionWatch()
        batch_keys = tuple(task.abstract_batch())
        t = cfg.train
        train_metrics: dict[str, float] = {}
        eval_metrics: dict[str, dict[str, float]] = {}
        step = start
        try:
            if start == 0 and evaluators and (t.eval_every or t.eval_every_epochs):
                eval_metrics = self._evaluate(evaluators, 0, state["params"])  # where the curve starts
            self.clock.start()  # before a pending evaluation, which may record the best's time
            if eval_pending and evaluators:  # resumed from a final checkpoint saved before its eval
                eval_metrics = self._eval_and_track(evaluators, start, state, best_ckpt)
            pending: list[dict[str, Any]] = []
            last_log, excluded = time.perf_counter(), 0.0  # eval and checkpoint time is excluded

            def flush_log() -> None:
                nonlocal pending, last_log, excluded, train_metrics
                check_finite(state)
                seconds = time.perf_counter() - last_log - excluded
                self.clock.train_s += seconds
                train_metrics = self._log_train(step, pending, seconds, data)
                pending, last_log, excluded = [], time.perf_counter(), 0.0

            while step < self.total and not self.best.stop:
                local = next(data)
                batch = setup.global_batch({k: local[k] for k in batch_keys})
                state, metrics = compiled(state, batch)
                pending.append(metrics)
                if len(pending) > MAX_STEPS_IN_FLIGHT:
                    jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1])
                step += 1
                final = step == self.total
                if self._due(t.log_every, 0, step) or final:
                    flush_log()
                evaluate_now = bool(evaluators) and (self._due(t.eval_every, t.eval_every_epochs, step) or final)
                save_now = self._due(t.checkpoint_every, t.checkpoint_every_epochs, step)
                if final or evaluate_now or save_now:
                    jax.block_until_ready(state)  # the steps still in flight are training time
                t_aside = time.perf_counter()
                if final:  # the final checkpoint comes before the final eval
                    self._save(step, state, data, eval_pending=bool(evaluators))
                if evaluate_now:
                    eval_metrics = self._eval_and_track(evaluators, step, state, best_ckpt)
                if not final and (save_now or self.best.stop):
                    self._save(step, state, data)
                if not final and watch.reached(step):
                    if self.saved_step != step:
                        self._save(step, state, data)
                    self.ckpt.wait()
                    log0(f"preemption notice: saved step {step}; exiting with code {PREEMPTED_EXIT_CODE}")
                    raise Preempted(step, self.ckpt.directory)
                excluded += time.perf_counter() - t_aside
            if pending:  # stopped early between two log steps
                flush_log()
            if self.saved_step != step:  # a resumed run that had nothing left to do
                self._save(step, state, data)
            self.ckpt.wait()
            params, final_step, best_eval = state["params"], step, eval_metrics
            if best_ckpt is not None:
                best_ckpt.wait()
                final_step = best_ckpt.latest_step()
                if final_step is None:
                    raise NoCheckpointError(f"no evaluation was run, so there is no best checkpoint in "
                                            f"{best_ckpt.directory}")
                restored, saved = best_ckpt.restore(final_step, {"params": setup.abstract_state["params"]})
                params = restored["params"]
                best_eval = {k: v for k, v in saved.items() if k != "step"}
            final_metrics = self._evaluate(final_evaluators, final_step, params)
        finally:
            watch.close()
            self.logger.close()
            self.ckpt.close()
            if best_ckpt is not None:
                best_ckpt.close()

        self.clock.tick()
        report = {
            "task": task.name,
            "model": dataclasses.asdict(cfg.model),
            "data": data_summary,
            "steps": step,
            "epochs": step / task.steps_per_epoch if task.steps_per_epoch else None,
            "stopped_early": self.best.stop,
            "best_metric": t.best_metric or None,
            "best_step": self.best.best_step,
            "best_value": self.best.best,
            "train": train_metrics,
            "eval": eval_metrics,  # the last evaluation, {split: metrics}
            "best_eval": best_eval,  # the evaluation of the parameters the final evaluators used
            **{split: m for split, m in final_metrics.items()},
            # train_s sums every session's steps since step 0
            "train_examples_per_s": cfg.data.global_batch * step / self.clock.train_s
            if self.clock.train_s > 0 and step > 0 else None,
            "train_time_s": self.clock.train_s,
            "eval_time_s": self.clock.eval_s,
            "checkpoint_time_s": self.clock.checkpoint_s,
            "train_time_to_best_s": self.clock.train_to_best_s,
            "wall_time_to_best_s": self.clock.wall_to_best_s,
            "wall_time_total_s": self.clock.wall_s,
            "model_info": info,
            "train_step_memory_bytes": memory,
            "environment": _environment(),
        }
        if self.is_writer:
            rd.write_json(self.run_dir / "report.json", report)
        log0(f"done: {step} steps; checkpoints in {self.ckpt.directory}; report {self.run_dir / 'report.json'}")
        return report


def _environment() -> dict[str, Any]:
    env = environment()
    return {"device": f"{env['device_kind']} ({env['platform']}) x{env['device_count']}",
            "processes": jax.process_count(), "versions": env["versions"], "command": env["command"],
            "date": env["date"]}


def train(cfg: Config, *, overwrite: bool = False, accept_config_changes: bool = False) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the report (also ``run_dir/report.json``)."""
    return Trainer(cfg, overwrite=overwrite, accept_config_changes=accept_config_changes).run()


def evaluate(cfg: Config) -> dict[str, Any]:
    """Evaluate a run's best checkpoint (or its newest one) with every evaluator of its task."""
    task = get_task(cfg)
    setup = inspection_setup(cfg, task)
    run_dir = rd.run_path(cfg.run_dir)
    best_dir, last_dir = run_dir / "best" / "checkpoints", run_dir / "checkpoints"
    directory = best_dir if rd.checkpoint_steps(best_dir) else last_dir
    if not rd.checkpoint_steps(directory):
        raise NoCheckpointError(f"no checkpoint under {last_dir}; train first with `recjax train` "
                                "and the same config and run_dir")
    ckpt = Checkpointer(directory, keep=1, async_save=False)
    try:
        step = ckpt.latest_step()
        if directory == best_dir:
            restored, _ = ckpt.restore(step, {"params": setup.abstract_state["params"]})
            params = restored["params"]
        else:
            params = ckpt.restore(step, setup.abstract_state)[0]["params"]
    finally:
        ckpt.close()
    evaluators = {**task.evaluators(setup), **task.final_evaluators(setup)}
    out: dict[str, Any] = {"step": step, "checkpoint": str(directory / str(step))}
    for split, run in evaluators.items():
        out[split] = run(params)
        log0(task.format_eval(split, step, out[split]))
    return out
