from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

from recjax.config import MeshConfig
from recjax.errors import ConfigError
from recjax.parallel.mesh import mesh_shape
from recjax.parallel.sharding import logical_to_spec
from tests.conftest import run_python


def test_mesh_shape_resolution():
    assert mesh_shape(MeshConfig(), 8) == (8, 1, 1, 1)
    assert mesh_shape(MeshConfig(data=4, fsdp=-1), 8) == (4, 2, 1, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=2, tensor=2), 8) == (2, 2, 2, 1)
    with pytest.raises(ConfigError, match="only one axis may be -1"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ConfigError, match="not divisible"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(ConfigError, match="multiply to 4"):
        mesh_shape(MeshConfig(data=2, fsdp=2), 8)


def test_logical_rules_to_specs():
    rules = {"batch": ["data", "fsdp"], "table_rows": ["data", "fsdp"], "embed": ["fsdp"], "mlp": ["tensor"]}
    assert logical_to_spec(("batch", None), rules) == P(("data", "fsdp"), None)
    # a mesh axis is used once per spec: embed loses fsdp to table_rows
    assert logical_to_spec(("table_rows", "embed"), rules) == P(("data", "fsdp"), None)
    assert logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert logical_to_spec(("unknown",), rules) == P(None)


def test_mesh_on_one_and_eight_devices():
    code = """
import jax
from jax.sharding import AxisType
from recjax.config import MeshConfig
from recjax.parallel.mesh import make_mesh
n = len(jax.devices())
m = make_mesh(MeshConfig(data=-1, fsdp=min(n, 2)))
assert dict(m.shape) == {"data": n // min(n, 2), "fsdp": min(n, 2), "tensor": 1, "expert": 1}, m.shape
assert all(t == AxisType.Auto for t in m.axis_types)
print("ok", len(jax.devices()))
"""
    assert "ok 8" in run_python(code, devices=8)
    assert "ok 1" in run_python(code, devices=1)
