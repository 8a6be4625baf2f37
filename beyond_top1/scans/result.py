"""What a scan keeps: compact per-position results of one or several lenses (optionally a
probe's predictions). A saturation-only scan (``keep="saturation"``) keeps no per-layer arrays.
Its folder is :mod:`beyond_top1.scans.files`. Statistics are computed on request
(:meth:`ScanResult.ordering`), never when saving.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from beyond_top1.saturation import OrderingStats, ordering, saturation_layers

LENS_FIELDS = ("top_ids", "final_ranks", "top_logprobs")


class ScanFileError(ValueError):
    """A scan folder is missing, corrupt, or was written with other settings."""


@dataclass
class ScanResult:
    """Compact per-position results of :func:`~beyond_top1.scans.scan`; ``n`` = scored positions.

    Attributes:
        saturation: one row per position: ``text_id, pos, token_id, next_token_id`` (``-1`` at
            a text's last token), ``top_1_id..top_k_id`` (the final top-k), ``s_1..s_k``, all
            under the scan's (first) lens.
        top_ids: ``[n, L, k]`` that lens' top-k ids at every layer (rank order); this and the
            next three are ``None`` in a saturation-only scan (``keep="saturation"``).
        final_ranks: ``[n, L, k]`` rank (1-based) of final token ``i`` at every layer.
        top_logprobs: ``[n, L, k]`` log-probs of ``top_ids`` under the lens.
        resid_cos: ``[n, L]`` ``cos(h_l, h_{l-1})`` (``h_{-1}`` = the embedding).
        settings: how the scan was made (model, lenses, k, precision, texts...).
        other_lenses: per further lens name, its ``top_ids``, ``final_ranks``, ``top_logprobs``
            (saturation-only: its ``final_ids`` and ``s``, ``[n, k]``).
        probe_task, probe_settled: ``[n, L]`` a task probe's prediction (and its probability of
            task ``>= 2``) at every layer, when the scan was given a probe.
        texts: the texts scanned (``None`` for scans saved before scans kept them).
        info: what the run found beyond the settings (e.g. rows read again in fp32).
    """

    saturation: pd.DataFrame
    top_ids: Int[np.ndarray, "n layer k"] | None
    final_ranks: Int[np.ndarray, "n layer k"] | None
    top_logprobs: Float[np.ndarray, "n layer k"] | None
    resid_cos: Float[np.ndarray, "n layer"] | None
    settings: dict = field(default_factory=dict)
    other_lenses: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    probe_task: Int[np.ndarray, "n layer"] | None = field(default=None, repr=False)
    probe_settled: Float[np.ndarray, "n layer"] | None = field(default=None, repr=False)
    texts: list[str] | None = field(default=None, repr=False)
    info: dict = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        if self.top_ids is None:
            return int(self.settings["n_layers"])
        return int(self.top_ids.shape[1])

    @property
    def k(self) -> int:
        if self.top_ids is None:
            return int(self.settings["k"])
        return int(self.top_ids.shape[2])

    @property
    def keeps_trajectories(self) -> bool:
        """Whether the per-layer arrays were kept (not a ``keep="saturation"`` scan)."""
        return self.top_ids is not None

    def require_trajectories(self, what: str) -> None:
        """Raise a clear error when ``what`` needs per-layer arrays this scan did not keep."""
        if not self.keeps_trajectories:
            raise ValueError(
                f"{what} needs the per-layer read-outs, and this scan kept only the saturation "
                "layers (keep='saturation'); scan again with keep='all' (the default)"
            )

    @property
    def lens_names(self) -> tuple[str, ...]:
        """The lenses read, the first one being the one of ``saturation`` and ``top_ids``."""
        if "lenses" in self.settings:  # several lenses, by the names they were given
            return tuple(self.settings["lenses"])
        return (str(self.settings.get("lens", "lens")), *self.other_lenses)

    def lens_arrays(self, name: str | None = None) -> dict[str, np.ndarray]:
        """``top_ids``, ``final_ranks``, ``top_logprobs`` of lens ``name`` (default: the first)."""
        self.require_trajectories("lens_arrays")
        if name is None or name == self.lens_names[0]:
            return {key: getattr(self, key) for key in LENS_FIELDS}
        if name not in self.other_lenses:
            raise KeyError(f"this scan read the lenses {list(self.lens_names)}, not {name!r}")
        return self.other_lenses[name]

    def __len__(self) -> int:
        return len(self.saturation)

    def saturation_array(self, lens: str | None = None) -> Int[np.ndarray, "n k"]:
        """``s_1..s_k`` as an ``[n, k]`` integer array (of another lens: ``lens=name``)."""
        if lens is None or lens == self.lens_names[0]:
            return self.saturation[[f"s_{i}" for i in range(1, self.k + 1)]].to_numpy()
        if not self.keeps_trajectories:
            if lens not in self.other_lenses:
                raise KeyError(f"this scan read the lenses {list(self.lens_names)}, not {lens!r}")
            return self.other_lenses[lens]["s"].astype(np.int64)
        top_ids = torch.as_tensor(self.lens_arrays(lens)["top_ids"])
        return saturation_layers(top_ids).numpy()

    def ordering(self, **kwargs) -> OrderingStats:
        """001's ordering statistics (see :func:`beyond_top1.saturation.ordering`), computed
        now: a scan does not store them."""
        return ordering(torch.tensor(self.saturation_array()), self.n_layers, **kwargs)

    def subset(self, rows: np.ndarray) -> ScanResult:
        """The positions selected by a boolean mask or index array."""
        rows = np.asarray(rows)

        def pick(array):
            return None if array is None else array[rows]

        return ScanResult(
            self.saturation.iloc[rows].reset_index(drop=True),
            pick(self.top_ids),
            pick(self.final_ranks),
            pick(self.top_logprobs),
            pick(self.resid_cos),
            dict(self.settings),
            {n: {k: v[rows] for k, v in a.items()} for n, a in self.other_lenses.items()},
            pick(self.probe_task),
            pick(self.probe_settled),
            self.texts,
            dict(self.info),
        )

    def save(self, directory: str | Path) -> Path:
        """Write the scan's files to ``directory`` (see :func:`~beyond_top1.scans.save_scan`)."""
        from beyond_top1.scans.files import save_scan

        return save_scan(self, directory)

    def __repr__(self) -> str:
        s = self.settings
        lenses = ", ".join(repr(n) for n in self.lens_names)
        return (
            f"ScanResult({len(self)} positions, {s.get('n_texts', '?')} texts, "
            f"model={s.get('model_name')!r}, lens={lenses}, k={self.k}, L={self.n_layers})"
        )

    def _repr_html_(self) -> str:
        head = self.saturation.head(10).to_html(index=False)
        return f"<div><b>{self!r}</b>{head}</div>"


def warn_ordering_arguments(function: str, arguments: dict) -> None:
    """Deprecated ordering arguments: a scan no longer stores its ordering statistics."""
    unknown = set(arguments) - {"n_permutations", "filter_fraction", "seed"}
    if unknown:
        raise TypeError(f"{function}() got unexpected arguments {sorted(unknown)}")
    if arguments:
        warnings.warn(
            f"{function}({', '.join(sorted(arguments))}=...) is ignored: a scan no longer "
            "stores ordering statistics; compute them with scan.ordering(...) (or "
            "`beyond-top1 order`). The arguments go away in the next release",
            DeprecationWarning,
            stacklevel=3,
        )


__all__ = ["LENS_FIELDS", "ScanFileError", "ScanResult", "warn_ordering_arguments"]
