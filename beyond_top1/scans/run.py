"""The scan: every corpus-level read-out goes through this one loop.

:func:`scan` runs texts through a model batch by batch and reads every layer through one or
several lenses, keeping per scored position only compact results (see
:class:`~beyond_top1.scans.ScanResult`): top-k ids, their log-probs and the final tokens' ranks
per lens, the hidden-state cosine between consecutive layers, ``s_1..s_k``, and, given a task
probe, its prediction at every layer. Nothing of size ``[tokens, layers, vocab]`` outlives one
layer of one batch. Early-exit signals are derived from a scan
(:meth:`~beyond_top1.early_exit.ExitSignals.from_scan`).

With ``out=DIR`` the scan writes one shard per ``shard_batches`` batches (atomically), so an
interrupted run continues with ``resume=True`` without redoing finished shards; resuming a
finished scan just loads it. The final files are then written from the shards one batch at a
time and the result is read back with its per-layer arrays memory-mapped
(:mod:`~beyond_top1.scans.files`): only the table (~112 bytes a position) is read whole.
Re-running with the same arguments writes identical files.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from beyond_top1 import distributed, hooked
from beyond_top1.activations import stream_residuals
from beyond_top1.data import (
    DEFAULT_SCORE_FIRST,
    check_batch_size,
    resolve_max_len,
    text_list,
    texts_fingerprint,
)
from beyond_top1.fileio import OutputFolder
from beyond_top1.lenses import Lens, resolve_lens
from beyond_top1.probes import apply_probe, probe_identity
from beyond_top1.ranking import (
    DEFAULT_CANDIDATES,
    PRECISIONS,
    lens_saturation,
    lens_topk,
    reread_loose_logprobs,
)
from beyond_top1.saturation import saturation_layers
from beyond_top1.scans.files import (
    SCAN_KIND,
    ShardStore,
    legacy_scan_files,
    load_scan,
    scan_info,
    write_scan_files,
)
from beyond_top1.scans.result import (
    LENS_FIELDS,
    ScanFileError,
    ScanResult,
    warn_ordering_arguments,
)

MARGIN_TOLERANCE = 1e-4  # bf16: p_1 - p_2 less certain than this is read again in fp32
KEEPS = ("all", "saturation")


# ---------------------------------------------------------------------------------------------
# One batch
# ---------------------------------------------------------------------------------------------


def _read_lens(lens: Lens, resid, k: int, precision: str, n_candidates: int):
    """One lens' read-out of ``resid [T, L, d]``; with bf16 proposals, the (position, layer)
    rows whose ``p_1 - p_2`` could differ from an fp32 read-out's by more than
    :data:`MARGIN_TOLERANCE` are read again in fp32 (the part of the log-normaliser left in bf16,
    :attr:`~beyond_top1.ranking.TopKReadout.bf16_error`). Returns the arrays and that count."""
    L = lens.n_layers
    readout = lens_topk(
        lens, resid, tuple(range(L)), k, precision=precision, n_candidates=n_candidates
    )
    logprobs, reread = reread_loose_logprobs(lens, resid, readout, MARGIN_TOLERANCE)
    arrays = {
        "top_ids": readout.top_ids.cpu().numpy().astype(np.int32),
        "final_ranks": readout.final_ranks.clamp_max(2**31 - 1).cpu().numpy().astype(np.int32),
        "top_logprobs": logprobs.cpu().numpy().astype(np.float32),
    }
    return arrays, reread


def _saturation_batch(batch, lenses: Mapping[str, Lens], k, precision, n_candidates) -> dict:
    """``keep="saturation"``: per lens the final top-k and ``s`` only (read downward)."""
    out = _positions(batch)
    rows_read = 0
    for index, (name, lens) in enumerate(lenses.items()):
        readout = lens_saturation(
            lens, batch.resid, k, precision=precision, n_candidates=n_candidates
        )
        rows_read += readout.rows_read
        prefix = "" if index == 0 else f"lens/{name}/"
        out[prefix + "final_ids"] = readout.final_ids.cpu().numpy().astype(np.int32)
        out[prefix + "s"] = readout.s.cpu().numpy().astype(np.int16)
    out["rows_read"] = np.array([rows_read], dtype=np.int64)
    return out


def _positions(batch) -> dict:
    return {
        "text_id": batch.text_ids.cpu().numpy().astype(np.int64),
        "pos": batch.positions.cpu().numpy().astype(np.int64),
        "token_id": batch.token_ids.cpu().numpy().astype(np.int64),
        "next_token_id": batch.next_token_ids.cpu().numpy().astype(np.int64),
    }


def _scan_batch(batch, lenses: Mapping[str, Lens], k, precision, n_candidates, probe) -> dict:
    """Compact numpy results for one :class:`~beyond_top1.activations.ResidualBatch`."""
    resid = batch.resid  # [T, L+1, d]: embedding, then resid_post 0..L-1
    out = _positions(batch)
    reread = 0
    for index, (name, lens) in enumerate(lenses.items()):
        arrays, n = _read_lens(lens, resid[:, 1:], k, precision, n_candidates)
        reread += n
        prefix = "" if index == 0 else f"lens/{name}/"
        out.update({prefix + key: value for key, value in arrays.items()})
    out["reread"] = np.array([reread], dtype=np.int64)
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(
            resid[:, 1:].float(), resid[:, :-1].float(), dim=-1
        )
    out["resid_cos"] = cos.cpu().numpy().astype(np.float32)
    if probe is not None:
        tasks, settled = apply_probe(probe, resid[:, 1:])
        out["probe_task"] = tasks
        if settled is not None:
            out["probe_settled"] = settled
    return out


def _concatenate(parts: list[dict]):
    def cat(key, shape, dtype):
        arrays = [p[key] for p in parts if key in p]
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(shape, dtype)

    return cat


def _position_frame(cat, final_ids, s, k: int) -> pd.DataFrame:
    frame = pd.DataFrame(
        {key: cat(key, (0,), np.int64) for key in ("text_id", "pos", "token_id", "next_token_id")}
    )
    for i in range(k):
        frame[f"top_{i + 1}_id"] = final_ids[:, i].astype(np.int64)
    for i in range(k):
        frame[f"s_{i + 1}"] = s[:, i].astype(np.int64)
    return frame


def _assemble_saturation(parts: list[dict], settings: dict, texts: list[str] | None) -> ScanResult:
    k = settings["k"]
    cat = _concatenate(parts)
    frame = _position_frame(cat, cat("final_ids", (0, k), np.int64), cat("s", (0, k), np.int64), k)
    others = {
        name: {
            "final_ids": cat(f"lens/{name}/final_ids", (0, k), np.int32),
            "s": cat(f"lens/{name}/s", (0, k), np.int16),
        }
        for name in settings.get("lenses", [])[1:]
    }
    counts = {"layer_rows_read": int(sum(int(p["rows_read"][0]) for p in parts))}
    info = scan_info(counts, len(frame), settings)
    return ScanResult(frame, None, None, None, None, settings, others, texts=texts, info=info)


def _assemble(parts: list[dict], settings: dict, texts: list[str] | None) -> ScanResult:
    if settings.get("keep") == "saturation":
        return _assemble_saturation(parts, settings, texts)
    n_layers, k = settings["n_layers"], settings["k"]
    cat = _concatenate(parts)
    lens_shape = (0, n_layers, k)
    dtypes = {"top_ids": np.int32, "final_ranks": np.int32, "top_logprobs": np.float32}
    first = {key: cat(key, lens_shape, dtypes[key]) for key in LENS_FIELDS}
    s = saturation_layers(torch.as_tensor(first["top_ids"])).numpy().astype(np.int64)
    frame = _position_frame(cat, first["top_ids"][:, -1], s, k)
    others = {
        name: {key: cat(f"lens/{name}/{key}", lens_shape, dtypes[key]) for key in LENS_FIELDS}
        for name in settings.get("lenses", [])[1:]
    }
    has_probe = settings.get("probe") is not None
    settled = [p for p in parts if "probe_settled" in p]
    return ScanResult(
        saturation=frame,
        resid_cos=cat("resid_cos", (0, n_layers), np.float32),
        settings=settings,
        other_lenses=others,
        probe_task=cat("probe_task", (0, n_layers), np.int16) if has_probe else None,
        probe_settled=cat("probe_settled", (0, n_layers), np.float32) if settled else None,
        texts=texts,
        info={"rows_reread_in_fp32": int(sum(int(p["reread"][0]) for p in parts))},
        **first,
    )


# ---------------------------------------------------------------------------------------------
# The scan
# ---------------------------------------------------------------------------------------------


def _named_lenses(model, lens) -> dict[str, Lens]:
    """``{name: lens}`` from one lens (or ``"logit"``, a folder) or a mapping of them."""
    if isinstance(lens, Mapping):
        if not lens:
            raise ValueError("give at least one lens")
        return {str(n): resolve_lens(model, x, name=f"lens {n!r}") for n, x in lens.items()}
    resolved = resolve_lens(model, lens)
    return {resolved.kind: resolved}


def scan(
    model,
    texts: Iterable[str],
    *,
    lens: Lens | str | Path | Mapping[str, Lens] | None = None,
    k: int = 5,
    batch_size: int = 8,
    max_len: int | None = None,
    precision: str = "fp32",
    n_candidates: int = DEFAULT_CANDIDATES,
    probe=None,
    out: str | Path | None = None,
    resume: bool = False,
    shard_batches: int = 4,
    lens_source: str | None = None,
    texts_description: str | None = None,
    progress: bool = True,
    score_first: bool = DEFAULT_SCORE_FIRST,
    keep: str = "all",
    **ordering,
) -> ScanResult:
    """Rank trajectories and saturation layers for every scored position of ``texts``.

    Args:
        model: a ``HookedTransformer``.
        texts: a list of strings (kept with the result, and in ``out``).
        lens: how layers are read: a :class:`~beyond_top1.lenses.Lens` of ``model``,
            ``"logit"`` (the default) or a saved lens folder; or ``{name: lens}`` to read
            several lenses in the same pass (the first one gives ``saturation``).
        k: ranks tracked; ``s_1..s_k`` are computed (``1 <= k <= vocab``).
        batch_size, max_len: texts per forward pass; tokens per text (default 128).
        precision: which GEMM proposes candidates, ``"fp32"`` or ``"bf16"``: the exact rule
            gives the same top-k ids, ranks within ``k`` and saturation layers either way;
            ranks beyond ``k`` and log-probs carry the bounds of :mod:`beyond_top1.ranking`.
        probe: a task probe (anything with ``predict``) applied to ``resid_post`` at every
            layer: the early-exit probe criteria read its predictions.
        out: a folder to write shards and final files to (resumable; see module docstring).
        resume: continue an interrupted run in ``out`` (settings must match); on a finished
            scan, load it.
        lens_source: how the lens was given (e.g. its folder), recorded in the settings.
        texts_description: how the texts were chosen, recorded in the settings.
        score_first: score position 0 of a model without BOS (default: not; it is the
            attention sink, see :mod:`beyond_top1.data`).
        keep: ``"all"`` (the default) keeps every layer's read-out; ``"saturation"`` only the
            final top-k and ``s_1..s_k`` (the same values), read from the last layer down and
            only where a run is unbroken (:func:`~beyond_top1.ranking.lens_saturation`): what
            ordering statistics, task labels and probes need, at a fraction of the cost. It
            takes no ``probe`` and gives no trajectories, cosines or early-exit signals.

        ordering: the old ``n_permutations`` (ignored with a warning: ordering statistics are
            computed by :meth:`ScanResult.ordering`).

    Returns:
        A :class:`~beyond_top1.scans.ScanResult`.
    """
    warn_ordering_arguments("scan", ordering)
    lenses = _named_lenses(model, lens)
    texts = text_list(texts)
    vocab = hooked.d_vocab(model)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if shard_batches < 1:
        raise ValueError(f"shard_batches must be >= 1, got {shard_batches}")
    if keep not in KEEPS:
        raise ValueError(f"keep must be one of {KEEPS}, got {keep!r}")
    if keep == "saturation" and probe is not None:
        raise ValueError("keep='saturation' keeps no per-layer results: a probe needs keep='all'")
    check_batch_size(batch_size)
    first = next(iter(lenses.values()))
    settings = {
        "model_name": hooked.model_name(model),
        "unembedding_fingerprint": hooked.unembedding_fingerprint(model),
        "n_layers": hooked.n_layers(model),
        "lens": lens_source or next(iter(lenses)),
        "lens_kind": first.kind,
        "k": k,
        "precision": precision,
        "n_candidates": n_candidates if precision == "bf16" else None,
        "batch_size": batch_size,
        "max_len": resolve_max_len(model, max_len),
        "n_texts": len(texts),
        "texts": texts_description,
        "texts_sha256": texts_fingerprint(texts),
        "shard_batches": shard_batches,
        "score_first": bool(score_first),
    }
    if len(lenses) > 1:  # recorded only when used, so one-lens settings stay as they were
        settings["lenses"] = list(lenses)
        settings["lens_kinds"] = {name: lens.kind for name, lens in lenses.items()}
    if probe is not None:
        settings["probe"] = probe_identity(probe)
    if keep != "all":  # recorded only when used, so full scans' settings stay as they were
        settings["keep"] = keep
    run = functools.partial(_run_shards, model, texts, lenses, settings, n_candidates, probe)
    where = distributed.ranks()
    if where.active:
        out = None if out is None else Path(out)
        return _scan_ranks(run, texts, out, settings, resume, progress and where.is_main, where)
    if out is None:
        shards, _ = run(store=None, progress=progress, where=where)
        return _assemble(_in_order(shards), dict(settings), texts)
    with OutputFolder(out, SCAN_KIND, adopt=legacy_scan_files(Path(out))) as folder:
        store = ShardStore(folder, settings, resume)
        if not store.complete:
            _, timing = run(store=store, progress=progress, where=where, keep_parts=False)
            _write_merged(folder, store, settings, texts)
            store.finish(timing)
    return load_scan(out)


def _write_merged(folder: OutputFolder, store: ShardStore, settings: dict, texts) -> None:
    """The final files from every shard in ``store``, one batch in memory at a time."""

    def pieces():
        for index in _shard_indices(settings):
            parts = store.load(index)
            if parts is None:
                raise ScanFileError(f"scan shard {index} is missing or torn; rerun with resume")
            for part in parts:
                yield _assemble([part], settings, None)

    write_scan_files(folder, pieces, settings, texts)


def _scan_ranks(run, texts, out: Path | None, settings, resume, progress, where) -> ScanResult:
    """The scan under ``torchrun``. Every rank runs the shards of its batches. Without ``out``
    they are gathered and every rank returns the whole result. With ``out``, rank 0 checks and
    locks the folder, every rank writes its shards there, rank 0 merges them into the same
    files as a one-process run, and every rank returns the merged result. A failure on any rank
    stops all of them with its message (:func:`beyond_top1.distributed.check`)."""
    n_shards = len(_shard_indices(settings))
    if n_shards < where.world_size and where.is_main:
        warnings.warn(
            f"{n_shards} shard(s) of {settings['shard_batches']} batches for {where.world_size} "
            "ranks: some ranks have no work. Use a smaller shard_batches (--shard-batches) or "
            "batch_size, or more texts",
            stacklevel=3,
        )
    if out is None:
        shards, _ = distributed.run_checked(lambda: run(store=None, progress=progress, where=where))
        gathered = {
            i: p for ranked in distributed.all_gather(shards, where) for i, p in ranked.items()
        }
        return _assemble(_in_order(gathered), dict(settings), texts)

    def open_folder() -> OutputFolder:
        return OutputFolder(out, SCAN_KIND, adopt=legacy_scan_files(out))

    with distributed.on_main(open_folder, where) as folder:  # rank 0 checks and locks `out`
        complete = distributed.run_checked(
            lambda: folder is not None and ShardStore(folder, settings, resume).complete, where
        )
        if not distributed.broadcast(complete, where):
            store = ShardStore.writer(out)
            _, timing = distributed.run_checked(
                lambda: run(store=store, progress=progress, where=where, keep_parts=False), where
            )
            timings = distributed.all_gather(timing, where)

            def merge() -> None:
                if folder is not None:
                    _write_merged(folder, store, settings, texts)
                    ShardStore(folder, settings, resume=True).finish(_merged_timing(timings))

            distributed.run_checked(merge, where)
    return load_scan(out)


def _in_order(shards: dict[int, list[dict]]) -> list[dict]:
    """The parts of an in-memory run, in shard order (files go through :func:`_write_merged`)."""
    return [part for index in sorted(shards) for part in shards[index]]


def _merged_timing(timings: list[dict]) -> dict:
    seconds = max(t["seconds"] for t in timings)
    tokens = sum(t["tokens_scanned_now"] for t in timings)
    return {
        "seconds": seconds,
        "tokens_scanned_now": tokens,
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
        "ranks": len(timings),
    }


def _n_batches(settings: dict) -> int:
    return -(-settings["n_texts"] // settings["batch_size"])


def _shard_indices(settings: dict) -> range:
    return range(-(-_n_batches(settings) // settings["shard_batches"]))


def _run_shards(
    model, texts, lenses, settings, n_candidates, probe, *, store, progress, where,
    keep_parts=True,
):  # fmt: skip
    """The loop: this rank's shards of batches, each batch read once; finished shards in
    ``store`` are loaded (or, without ``keep_parts``, just skipped), new ones written there.
    Returns ``{shard index: its batches' parts}`` and the timing."""
    L, k, shard_batches = settings["n_layers"], settings["k"], settings["shard_batches"]
    n_batches = _n_batches(settings)
    mine = [i for i in _shard_indices(settings) if i % where.world_size == where.rank]
    shards: dict[int, list[dict] | None] = {}
    for index in mine if store else ():  # finished shards are never recomputed
        if not keep_parts:  # (rank 0 reads them at the merge)
            if store.is_finished(index):
                shards[index] = None
        elif (parts := store.load(index)) is not None:
            shards[index] = parts
    todo = set(mine) - set(shards)
    start = time.perf_counter()
    n_tokens = 0
    pending: list[dict] = []
    saturation_only = settings.get("keep") == "saturation"
    batches = stream_residuals(
        model,
        texts,
        layers=tuple(range(L)) if saturation_only else (-1, *range(L)),
        batch_size=settings["batch_size"],
        max_len=settings["max_len"],
        select=lambda b: b // shard_batches in todo,
        progress=progress,
        score_first=settings["score_first"],
    )
    for batch in batches:
        if saturation_only:
            part = _saturation_batch(batch, lenses, k, settings["precision"], n_candidates)
        else:
            part = _scan_batch(batch, lenses, k, settings["precision"], n_candidates, probe)
        pending.append(part)
        n_tokens += len(batch)
        shard = batch.batch_index // shard_batches
        if batch.batch_index == min((shard + 1) * shard_batches, n_batches) - 1:
            if store:
                store.write(shard, pending)
            shards[shard] = pending if keep_parts else None
            pending = []
    seconds = time.perf_counter() - start
    timing = {"seconds": round(seconds, 2), "tokens_scanned_now": n_tokens}
    timing["tokens_per_second"] = round(n_tokens / seconds, 2) if seconds > 0 else None
    return shards, timing


__all__ = ["KEEPS", "MARGIN_TOLERANCE", "scan"]
