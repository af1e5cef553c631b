"""Time intervals as sorted (start, end) lists: union, difference, intersection, length."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _subtract(
    base: list[tuple[float, float]], cut: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """``base`` minus ``cut`` (both sorted, disjoint)."""
    out: list[tuple[float, float]] = []
    for a, b in base:
        start = a
        for c, d in cut:
            if d <= start or c >= b:
                continue
            if c > start:
                out.append((start, c))
            start = max(start, d)
        if start < b:
            out.append((start, b))
    return out


def _intersect(
    xs: list[tuple[float, float]], ys: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    out = []
    for a, b in xs:
        for c, d in ys:
            lo, hi = max(a, c), min(b, d)
            if hi > lo:
                out.append((lo, hi))
    return _union(out)


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _counter(intervals: list[tuple[float, float]]) -> Any:
    """A function t → how many of the intervals contain t (binary search on sorted ends)."""
    starts = sorted(a for a, _ in intervals)
    ends = sorted(b for _, b in intervals)

    def count(t: float) -> int:
        return bisect.bisect_right(starts, t) - bisect.bisect_left(ends, t)

    return count
