"""Bounded output over the label budget (issue 11, item 12): the TensorBoard Text tab's table
holds the worst and best labels and a note, not every label."""

from __future__ import annotations

import numpy as np
import pytest
from tables import mode_dir  # noqa: E402  (tests/ is on sys.path, see conftest.py)

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

from labeltrack_log import GroupedStats  # noqa: E402
from labeltrack_log.sinks.tensorboard import TensorBoardSink  # noqa: E402


def text_table(run_dir) -> str:
    (path,) = run_dir.glob("*tfevents*")
    for event in EventFileLoader(str(path)).Load():
        for v in event.summary.value:
            if v.tag.endswith("/table"):
                return v.tensor.string_val[0].decode()
    raise AssertionError("no text table")


def test_the_text_table_over_the_budget_is_bounded_to_the_worst_and_best_labels(tmp_path):
    n = 300_000
    rng = np.random.default_rng(0)
    labels = np.arange(n, dtype=np.int64)
    means = rng.permutation(n).astype(float)  # label with mean n-1 is the worst, mean 0 the best
    g = GroupedStats()
    g.update(labels, means)
    g.update(np.array([n, n + 1]), np.array([np.nan, np.inf]))  # two labels without finite values
    table = g.compute()
    with TensorBoardSink(tmp_path, label_budget=10) as sink:
        sink.log_stats(table, step=1, name="loss", mode="train")
    text = text_table(mode_dir(tmp_path, "train"))
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| label")]
    assert len(rows) == TensorBoardSink.table_rows
    assert len(text) < 20_000  # was every one of 300,002 labels: ~20 MB per step
    shown = [float(r.split("|")[3]) for r in rows]
    assert shown == sorted(shown, reverse=True)
    assert shown[:50] == [float(n - 1 - i) for i in range(50)]  # the 50 largest means, largest first
    assert shown[50:] == [float(49 - i) for i in range(50)]  # then the 50 smallest
    assert f"of {n + 2}" in text and "2 without finite values" in text and "CSV/JSONL" in text


def test_within_the_row_limit_the_text_table_lists_every_label(tmp_path):
    g = GroupedStats()
    g.update(np.arange(30), np.arange(30, dtype=float))
    with TensorBoardSink(tmp_path, label_budget=5) as sink:
        sink.log_stats(g.compute(), step=1, name="loss", mode="train")
    rows = [line for line in text_table(mode_dir(tmp_path, "train")).splitlines() if line.startswith("| ") and "label" not in line]
    assert len(rows) == 30
