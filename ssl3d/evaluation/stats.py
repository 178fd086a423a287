"""Statistics of a label-efficiency curve: mean ± sd over seeds and paired differences with a t interval."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Summary:
    mean: float
    sd: float  # sample standard deviation (ddof 1); nan for a single seed
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "–"
        return f"{self.mean:.{digits}f}" + ("" if self.n < 2 else f" ± {self.sd:.{digits}f}")


def summarize(values: Sequence[float]) -> Summary:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return Summary(float("nan"), float("nan"), 0)
    return Summary(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size))


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    low: float  # confidence interval of the mean difference (nan with fewer than 2 pairs)
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width: the mean difference is known to ± this much (95 % by default)."""
        return (self.high - self.low) / 2

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        ci = "" if self.n < 2 else f" [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        return f"{self.mean:+.{digits}f}{ci}"

    def fmt_half(self, digits: int = 3) -> str:
        """``+0.050 (±0.030)``: mean difference and the interval's half-width."""
        if self.n == 0:
            return "–"
        return f"{self.mean:+.{digits}f}" + ("" if self.n < 2 else f" (±{self.half_width:.{digits}f})")


def paired_difference(a: dict, b: dict, confidence: float = 0.95) -> PairedDifference:
    """Mean of ``a[seed] - b[seed]`` over the seeds both have, with scipy's Student-t interval over seeds.

    Pairing by seed matters: both arms of a seed trained on the same few-shot cases, so case-selection luck
    cancels in the difference.
    """
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None
                   and not math.isnan(a[s]) and not math.isnan(b[s]))
    d = np.asarray([a[s] - b[s] for s in seeds], dtype=np.float64)
    if d.size == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), 0)
    mean = float(d.mean())
    if d.size < 2:
        return PairedDifference(mean, float("nan"), float("nan"), 1)
    if np.ptp(d) == 0:  # identical differences: a zero-width interval (scipy would warn about precision loss)
        return PairedDifference(mean, mean, mean, int(d.size))
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(confidence)
    return PairedDifference(mean, float(ci.low), float(ci.high), int(d.size))
