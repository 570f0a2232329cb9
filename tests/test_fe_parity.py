"""labeltrack_log.fastestimator.LabelTracker against FastEstimator's own LabelTracker, hook by hook.

Both traces are driven with the same batches on FE's ``sample_system_object()`` (as FE's own tests
do: ``system.mode``/``global_step`` set by hand, torch float labels) and must produce the same
Summary list: names (and their types), modes, keys, steps, label order and values (FE computes
them with ``statistics`` in exact arithmetic; ours are float64 within 1e-12 relative).
"""

from __future__ import annotations

import logging
import math
import pickle

import numpy as np
import pytest

fe = pytest.importorskip("fastestimator")
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
from fastestimator.summary.summary import Summary, ValWithError  # noqa: E402
from fastestimator.test.unittest_util import sample_system_object  # noqa: E402
from fastestimator.trace.xai import LabelTracker as FELabelTracker  # noqa: E402
from fastestimator.util.data import Data  # noqa: E402

from labeltrack_log.errors import ConfigError, InputShapeError  # noqa: E402
from labeltrack_log.fastestimator import LabelTracker  # noqa: E402

MODES = ("train", "eval")

# FE's own test data (test/PR_test/integration_test/trace/xai/test_label_tracker.py): torch float labels.
FE_EPOCHS = [
    [([2, 1, 0, 1, 0, 1, 1, 1, 0, 0], [0.9, 0.8, 0.1, 0.4, 0.9, 0.6, 0.1, 0.6, 0.8, 0.3]),
     ([1, 1, 1, 1, 0, 1, 0, 0, 0, 0], [0.3, 0.1, 0.0, 0.8, 0.5, 0.5, 0.6, 0.2, 0.5, 1.0]),
     ([2, 2, 2, 2, 2, 0, 2, 2, 2, 2], [0.3, 0.4, 0.7, 0.9, 0.3, 0.0, 0.3, 0.7, 0.8, 0.6])],
    [([0, 1, 0, 1, 0, 1, 1, 1, 0, 0], [0.8, 0.9, 0.6, 0.1, 0.7, 0.3, 0.9, 0.9, 0.4, 0.6]),
     ([2, 2, 2, 2, 0, 1, 0, 0, 0, 0], [0.4, 0.4, 0.9, 0.1, 0.4, 0.9, 0.0, 0.8, 1.0, 0.1]),
     ([1, 1, 1, 1, 2, 2, 2, 2, 2, 2], [0.3, 0.9, 0.9, 0.5, 0.9, 0.8, 0.6, 0.1, 0.1, 0.2])],
]


def torch_float_epochs():
    return [[(torch.Tensor(y), torch.Tensor(m)) for y, m in epoch] for epoch in FE_EPOCHS]


def random_epochs(n_epochs=3, n_batches=4, batch=37, n_labels=7, seed=1, offset=0.0):
    """Labels whose first appearance order is not their natural order; a label (6) that shows up late."""
    rng = np.random.default_rng(seed)
    epochs = []
    for e in range(n_epochs):
        batches = []
        for _ in range(n_batches):
            y = rng.choice([5, 3, 0, 1, 4, 2], size=batch)
            if e == n_epochs - 1:
                y[-1] = 6
            if not epochs and not batches:
                y[0] = 5  # first-seen order differs from natural order
            batches.append((y.astype(np.int64), (offset + rng.gamma(2.0, 0.5, size=batch)).astype(np.float32)))
        epochs.append(batches)
    return epochs


def drive(trace, epochs, modes=MODES, convert=lambda y, m: (y, m), system=None):
    """Run a trace through FE's hook sequence: on_begin, per epoch and mode the batches, on_end."""
    system = system or sample_system_object()
    trace.system = system
    trace.on_begin(Data())
    step = 0
    for epoch_idx, batches in enumerate(epochs, start=1):
        system.epoch_idx = epoch_idx
        for mode in modes:
            system.mode = mode
            trace.on_epoch_begin(Data())
            for batch_idx, (y, m) in enumerate(batches, start=1):
                if mode == "train":
                    step += 1
                    system.global_step = step
                system.batch_idx = batch_idx
                y, m = convert(y, m)
                trace.on_batch_begin(Data())
                trace.on_batch_end(Data({"y": y, "acc": m}))
            trace.on_epoch_end(Data())
    response = Data()
    trace.on_end(response)
    return response, system


