"""docs/walkthrough.ipynb, the walkthrough as a notebook on the reference model, runs top to bottom
(every cell asserts what it shows).  Its tools are the [learn] extra (nbclient, ipykernel): without
them the test skips, and .ci/run's second step, which installs the extra, runs it again."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "walkthrough.ipynb"


def test_walkthrough_notebook_runs(monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    # the kernel is another process (conftest's PYTHONPATH: this checkout's npllama), on one thread
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "docs")}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "block_forward gives the same output, bit for bit" in text
    assert "against finite differences: relative error" in text
    assert "the loss fell from" in text
