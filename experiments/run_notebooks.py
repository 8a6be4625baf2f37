"""Execute the notebooks headless at a chosen size and report each one's wall time.

The test suite runs them at ``test`` size; this runs them as a user would (default ``full``),
with the kernel named ``--kernel`` (register this venv's: ``python -m ipykernel install --user
--name python3``). Executed copies go to ``--out``.

    python experiments/run_notebooks.py --out /tmp/nbfull 01_quickstart 05_lenses_and_replacement
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    parser.add_argument("--scale", default="full", choices=["full", "test"])
    parser.add_argument("--out", required=True, help="folder for the executed copies")
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)

    import nbformat
    from nbclient import NotebookClient

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["BEYOND_TOP1_NOTEBOOK_SCALE"] = args.scale
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.names or sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    failed = 0
    for name in names:
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        start = time.time()
        client = NotebookClient(
            notebook,
            timeout=3000,
            kernel_name=args.kernel,
            resources={"metadata": {"path": str(out)}},
        )
        try:
            client.execute()
            print(f"{name} ok {time.time() - start:.0f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next notebook
            failed += 1
            print(f"{name} FAILED {time.time() - start:.0f} s: {str(exc)[-2000:]}", flush=True)
        nbformat.write(notebook, out / f"{name}.out.ipynb")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
