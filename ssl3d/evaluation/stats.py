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

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        ci = "" if self.n < 2 else f" [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        return f"{self.mean:+.{digits}f}{ci}"


def paired_difference(a: dict, b: dict, confidence: float = 0.95) -> PairedDifference:
    """Mean of ``a[seed] - b[seed]`` over the seeds both have, with a Student-t interval over seeds.

    Pairing by seed matters: both arms of a seed trained on the same few-shot cases, so case-selection luck
    cancels in the difference.
    """
    seeds = sorted(s for s in a if s in b and not math.isnan(a[s]) and not math.isnan(b[s]))
    d = np.asarray([a[s] - b[s] for s in seeds], dtype=np.float64)
    if d.size == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), 0)
    mean = float(d.mean())
    if d.size < 2:
        return PairedDifference(mean, float("nan"), float("nan"), 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return PairedDifference(mean, mean - half, mean + half, int(d.size))
