"""Which texts a task reads, as a value that can be compared, recorded and loaded again."""

from __future__ import annotations

from dataclasses import dataclass

from beyond_top1.data import load_texts, wiki_texts


@dataclass(frozen=True)
class TextSpec:
    """Texts ``start:stop`` of the Wikipedia ``split`` in the order of ``seed``, or of ``file``
    (``.txt``/``.jsonl``; ``stop=None``: to the end)."""

    split: str = "val"
    start: int = 0
    stop: int | None = 200
    seed: int = 0
    file: str | None = None

    def load(self) -> list[str]:
        if self.file is not None:
            return load_texts(self.file)[self.start : self.stop]
        return wiki_texts(self.stop, split=self.split, seed=self.seed)[self.start : self.stop]

    def describe(self) -> str:
        if self.file is not None:
            span = f"{self.start}:{self.stop}" if self.start else f"first {self.stop}"
            return f"{self.file} ({'all' if self.stop is None and not self.start else span})"
        if self.start:
            return (
                f"wiki_texts({self.stop}, split={self.split!r}, seed={self.seed})"
                f"[{self.start}:{self.stop}]"
            )
        return f"wiki_texts({self.stop}, split={self.split!r}, seed={self.seed})"


__all__ = ["TextSpec"]
