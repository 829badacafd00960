"""The analysis notebooks run top to bottom on the committed results and are stored stripped."""

from __future__ import annotations

import pytest

from tests.conftest import REPO

NOTEBOOKS = REPO / "notebooks"


@pytest.mark.parametrize("name", ["scaling_laws.ipynb", "scaling_excess_kl.ipynb", "mfu.ipynb"])
def test_notebook_is_committed_without_outputs(name):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("scaling_laws.ipynb", ["approach 3 L(N, D)", "Bayes floor", "runs per free parameter"]),
        ("scaling_excess_kl.ipynb", ["excess KL falls with size", "approach 3, E = 0", "free-E check",
                                     "| rankmixer |", "| dlrm | ", "kunlun beats the blind model in",
                                     "| no_compskip |"]),
        ("mfu.ipynb", ["TFLOP/s", "MFU available for"]),
    ],
)
def test_notebook_executes(name, expected, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("RECJAX_NOTEBOOK_BOOT", "50")  # bootstrap resamples: enough to run
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")  # this venv's ipykernel, not a user one
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for snippet in expected:
        assert snippet in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert images, "no figure was drawn"


def _seqrec_study():
    import importlib.util

    spec = importlib.util.spec_from_file_location("seqrec_ml100k", NOTEBOOKS / "seqrec_ml100k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seqrec_ablation_variants_switch_one_recbole_difference_each():
    study = _seqrec_study()
    for model, variants in study.ABLATIONS.items():
        recbole = dict(o.split("=") for o in variants["recbole"])
        default = dict(o.split("=") for o in variants["recjax_default"])
        for name, overrides in variants.items():
            changed = {k for k, v in (o.split("=") for o in overrides) if recbole[k] != v}
            if name.startswith("recbole+"):
                assert len(changed) == 1, (model, name, changed)
                (key,) = changed
                assert dict(o.split("=") for o in overrides)[key] == default[key], (model, name)
        # every key in which the presets differ is switched by one variant
        singles = {k for n, o in variants.items() if n.startswith("recbole+")
                   for k, v in (x.split("=") for x in o) if recbole[k] != v}
        assert singles == {k for k in recbole if recbole[k] != default[k]}, model


def test_seqrec_comparison_interval_and_verdict():
    study = _seqrec_study()
    s = study.stats([0.05, 0.06, 0.07])
    assert s["mean"] == pytest.approx(0.06) and s["std"] == pytest.approx(0.01)
    assert s["ci95"] == pytest.approx(4.303 * 0.01 / 3 ** 0.5)
    same = study.compare([0.0600, 0.0601, 0.0602], [0.0605, 0.0606, 0.0607])
    assert same["relative_difference"] == pytest.approx(0.5 / 60.1, rel=1e-6)
    assert same["within_2pct"] == "holds" and same["ci95"] < 0.01
    worse = study.compare([0.060, 0.061, 0.062], [0.040, 0.041, 0.042])
    assert worse["within_2pct"] == "refuted" and worse["relative_difference"] < -0.3
    noisy = study.compare([0.05, 0.06, 0.07], [0.05, 0.06, 0.07])
    assert noisy["within_2pct"] == "unresolved"  # the interval is wider than +-2%
    assert study.compare([0.06], [0.06])["ci95"] is None  # one seed: no interval


def test_seqrec_table_states_recbole_reference_runs():
    study = _seqrec_study()
    reference = study.recbole_reference()  # notebooks/results/recbole_ml100k.json as committed
    bert = reference["BERT4Rec"]
    assert len(bert["seeds"]) == len(bert["test_ndcg@10"]["values"]) >= 2
    assert 0.0 < bert["test_ndcg@10"]["mean"] < bert["test_hr@10"]["mean"] < 1.0
    doc = {"data": {"users": 943, "items": 1682, "interactions": 100_000}, "protocol": "leave-one-out",
           "device": "cpu", "summary": [], "popularity_test": {"hr@10": 0.05, "ndcg@10": 0.023},
           "recbole_reference": {"BERT4Rec": {"seeds": [1, 2], "test_ndcg@10": study.stats([0.05, 0.06]),
                                              "test_hr@10": study.stats([0.10, 0.12])}}}
    assert ("RecBole 1.2.1's BERT4Rec re-run on this protocol (notebooks/recbole_reference.py, 2 seeds): "
            "test HR@10 0.1100 ± 0.0141, NDCG@10 0.0550 ± 0.0071.") in study.markdown_models(doc)


def test_seqrec_paper_setting_is_a_valid_config_of_both_models():
    from recjax.config import load_config

    study = _seqrec_study()
    for model in ("bert4rec", "cotten4rec"):
        cfg = load_config(str(REPO / "configs" / "experiments" / f"{model}_ml100k.yaml"), study.PAPER)
        assert (cfg.model.hidden, cfg.data.sequences.max_len, cfg.data.global_batch) == (128, 100, 128)
        assert cfg.optim.dense.name == "adamw" and cfg.optim.grad_clip_norm == 1.0
        assert cfg.optim.warmup_steps == cfg.train.epochs * 12 // 10  # 10% of the steps
        assert cfg.model.attention == ("softmax" if model == "bert4rec" else "cosine")


def test_seqrec_sweep_overrides_merge_and_the_picked_variant_is_the_experiment_config():
    from recjax.config import load_config

    study = _seqrec_study()
    assert study._merge(["a=1", "b=2"], ["a=3"]) == ["a=3", "b=2"]
    config = str(REPO / "configs" / "experiments" / "bert4rec_ml100k.yaml")
    experiment = load_config(config)
    picked = load_config(config, study._merge(study.RECBOLE_BUDGET, study.SWEEP["base_h128_e20"]))
    assert picked == experiment
    base = load_config(config, study._merge(study.RECBOLE_BUDGET, study.SWEEP["base"]))
    assert (base.model.hidden, base.model.inner, base.train.epochs) == (64, 256, 10)
    for overrides in study.SWEEP.values():  # every variant is a valid config
        load_config(config, study._merge(study.RECBOLE_BUDGET, overrides))


def test_seqrec_sweep_summary_picks_best_validation_among_the_most_seeds():
    study = _seqrec_study()

    def row(variant, seed, valid, test):
        return {"variant": f"sweep_{variant}", "seed": seed, "device": "cpu", "overrides": [],
                "valid": {"ndcg@10": valid}, "test": {"ndcg@10": test, "hr@10": 2 * test},
                "best_epoch": 5, "epochs_run": 10}

    rows = [row("last1_l4", 0, 0.09, 0.05),  # best validation, but one seed only
            row("base", 0, 0.06, 0.07), row("base", 1, 0.06, 0.07),
            row("base_e30", 0, 0.07, 0.05), row("base_e30", 1, 0.07, 0.05)]
    summary = study.summarise_sweep(rows)
    assert [e["variant"] for e in summary] == ["last1_l4", "base_e30", "base"]
    assert [e["selected"] for e in summary] == [False, True, False]  # by validation, not by test
    assert summary[1]["overrides"] == study.SWEEP["base_e30"]
    doc = {"data": {"users": 943, "items": 1682, "interactions": 100_000}, "protocol": "leave-one-out",
           "device": "cpu", "summary": summary}
    md = study.markdown_sweep(doc)
    assert "| **base_e30** | train.epochs=30 | 2 | 0.0700 ± 0.0000 | 0.0500 ± 0.0000 |" in md


def test_seqrec_recbole_sized_runs_match_across_studies():
    """The ablation's BERT4Rec variants and the ml100k Cotten4Rec comparison stay at RecBole's sizes
    (hidden 64, inner 256) while the BERT4Rec experiment config is larger."""
    from recjax.config import load_config

    study = _seqrec_study()
    experiments = REPO / "configs" / "experiments"
    cotten = load_config(str(experiments / "cotten4rec_ml100k.yaml"))
    bert = load_config(str(experiments / "bert4rec_ml100k.yaml"), study.RECBOLE_BUDGET)
    sizes = ("hidden", "inner", "num_layers", "num_heads", "dropout", "norm", "output_head")
    assert [getattr(cotten.model, k) for k in sizes] == [getattr(bert.model, k) for k in sizes]
    assert (cotten.train.epochs, cotten.model.hidden, cotten.model.attention) == (bert.train.epochs, 64, "cosine")
    assert load_config(str(experiments / "bert4rec_ml100k.yaml")).model.hidden == 128
    for overrides in study.ABLATIONS["bert4rec"].values():
        cfg = load_config(str(experiments / "bert4rec_ml100k.yaml"), overrides)
        assert (cfg.model.hidden, cfg.model.inner) == (64, 256)
