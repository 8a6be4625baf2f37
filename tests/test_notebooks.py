"""Every notebook in notebooks/ runs top to bottom (headless, small settings).

Each notebook reads ``BEYOND_TOP1_NOTEBOOK_SCALE``; ``test`` means a handful of short texts.
The kernel is this interpreter's (a kernelspec written to a temporary ``JUPYTER_PATH``), with
this checkout first on ``PYTHONPATH``, so the notebooks import the code under test. A failing
cell fails the test (``nbclient`` raises ``CellExecutionError``). Stored notebooks carry no
outputs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "beyond-top1-tests"


def test_the_five_notebooks_are_there():
    names = [path.stem for path in NOTEBOOKS]
    assert names == [
        "01_quickstart",
        "02_saturation_order",
        "03_probes_interventions",
        "04_early_exit",
        "05_lenses_and_replacement",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_stored_without_outputs(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, path.name
    source = "".join("".join(c["source"]) for c in notebook["cells"])
    assert "BEYOND_TOP1_NOTEBOOK_SCALE" in source


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec for this interpreter and the environment the kernel inherits."""
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec = jupyter / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "beyond-top1 (tests)",
                "language": "python",
            }
        )
    )
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {
        "JUPYTER_PATH": os.pathsep.join(
            p for p in (str(jupyter), os.environ.get("JUPYTER_PATH")) if p
        ),
        "PYTHONPATH": python_path,
        "BEYOND_TOP1_NOTEBOOK_SCALE": "test",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        # Small batches: one thread loses little, and on a busy 2-core box torch's two
        # threads wait on each other and run several times slower.
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, kernel_env, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for key, value in kernel_env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=KERNEL,
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert errors == []
    # the inline views were rendered into the notebook (offline bundle, not the CDN)
    html = [
        output["data"]["text/html"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "text/html" in output.get("data", {})
    ]
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images, "the matplotlib figures did not render inline"
    if path.stem == "01_quickstart":
        assert any("CircuitsVis.render(" in h for h in html)
        assert not any("unpkg.com" in h for h in html)
