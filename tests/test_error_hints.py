"""Error hints that point to the right fix (issue 11, item 14)."""

from __future__ import annotations

import numpy as np
import pytest

from labeltrack_log import GroupedStats, InputShapeError, Tracker


def test_a_column_of_class_ids_gets_the_squeeze_hint_not_argmax():
    y = np.array([[0], [3], [1]])  # argmax(-1) of this is [0, 0, 0]: every label class 0
    with pytest.raises(InputShapeError) as err:
        GroupedStats().update(y, np.ones(3))
    msg = str(err.value)
    assert "y[:, 0]" in msg and "y.squeeze(-1)" in msg and "argmax" not in msg
    with pytest.raises(InputShapeError, match=r"y\[:, 0\]"):
        Tracker("ce", sinks=[], figures=None).update(y, np.ones(3))


def test_one_hot_labels_still_get_the_argmax_hint():
    with pytest.raises(InputShapeError, match=r"y\.argmax\(-1\)"):
        GroupedStats().update(np.eye(3), np.ones(3))


def test_a_column_of_values_gets_the_squeeze_hint():
    with pytest.raises(InputShapeError, match=r"v\[:, 0\].*squeeze"):
        GroupedStats().update(np.arange(3), np.ones((3, 1)))


def test_a_batch_mean_through_the_fastestimator_trace_names_fes_average_loss_option():
    pytest.importorskip("fastestimator")
    from test_fe_parity import drive, torch_float_epochs

    from labeltrack_log.fastestimator import LabelTracker

    tracker = LabelTracker("y", "acc", sinks=[], figures=None)
    with pytest.raises(InputShapeError) as err:
        drive(tracker, torch_float_epochs(), convert=lambda y, m: (y, m.mean()))  # a batch-mean "loss"
    msg = str(err.value)
    assert "average_loss=False" in msg and "reduction=" not in msg and "'acc'" in msg
