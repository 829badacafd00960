"""Shared test helpers: subprocess runner with N virtual CPU devices, tiny configs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any

from recjax.parallel.launch import with_virtual_devices

REPO = pathlib.Path(__file__).resolve().parent.parent
# The suite's programs run for milliseconds and XLA's CPU compiles dominate its time: compile each
# program as one LLVM module (split codegen only adds work on a 2-core runner) without LLVM's
# optimisation passes. The xdist workers and every subprocess inherit these flags; a GPU host (its
# kernels are compiled by the same LLVM) keeps XLA's defaults.
FAST_COMPILE_FLAGS = ["--xla_cpu_parallel_codegen_split_count=1", "--xla_backend_optimization_level=0"]


def pytest_configure(config) -> None:
    if shutil.which("nvidia-smi"):
        return
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join([*FAST_COMPILE_FLAGS, *(f for f in flags if f not in FAST_COMPILE_FLAGS)])


def run_python(code: str, devices: int = 1, timeout: int = 600, cwd: pathlib.Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter with ``devices`` virtual CPU devices; return stdout."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = with_virtual_devices(env.get("XLA_FLAGS", ""), devices)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd or REPO
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def run_cli(args: list[str], devices: int | None = None, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    if devices:
        env["XLA_FLAGS"] = with_virtual_devices(env.get("XLA_FLAGS", ""), devices)
    proc = subprocess.run(
        [sys.executable, "-m", "recjax.cli", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"recjax {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# Overrides that make any config tiny and fast (CI: 2 cores).
TINY = [
    "data.global_batch=64",
    "data.eval_batches=2",
    "data.synthetic.num_sparse=4",
    "data.synthetic.vocab_sizes=[500]",
    "data.synthetic.num_users=100",
    "train.log_every=1",
    "train.tensorboard=false",
    "optim.warmup_steps=2",
]


def tiny(*extra: str) -> list[str]:
    """TINY with ``extra`` overrides; a key in ``extra`` replaces the TINY value."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [t for t in TINY if t.split("=", 1)[0] not in keys] + list(extra)


def with_overrides(base: list[str], *extra: str) -> list[str]:
    """``base`` arguments with the ``key=value`` overrides in ``extra`` replacing the same keys."""
    keys = {e.split("=", 1)[0] for e in extra if "=" in e}
    return [a for a in base if a.split("=", 1)[0] not in keys] + list(extra)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``recjax ARGV`` in this process: (exit code, stdout, stderr)."""
    from recjax.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def snapshot(run: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``run`` (relative path -> bytes)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# `python -c KILL_DRIVER recjax-args...`: `recjax` whose train stream SIGKILLs process
# $KILL_PROCESS (default 0) when it fetches batch $KILL_AT_BATCH, once: the time of death goes to
# the file $KILL_MARKER, and a relaunch that finds it trains on.
KILL_DRIVER = """
import os, pathlib, signal, sys, time
from recjax import cli
from recjax.data import pipeline

marker, at = pathlib.Path(os.environ["KILL_MARKER"]), int(os.environ["KILL_AT_BATCH"])
victim = int(os.environ.get("KILL_PROCESS", "0"))
make_iterator = pipeline.make_iterator


class DiesOnce:
    # process `victim` SIGKILLs itself when asked for batch `at`, unless it did so before
    def __init__(self, it):
        self.it, self.served = it, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.served += 1
        if self.served == at and not marker.exists():
            marker.write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return next(self.it)

    def __getattr__(self, name):
        return getattr(self.it, name)


def dying_make_iterator(cfg, split, *, process_index=0, process_count=1):
    it = make_iterator(cfg, split, process_index=process_index, process_count=process_count)
    return DiesOnce(it) if split == "train" and process_index == victim else it


pipeline.make_iterator = dying_make_iterator
sys.exit(cli.main(sys.argv[1:]))
"""


def read_losses(run_dir: pathlib.Path) -> dict[int, float]:
    """Train loss per step from ``run_dir/metrics.jsonl`` (a step logged twice keeps the last)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def model_logits(model: Any, batch: dict[str, Any]) -> Any:
    """A CTR model's jitted forward: ``model(batch)[0]``."""
    import jax
    from flax import nnx

    graphdef, params = nnx.split(model)
    return jax.jit(lambda p, b: nnx.merge(graphdef, p)(b)[0])(params, batch)


def assert_adam_lowers_loss(model: Any, batch: dict[str, Any], steps: int = 4) -> None:
    """``steps`` Adam steps on one batch's BCE give finite, falling losses."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    graphdef, params = nnx.split(model)
    opt = optax.adam(3e-3)
    loss = lambda p: optax.sigmoid_binary_cross_entropy(nnx.merge(graphdef, p)(batch)[0], batch["label"]).mean()

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    state, losses = opt.init(params), []
    for _ in range(steps):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def xla_over_analytic_forward_flops(cfg: Any, batch: int = 16) -> float:
    """XLA's cost analysis of a CTR model's jitted forward over ``batch`` examples (built
    abstractly from ``cfg``; event keys when the stream has events) over the registry's analytic
    forward FLOPs for as many examples."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from recjax.data.spec import feature_spec
    from recjax.models import registry

    fs = feature_spec(cfg.data)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: registry.build_model(cfg, fs, nnx.Rngs(0))))
    shapes = {"dense": ((batch, fs.num_dense), jnp.float32), "sparse": ((batch, fs.num_sparse), jnp.int32)}
    if fs.events:
        shapes.update({"event_item": ((batch, fs.events), jnp.int32), "event_type": ((batch, fs.events), jnp.int32),
                       "event_age": ((batch, fs.events), jnp.float32)})
    abstract = {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
    xla = fwd.lower(params, abstract).compile().cost_analysis()["flops"]
    return xla / (registry.forward_flops_per_example(cfg, fs) * batch)
