"""The example notebook in ``examples/`` runs end to end, offline, on the bundled demo model, and
shows the trace, the tables and the report inline."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO_ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = REPO_ROOT / "examples" / "loopscope_in_a_notebook.ipynb"


def _html_outputs(cell: dict) -> str:
    return "".join(
        str(output.get("data", {}).get("text/html", ""))
        for output in cell.get("outputs", [])
        if output.get("output_type") in ("execute_result", "display_data")
    )


def test_the_example_notebook_runs_offline(tmp_path: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env={"OMP_NUM_THREADS": "1"})
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert errors == []
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert "recurrence: 9" in _html_outputs(code[1])  # the label slice 0..8 kept 9 of them
    verdict = _html_outputs(code[4])
    assert "block layer 0" in verdict and "converged" in verdict
    assert "fixed_point" in _html_outputs(code[5])
    page = _html_outputs(code[6])
    assert 'class="loopscope-report"' in page and "data:image/png;base64," in page
    assert (tmp_path / "demo-trace.zarr" / "zarr.json").is_file()
    assert (tmp_path / "demo-report" / "report.html").is_file()
