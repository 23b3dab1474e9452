"""The example notebook runs tp=2 from a Jupyter kernel (so it cannot rot)."""

from __future__ import annotations

import os
import time

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "examples", "notebook_tp2.ipynb")


def _text(cell) -> str:
    """What a code cell printed or displayed."""
    parts = []
    for o in cell.get("outputs", []):
        parts.append(o.get("text", ""))
        parts.append(o.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _is_resource_tracker(p: psutil.Process) -> bool:
    try:
        return "resource_tracker" in " ".join(p.cmdline())
    except psutil.Error:            # already gone
        return True


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tp2_notebook_runs_and_answers():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    memory, answer, story = (_text(c) for c in nb.cells if c.cell_type == "code"
                             and ("llm.memory()" in c.source or "generate(" in c.source
                                  or "stream(" in c.source))
    assert "(0," in memory and "(1," in memory, memory          # one entry per rank
    assert "Paris" in answer and ("stop" in answer or "length" in answer), answer
    assert len(story.strip()) >= 20, story                     # the stream printed text
    # The kernel is shut down and llm.close() stopped the workers: nothing of ours is left.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [p for p in psutil.Process().children(recursive=True)
                if p.pid not in before and not _is_resource_tracker(p)]
        if not left:
            break
        time.sleep(0.2)
    assert not left, [(p.pid, p.name()) for p in left]
