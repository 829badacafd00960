from __future__ import annotations

import pathlib

import pytest

from recjax.config import load_config, parse_overrides
from recjax.errors import ConfigError


def test_base_loads_with_defaults():
    cfg = load_config()
    assert cfg.model.name == "dlrm"
    assert cfg.mesh.rules["batch"] == ["data", "fsdp", "expert"]
    assert cfg.optim.embedding.name == "rowwise_adagrad"


def test_chain_and_overrides(tmp_path: pathlib.Path):
    (tmp_path / "mid.yaml").write_text("base: ../../configs/models/dcnv2.yaml\ntrain: {steps: 7}\n".replace(
        "../../configs", str(pathlib.Path(__file__).resolve().parent.parent / "configs")))
    (tmp_path / "top.yaml").write_text("base: mid.yaml\ntrain: {log_every: 3}\n")
    cfg = load_config(tmp_path / "top.yaml", ["train.steps=9", "mesh.rules.batch=[data]", "optim.dense.lr=1"])
    assert cfg.model.name == "dcnv2"
    assert cfg.train.steps == 9 and cfg.train.log_every == 3
    assert cfg.mesh.rules["batch"] == ["data"]
    assert cfg.mesh.rules["table_rows"] == ["data", "fsdp", "expert"]  # other rules survive the override
    assert cfg.optim.dense.lr == 1.0 and isinstance(cfg.optim.dense.lr, float)
    assert load_config(None, ["optim.dense.lr=3e-4"]).optim.dense.lr == 3e-4  # YAML 1.1 reads this as a string


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'.*'train.steps'"):
        load_config(None, ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"'data.global_batch'"):
        load_config(None, ["data.global_batc=3"])


def test_wrong_type_names_key_expected_and_given():
    with pytest.raises(ConfigError, match=r"train.steps.*expected int.*'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"train.compute_dtype.*one of 'float32', 'bfloat16'.*'fp8'"):
        load_config(None, ["train.compute_dtype=fp8"])
    with pytest.raises(ConfigError, match=r"data.synthetic.vocab_sizes\[1\].*expected int"):
        load_config(None, ["data.synthetic.vocab_sizes=[1, x]"])


def test_unknown_model_and_model_keys():
    with pytest.raises(ConfigError, match=r"unknown model 'dlrn'.*'dlrm'"):
        load_config(None, ["model.name=dlrn"])
    with pytest.raises(ConfigError, match=r"model.top_mpl.*model.top_mlp"):
        load_config(None, ["model.top_mpl=[4]"])


def test_conflicting_override_is_an_error():
    with pytest.raises(ConfigError, match="given twice"):
        parse_overrides(["train.steps=1", "train.steps=2"])
    assert parse_overrides(["a.b=1", "a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


def test_missing_file_and_cycle(tmp_path: pathlib.Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_all_shipped_configs_resolve():
    root = pathlib.Path(__file__).resolve().parent.parent / "configs"
    files = sorted(root.glob("models/*.yaml")) + sorted(root.glob("experiments/*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_config_imports_no_model_or_trainer_module():
    """The registry looks models and tasks up by name: importing and loading a config pulls in
    no model, task or trainer module, and nothing imports the removed sequential loop."""
    import pathlib
    import subprocess
    import sys

    code = ("import sys, recjax.config as c; "
            "bad = [m for m in sys.modules if m.startswith(('recjax.models', 'recjax.tasks', 'recjax.train'))]; "
            "print(bad); assert not bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    root = pathlib.Path(__file__).resolve().parent.parent / "recjax"
    offenders = [str(p) for p in root.rglob("*.py") if "seqrec_loop" in p.read_text()]
    assert offenders == []
    assert not (root / "train" / "seqrec_loop.py").exists() and not (root / "train" / "loop.py").exists()
