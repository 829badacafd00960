"""Shared test helpers: subprocess runner with N virtual CPU devices, tiny configs."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_python(code: str, devices: int = 1, timeout: int = 600, cwd: pathlib.Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter with ``devices`` virtual CPU devices; return stdout."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
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
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
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
