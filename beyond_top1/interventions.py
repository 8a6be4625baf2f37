"""Task-shift interventions (paper 001; docs/definitions.md, "Intervention").

Pairs of positions in one text (at most ``max_distance`` tokens apart) share their final top-1
token, but the *source* fixes it at least ``delta`` layers before the *target*, and comes
**strictly before** it in the text (``direction="forward"``; a later source would inject context
the target cannot see, so ``"backward"`` pairs are only ever reported on their own). For an
offset ``d`` the source's ``resid_post`` at layer ``l = s_src + d`` is copied into the target's
``resid_post`` at the same layer, with a hook on ``blocks.{l}.hook_resid_post`` that replaces
**only the target position** (:func:`hooks.copy_positions`; the public code of 001 replaced a
whole block's output for every position). The model then runs on and the target's ``s_1`` is
recomputed under the lens from its residuals at every layer. Success: the final top-1 is
unchanged and the new ``s_1 <= l``; strict success: new ``s_1 == l``.

Controls that can succeed (each trial kind is a row of the trial table):

* ``matched``: a donor position of the same text, before the target, whose lens top-1 at
  layer ``l`` is the source's lens top-1 at ``l`` but which has not saturated yet
  (``s_1 > l``): the same content as the real patch, another task state.
* ``random``: the same-layer state of a random other position of the same text (any top-1).

``own`` (the target's own state copied into itself) is an exact no-op that gives each pair's
unpatched baseline in the same batch layout; it cannot succeed when ``l < s_tgt`` and is never
reported as a control. With a task probe fitted on *other* texts (checked), the probe's
predicted task after ``l`` is compared before and after the patch (did it move from 1 to 2?).

Patched runs are batched: one patch per batch row, many pairs and offsets per forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from beyond_top1 import hooked
from beyond_top1.data import tokenize
from beyond_top1.fileio import OutputFolder, output_folder
from beyond_top1.lenses import resolve_lens
from beyond_top1.probes import text_hash
from beyond_top1.ranking import lens_topk
from beyond_top1.saturation import DEFAULT_FILTER_FRACTION, position_filter, saturation_layers

DEFAULT_MAX_DISTANCE = 30
DEFAULT_MAX_PAIRS = 200
KINDS = ("patch", "matched", "random", "own")
CONTROLS = ("matched", "random")  # controls that can succeed (see the module docstring)
DIRECTIONS = ("forward", "backward")
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


def default_delta(n_layers: int) -> int:
    """Δ, the minimum gap between the pair's top-1 saturation layers.

    10 layers for models with ``L >= 24`` (001); otherwise scaled with depth,
    ``round_half_up(10 · L / 24)`` and at least 1: 5 for 12 layers, 3 for 6, 1 for 2.
    """
    if n_layers >= 24:
        return 10
    return max(1, math.floor(10 * n_layers / 24 + 0.5))


def default_offset_range(n_layers: int) -> int:
    """``a`` for offsets ``d ∈ [-a, a]``: half of :func:`default_delta` (5 for ``L >= 24``), so
    every patched layer ``s_src + d`` lies before the target's own ``s_1``."""
    return max(1, default_delta(n_layers) // 2)


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


def find_pairs(
    scan,
    *,
    n_layers: int | None = None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    delta: int | None = None,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    one_per_target: bool = True,
    direction: str = "forward",
    text_ids: Collection[int] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Source/target pairs for the task-shift intervention.

    A pair is two positions of one text, at most ``max_distance`` tokens apart, with the same
    final top-1 token and top-1 saturation layers ``s_src + delta <= s_tgt``. The
    earlier-saturating position is the source.

    Args:
        scan: a :class:`~beyond_top1.scans.ScanResult`, or a DataFrame with columns
            ``text_id, pos, top_1_id, s_1`` (then pass ``n_layers`` for the default Δ).
        delta: default :func:`default_delta` of the model's depth.
        max_pairs: keep at most this many, chosen at random (seeded); ``None`` keeps all.
        one_per_target: use each target position in at most one pair (the first after a
            seeded shuffle), so that no target is counted twice.
        direction: ``"forward"`` (default): the source comes strictly before the target, so the
            patch carries only context the target can see; ``"backward"``: strictly after
            (report those separately).
        text_ids: only pairs from these texts (e.g. those a probe was not fitted on).

    Returns:
        One row per pair, sorted by text and target: ``pair_id, text_id, src_pos, tgt_pos,
        src_row, tgt_row`` (rows of the scan), ``top1_id, s_src, s_tgt, gap, distance,
        direction``.
    """
    if hasattr(scan, "saturation"):
        frame, n_layers = scan.saturation, n_layers or scan.n_layers
    else:
        frame = scan
    missing = {"text_id", "pos", "top_1_id", "s_1"} - set(frame.columns)
    if missing:
        raise ValueError(f"the frame lacks columns {sorted(missing)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if delta is None:
        if n_layers is None:
            raise ValueError("pass delta, or n_layers for the default")
        delta = default_delta(n_layers)
    if delta < 1 or max_distance < 1:
        raise ValueError(f"delta and max_distance must be >= 1, got {delta}, {max_distance}")
    base = pd.DataFrame(
        {
            "row": np.arange(len(frame)),
            "text_id": frame["text_id"].to_numpy(),
            "pos": frame["pos"].to_numpy(),
            "top1_id": frame["top_1_id"].to_numpy(),
            "s": frame["s_1"].to_numpy(),
        }
    )
    merged = base.merge(base, on=["text_id", "top1_id"], suffixes=("_src", "_tgt"))
    ahead = merged["pos_tgt"] - merged["pos_src"]  # > 0: the source comes first
    if direction == "backward":
        ahead = -ahead
    gap = merged["s_tgt"] - merged["s_src"]
    keep = (ahead > 0) & (ahead <= max_distance) & (gap >= delta)
    if text_ids is not None:
        keep &= merged["text_id"].isin(list(text_ids))
    merged = merged[keep]
    pairs = pd.DataFrame(
        {
            "text_id": merged["text_id"].to_numpy(),
            "src_pos": merged["pos_src"].to_numpy(),
            "tgt_pos": merged["pos_tgt"].to_numpy(),
            "src_row": merged["row_src"].to_numpy(),
            "tgt_row": merged["row_tgt"].to_numpy(),
            "top1_id": merged["top1_id"].to_numpy(),
            "s_src": merged["s_src"].to_numpy(),
            "s_tgt": merged["s_tgt"].to_numpy(),
        }
    )
    pairs = pairs.sort_values(["text_id", "tgt_pos", "src_pos"]).reset_index(drop=True)
    order = np.random.default_rng(seed).permutation(len(pairs))
    pairs = pairs.iloc[order]
    if one_per_target:
        pairs = pairs.drop_duplicates("tgt_row", keep="first")
    if max_pairs is not None:
        pairs = pairs.head(max_pairs)
    pairs = pairs.sort_values(["text_id", "tgt_pos", "src_pos"]).reset_index(drop=True)
    pairs["gap"] = pairs["s_tgt"] - pairs["s_src"]
    pairs["distance"] = (pairs["tgt_pos"] - pairs["src_pos"]).abs()
    pairs["direction"] = direction
    pairs.insert(0, "pair_id", np.arange(len(pairs)))
    pairs.attrs.update({"delta": int(delta), "max_distance": int(max_distance), "seed": seed})
    pairs.attrs["direction"] = direction
    return pairs


# ---------------------------------------------------------------------------------------------
# One batch of patched runs
# ---------------------------------------------------------------------------------------------


def patch_and_read(
    model,
    tokens: Int[Tensor, "batch pos"],
    read_pos: Sequence[int],
    patches: Sequence[tuple[int, int, int]] = (),
) -> Float[Tensor, "batch layer d_model"]:
    """Run ``tokens`` with within-row patches and read one position per row at every layer.

    Args:
        tokens: right-padded token ids.
        read_pos: the position to read in each row (the target).
        patches: ``(layer, target_pos, source_pos)`` per row (``len(patches) == batch`` rows,
            or empty for an unpatched run): row ``b``'s ``resid_post`` at ``target_pos`` and
            ``layer`` is replaced by the same row's ``resid_post`` at ``source_pos`` (as it
            arrived at that hook), and nothing else changes.

    Returns:
        ``[batch, L, d_model]`` ``resid_post`` of each row's ``read_pos`` at layers ``0..L-1``,
        after the patch.
    """
    from beyond_top1.hooks import copy_positions, patched, record_positions

    batch = tokens.shape[0]
    if len(read_pos) != batch or (patches and len(patches) != batch):
        raise ValueError("give one read position (and one patch, if any) per batch row")
    L = hooked.n_layers(model)
    by_layer: dict[int, dict] = {}
    for row, (layer, target, source) in enumerate(patches):
        if not 0 <= layer < L:
            raise ValueError(f"patch layer {layer} outside [0, {L - 1}]")
        by_layer.setdefault(int(layer), {})[(row, int(target))] = (row, int(source))
    cells = [(row, int(p)) for row, p in enumerate(read_pos)]
    store: dict[str, Tensor] = {}
    fwd = []
    for layer in range(L):
        name = hooked.resid_hook_name(layer)
        if layer in by_layer:
            fwd.append((name, copy_positions(by_layer[layer])))
        fwd.append((name, record_positions(store, cells)))  # sees the patched activation
    with patched(model, fwd):
        hooked.run_forward(model, tokens)
    return torch.stack([store[hooked.resid_hook_name(l)] for l in range(L)], dim=1)


@dataclass
class TextStates:
    """The unpatched run of one text: per-layer (pre-rotary) keys and values
    ``[pos, kv_heads, d_head]`` and ``resid_post`` ``[pos, L, d_model]`` at every position."""

    token_ids: list[int]
    keys: list[Tensor]
    values: list[Tensor]
    resid: Float[Tensor, "pos layer d_model"]


def text_states(model, token_lists: Sequence[Sequence[int]]) -> list[TextStates]:
    """Run whole texts once (right-padded, with their attention mask) and keep their states."""
    from beyond_top1.hooks import patched, record

    L = hooked.n_layers(model)
    device = hooked.model_device(model)
    lengths = [len(ids) for ids in token_lists]
    tokens = torch.zeros((len(token_lists), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = torch.as_tensor(list(ids))
        mask[row, : len(ids)] = 1
    cache = hooked.kv_cache(model, batch_size=len(token_lists))
    store: dict[str, Tensor] = {}
    fwd = [(hooked.resid_hook_name(l), record(store)) for l in range(L)]
    with patched(model, fwd):
        hooked.run_forward(
            model, tokens.to(device), attention_mask=mask.to(device), past_kv_cache=cache
        )
    keys, values = hooked.kv_tensors(cache)
    resid = torch.stack([store[hooked.resid_hook_name(l)] for l in range(L)], dim=2)
    return [
        TextStates(
            list(ids),
            [k[row, :n] for k in keys],
            [v[row, :n] for v in values],
            resid[row, :n],
        )
        for row, (ids, n) in enumerate(zip(token_lists, lengths, strict=True))
    ]


def patch_and_read_cached(
    model,
    states: Sequence[TextStates],
    targets: Sequence[int],
    patches: Sequence[tuple[int, int] | None],
) -> Float[Tensor, "batch layer d_model"]:
    """The same experiment as :func:`patch_and_read`, computing only the target positions.

    Row ``b`` continues text ``states[b]`` at position ``targets[b]``: the keys and values of
    the positions before it come from the unpatched run (a patch at the target cannot change
    them: the model is causal), so only the target token is run, through every layer.
    ``patches[b] = (layer, from_pos)`` replaces the target's ``resid_post`` at ``layer`` with
    the unpatched ``resid_post`` of ``from_pos`` at that layer (``from_pos == targets[b]``: the
    target's own activation in this run, copied in place, an exact no-op); ``None``: no patch.

    Returns ``[batch, L, d_model]``: the target's ``resid_post`` at every layer.
    """
    from beyond_top1.hooks import copy_positions, patched, record_positions, replace_at_positions

    batch = len(states)
    if len(targets) != batch or len(patches) != batch:
        raise ValueError("give one target and one patch (or None) per row")
    L = hooked.n_layers(model)
    device = hooked.model_device(model)
    width = max(int(t) for t in targets)
    keys = [torch.zeros((batch, width, *k.shape[1:]), dtype=k.dtype) for k in states[0].keys]
    values = [torch.zeros_like(k) for k in keys]
    mask = torch.zeros((batch, width), dtype=torch.long)
    tokens = torch.zeros((batch, 1), dtype=torch.long)
    replace: dict[int, dict] = {}
    copy: dict[int, dict] = {}
    for row, (state, target, patch) in enumerate(zip(states, targets, patches, strict=True)):
        target = int(target)
        if not 0 <= target < len(state.token_ids):
            raise IndexError(
                f"row {row}: target {target} outside the text's {len(state.token_ids)} tokens"
            )
        if target:
            for layer in range(L):
                keys[layer][row, width - target :] = state.keys[layer][:target]
                values[layer][row, width - target :] = state.values[layer][:target]
            mask[row, width - target :] = 1
        tokens[row, 0] = state.token_ids[target]
        if patch is None:
            continue
        layer, source = int(patch[0]), int(patch[1])
        if not 0 <= layer < L:
            raise ValueError(f"patch layer {layer} outside [0, {L - 1}]")
        if source == target:
            copy.setdefault(layer, {})[(row, 0)] = (row, 0)
        else:
            replace.setdefault(layer, {})[(row, 0)] = state.resid[source, layer]
    cache = hooked.kv_cache(
        model,
        [k.to(device) for k in keys],
        [v.to(device) for v in values],
        mask.to(device),
    )
    cells = [(row, 0) for row in range(batch)]
    store: dict[str, Tensor] = {}
    fwd = []
    for layer in range(L):
        name = hooked.resid_hook_name(layer)
        if layer in replace:
            fwd.append((name, replace_at_positions(replace[layer])))
        if layer in copy:
            fwd.append((name, copy_positions(copy[layer])))
        fwd.append((name, record_positions(store, cells)))  # sees the patched activation
    with patched(model, fwd):
        hooked.run_forward(model, tokens.to(device), past_kv_cache=cache)
    return torch.stack([store[hooked.resid_hook_name(l)] for l in range(L)], dim=1)


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


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
        with output_folder(directory, "interventions") as folder:
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


# ---------------------------------------------------------------------------------------------
# Planning the trials
# ---------------------------------------------------------------------------------------------


def _random_donor(rng, positions: np.ndarray, exclude: set[int]) -> int | None:
    """Any other position of the text (its top-1 is not looked at)."""
    pool = positions[~np.isin(positions, list(exclude))]
    return int(pool[rng.integers(len(pool))]) if len(pool) else None


def _matched_donor(rng, text: pd.DataFrame, layer: int, token: int, target: int, exclude) -> int:
    """A position before ``target`` whose lens top-1 at ``layer`` is ``token`` and whose
    ``s_1 > layer`` (the same content as the source, not yet final); ``-1`` if none."""
    ok = (
        (text["top1_at"][:, layer] == token)
        & (text["s_1"] > layer)
        & (text["pos"] < target)
        & ~np.isin(text["pos"], list(exclude))
    )
    pool = text["pos"][ok]
    return int(pool[rng.integers(len(pool))]) if len(pool) else -1


def _plan_trials(scan, pairs: pd.DataFrame, offsets, L: int, controls: bool, seed: int):
    """One row per run: ``pair_id, kind, d, layer, text_id, tgt_pos, from_pos``."""
    frame = scan.saturation
    top1_at = np.asarray(scan.top_ids)[:, :, 0]  # [n, L]: the lens top-1 at every layer
    texts = {}
    for text_id, part in frame.groupby("text_id"):
        rows = part.index.to_numpy()
        texts[int(text_id)] = {
            "pos": part["pos"].to_numpy(),
            "s_1": part["s_1"].to_numpy(),
            "top1_at": top1_at[rows],
        }
    rng = np.random.default_rng([seed, 1])
    trials = []
    for pair in pairs.itertuples(index=False):
        text = texts[int(pair.text_id)]
        source, target = int(pair.src_pos), int(pair.tgt_pos)
        own_layer = int(min(max(pair.s_src, 0), L - 2)) if L > 1 else 0
        trials.append((pair.pair_id, "own", 0, own_layer, pair.text_id, target, target))
        for d in offsets:
            layer = int(pair.s_src) + d
            if not 0 <= layer <= L - 2:
                continue
            trials.append((pair.pair_id, "patch", d, layer, pair.text_id, target, source))
            if not controls:
                continue
            token = int(top1_at[int(pair.src_row), layer])
            donor = _matched_donor(rng, text, layer, token, target, {target, source})
            if donor >= 0:
                trials.append((pair.pair_id, "matched", d, layer, pair.text_id, target, donor))
            donor = _random_donor(rng, text["pos"], {target, source})
            if donor is not None:
                trials.append((pair.pair_id, "random", d, layer, pair.text_id, target, donor))
    columns = ["pair_id", "kind", "d", "layer", "text_id", "tgt_pos", "from_pos"]
    return pd.DataFrame(trials, columns=columns)


def _check_probe(model, probe, texts: Sequence[str], text_ids) -> list[int]:
    """The probe's layers; refuse a probe for another model or fitted on a target's text."""
    if probe is None:
        return []
    meta = getattr(probe, "metadata_", {})
    fingerprint = meta.get("unembedding_fingerprint")
    if fingerprint and fingerprint != hooked.unembedding_fingerprint(model):
        raise ValueError("the probe was trained on another model; fit one for this model")
    fitted_on = set(meta.get("text_hashes") or [])
    shared = sorted(t for t in text_ids if text_hash(texts[t]) in fitted_on)
    if shared:
        raise ValueError(
            f"the probe was fitted on {len(shared)} of the target texts (e.g. text {shared[0]}): "
            "its predictions there are in-sample. Fit it on other texts (e.g. a scan of the "
            "train split) for held-out evidence"
        )
    L = hooked.n_layers(model)
    return sorted(l for l in (probe.layers or range(L)) if 0 <= l < L)


def intervene(
    model,
    scan,
    texts: Sequence[str],
    *,
    lens=None,
    pairs: pd.DataFrame | None = None,
    offsets: Sequence[int] | None = None,
    a: int | None = None,
    delta: int | None = None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    direction: str = "forward",
    text_ids: Collection[int] | None = None,
    controls: bool = True,
    probe=None,
    batch_size: int = 32,
    engine: str = "cached",
    texts_per_run: int = 8,
    precision: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> InterventionResult:
    """Patch sources into targets at offsets ``d`` and measure whether the task shifts.

    Args:
        model, scan, texts: the model, a scan of ``texts`` made with it (checked), and the texts.
        lens: the lens to recompute ``s_1`` with; use the scan's (default: the logit lens).
        pairs: from :func:`find_pairs` (default: found with ``max_distance``, ``delta``,
            ``max_pairs``, ``direction`` and ``seed``).
        offsets: the offsets ``d`` (default ``-a..a``, ``a`` from
            :func:`default_offset_range`). Offsets whose layer ``s_src + d`` falls outside
            ``0..L-2`` are skipped for that pair (patching the last layer is trivially final).
        direction, text_ids: of the default pairs (see :func:`find_pairs`).
        controls: also run the matched-donor and random-vector controls (the own-activation run
            always runs, once per pair: it is the unpatched baseline).
        probe: a fitted :class:`~beyond_top1.probes.TaskProbe` for this model, fitted on texts
            other than the targets' (checked).
        batch_size: patched runs per forward pass.
        engine: ``"cached"`` (default) runs only the target token of each patched run on top of
            the unpatched keys and values of the positions before it
            (:func:`patch_and_read_cached`); ``"full"`` re-runs every row's text up to its last
            used position (:func:`patch_and_read`). Both compute the same thing (tested).
        texts_per_run: texts whose unpatched states are held at once (``"cached"``).
        precision: of the lens read-out (default: the scan's); the top-1 ids are exact either way.
        seed: pair sampling and donors.

    Returns:
        An :class:`InterventionResult`.
    """
    from beyond_top1.probes import check_scan_matches

    texts = list(texts)
    check_scan_matches(model, scan, texts)
    if engine not in ("cached", "full"):
        raise ValueError(f"engine must be 'cached' or 'full', got {engine!r}")
    L = hooked.n_layers(model)
    lens = resolve_lens(model, lens)
    delta = default_delta(L) if delta is None else delta
    if offsets is None:
        a = default_offset_range(L) if a is None else int(a)
        if a < 0:
            raise ValueError(f"a must be >= 0, got {a}")
        offsets = range(-a, a + 1)
    offsets = sorted({int(d) for d in offsets})
    if pairs is None:
        pairs = find_pairs(
            scan,
            max_distance=max_distance,
            delta=delta,
            max_pairs=max_pairs,
            direction=direction,
            text_ids=text_ids,
            seed=seed,
        )
    pairs = pairs.reset_index(drop=True).copy()
    probe_layers = _check_probe(model, probe, texts, sorted(set(pairs["text_id"].tolist())))
    settings = scan.settings or {}
    precision = precision or settings.get("precision") or "fp32"
    max_len = settings.get("max_len")
    token_cache: dict[int, list[int]] = {}

    def tokens_of(text_id: int) -> list[int]:
        if text_id not in token_cache:
            token_cache[text_id] = tokenize(model, texts[text_id], max_len=max_len, truncate=True)
        return token_cache[text_id]

    frame = scan.saturation
    for pair in pairs.itertuples(index=False):
        if tokens_of(int(pair.text_id))[pair.tgt_pos] != int(frame["token_id"].iat[pair.tgt_row]):
            raise ValueError(
                "the texts' tokens do not match the scan's: pass the texts the scan was made on"
            )
    table = _plan_trials(scan, pairs, offsets, L, controls, seed)
    outcome = _run_trials(
        model,
        lens,
        table,
        tokens_of,
        engine=engine,
        batch_size=batch_size,
        texts_per_run=texts_per_run,
        precision=precision,
        probe=probe,
        probe_layers=probe_layers,
        progress=progress,
    )
    table["new_s1"], table["new_top1"], probe_pred = outcome
    top1 = pairs.set_index("pair_id")["top1_id"]
    table["top1_unchanged"] = table["new_top1"].to_numpy() == top1.loc[table["pair_id"]].to_numpy()
    table["success"] = table["top1_unchanged"] & (table["new_s1"] <= table["layer"])
    table["strict"] = table["top1_unchanged"] & (table["new_s1"] == table["layer"])
    own = table[table["kind"] == "own"].set_index("pair_id")
    pairs["base_s1"] = own["new_s1"].reindex(pairs["pair_id"]).to_numpy()
    pairs["base_top1"] = own["new_top1"].reindex(pairs["pair_id"]).to_numpy()
    pairs["base_matches_scan"] = (pairs["base_s1"] == pairs["s_tgt"]) & (
        pairs["base_top1"] == pairs["top1_id"]
    )
    filter_fraction = getattr(probe, "metadata_", {}).get("filter_fraction")
    pairs["tgt_in_probe_population"] = position_filter(
        torch.tensor(pairs["s_tgt"].to_numpy()),
        L,
        DEFAULT_FILTER_FRACTION if filter_fraction is None else filter_fraction,
    ).numpy()
    if probe is not None and len(table):
        _probe_columns(table, probe_pred, probe_layers, L)
    table = table.drop(columns=["text_id"])
    result_settings = {
        "model_name": hooked.model_name(model),
        "n_layers": L,
        "lens": getattr(lens, "kind", None),
        "delta": int(pairs.attrs.get("delta", delta)),
        "max_distance": int(pairs.attrs.get("max_distance", max_distance)),
        "direction": pairs.attrs.get("direction", direction),
        "offsets": offsets,
        "max_pairs": max_pairs,
        "controls": controls,
        "probe": bool(probe is not None),
        "probe_layers": probe_layers,
        "engine": engine,
        "precision": precision,
        "seed": seed,
    }
    return InterventionResult(pairs, table, result_settings)


def _run_trials(
    model,
    lens,
    table: pd.DataFrame,
    tokens_of,
    *,
    engine: str,
    batch_size: int,
    texts_per_run: int,
    precision: str,
    probe,
    probe_layers: list[int],
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run every trial; returns the target's new ``s_1`` and final top-1, and the probe's
    prediction at every layer (0 where it was not applied)."""
    L = hooked.n_layers(model)
    n = len(table)
    new_s1 = np.zeros(n, dtype=np.int64)
    new_top1 = np.zeros(n, dtype=np.int64)
    probe_pred = np.zeros((n, L), dtype=np.int64)

    def read(index: np.ndarray, resid: Tensor) -> None:
        readout = lens_topk(lens, resid, tuple(range(L)), 1, precision=precision)
        new_s1[index] = saturation_layers(readout.top_ids)[:, 0].cpu().numpy()
        new_top1[index] = readout.top_ids[:, -1, 0].cpu().numpy()
        for layer in probe_layers:
            probe_pred[index, layer] = probe.predict_resid(resid[:, layer].cpu())

    columns = {c: table[c].to_numpy() for c in ("text_id", "tgt_pos", "from_pos", "layer")}
    bar = tqdm(total=n, desc="patched runs", unit="run", disable=not progress)
    if engine == "cached":
        text_ids = sorted(set(columns["text_id"].tolist()))
        for start in range(0, len(text_ids), texts_per_run):
            group = text_ids[start : start + texts_per_run]
            states = dict(
                zip(group, text_states(model, [tokens_of(t) for t in group]), strict=True)
            )
            rows = np.flatnonzero(np.isin(columns["text_id"], group))
            rows = rows[np.argsort(columns["tgt_pos"][rows], kind="stable")]
            for chunk_start in range(0, len(rows), batch_size):
                chunk = rows[chunk_start : chunk_start + batch_size]
                layers, sources = columns["layer"][chunk], columns["from_pos"][chunk]
                patches = list(zip(layers.tolist(), sources.tolist(), strict=True))
                resid = patch_and_read_cached(
                    model,
                    [states[int(t)] for t in columns["text_id"][chunk]],
                    columns["tgt_pos"][chunk].tolist(),
                    patches,
                )
                read(chunk, resid)
                bar.update(len(chunk))
    else:
        length = np.maximum(columns["tgt_pos"], columns["from_pos"]) + 1
        order = np.argsort(length, kind="stable")
        tok = hooked.tokenizer(model)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        device = hooked.model_device(model)
        for start in range(0, n, batch_size):
            chunk = order[start : start + batch_size]
            tokens = torch.full((len(chunk), int(length[chunk].max())), pad_id, dtype=torch.long)
            for row, index in enumerate(chunk):
                ids = tokens_of(int(columns["text_id"][index]))[: length[index]]
                tokens[row, : len(ids)] = torch.as_tensor(ids)
            patches = [
                (int(columns["layer"][i]), int(columns["tgt_pos"][i]), int(columns["from_pos"][i]))
                for i in chunk
            ]
            read(chunk, patch_and_read(model, tokens.to(device), [p[1] for p in patches], patches))
            bar.update(len(chunk))
    bar.close()
    return new_s1, new_top1, probe_pred


def _probe_columns(table: pd.DataFrame, pred: np.ndarray, layers: list[int], L: int) -> None:
    """Probe predictions after ``l``: unpatched (the pair's own row) vs. this run."""
    is_probe = np.zeros(L, dtype=bool)
    is_probe[layers] = True
    own_index = table.index[table["kind"] == "own"]
    own_of_pair = pd.Series(own_index, index=table.loc[own_index, "pair_id"].to_numpy())
    before = pred[own_of_pair.loc[table["pair_id"]].to_numpy()]  # [n, L]
    after = pred
    layer_idx = np.arange(L)
    later = (layer_idx[None, :] > table["layer"].to_numpy()[:, None]) & is_probe[None, :]
    first = np.where(later.any(1), later.argmax(1), -1)
    rows = np.arange(len(table))
    has = first >= 0
    table["probe_layer_next"] = first
    table["probe_next_before"] = np.where(has, before[rows, np.maximum(first, 0)], 0)
    table["probe_next_after"] = np.where(has, after[rows, np.maximum(first, 0)], 0)
    count = later.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["probe_ge2_before"] = np.where(
            count > 0, ((before >= 2) & later).sum(1) / count, np.nan
        )
        table["probe_ge2_after"] = np.where(
            count > 0, ((after >= 2) & later).sum(1) / count, np.nan
        )


__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "InterventionResult",
    "default_delta",
    "default_offset_range",
    "find_pairs",
    "intervene",
    "TextStates",
    "patch_and_read",
    "patch_and_read_cached",
    "text_states",
]
