"""001's "saturation for better language modelling": is the rank-2 token gold more often when
its rank settled early?"""

from __future__ import annotations

import math
from dataclasses import dataclass

from beyond_top1.early_exit.criteria import DEFAULT_BETTER_LM_MARGIN
from beyond_top1.early_exit.signals import ExitSignals


def two_proportion_ztest(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """Pooled two-proportion z-test of ``x1/n1`` vs ``x2/n2``: ``(z, two-sided p)``."""
    if n1 <= 0 or n2 <= 0:
        return math.nan, math.nan
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return math.nan, math.nan
    z = (p1 - p2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


@dataclass
class BetterLMResult:
    """001's "saturation for better language modeling" test.

    Among positions whose final top-1 is not the gold token: how often the final rank-2 token
    is the gold token, for positions whose rank 2 saturated early (``s_2 <= L-1-m``) vs. only at
    the last layer (``s_2 = L-1``); pooled two-proportion z-test (two-sided).
    """

    n_early: int
    correct_early: int
    n_late: int
    correct_late: int
    z: float
    p_value: float
    m: int
    n_layers: int
    n_top1_wrong: int
    lens: str

    @property
    def rate_early(self) -> float:
        return self.correct_early / self.n_early if self.n_early else math.nan

    @property
    def rate_late(self) -> float:
        return self.correct_late / self.n_late if self.n_late else math.nan

    def to_dict(self) -> dict:
        return {
            "n_top1_wrong": self.n_top1_wrong,
            "n_early": self.n_early,
            "correct_early": self.correct_early,
            "rate_early": self.rate_early,
            "n_late": self.n_late,
            "correct_late": self.correct_late,
            "rate_late": self.rate_late,
            "z": self.z,
            "p_value": self.p_value,
            "m": self.m,
            "early_means": f"s_2 <= {self.n_layers - 1 - self.m}",
            "late_means": f"s_2 = {self.n_layers - 1}",
            "lens": self.lens,
        }

    def summary(self) -> str:
        return (
            f"top-1 wrong at {self.n_top1_wrong} positions; rank-2 token is gold at "
            f"{self.rate_early:.1%} of {self.n_early} with early "
            f"s_2 <= {self.n_layers - 1 - self.m} vs {self.rate_late:.1%} of {self.n_late} "
            f"with s_2 = {self.n_layers - 1}; "
            f"z = {self.z:.2f}, p = {self.p_value:.2g}"
        )

    def __repr__(self) -> str:
        return f"BetterLMResult({self.summary()})"


def better_language_modeling(
    signals: ExitSignals, m: int = DEFAULT_BETTER_LM_MARGIN, lens: str = "logit"
) -> BetterLMResult:
    """001's test (see :class:`BetterLMResult`); ``s_2`` is read under ``lens``."""
    L = signals.n_layers
    if not 0 <= m < L - 1:
        raise ValueError(f"m must be in [0, {L - 2}], got {m}")
    wrong = signals.final_top1 != signals.gold
    second_right = signals.final_ids[:, 1] == signals.gold
    s2 = signals.saturation[lens][:, 1]
    early = wrong & (s2 <= L - 1 - m)
    late = wrong & (s2 == L - 1)
    x1, n1 = int((early & second_right).sum()), int(early.sum())
    x2, n2 = int((late & second_right).sum()), int(late.sum())
    z, p = two_proportion_ztest(x1, n1, x2, n2)
    return BetterLMResult(n1, x1, n2, x2, z, p, m, L, int(wrong.sum()), lens)


__all__ = ["BetterLMResult", "better_language_modeling", "two_proportion_ztest"]
