"""What an intervention run found: pairs, trials, success rates with counts, SEs and paired
effects against the controls, and its folder."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from beyond_top1.fileio import OutputFolder, output_folder

FOLDER_KIND = "interventions"
KINDS = ("patch", "matched", "random", "own")
CONTROLS = ("matched", "random")  # controls that can succeed (see the package docstring)
# The columns of a rates table worth printing (CLI, report, experiments).
SUMMARY_COLUMNS = (
    "n",
    "success_rate",
    "success_se",
    "strict_rate",
    "matched_n",
    "matched_success_rate",
    "effect_vs_matched",
    "effect_vs_matched_se",
    "random_n",
    "random_success_rate",
)


@dataclass
class InterventionResult:
    """Outcome of :func:`intervene`.

    Attributes:
        pairs: the pairs (see :func:`find_pairs`) plus each target's unpatched baseline from the
            own-activation run: ``base_s1``, ``base_top1``, ``base_matches_scan``, and
            ``tgt_in_probe_population`` (the target passes the position filter the probe's
            training rows passed).
        trials: one row per patched run: ``pair_id, kind`` (``patch``, ``matched``, ``random``,
            ``own``), ``d, layer, from_pos, new_s1, new_top1, top1_unchanged, success, strict``
            and, with a probe, ``probe_next_before/after`` (predicted task at the first probe
            layer after ``l``, unpatched/patched) and ``probe_ge2_before/after`` (fraction of
            probe layers after ``l`` predicted as task >= 2).
    """

    pairs: pd.DataFrame
    trials: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def by_offset(self) -> pd.DataFrame:
        """Success rates per offset ``d``: the patch and each control, with counts and SEs."""
        return _rates(self, self.trials["d"], "d")

    def by_sign(self) -> pd.DataFrame:
        """The same rates pooled over ``d < 0`` and over ``d >= 0``."""
        sign = np.where(self.trials["d"] < 0, "d < 0", "d >= 0")
        return _rates(self, pd.Series(sign, index=self.trials.index), "offsets")

    def summary(self) -> dict:
        out = dict(self.settings)
        out["n_pairs"] = len(self.pairs)
        if len(self.pairs):
            out["baseline_matches_scan"] = float(self.pairs["base_matches_scan"].mean())
        out["by_sign"] = self.by_sign().to_dict(orient="records")
        return out

    def save(self, directory: str | Path | OutputFolder) -> Path:
        """``pairs.csv``, ``trials.csv``, ``by_offset.csv``, ``by_sign.csv``, ``summary.json``
        (atomically; files of the same name that this toolkit did not write are refused)."""
        with output_folder(directory, FOLDER_KIND) as folder:
            folder.write_csv("pairs.csv", self.pairs)
            folder.write_csv("trials.csv", self.trials)
            folder.write_csv("by_offset.csv", self.by_offset())
            folder.write_csv("by_sign.csv", self.by_sign())
            folder.write_json("summary.json", self.summary())
        return folder.path

    def __repr__(self) -> str:
        return (
            f"InterventionResult({len(self.pairs)} {self.settings.get('direction', '')} pairs, "
            f"{len(self.trials)} patched runs, offsets {self.settings.get('offsets')})"
        )

    def _repr_html_(self) -> str:
        table = self.by_offset().to_html(index=False, float_format="{:.3f}".format)
        return f"<div><b>{self!r}</b>{table}</div>"


def _rate(flags) -> tuple[int, int, float, float]:
    """``(n, hits, rate, binomial SE)`` of a boolean series (NaN entries left out)."""
    flags = pd.Series(flags, dtype="object").dropna().astype(bool)
    n, hits = len(flags), int(flags.sum())
    p = hits / n if n else math.nan
    return n, hits, p, math.sqrt(p * (1 - p) / n) if n else math.nan


def _kind_rates(trials: pd.DataFrame, prefix: str) -> dict:
    n, hits, p, se = _rate(trials["success"])
    _, strict, p_strict, se_strict = _rate(trials["strict"])
    return {
        f"{prefix}n": n,
        f"{prefix}success": hits,
        f"{prefix}success_rate": p,
        f"{prefix}success_se": se,
        f"{prefix}strict": strict,
        f"{prefix}strict_rate": p_strict,
        f"{prefix}strict_se": se_strict,
        f"{prefix}top1_changed": int((~trials["top1_unchanged"].astype(bool)).sum()),
    }


def _paired_effect(patch: pd.DataFrame, control: pd.DataFrame) -> tuple[int, float, float]:
    """Mean and SE of ``success(patch) - success(control)`` over trials that have both."""
    keys = ["pair_id", "d"]
    both = patch[[*keys, "success"]].merge(control[[*keys, "success"]], on=keys)
    diff = both["success_x"].astype(float) - both["success_y"].astype(float)
    n = len(diff)
    if not n:
        return 0, math.nan, math.nan
    se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return n, float(diff.mean()), se


def _probe_rates(trials: pd.DataFrame, prefix: str) -> dict:
    """The probe's predicted task after ``l``, on targets in the probe's population."""
    valid = trials["probe_next_before"] > 0
    before, after = trials.loc[valid, "probe_next_before"], trials.loc[valid, "probe_next_after"]
    starts_at_1 = before == 1
    return {
        f"{prefix}probe_n": int(valid.sum()),
        f"{prefix}probe_next_ge2_before": float((before >= 2).mean()) if valid.any() else math.nan,
        f"{prefix}probe_next_ge2_after": float((after >= 2).mean()) if valid.any() else math.nan,
        f"{prefix}probe_moved_1_to_2": float((after[starts_at_1] >= 2).mean())
        if starts_at_1.any()
        else math.nan,
    }


def _rates(result: InterventionResult, key: pd.Series, name: str) -> pd.DataFrame:
    trials = result.trials
    runs = trials[trials["kind"] != "own"]
    has_probe = "probe_next_after" in trials.columns
    population = result.pairs.set_index("pair_id")["tgt_in_probe_population"]
    rows = []
    for value, part in runs.groupby(key[runs.index]):
        kinds = {kind: part[part["kind"] == kind] for kind in ("patch", *CONTROLS)}
        patch = kinds["patch"]
        row = {name: value, **_kind_rates(patch, "")}
        row["mean_new_s1"] = float(patch["new_s1"].mean()) if len(patch) else math.nan
        for control in CONTROLS:
            row.update(_kind_rates(kinds[control], f"{control}_"))
            n, effect, se = _paired_effect(patch, kinds[control])
            row[f"effect_vs_{control}_n"] = n
            row[f"effect_vs_{control}"] = effect
            row[f"effect_vs_{control}_se"] = se
        if has_probe:
            for kind, frame in kinds.items():
                inside = frame[population.reindex(frame["pair_id"]).to_numpy(dtype=bool)]
                row.update(_probe_rates(inside, "" if kind == "patch" else f"{kind}_"))
        rows.append(row)
    return pd.DataFrame(rows)


def load_interventions(directory: str | Path) -> InterventionResult:
    """Read a folder written by :meth:`InterventionResult.save`."""
    directory = Path(directory)
    try:
        pairs = pd.read_csv(directory / "pairs.csv")
        trials = pd.read_csv(directory / "trials.csv")
        summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{directory} is not a finished interventions folder: {exc}") from None
    settings = {k: v for k, v in summary.items() if k not in ("n_pairs", "by_sign")}
    settings.pop("baseline_matches_scan", None)
    return InterventionResult(pairs, trials, settings)


__all__ = ["CONTROLS", "KINDS", "SUMMARY_COLUMNS", "InterventionResult", "load_interventions"]