def assert_same_summaries(expected: list[Summary], actual: list[Summary], rel: float = 1e-12) -> None:
    assert [(s.name, type(s.name)) for s in actual] == [(s.name, type(s.name)) for s in expected]
    for want, got in zip(expected, actual):
        assert isinstance(got, Summary)
        assert list(got.history) == list(want.history), want.name
        for mode in want.history:
            assert list(got.history[mode]) == list(want.history[mode]), (want.name, mode)
            for key in want.history[mode]:
                assert list(got.history[mode][key]) == list(want.history[mode][key]), (want.name, mode, key)
                for step, value in want.history[mode][key].items():
                    other = got.history[mode][key][step]
                    assert type(other) is type(value), (want.name, mode, key, step)
                    a = value.as_tuple() if isinstance(value, ValWithError) else (value,)
                    b = other.as_tuple() if isinstance(other, ValWithError) else (other,)
                    for x, y in zip(a, b):
                        assert y == pytest.approx(x, rel=rel, abs=1e-15), (want.name, mode, key, step, a, b)


def run_both(epochs, convert=lambda y, m: (y, m), **kwargs):
    theirs, their_system = drive(FELabelTracker("y", "acc", outputs="out", **kwargs), epochs, convert=convert)
    ours, our_system = drive(LabelTracker("y", "acc", outputs="out", sinks=None, **kwargs), epochs, convert=convert)
    return theirs, their_system, ours, our_system


BOUNDS = ["std", "range", None, ["std", "range", None], ["range", None]]
MAPPINGS = [None, {"good": 0, "bad": 1}, {"two": 2, "zero": 0, "one": 1}]


@pytest.mark.parametrize("bounds", BOUNDS, ids=str)
@pytest.mark.parametrize("label_mapping", MAPPINGS, ids=str)
def test_fe_test_data_torch_float_labels(bounds, label_mapping):
    theirs, their_system, ours, our_system = run_both(
        torch_float_epochs(), bounds=bounds, label_mapping=label_mapping, mode=["train", "eval"])
    assert_same_summaries(theirs["out"], ours["out"])
    # registered with the system for Traceability, the same list as the output
    assert list(our_system.custom_graphs) == list(their_system.custom_graphs) == ["out"]
    assert our_system.custom_graphs["out"] == ours["out"]
    assert_same_summaries(their_system.custom_graphs["out"], our_system.custom_graphs["out"])
    # FE's own test expectations, restated: epoch means at steps 3 and 6
    if bounds is None and label_mapping is None:
        means = {s.name: round(s.history["train"]["acc"][3], 6) for s in ours["out"]}
        assert means == {0: 0.49, 1: 0.42, 2: 0.59}
        assert [s.name for s in ours["out"]] == [2.0, 1.0, 0.0]  # first-seen order, float names


@pytest.mark.parametrize("bounds", [["std", "range", None]], ids=str)
@pytest.mark.parametrize("label_mapping", [None, {"five": 5, "six": 6, "zero": 0}], ids=str)
def test_random_int_labels_several_modes(bounds, label_mapping):
    epochs = random_epochs(offset=1e6)  # a large offset: FE's exact arithmetic vs our shifted sums
    theirs, _, ours, _ = run_both(epochs, convert=lambda y, m: (torch.tensor(y), torch.tensor(m)),
                                  bounds=bounds, label_mapping=label_mapping, mode=["train", "eval"])
    assert_same_summaries(theirs["out"], ours["out"])
    first = int(epochs[0][0][0][0])  # the first label of the first batch comes first, as in FE
    if label_mapping is None:
        assert ours["out"][0].name == first == 5
    assert sorted(s.name for s in ours["out"]) == sorted(label_mapping or range(7))


def test_tf_tensors_and_column_labels():
    epochs = random_epochs(seed=3)
    theirs, _ = drive(FELabelTracker("y", "acc", outputs="out", bounds=["std", "range"]), epochs,
                      convert=lambda y, m: (tf.constant(y), tf.constant(m)))
    # (N, 1) int32 labels and (N, 1) values, as a TF pipeline can produce them
    ours, _ = drive(LabelTracker("y", "acc", outputs="out", bounds=["std", "range"]), epochs,
                    convert=lambda y, m: (tf.constant(y[:, None].astype(np.int32)), tf.constant(m[:, None])))
    assert_same_summaries(theirs["out"], ours["out"])


def test_one_hot_labels_are_grouped_by_argmax():
    epochs = random_epochs(seed=4)
    eye = np.eye(7, dtype=np.float32)
    theirs, _, _, _ = run_both(epochs, convert=lambda y, m: (torch.tensor(y), torch.tensor(m)))
    with pytest.raises(ValueError):  # FE's own trace cannot take one-hot labels
        drive(FELabelTracker("y", "acc", outputs="out"), epochs, convert=lambda y, m: (torch.tensor(eye[y]), torch.tensor(m)))
    ours, _ = drive(LabelTracker("y", "acc", outputs="out"), epochs, convert=lambda y, m: (torch.tensor(eye[y]), torch.tensor(m)))
    assert_same_summaries(theirs["out"], ours["out"])


