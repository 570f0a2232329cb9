"""The tracker's state round-trips through FE's System.save_state/load_state and through pickle:
sinks are not part of the state and are reopened, and a restored tracker reproduces its summaries
and continues without losing or duplicating steps.

FE 1.7's RestoreWizard cannot resume in this environment even without a LabelTracker, and
``sample_system_object()``'s ModelOp does not restore, so the round trip uses a System whose network
has no ops (see the README section on resuming).
"""

from __future__ import annotations

import csv
import pickle
from collections import Counter
from pathlib import Path

import pytest

fe = pytest.importorskip("fastestimator")
import torch  # noqa: E402
from fastestimator.test.unittest_util import sample_system_object  # noqa: E402
from fastestimator.util.data import Data  # noqa: E402
from test_fe_parity import assert_same_summaries, random_epochs  # noqa: E402

from labeltrack_log.fastestimator import LabelTracker  # noqa: E402

EPOCHS = random_epochs(n_epochs=3, seed=7)
MODES = ("train", "eval")
STEPS_PER_EPOCH = len(EPOCHS[0])


def new_tracker(csv_path: Path) -> LabelTracker:
    return LabelTracker("y", "acc", outputs="out", mode=list(MODES), bounds=["std", "range", None],
                        label_mapping={"zero": 0, "one": 1, "two": 2, "three": 3, "six": 6},
                        sinks=[{"type": "csv", "path": str(csv_path)}], figures=None)


def new_system(tracker: LabelTracker):
    system = sample_system_object()
    system.network.ops.clear()  # FE 1.7 cannot restore the sample ModelOp here
    system.traces.append(tracker)
    tracker.system = system
    return system


def run_epoch(tracker: LabelTracker, epoch_idx: int, modes=MODES) -> None:
    system = tracker.system
    system.epoch_idx = epoch_idx
    for mode in modes:
        system.mode = mode
        tracker.on_epoch_begin(Data())
        for y, m in EPOCHS[epoch_idx - 1]:
            if mode == "train":
                system.update_global_step()
            tracker.on_batch_end(Data({"y": torch.tensor(y), "acc": torch.tensor(m)}))
        tracker.on_epoch_end(Data())


def reference(tmp_path: Path) -> list:
    """The summaries of an uninterrupted run."""
    tracker = new_tracker(tmp_path / "reference.csv")
    new_system(tracker)
    tracker.on_begin(Data())
    for epoch in (1, 2, 3):
        run_epoch(tracker, epoch)
    out = Data()
    tracker.on_end(out)
    return out["out"]


def csv_steps(path: Path) -> Counter:
    with path.open(newline="") as fh:
        return Counter((row["mode"], int(row["step"]), row["label"]) for row in csv.DictReader(fh))


def assert_each_step_once(path: Path, n_epochs: int) -> None:
    rows = csv_steps(path)
    assert set(rows.values()) == {1}, [k for k, v in rows.items() if v > 1]
    steps = {step for _, step, _ in rows}
    assert steps == {STEPS_PER_EPOCH * e for e in range(1, n_epochs + 1)}
    assert {mode for mode, _, _ in rows} == set(MODES)
    assert {label for _, _, label in rows} == {"0", "1", "2", "3", "6"}  # mapped labels only


def test_save_state_load_state_round_trip(tmp_path: Path):
    stats = tmp_path / "stats.csv"
    first = new_tracker(stats)
    system = new_system(first)
    first.on_begin(Data())
    run_epoch(first, 1)
    run_epoch(first, 2)
    system.save_state(str(tmp_path / "state"))
    first._close_sinks()  # the first process ends here, without on_end

    second = new_tracker(stats)  # a new process: same configuration
    restored = new_system(second)
    second.on_begin(Data())  # FE runs every on_begin, then RestoreWizard's load_state
    restored.load_state(str(tmp_path / "state"))
    assert restored.global_step == 2 * STEPS_PER_EPOCH
    assert second.system is restored and second.sinks and not second.sinks[0].closed  # live sinks kept
    assert_same_summaries(list(first.label_summaries.values()), list(second.label_summaries.values()), rel=0)
    assert second.history.steps("out", "eval") == first.history.steps("out", "eval") == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]

    run_epoch(second, 2, modes=("eval",))  # FE re-runs the last eval epoch after a restore
    run_epoch(second, 3)
    restored.save_state(str(tmp_path / "state2"))  # a restored tracker can be saved again
    out = Data()
    second.on_end(out)
    assert_same_summaries(reference(tmp_path), out["out"], rel=0)
    assert restored.custom_graphs["out"] == out["out"]
    assert_each_step_once(stats, 3)


def test_pickle_round_trip_reopens_sinks(tmp_path: Path):
    stats = tmp_path / "stats.csv"
    first = new_tracker(stats)
    system = new_system(first)
    first.on_begin(Data())
    run_epoch(first, 1)
    blob = pickle.dumps(first)
    assert "_sinks" not in first.__getstate__() and "system" not in first.__getstate__()
    first._close_sinks()

    second = pickle.loads(blob)
    assert second._sinks is None  # dropped from the state ...
    second.system = system
    run_epoch(second, 2)
    assert len(second.sinks) == 1 and second.sinks[0].path == stats  # ... and reopened from the configuration
    run_epoch(second, 3)
    out = Data()
    second.on_end(out)
    assert second._sinks is None  # closed at the end
    assert_same_summaries(reference(tmp_path), out["out"], rel=0)
    assert_each_step_once(stats, 3)
    # the restored tracker pickles again, FE traceability information included
    assert pickle.loads(pickle.dumps(second)).fe_summary()


def test_a_second_fit_starts_a_fresh_history(tmp_path: Path):
    """fit() resets FE's global step; the tracker's history and step bookkeeping restart with it."""
    stats = tmp_path / "stats.csv"
    tracker = new_tracker(stats)
    system = new_system(tracker)
    for _ in range(2):
        system.global_step = None  # what Estimator.fit() does through System.reset()
        tracker.on_begin(Data())
        run_epoch(tracker, 1)
        tracker.on_end(Data())
        assert tracker.history.steps("out", "train") == [STEPS_PER_EPOCH]
    rows = csv_steps(stats)
    assert set(rows.values()) == {2}  # both fits logged their epoch (the sink was reopened for the second)
