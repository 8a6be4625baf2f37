"""Running the intervention: trials planned from the pairs (patch, matched and random controls,
own-activation baselines), batched patched runs, success and the probe's view of each.
(:func:`intervene` is over 100 lines: about 40 are its docstring, one per argument.)"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.data import tokenize
from beyond_top1.interventions.pairs import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MAX_PAIRS,
    default_delta,
    default_offset_range,
    find_pairs,
)
from beyond_top1.interventions.patching import patch_and_read, patch_and_read_cached, text_states
from beyond_top1.interventions.result import InterventionResult
from beyond_top1.lenses import resolve_lens
from beyond_top1.probes import check_scan_matches, scan_texts, text_hash
from beyond_top1.progress import tqdm
from beyond_top1.ranking import lens_topk
from beyond_top1.saturation import DEFAULT_FILTER_FRACTION, position_filter, saturation_layers


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
    scan.require_trajectories("the matched-donor control")
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
    texts: Sequence[str] | None = None,
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
    runs_per_batch: int = 32,
    engine: str = "auto",
    texts_per_run: int = 8,
    precision: str | None = None,
    seed: int = 0,
    progress: bool = True,
    batch_size: int | None = None,
) -> InterventionResult:
    """Patch sources into targets at offsets ``d`` and measure whether the task shifts.

    Args:
        model, scan: the model and a scan made with it (checked).
        texts: the scan's texts (checked; default: the texts the scan keeps).
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
        runs_per_batch: patched runs per forward pass.
        engine: ``"cached"`` runs only the target token of each patched run on top of
            the unpatched keys and values of the positions before it
            (:func:`patch_and_read_cached`; ``HookedTransformer`` only); ``"full"`` re-runs every
            row's text up to its last used position (:func:`patch_and_read`). Both compute the
            same thing (tested). ``"auto"`` (default): ``"cached"`` where the model supports it,
            else ``"full"`` (a TransformerLens 4 bridge).
        texts_per_run: texts whose unpatched states are held at once (``"cached"``).
        precision: of the lens read-out (default: the scan's); the top-1 ids are exact either way.
        seed: pair sampling and donors.
        batch_size: the old name of ``runs_per_batch`` (deprecated: ``batch_size`` counts
            texts everywhere else).

    Returns:
        An :class:`InterventionResult`.
    """
    if batch_size is not None:
        warnings.warn(
            "intervene(batch_size=...) is now runs_per_batch=...; batch_size goes away in the "
            "next release",
            DeprecationWarning,
            stacklevel=2,
        )
        runs_per_batch = batch_size
    if engine not in ("auto", "cached", "full"):
        raise ValueError(f"engine must be 'auto', 'cached' or 'full', got {engine!r}")
    if engine == "auto":
        engine = "cached" if hooked.supports_tl_kv_cache(model) else "full"
    elif engine == "cached" and not hooked.supports_tl_kv_cache(model):
        raise ValueError(
            "engine='cached' needs a TransformerLens key/value cache, which a TransformerLens 4 "
            "TransformerBridge does not have; use engine='full' (or 'auto')"
        )
    texts = scan_texts(scan, texts)
    check_scan_matches(model, scan, texts)
    L = hooked.n_layers(model)
    lens = resolve_lens(model, lens)
    delta = default_delta(L) if delta is None else delta
    offsets = _offsets(offsets, a, L)
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
    precision = precision or (scan.settings or {}).get("precision") or "fp32"
    tokens_of = _token_reader(model, scan, texts, pairs)
    table = _plan_trials(scan, pairs, offsets, L, controls, seed)
    table["new_s1"], table["new_top1"], probe_pred = _run_trials(
        model,
        lens,
        table,
        tokens_of,
        engine=engine,
        runs_per_batch=runs_per_batch,
        texts_per_run=texts_per_run,
        precision=precision,
        probe=probe,
        probe_layers=probe_layers,
        progress=progress,
    )
    _score(table, pairs, probe, L)
    if probe is not None and len(table):
        _probe_columns(table, probe_pred, probe_layers, L)
    settings = {
        "model_name": hooked.model_name(model),
        "n_layers": L,
        "lens": getattr(lens, "kind", None),
        # the pairs' own search settings when they came from find_pairs
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
    return InterventionResult(pairs, table.drop(columns=["text_id"]), settings)


def _offsets(offsets: Sequence[int] | None, a: int | None, n_layers: int) -> list[int]:
    """The sorted offsets ``d``: as given, or ``-a..a`` (``a`` from the layer count)."""
    if offsets is None:
        a = default_offset_range(n_layers) if a is None else int(a)
        if a < 0:
            raise ValueError(f"a must be >= 0, got {a}")
        offsets = range(-a, a + 1)
    return sorted({int(d) for d in offsets})


def _token_reader(model, scan, texts: list[str], pairs: pd.DataFrame):
    """``text_id -> token ids`` as the scan tokenized them (cached), checked against the scan's
    token at every pair's target."""
    max_len = (scan.settings or {}).get("max_len")
    cache: dict[int, list[int]] = {}

    def tokens_of(text_id: int) -> list[int]:
        if text_id not in cache:
            cache[text_id] = tokenize(model, texts[text_id], max_len=max_len, truncate=True)
        return cache[text_id]

    frame = scan.saturation
    for pair in pairs.itertuples(index=False):
        if tokens_of(int(pair.text_id))[pair.tgt_pos] != int(frame["token_id"].iat[pair.tgt_row]):
            raise ValueError(
                "the texts' tokens do not match the scan's: pass the texts the scan was made on"
            )
    return tokens_of


def _score(table: pd.DataFrame, pairs: pd.DataFrame, probe, L: int) -> None:
    """Success per trial, and each pair's unpatched baseline (from its own-activation run)."""
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


def _run_trials(
    model,
    lens,
    table: pd.DataFrame,
    tokens_of,
    *,
    engine: str,
    runs_per_batch: int,
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
            for chunk_start in range(0, len(rows), runs_per_batch):
                chunk = rows[chunk_start : chunk_start + runs_per_batch]
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
        for start in range(0, n, runs_per_batch):
            chunk = order[start : start + runs_per_batch]
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


__all__ = ["intervene"]