def test_modes_are_tracked_separately_and_filtered_like_fe():
    tracker = LabelTracker("y", "acc", outputs="out", mode="!train")
    assert tracker.mode == FELabelTracker("y", "acc", mode="!train").mode
    assert LabelTracker("y", "acc", ds_id=["a", "b"]).ds_id == FELabelTracker("y", "acc", ds_id=["a", "b"]).ds_id
    assert LabelTracker("y", "acc").outputs == FELabelTracker("y", "acc").outputs == ["acc_by_y"]
    # train and eval batches differ: each mode gets its own accumulator
    epochs = random_epochs(seed=5)
    system = sample_system_object()
    tracker = LabelTracker("y", "acc", outputs="out", mode=["train", "eval"], bounds=None)
    tracker.system = system
    tracker.on_begin(Data())
    system.global_step = 1
    for mode, scale in (("train", 1.0), ("eval", 10.0)):
        system.mode = mode
        tracker.on_epoch_begin(Data())
        for y, m in epochs[0]:
            tracker.on_batch_end(Data({"y": y, "acc": m * scale}))
        tracker.on_epoch_end(Data())
    train = {s.name: s.history["train"]["acc"][1] for s in tracker.label_summaries.values()}
    evals = {s.name: s.history["eval"]["acc"][1] for s in tracker.label_summaries.values()}
    assert evals == pytest.approx({k: 10 * v for k, v in train.items()}, rel=1e-6)


def test_nan_metric_does_not_crash_and_is_excluded():
    y = torch.tensor([0, 0, 1, 1, 1])
    m = torch.tensor([1.0, float("nan"), 2.0, 4.0, float("inf")])
    with pytest.raises(AttributeError):  # FE's own trace crashes inside statistics.stdev
        drive(FELabelTracker("y", "acc", outputs="out"), [[(y, m)]], modes=("eval",))
    ours, _ = drive(LabelTracker("y", "acc", outputs="out", bounds=["std", "range"]), [[(y, m)]], modes=("eval",))
    by_name = {s.name: s.history["eval"] for s in ours["out"]}
    assert by_name[0]["acc ($min, \\mu, max$)"][None].as_tuple() == (1.0, 1.0, 1.0)
    assert by_name[1]["acc ($\\mu \\pm \\sigma$)"][None].as_tuple() == pytest.approx((3 - math.sqrt(2), 3.0, 3 + math.sqrt(2)))


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ConfigError, match="bounds: expected None, 'std', 'range'"):
        LabelTracker("y", "acc", bounds="sigma")
    with pytest.raises(ValueError):  # ConfigError is a ValueError, as FE raises
        LabelTracker("y", "acc", bounds=["std", "minmax"])
    for figures in (0, -2, "sometimes", True, 1.5):
        with pytest.raises(ConfigError, match="figures: expected 'end', 'epoch', a positive int"):
            LabelTracker("y", "acc", figures=figures)
    with pytest.raises(ConfigError, match="unknown sink 'tensorbored'"):
        LabelTracker("y", "acc", sinks="tensorbored")


def test_batch_mean_metric_gets_a_clear_error():
    tracker = LabelTracker("y", "acc")
    tracker.system = sample_system_object()
    tracker.system.mode = "eval"
    with pytest.raises(InputShapeError, match="one value per sample, got a scalar .0-d.: a batch mean.*average_loss=False"):
        tracker.on_batch_end(Data({"y": torch.tensor([0, 1]), "acc": torch.tensor(0.5)}))


def test_memory_does_not_grow_with_samples():
    """No sample is stored: the state after 400k samples is as small as after one batch."""
    rng = np.random.default_rng(0)
    tracker = LabelTracker("y", "acc", mode="eval")
    system = sample_system_object()
    tracker.system = system
    system.mode, system.global_step = "eval", 1
    tracker.on_batch_end(Data({"y": rng.integers(0, 50, 256), "acc": rng.random(256)}))
    small = len(pickle.dumps(tracker))
    for _ in range(400):
        tracker.on_batch_end(Data({"y": torch.tensor(rng.integers(0, 50, 1000)), "acc": torch.tensor(rng.random(1000))}))
    assert len(pickle.dumps(tracker)) < small + 2000
    tracker.on_epoch_end(Data())
    summary = tracker.label_summaries[0].history["eval"]["acc ($\\mu \\pm \\sigma$)"][1]
    assert summary.y == pytest.approx(0.5, abs=0.01)


def test_logging_nothing_when_no_sinks(caplog):
    caplog.set_level(logging.INFO)
    drive(LabelTracker("y", "acc", outputs="out"), torch_float_epochs())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("labeltrack_log")]
