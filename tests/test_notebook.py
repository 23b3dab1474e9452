"""The example notebook runs tp=2 from a Jupyter kernel (so it cannot rot)."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "examples", "notebook_tp2.ipynb")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tp2_notebook_runs_and_answers():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "Paris" in text
    assert "stop" in text or "length" in text
