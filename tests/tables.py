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


def mode_dir(logdir, mode: str):
    """``<logdir>/<the one run directory>/<mode>``: TensorBoardSink's default run name is a time
    stamp made unique (``<YYYYmmdd-HHMMSS>-<host>``), one per training run."""
    from pathlib import Path

    runs = sorted(p for p in Path(logdir).iterdir() if p.is_dir())
    assert len(runs) == 1, f"expected one run directory in {logdir}, got {[p.name for p in runs]}"
    return runs[0] / mode


def shown_order(charts: list) -> list:
    """The order TensorBoard's frontend shows the charts of one Custom Scalars category in (charts as
    the layout API returns them): every multiline chart in layout order, then every margin chart in
    reverse layout order. Checked against the real frontend in test_run.py (headless Chromium)."""
    multiline = [c for c in charts if "multiline" in c]
    return multiline + [c for c in charts if "multiline" not in c][::-1]
