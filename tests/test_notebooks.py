"""Every notebook in notebooks/ runs top to bottom (headless, small settings); the two
longest run with the slow tests (``bash scripts/test.sh -m slow``).

Each notebook reads ``BEYOND_TOP1_NOTEBOOK_SCALE``; ``test`` means a handful of short texts.
The kernel is this interpreter's (a kernelspec written to a temporary ``JUPYTER_PATH``), with
this checkout first on ``PYTHONPATH``, so the notebooks import the code under test. A failing
cell fails the test (``nbclient`` raises ``CellExecutionError``). Stored notebooks carry no
outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import notebook_runs
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


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
    return notebook_runs.kernel_env(tmp_path_factory.mktemp("jupyter"))


SLOW_NOTEBOOKS = ("03_probes_interventions", "05_lenses_and_replacement")  # ~2.5 min each (AMD)
RUNS = [
    pytest.param(path, marks=[pytest.mark.slow] if path.stem in SLOW_NOTEBOOKS else [])
    for path in NOTEBOOKS
]


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, kernel_env, tmp_path, monkeypatch):
    """Every notebook runs; figures display without ``%matplotlib inline`` (no notebook has
    it) and no output holds a TqdmWarning or a requires-grad warning."""
    import nbformat

    for key, value in kernel_env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(path, as_version=4)
    assert "%matplotlib" not in "".join(c.source for c in notebook.cells if c.cell_type == "code")
    notebook_runs.execute(notebook, tmp_path)
    outputs = notebook_runs.outputs(notebook)
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert errors == []
    assert notebook_runs.noisy_outputs(notebook) == []
    html = notebook_runs.html_outputs(notebook)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the matplotlib figures did not render inline"
    assert not any("unpkg.com" in h for h in html)
    if path.stem == "01_quickstart":
        assert any("CircuitsVis.render(" in h for h in html)
        assert any('class="bt-heat-table"' in h for h in html)  # the heatmap and the diff
        assert sum(notebook_runs.BUNDLE_MARK in h for h in html) == 1  # the bundle, once


def test_a_notebook_with_ten_views_stays_small(kernel_env, tmp_path, monkeypatch):
    """Ten views and a figure: the CircuitsVis bundle rides once, the file stays under 3 MB."""
    import nbformat

    for key, value in kernel_env.items():
        monkeypatch.setenv(key, value)
    notebook = notebook_runs.execute(notebook_runs.ten_views_notebook(), tmp_path)
    assert [o for o in notebook_runs.outputs(notebook) if o.get("output_type") == "error"] == []
    assert notebook_runs.noisy_outputs(notebook) == []
    html = notebook_runs.html_outputs(notebook)
    assert len(html) == 10
    assert sum(notebook_runs.BUNDLE_MARK in h for h in html) == 1
    assert html[0].count(notebook_runs.BUNDLE_MARK) == 1  # with the first view
    path = tmp_path / "ten_views.ipynb"
    nbformat.write(notebook, path)
    size = path.stat().st_size
    assert size < 3_000_000, size
    assert any("image/png" in o.get("data", {}) for o in notebook_runs.outputs(notebook))
