"""Summaries of measured values, shared by the load generator and the report."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The value below which a fraction ``q`` of ``values`` lies (nearest rank); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]
