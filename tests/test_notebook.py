"""notebooks/quickstart.ipynb runs top to bottom (its cells assert what they show)."""
import nbformat
from nbclient import NotebookClient


def test_quickstart_notebook_runs(root):
    nb = nbformat.read(root / "notebooks/quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3      # two timelines and the loss
