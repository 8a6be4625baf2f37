"""Compare two ``metrics.json`` files of ``beyond-top1 reproduce``, leaving out what is meant to
differ between runs: timings, the environment, fingerprints, cache flags and speeds.

Used for the architecture change of issue 14: ``reproduce --scale test`` before and after must
give the same numbers. Every stage's status and metrics, and the run's model, scale and
settings, are compared; exits 1 and lists every difference when they differ. How each stage
records its own settings may change with the code, so those differences are listed apart and
do not fail the comparison.

One move is expected: scans no longer compute 001's ordering statistics when they are saved
(the ``ordering`` stage does, once), so ``scan-<model>.metrics.ordering`` exists only before.
Those values are checked against the ``ordering`` stage's ``ordering.csv`` of the after run
(next to its ``metrics.json``): equal values pass, any difference fails.

    python experiments/compare_metrics.py runs/before/metrics.json runs/after/metrics.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from beyond_top1.reproduce import slug

# keys whose values are timings, speeds, environment or run bookkeeping, at any depth
IGNORED = {
    "environment",
    "seconds",
    "seconds_this_run",
    "cached",
    "started",
    "finished",
    "tokens_per_second",
    "speedup",
    "seconds_full",
    "seconds_early_exit",
    "tokens_per_s_full",
    "tokens_per_s_early_exit",
    "fingerprint",
    "unembedding_fingerprint",
    "after",  # the fingerprints of the stages a stage depends on
}


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key in IGNORED:
                continue
            where = f"{path}.{key}" if path else key
            if key not in a or key not in b:
                out.append(f"{where}: only in {'after' if key in b else 'before'}")
            else:
                out += differences(a[key], b[key], where)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items before, {len(b)} after"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]  # noqa: E501
    if isinstance(a, float) and isinstance(b, float):
        same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
        return [] if same else [f"{path}: {a!r} before, {b!r} after"]
    return [] if a == b else [f"{path}: {a!r} before, {b!r} after"]


def moved_ordering(before: dict, after_metrics: Path) -> tuple[list[str], list[str]]:
    """Check each scan stage's old ``ordering`` entry against the after run's ordering.csv:
    ``(paths checked and equal, differences)``."""
    table_path = after_metrics.parent / "stages" / "ordering" / "ordering.csv"
    table = pd.read_csv(table_path) if table_path.is_file() else None
    checked, found = [], []
    for name, stage in before["stages"].items():
        old = stage.get("metrics", {}).get("ordering")
        if not name.startswith("scan-") or old is None:
            continue
        where = f"stages.{name}.metrics.ordering"
        rows = None if table is None else table[[slug(m) == name[5:] for m in table["model"]]]
        if rows is None or len(rows) != 1:
            found.append(f"{where}: no row for this scan in {table_path}")
            continue
        row = {k: v.item() if hasattr(v, "item") else v for k, v in rows.iloc[0].items()}
        diff = [d for key, value in old.items() for d in differences(value, row.get(key), key)]
        if diff:
            found += [f"{where}.{d}" for d in diff]
        else:
            checked.append(f"{where}: {len(old)} values, equal to {table_path.name}")
        stage["metrics"].pop("ordering")
    return checked, found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    args = p.parse_args(argv)
    with open(args.before, encoding="utf-8") as f:
        before = json.load(f)
    with open(args.after, encoding="utf-8") as f:
        after = json.load(f)
    stage_settings = [
        line
        for name in sorted(set(before["stages"]) & set(after["stages"]))
        for line in differences(
            before["stages"][name].get("settings", {}),
            after["stages"][name].get("settings", {}),
            f"stages.{name}.settings",
        )
    ]
    for run in (before, after):
        for stage in run["stages"].values():
            stage.pop("settings", None)
    moved, found = moved_ordering(before, Path(args.after))
    for line in moved:
        print(f"moved to the ordering stage: {line}")
    found += differences(before, after)
    for line in found:
        print(line)
    print(f"{len(found)} difference(s) outside timings, environment and fingerprints")
    if stage_settings:
        print(f"(stage settings recorded differently, not compared: {len(stage_settings)})")
        for line in stage_settings:
            print(f"  {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
