"""Every Colab notebook runs top to bottom, headless, at its tiny size (MEMZOO_TINY=1)."""

import os
from pathlib import Path

import nbformat
import pytest

COLAB = Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))


def test_notebooks_exist_and_are_committed_without_outputs():
  assert len(NOTEBOOKS) >= 5
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
  from nbclient import NotebookClient

  monkeypatch.setenv("MEMZOO_TINY", "1")
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as on a Colab CPU runtime
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
    nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(COLAB)}}
  )
  client.execute()  # raises CellExecutionError naming the failing cell
  assert os.environ["MEMZOO_TINY"] == "1"
