"""The analysis notebooks run top to bottom on the committed results and are stored stripped."""

from __future__ import annotations

import pytest

from tests.conftest import REPO

NOTEBOOKS = REPO / "notebooks"


@pytest.mark.parametrize("name", ["scaling_laws.ipynb", "mfu.ipynb"])
def test_notebook_is_committed_without_outputs(name):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("scaling_laws.ipynb", ["approach 3 L(N, D)", "Bayes floor", "runs per free parameter"]),
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
