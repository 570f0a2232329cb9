"""Hand-built StatsTables for the figure and history tests."""

from __future__ import annotations

import numpy as np

from labeltrack_log import StatsTable


def table(labels, mean, std=None, count=None, nonfinite=None) -> StatsTable:
    """A table with the given means; std 0.1, count 10, min/max = mean -/+ 2 std unless given."""
    mean = np.asarray(mean, dtype=float)
    n = len(mean)
    std = np.full(n, 0.1) if std is None else np.asarray(std, dtype=float)
    count = np.full(n, 10) if count is None else np.asarray(count)
    nonfinite = np.zeros(n, dtype=int) if nonfinite is None else np.asarray(nonfinite)
    return StatsTable(labels, count, mean, std, mean - 2 * std, mean + 2 * std, nonfinite)
