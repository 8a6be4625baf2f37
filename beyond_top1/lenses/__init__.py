"""Lenses that read intermediate residual streams as next-token distributions."""

from beyond_top1.lenses.base import Lens
from beyond_top1.lenses.logit import LogitLens

__all__ = ["Lens", "LogitLens"]
