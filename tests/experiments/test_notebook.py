"""The notebook runs from top to bottom; its own asserts check the numbers it shows."""

from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parents[2] / "experiments" / "notebooks" / "losses.ipynb"


def test_losses_notebook_executes_and_draws_its_plots():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(NOTEBOOK.parents[2])}},
  ).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
  text = "".join(o.get("text", "") for o in outputs)
  assert "first gap where log(1 - softmax) is not finite" in text
  assert "complement_likelihood" in text
