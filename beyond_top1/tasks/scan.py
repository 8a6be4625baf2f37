"""Task: a saturation scan of a corpus (CLI ``scan``, stages ``scan-<model>``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from beyond_top1.lenses import Lens
from beyond_top1.scans import TIMING_FILE, ScanResult, load_scan, scan
from beyond_top1.tasks.texts import TextSpec


@dataclass(frozen=True)
class ScanConfig:
    texts: TextSpec = field(default_factory=lambda: TextSpec(split="val", stop=200))
    lens: str = "logit"  # "logit" or a saved lens folder (recorded as given)
    k: int = 5
    precision: str = "fp32"
    max_len: int | None = None
    batch_size: int = 8
    score_first: bool = False
    keep: str = "all"  # "saturation": s and the final top-k only (see bt.scan)
    shard_batches: int = 4  # batches per resumable shard file (and per rank's unit of work)


def run(
    model,
    config: ScanConfig,
    out: str | Path,
    *,
    lens: Lens | Mapping[str, Lens] | None = None,
    probe=None,
    resume: bool = True,
    progress: bool = True,
) -> ScanResult:
    """The scan of ``config.texts`` written to ``out`` (resumed when it holds the same scan,
    loaded when it is finished). ``lens``: the lens object(s) ``config.lens`` names, when the
    caller has them already."""
    return scan(
        model,
        config.texts.load(),
        lens=config.lens if lens is None else lens,
        k=config.k,
        batch_size=config.batch_size,
        max_len=config.max_len,
        precision=config.precision,
        probe=probe,
        out=out,
        resume=resume,
        lens_source=config.lens,
        texts_description=config.texts.describe(),
        progress=progress,
        score_first=config.score_first,
        keep=config.keep,
        shard_batches=config.shard_batches,
    )


def load(out: str | Path) -> ScanResult:
    return load_scan(out)


def headline(result: ScanResult, out: str | Path | None = None) -> dict:
    """Layers, positions, mean ``s_i`` and (when ``out`` has its timing) the speed."""
    s = result.saturation_array()
    head = {
        "n_layers": result.n_layers,
        "n_positions": len(result),
        "mean_saturation_layer": [float(x) for x in s.mean(0)] if len(s) else [],
    }
    timing = Path(out) / TIMING_FILE if out is not None else None
    if timing is not None and timing.is_file():
        head["tokens_per_second"] = json.loads(timing.read_text()).get("tokens_per_second")
    return head


__all__ = ["ScanConfig", "headline", "load", "run"]
