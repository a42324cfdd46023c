"""Intervals for accuracy claims: Wilson for one run, a paired bootstrap for a method against the plain model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the two-sided 95 % normal quantile
BOOTSTRAP_ITERS = 2000
BOOTSTRAP_SEED = 0  # fixed: the same samples give the same interval on every machine


def wilson_interval(mean: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``mean`` over ``n`` samples (soft scores count as their mean)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = min(1.0, max(0.0, mean))
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference_interval(
    before: Sequence[float], after: Sequence[float], iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float, float]:
    """Mean of ``after - before`` over paired samples and its 95 % percentile-bootstrap interval."""
    diffs = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if diffs.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, diffs.size, size=(iters, diffs.size))
    means = diffs[draws].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return (float(diffs.mean()), float(low), float(high))


def normalise_answer(text: str) -> str:
    """An answer as compared for agreement: lower case, surrounding spaces and a final full stop dropped."""
    return " ".join(str(text).lower().split()).rstrip(".")


def agreement(before: Sequence[str], after: Sequence[str]) -> float:
    """Share of paired samples whose answers are the same (EffiVLM-Bench's "loyalty")."""
    if not before:
        return math.nan
    same = sum(normalise_answer(a) == normalise_answer(b) for a, b in zip(before, after, strict=True))
    return same / len(before)
