"""Peak lookup, MFU arithmetic, XLA FLOPs and memory analysis of real compiled programs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from recjax.train import flops as F


@pytest.mark.parametrize(
    "kind,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA B200", 2250e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v6e", 918e12),
        ("cpu", None),
        ("Tesla T4", None),
        ("", None),
    ],
)
def test_peak_lookup(kind, peak):
    assert F.peak_flops_per_device(kind) == peak


def test_mfu_math():
    assert F.mfu(989e12 * 0.5, 1.0, 989e12) == pytest.approx(0.5)
    assert F.mfu(1e12, 0.01, 1e15) == pytest.approx(0.1)
    assert F.mfu(1e12, 0.01, None) is None
    assert F.mfu(1e12, 0.0, 1e15) is None


def test_xla_flops_matmul():
    m, k, n = 64, 32, 16
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert F.xla_flops(compiled) == pytest.approx(2 * m * n * k, rel=1e-6)


class _Fake:
    def __init__(self, cost=None, mem=None):
        self._cost, self._mem = cost, mem

    def cost_analysis(self):
        return self._cost

    def memory_analysis(self):
        return self._mem


def test_xla_flops_and_memory_robust():
    assert F.xla_flops(_Fake([{"flops": 10.0}])) == 10.0
    assert F.xla_flops(_Fake({"flops": 3})) == 3.0
    for bad in (None, [], {}, [{"bytes accessed": 1.0}]):
        assert F.xla_flops(_Fake(bad)) != F.xla_flops(_Fake(bad))  # NaN
    assert F.memory_report(_Fake()) == {}

    class Partial:
        argument_size_in_bytes = 100
        temp_size_in_bytes = 50

    assert F.memory_report(_Fake(mem=Partial())) == {"argument": 100, "temp": 50, "total": 150}


def test_memory_report_real_compile():
    x = jnp.ones((256, 128), jnp.float32)
    compiled = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0), donate_argnums=()).lower(x).compile()
    r = F.memory_report(compiled)
    assert r["argument"] == 256 * 128 * 4
    assert r["output"] == 256 * 4
    assert r["total"] == r["argument"] + r["output"] + r["temp"] - r["alias"]
    assert set(r) >= {"argument", "output", "temp", "alias", "generated_code", "total"}


def test_format_bytes():
    assert F.format_bytes(0) == "0 B"
    assert F.format_bytes(1023) == "1023 B"
    assert F.format_bytes(1536) == "1.50 KiB"
    assert F.format_bytes(3 * 1024**3) == "3.00 GiB"
    assert F.format_bytes(None) == "n/a"
