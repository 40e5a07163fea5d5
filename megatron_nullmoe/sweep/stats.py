"""The report's math, with no framework imports: intervals over seeds and loss at matched FLOPs.

Interval: mean +- t(0.975, n-1) * s / sqrt(n), s the sample standard deviation (n - 1), Student t
because seeds are few. n = 1 gives the mean and no interval.

Loss at matched realised FLOPs: the trainer logs `throughput/model_flops_total`, the cumulative
model FLOPs counted from the *realised* real experts per token of every interval (not from top-k).
A run's loss curve is its (cumulative FLOPs, loss) points: train losses at their logged steps;
validation losses at their steps, whose FLOPs are interpolated linearly in step between the
logged train points (with 0 FLOPs at step 0). The compared runs (every variant and seed at one
grid point) are read at one budget B, the smallest final FLOPs among them, so that no run is
extrapolated; each run's loss at B is linear interpolation between its two points around B, and
None when B falls before the run's first point (e.g. before its first evaluation). Equal steps
are not equal compute: budget control holds the realised rate near, not at, its target, and
early routing can run well above it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

# t(0.975, df) for df = 1..30; beyond, the Cornish-Fisher expansion below is within 1e-4.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom {df}: need at least 1 (two seeds)")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_interval(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """(mean, 95% half-width or None for n = 1, n) over the values that are not None/NaN."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(xs)
    if n == 0:
        return None, None, 0
    mean = sum(xs) / n
    if n == 1:
        return mean, None, 1
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n), n


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> Optional[float]:
    """y at x on the piecewise-linear curve through (xs, ys), xs increasing; None outside it."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0]  # a single point, at x


def loss_curves(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """{"train": (flops, losses), "val": (flops, losses)} of one run's metrics.jsonl records."""
    train = [r for r in records if "train/loss" in r and "throughput/model_flops_total" in r]
    steps = [0.0] + [float(r["step"]) for r in train]
    flops = [0.0] + [float(r["throughput/model_flops_total"]) for r in train]
    val_points = []
    for r in records:
        if "val/loss" in r:
            at = interpolate(steps, flops, float(r["step"]))
            if at is not None:
                val_points.append((at, r["val/loss"]))
    return {"train": ([f for f in flops[1:]], [r["train/loss"] for r in train]),
            "val": ([f for f, _ in val_points], [v for _, v in val_points])}


def matched_budget(final_flops: Sequence[float]) -> float:
    return min(final_flops)


def paired_diffs(a_by_seed: dict[int, Optional[float]], b_by_seed: dict[int, Optional[float]]
                 ) -> list[float]:
    """A - B for each seed where both have a value, in seed order."""
    return [a_by_seed[s] - b_by_seed[s] for s in sorted(set(a_by_seed) & set(b_by_seed))
            if a_by_seed[s] is not None and b_by_seed[s] is not None]


def paired_difference(a_by_seed: dict[int, Optional[float]], b_by_seed: dict[int, Optional[float]]
                      ) -> tuple[Optional[float], Optional[float], int]:
    """Mean of A - B over the seeds where both have a value, with its 95% half-width: the seed is
    the unit (same data order, same seed), so seed-to-seed variation common to both cancels."""
    return mean_interval(paired_diffs(a_by_seed, b_by_seed))


def verdict(mean: Optional[float], half: Optional[float], a: str, b: str) -> str:
    """Which side is lower beyond the 95% interval of A - B, or that the interval holds 0."""
    if mean is None or half is None:
        return "no interval (needs two seeds with both)"
    if mean + half < 0:
        return f"{a} lower"
    if mean - half > 0:
        return f"{b} lower"
    return "within noise"
