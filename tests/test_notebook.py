"""Executes notebooks/walkthrough.ipynb top to bottom (nbclient); any cell error fails the test."""
import os

import nbclient
import nbformat

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "walkthrough.ipynb")


def test_walkthrough_notebook_runs_top_to_bottom_without_errors():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # runs in a copy: the committed notebook keeps the outputs of its own fresh run
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 5  # schedule, 2D base, 2D fine-tuned, digit grids, cost: each cell drew its figure
    text = "".join(output.get("text", "") for output in outputs)
    assert "notebook ran in" in text
