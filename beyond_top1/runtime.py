"""What the hardware offers: CPU threads (one context manager for the library, CLI and
experiments) and whether a device has a fast bf16 matrix multiply."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def auto_threads() -> tuple[int | None, str]:
    """``(threads, why)`` for ``"auto"``: one thread per core other work leaves free when the
    machine is busy (1-minute load average >= 1), where torch's threads would wait on each other
    and run several times slower; ``(None, "")`` (torch's default) otherwise."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None, ""
    cores = os.cpu_count() or 1
    free = round(cores - load)
    if load >= 1.0 and free < torch.get_num_threads():
        threads = max(1, free)
        return threads, (
            f"auto: load average {load:.1f} on {cores} cores, other work is running: "
            f"{threads} thread(s)"
        )
    return None, ""


def resolve_threads(setting: int | str | None) -> tuple[int | None, str]:
    """``(threads or None for torch's default, why)`` for an int, ``"auto"`` or ``None``."""
    if setting in (None, "", "auto"):
        return auto_threads()
    try:
        threads = int(setting)
    except (TypeError, ValueError):
        raise ValueError(f"threads takes a number or 'auto', got {setting!r}") from None
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads, "set"


@contextlib.contextmanager
def threads(setting: int | str | None) -> Iterator[int]:
    """Run the block with ``setting`` torch threads (an int, ``"auto"``, or ``None`` for no
    change); the previous count comes back afterwards, also on an exception.

    >>> with bt.threads(1):            # e.g. timings on a shared machine
    ...     result = bt.scan(model, texts)
    """
    previous = torch.get_num_threads()
    wanted, _ = resolve_threads(setting) if setting is not None else (None, "")
    if wanted is not None:
        torch.set_num_threads(wanted)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def has_fast_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (CUDA with bf16, or a CPU with
    AVX-512 BF16/AMX). Elsewhere a bf16 GEMM is emulated and ~100x slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


__all__ = ["auto_threads", "has_fast_bf16", "resolve_threads", "threads"]
