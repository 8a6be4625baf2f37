"""Run notebooks headless as the tests do, and lay their outputs out as a front end would.

``kernel_env`` makes a kernelspec for this interpreter (in a temporary ``JUPYTER_PATH``) with this
checkout first on ``PYTHONPATH``; :func:`execute` runs a notebook in it with ``nbclient``.
:func:`outputs_page` writes the HTML outputs of an executed notebook into one page, in order, as
JupyterLab inserts them into one document (scripts run where the notebook is trusted); it can
drop the scripts (an untrusted notebook: Jupyter's sanitizer removes them) or the output that
carried the CircuitsVis bundle (a reopened notebook whose first view was cleared).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "beyond-top1-tests"
BUNDLE_MARK = "var CircuitsVis="
QUIET = ("TqdmWarning", "IProgress not found", "requires_grad", "requires grad")


def kernel_env(folder: Path) -> dict[str, str]:
    """A kernelspec for this interpreter under ``folder`` and the environment the kernel
    inherits (small test settings, offline, one thread)."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
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
            p for p in (str(folder), os.environ.get("JUPYTER_PATH")) if p
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


def execute(notebook, workdir: Path):
    """Run ``notebook`` (an ``nbformat`` node) in the test kernel; return it with outputs."""
    from nbclient import NotebookClient

    client = NotebookClient(
        notebook,
        kernel_name=KERNEL,
        timeout=300,
        resources={"metadata": {"path": str(workdir)}},  # the kernel's working directory
    )
    client.execute()
    return notebook


def outputs(notebook) -> list[dict]:
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def noisy_outputs(notebook) -> list[str]:
    """Output texts that hold a warning the notebook experience must not show."""
    found = []
    for output in outputs(notebook):
        texts = [output.get("text", ""), *output.get("data", {}).values()]
        texts += [output.get("evalue", ""), "".join(output.get("traceback", []))]
        text = "\n".join(t if isinstance(t, str) else json.dumps(t) for t in texts)
        found += [word for word in QUIET if word in text]
    return found


def html_outputs(notebook) -> list[str]:
    return [o["data"]["text/html"] for o in outputs(notebook) if "text/html" in o.get("data", {})]


def outputs_page(notebook, *, trusted: bool = True, drop_bundle: bool = False) -> str:
    """The notebook's HTML outputs in one page, in order."""
    parts = html_outputs(notebook)
    if drop_bundle:
        parts = [p for p in parts if BUNDLE_MARK not in p]
    if not trusted:
        parts = [re.sub(r"<script\b.*?</script>", "", p, flags=re.S | re.I) for p in parts]
    body = "\n".join(f'<div class="output">{p}</div>' for p in parts)
    return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>{body}</body></html>'


TEN_VIEWS = [
    """
import beyond_top1 as bt
from hooks import replace_at_positions

model = bt.load_model("smollm2-135m")
prompt = "The capital of France is Paris, and the capital of Italy is"
traj = bt.trajectory(model, prompt, targets=[" Rome", " Paris"])
""",
    "traj",
    "bt.views.topk_tokens(traj)",
    "bt.views.colored_tokens(traj)",
    "bt.views.token_log_probs(traj)",
    'bt.views.heatmap(traj, stat="rank:  Rome")',
    "bt.views.colored_tokens_multi(traj)",
    """
ids, resid = bt.prompt.prompt_residuals(model, prompt)
hook = ("blocks.10.hook_resid_post", replace_at_positions({len(ids) - 1: resid[3, 10]}))
patched = bt.trajectory(model, prompt, targets=[" Rome", " Paris"], fwd_hooks=[hook])
bt.views.diff(traj, patched, stat="logprob:  Paris", names=("clean", "patched"))
""",
    'bt.trajectory(model, [prompt, "The capital of Spain is Madrid, and"], targets=" Rome")',
    "bt.views.topk_grid(traj)",
    'bt.trajectory(model, "Rome was founded, the story goes, by Romulus")',
    "bt.plot.plot_targets(traj)",
]


def ten_views_notebook():
    """A notebook that displays ten views and a figure, with no magics."""
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source.strip()) for source in TEN_VIEWS]
    return notebook
