"""Data parallelism under ``torchrun``: which batches this process runs, and how ranks combine.

Launched by ``torchrun --nproc-per-node N [--nnodes M ...]`` (which sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` ...), the corpus-level analyses shard their batches of the text
list across ranks (the same batches as a one-process run, so each batch's numbers are the
same): a scan runs shard ``s`` (``shard_batches`` batches) on rank ``s mod N``, the fits and
evaluations batch ``b`` on rank ``b mod N``, a tuned lens part ``r`` of each step's batch on rank
``r``. Results are combined with ``torch.distributed`` collectives: float64 all-reduces of sums
(normal equations, metric sums), a gradient all-reduce per tuned-lens step, and for scans,
shard files that rank 0 merges (so several nodes need a shared filesystem for ``out``). The
process group is created on first use: ``gloo`` for CPU tensors (and ``nccl`` for CUDA ones,
when CUDA is there), with each rank on GPU ``LOCAL_RANK`` when there is one. Without
``torchrun`` nothing changes: one rank, no collectives.

Errors: a rank that fails in a checked section (:func:`run_checked`) reports its message to the
others at its end, so all ranks stop with that rank's message instead of waiting for it; a rank
that dies outright (killed, out of memory), or fails between checks, is detected by
``torchrun``, which stops the others. A collective waits at most ``BEYOND_TOP1_DIST_TIMEOUT``
seconds (default 3 hours) for the other ranks.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

TIMEOUT_ENV = "BEYOND_TOP1_DIST_TIMEOUT"  # seconds a collective waits for the other ranks
DEFAULT_TIMEOUT = "10800"  # 3 h: fast ranks wait for the slowest one's shards and rank 0's merge


class RankFailedError(RuntimeError):
    """Another rank failed; its message is this error's."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        """Whether several processes share the work."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: it shows progress and writes the merged outputs."""
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        """Whether batch ``batch_index`` runs on this rank (round robin)."""
        return batch_index % self.world_size == self.rank

    def owned(self, n: int) -> list[int]:
        """The indices in ``range(n)`` this rank runs."""
        return list(range(self.rank, n, self.world_size))


@contextlib.contextmanager
def on_main(open_context: Callable[[], contextlib.AbstractContextManager[T]], where=None):
    """Enter ``open_context()`` on rank 0 only (an output folder, checked and locked for the
    whole run); yields its value there and ``None`` elsewhere. If rank 0 cannot enter it, every
    rank raises its message. In one process: just ``with open_context() as value``."""
    where = where or ranks()
    with contextlib.ExitStack() as stack:
        value = run_checked(
            lambda: stack.enter_context(open_context()) if where.is_main else None, where
        )
        yield value


def sharded(stream: dict, where: Ranks | None = None) -> dict:
    """Keyword arguments of :func:`~beyond_top1.activations.stream_residuals` for this rank's
    batches (round robin), with progress shown by rank 0 only; unchanged in one process."""
    where = where or ranks()
    if not where.active:
        return stream
    progress = stream.get("progress", True) and where.is_main
    return {**stream, "select": where.owns, "progress": progress}


def launched() -> bool:
    """Whether ``torchrun`` started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def ranks() -> Ranks:
    """This process's :class:`Ranks`, creating the process group if ``torchrun`` launched it."""
    if not dist.is_available():
        return Ranks()
    if not dist.is_initialized():
        if not launched():
            return Ranks()
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
        dist.init_process_group(backend=backend, timeout=timeout)
        atexit.register(_destroy)  # gloo's threads abort the process if left running at exit
        local = int(os.environ.get("LOCAL_RANK", "-1"))
        if torch.cuda.is_available() and 0 <= local < torch.cuda.device_count():
            torch.cuda.set_device(local)  # device="cuda" is then this rank's GPU
    return Ranks(dist.get_rank(), dist.get_world_size())


def check(error: BaseException | None = None, where: Ranks | None = None) -> None:
    """Tell every rank whether any rank failed; raise on all of them if one did.

    Every rank must call this at the same point (it is a collective). The failing rank passes
    its exception and gets it back; the others raise :class:`RankFailedError` with its message.
    """
    where = where or ranks()
    if not where.active:
        if error is not None:
            raise error
        return
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages: list[str | None] = [None] * where.world_size
    dist.all_gather_object(messages, message)
    if error is not None:
        raise error
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    if failed:
        rank, text = failed[0]
        raise RankFailedError(f"rank {rank} failed: {text}")


def run_checked(work: Callable[[], T], where: Ranks | None = None) -> T:
    """``work()`` on every rank, then :func:`check`: all ranks return or all raise."""
    where = where or ranks()
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - passed on to every rank, then re-raised
        check(exc, where)
        raise
    check(None, where)
    return result


def all_reduce_sum(tensor: torch.Tensor, where: Ranks | None = None) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (float64 stays float64) and return it."""
    where = where or ranks()
    if where.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(value: T, where: Ranks | None = None) -> list[T]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    where = where or ranks()
    if not where.active:
        return [value]
    out: list = [None] * where.world_size
    dist.all_gather_object(out, value)
    return out


def broadcast(value: T, where: Ranks | None = None) -> T:
    """Rank 0's ``value`` on every rank."""
    where = where or ranks()
    if not where.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(where: Ranks | None = None) -> None:
    where = where or ranks()
    if where.active:
        dist.barrier()


__all__ = [
    "RankFailedError",
    "Ranks",
    "TIMEOUT_ENV",
    "all_gather",
    "all_reduce_sum",
    "barrier",
    "broadcast",
    "check",
    "launched",
    "on_main",
    "run_checked",
    "sharded",
    "ranks",
]
