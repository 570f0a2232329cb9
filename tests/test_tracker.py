"""The framework-agnostic Tracker against real sinks: CSV/JSONL files and PNGs read back, TensorBoard
event files read back with EventAccumulator; failing sinks, the figure schedule, label
restriction, pickling, close and the context manager.

Tests marked ``core`` need only numpy + matplotlib (file sinks)."""

from __future__ import annotations

import csv
import json
import logging
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import labeltrack_log
from labeltrack_log import ConfigError, InputTypeError, StatsHistory, Tracker
from labeltrack_log.naming import figure_file, figure_name, tb_item_tag, tb_tag
from labeltrack_log.sinks import Sink
from labeltrack_log.sinks.files import CSVSink, ImageDirSink, JSONLSink
from tables import mode_dir  # noqa: E402  (tests/ is on sys.path, see conftest.py)

MODES = ("train", "eval")
NAME = "ce_by_y"


def epoch_batches(epoch: int, mode: str, n_batches: int = 3, size: int = 40) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic batches of one epoch and mode; labels 0..4, values differ per mode and epoch."""
    rng = np.random.default_rng(100 * epoch + len(mode))
    return [(rng.integers(0, 5, size), rng.gamma(2.0, 0.5, size) + (epoch if mode == "eval" else 0.0))
            for _ in range(n_batches)]


def reference(epoch: int, mode: str) -> dict[int, tuple[int, float, float, float, float]]:
    """numpy reference of one epoch: label -> (count, mean, std (ddof=1), min, max)."""
    labels = np.concatenate([y for y, _ in epoch_batches(epoch, mode)])
    values = np.concatenate([v for _, v in epoch_batches(epoch, mode)])
    out = {}
    for lab in np.unique(labels):
        v = values[labels == lab]
        out[int(lab)] = (len(v), v.mean(), v.std(ddof=1) if len(v) > 1 else 0.0, v.min(), v.max())
    return out


def run(tracker: Tracker, epochs: int = 3, steps_per_epoch: int = 10, first_epoch: int = 1) -> dict[int, dict]:
    """Feed ``epochs`` epochs of both modes; end each at step epoch * steps_per_epoch. Returns the tables."""
    out = {}
    for epoch in range(first_epoch, first_epoch + epochs):
        for mode in MODES:
            for y, v in epoch_batches(epoch, mode):
                tracker.update(y, v, mode=mode)
        out[epoch] = tracker.end_epoch(epoch * steps_per_epoch)
    return out


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def pngs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.png"))


def expected_pngs(steps_by_mode: dict[str, list[int]], bounds=("std",)) -> list[str]:
    return sorted(figure_file(figure_name(NAME, b), mode, s) for b in bounds for mode, steps in steps_by_mode.items()
                  for s in steps)


class Exploding(Sink):
    """A real Sink that raises in one method and counts every call it gets."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.calls: Counter = Counter()

    def _maybe(self, method: str) -> None:
        self.calls[method] += 1
        if method == self.where:
            raise RuntimeError(f"{method} is on fire")

    def log_stats(self, table, *, step, name, mode):
        self._check_call(step, table)
        self._maybe("log_stats")

    def log_figure(self, figure, *, step, name, mode):
        self._check_call(step)
        self._maybe("log_figure")

    def flush(self):
        self._maybe("flush")

    def _close(self):
        self._maybe("close")

    def __repr__(self) -> str:
        return f"Exploding({self.where!r})"


# --------------------------------------------------------------------------- real sinks
@pytest.mark.core
def test_every_epoch_reaches_the_file_sinks_with_the_right_numbers(tmp_path: Path):
    csv_path, jsonl_path = tmp_path / "s.csv", tmp_path / "s.jsonl"
    with Tracker(NAME, sinks=[{"type": "csv", "path": str(csv_path)}, JSONLSink(jsonl_path)],
                 label_names={0: "zero", 3: "three"}, figures=None) as tracker:
        tables = run(tracker)
        assert len(csv_rows(csv_path)) == 3 * 2 * 5  # visible before close: flushed every epoch
    for path in (csv_path, jsonl_path):
        history = StatsHistory.from_file(path)
        assert history.label_names == {0: "zero", 3: "three"}
        for mode in MODES:
            assert history.steps(NAME, mode) == tracker.history.steps(NAME, mode) == [10, 20, 30]
            for (step, table), epoch in zip(history.items(NAME, mode), (1, 2, 3)):
                want = reference(epoch, mode)
                assert table.labels.tolist() == sorted(want)
                got = np.column_stack([table.count, table.mean, table.std, table.min, table.max])
                np.testing.assert_allclose(got, np.array([want[k] for k in sorted(want)]), rtol=1e-12)
                assert tables[epoch][mode] == tracker.history.tables(NAME, mode)[epoch - 1]
    rows = [json.loads(line) for line in jsonl_path.read_text(encoding="utf-8").splitlines()]
    assert {(str(r["label"]), r["label_name"]) for r in rows} == {("0", "zero"), ("1", "1"), ("2", "2"), ("3", "three"), ("4", "4")}


def test_tensorboard_scalars_and_final_figures(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from labeltrack_log.sinks.tensorboard import TensorBoardSink

    logdir = tmp_path / "runs"
    with Tracker(NAME, sinks=[TensorBoardSink(logdir)], label_names={1: "one"}, bounds=["std", "range"]) as tracker:
        run(tracker, epochs=2)
    for mode in MODES:
        acc = EventAccumulator(str(mode_dir(logdir, mode)), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for label, text in ((1, "one"), (4, "4")):
            means = acc.Scalars(tb_tag(NAME, text, "mean"))
            assert [p.step for p in means] == [10, 20]
            assert [p.value for p in means] == pytest.approx([reference(e, mode)[label][1] for e in (1, 2)], rel=1e-6)
        for bound in ("std", "range"):  # figures="end": once per bound and mode, at the last step
            images = acc.Images(tb_item_tag(figure_name(NAME, bound), "figure"))
            assert [im.step for im in images] == [20] and images[0].encoded_image_string[:4] == b"\x89PNG"


# ------------------------------------------------------------------------ failing sinks
@pytest.mark.core
@pytest.mark.parametrize("where", ["log_stats", "log_figure", "flush", "close"])
def test_failing_sink_is_logged_once_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str):
    caplog.set_level(logging.INFO, logger="labeltrack_log")
    bad = Exploding(where)
    csv_path, images = tmp_path / "s.csv", tmp_path / "images"
    tracker = Tracker(NAME, sinks=[bad, {"type": "csv", "path": str(csv_path)}, ImageDirSink(images)],
                      figures="epoch")
    run(tracker)
    tracker.close()

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert f"Exploding('{where}')" in errors[0].getMessage() and f"{where}()" in errors[0].getMessage()
    assert "skipped for the rest of training" in errors[0].getMessage()
    assert errors[0].exc_info and f"{where} is on fire" in str(errors[0].exc_info[1])
    assert bad.calls[where] == 1  # never called again after its failure
    order = ["log_stats", "log_figure", "flush"]  # what one epoch calls, in order; then close
    if where != "close":
        assert not any(bad.calls[m] for m in order[order.index(where) + 1:])  # skipped from then on
    assert bad.closed  # what it holds is still released
    # the healthy sinks received everything
    assert {(r["mode"], int(r["step"])) for r in csv_rows(csv_path)} == {(m, s) for m in MODES for s in (10, 20, 30)}
    assert pngs(images) == expected_pngs({m: [10, 20, 30] for m in MODES})
    assert tracker.sinks == []  # closed; reading the property opens nothing
    run(tracker, epochs=1, first_epoch=4)  # logging reopens from the configuration: the closed instance is not
    assert tracker.sinks and bad not in tracker.sinks
    tracker.close()


@pytest.mark.core
def test_rendering_failure_turns_figures_off_but_keeps_stats(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    tracker = Tracker(NAME, sinks=[ImageDirSink(tmp_path), CSVSink(tmp_path / "s.csv")], figures="epoch")
    tracker.update(np.array([0, 1]), np.array([1.0, 2.0]), mode="eval")
    tracker.end_epoch(1)
    tracker.bounds = ("sigma",)  # a figure the renderer cannot draw
    tracker.update(np.array([0, 1]), np.array([1.0, 2.0]), mode="eval")
    with caplog.at_level(logging.ERROR, logger="labeltrack_log"):
        tracker.end_epoch(2)
    assert tracker.figures is None and "figures are turned off" in caplog.text
    assert len(csv_rows(tmp_path / "s.csv")) == 4 and pngs(tmp_path) == expected_pngs({"eval": [1]})
    tracker.close()


# ---------------------------------------------------------------------- figure schedule
@pytest.mark.core
@pytest.mark.parametrize(("figures", "bounds", "steps"), [
    ("end", "std", [40]),
    ("epoch", "std", [10, 20, 30, 40]),
    (2, ["std", "range"], [20, 40]),
    (3, "range", [30, 40]),  # every 3rd epoch, and the end
    (None, "std", []),
    ("epoch", [], []),
])
def test_figure_schedule(tmp_path: Path, figures, bounds, steps):
    with Tracker(NAME, sinks=ImageDirSink(tmp_path), figures=figures, bounds=bounds) as tracker:
        run(tracker, epochs=4)
        if figures == "epoch" and bounds:
            assert len(pngs(tmp_path)) == 2 * 4  # sent as each epoch ends, not only at close
    drawn = [bounds] if isinstance(bounds, str) else bounds
    assert pngs(tmp_path) == expected_pngs({m: steps for m in MODES}, drawn)


@pytest.mark.core
def test_epoch_argument_drives_the_every_n_schedule(tmp_path: Path):
    tracker = Tracker(NAME, sinks=ImageDirSink(tmp_path), figures=2)
    for epoch, step in ((3, 5), (4, 9)):  # e.g. a framework's own epoch numbers after a restore
        tracker.update([0, 1], [0.5, 1.5], mode="train")
        tracker.end_epoch(step, epoch=epoch)
    assert pngs(tmp_path) == expected_pngs({"train": [9]})
    tracker.close()
    assert pngs(tmp_path) == expected_pngs({"train": [9]})  # the last step already has its figure


@pytest.mark.core
def test_no_sinks_renders_nothing_and_stays_light():
    code = ("import sys\nfrom labeltrack_log import Tracker\n"
            "t = Tracker('x', sinks=[], figures='epoch')\n"
            "t.update([0, 1, 1], [1.0, 2.0, 3.0], mode='eval'); t.end_epoch(1); t.close()\n"
            "print(sorted(m for m in ('matplotlib', 'torch', 'tensorflow', 'mlflow', 'tensorboard', 'fastestimator')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------- labels and modes
@pytest.mark.core
def test_restriction_to_labels_and_display_names(tmp_path: Path):
    path = tmp_path / "s.csv"
    with Tracker(NAME, sinks=CSVSink(path), labels=[4, 1, 9], label_names={1: "one", 4: "four"}, figures=None) as tracker:
        tables = run(tracker, epochs=1)
    assert tables[1]["eval"].labels.tolist() == [1, 4]
    assert tables[1]["eval"][4].mean == pytest.approx(reference(1, "eval")[4][1], rel=1e-12)
    assert tracker.history.latest(NAME, "train").labels.tolist() == [1, 4]
    assert sorted((r["mode"], r["label"], r["label_name"]) for r in csv_rows(path)) == [
        ("eval", "1", "one"), ("eval", "4", "four"), ("train", "1", "one"), ("train", "4", "four")]


@pytest.mark.core
def test_modes_end_separately_and_a_step_is_never_sent_twice(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "s.csv"
    tracker = Tracker(NAME, sinks=CSVSink(path), figures=None)
    tracker.update([0, 1], [1.0, 2.0], mode="train")
    tracker.update([0], [5.0], mode="eval")
    assert list(tracker.end_epoch(3, "train")) == ["train"]  # eval stays pending
    assert tracker.end_epoch(4, ["test"]) == {}  # a mode without updates: nothing
    tracker.update([0], [7.0], mode="eval")
    assert tracker.end_epoch(3)["eval"][0].mean == 6.0  # both eval batches, one epoch
    tracker.update([0], [9.0], mode="eval")
    with caplog.at_level(logging.INFO, logger="labeltrack_log"):
        again = tracker.end_epoch(3, "eval")  # step 3 of eval was sent already: said out loud
    assert again["eval"][0].mean == 9.0
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "eval step 3 is not above the last step logged (3)" in warning.getMessage()
    assert "the global step" in warning.getMessage()
    tracker.close()
    assert Counter((r["mode"], r["step"]) for r in csv_rows(path)) == {("train", "3"): 2, ("eval", "3"): 1}
    assert tracker.history.steps(NAME, "eval") == [3]


# --------------------------------------------------------------------------- pickling
@pytest.mark.core
def test_pickle_round_trip_reopens_sinks_and_does_not_resend(tmp_path: Path):
    path = tmp_path / "s.csv"
    first = Tracker(NAME, sinks={"type": "csv", "path": str(path)}, label_names={2: "two"}, figures=None)
    run(first, epochs=2)
    for y, v in epoch_batches(3, "train"):  # an epoch in progress is part of the state
        first.update(y, v, mode="train")
    blob = pickle.dumps(first)
    first.close()

    second = pickle.loads(blob)
    assert second._sinks is None  # not pickled ...
    second.end_epoch(30, "train")  # the epoch in progress ends after the restore
    assert isinstance(second.sinks[0], CSVSink) and second.sinks[0].path == path  # ... reopened from the config
    run(second, epochs=1, first_epoch=2)  # a resumed run repeats epoch 2: not sent again
    for y, v in epoch_batches(3, "eval"):
        second.update(y, v, mode="eval")
    second.end_epoch(30)
    second.close()
    rows = csv_rows(path)
    assert Counter((r["mode"], r["step"], r["label"]) for r in rows).most_common(1)[0][1] == 1
    assert {(r["mode"], int(r["step"])) for r in rows} == {(m, s) for m in MODES for s in (10, 20, 30)}
    assert {r["label_name"] for r in rows if r["label"] == "2"} == {"two"}  # names reapplied to the new sink
    train_30 = StatsHistory.from_file(path).latest(NAME, "train")
    assert dict(zip(train_30.labels.tolist(), train_30.count.tolist())) == {k: c for k, (c, *_) in reference(3, "train").items()}
    assert second.history.steps(NAME, "train") == [10, 20, 30]


@pytest.mark.core
def test_setstate_on_a_live_tracker_keeps_its_open_sinks(tmp_path: Path):
    saved = Tracker(NAME, sinks=CSVSink(tmp_path / "old.csv"), figures=None)
    run(saved, epochs=1)
    state = pickle.loads(pickle.dumps(saved.__getstate__()))
    live = Tracker(NAME, sinks=CSVSink(tmp_path / "new.csv"), figures=None)
    sinks = live.sinks
    live.__setstate__(state)  # what FastEstimator's System.load_state does
    assert live.sinks == sinks and not sinks[0].closed
    assert live.history.steps(NAME, "eval") == [10]
    run(live, epochs=1, first_epoch=2)
    live.close()
    assert {r["step"] for r in csv_rows(tmp_path / "new.csv")} == {"20"}
    saved.close()


# --------------------------------------------------------------------- close and with
@pytest.mark.core
def test_close_is_idempotent_and_a_later_use_reopens(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    csv_path = tmp_path / "s.csv"
    tracker = Tracker(NAME, sinks=[ImageDirSink(tmp_path), {"type": "csv", "path": str(csv_path)}])
    instance = tracker.sinks[0]
    run(tracker, epochs=1)
    tracker.close()
    tracker.close()
    assert instance.closed and tracker._sinks is None
    assert pngs(tmp_path) == expected_pngs({m: [10] for m in MODES})  # final figures once
    assert tracker.sinks == []  # reading the property reopens nothing
    with caplog.at_level(logging.WARNING, logger="labeltrack_log"):
        run(tracker, epochs=1, first_epoch=2)  # logging does
    assert [type(s) for s in tracker.sinks] == [CSVSink]  # the configured dict reopens, the instance cannot
    assert "cannot be reopened" in caplog.text
    tracker.close()
    assert {r["step"] for r in csv_rows(csv_path)} == {"10", "20"}


@pytest.mark.core
def test_context_manager_closes_on_error_too(tmp_path: Path):
    sink = CSVSink(tmp_path / "s.csv")
    with pytest.raises(KeyError):
        with Tracker(NAME, sinks=[sink, ImageDirSink(tmp_path)]) as tracker:
            run(tracker, epochs=1)
            raise KeyError("training crashed")
    assert sink.closed and pngs(tmp_path) == expected_pngs({m: [10] for m in MODES})
    assert tracker is not None and labeltrack_log.Tracker is Tracker


# ----------------------------------------------------------------------- bad arguments
@pytest.mark.core
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": ""}, "name: expected a non-empty string"),
    ({"figures": 0}, "figures: expected 'end', 'epoch', a positive int"),
    ({"figures": True}, "figures: expected 'end', 'epoch', a positive int"),
    ({"figures": "sometimes"}, "figures: expected 'end', 'epoch', a positive int"),
    ({"bounds": ["std", "sigma"]}, r"bounds: expected some of \['std', 'range'\], got \['sigma'\]"),
    ({"bounds": None}, r"bounds: expected some of .*, got \[None\]"),
    ({"labels": "cat"}, "labels: expected an iterable of label values"),
    ({"labels": [[0]]}, "labels: expected hashable label values"),
    ({"label_names": ["cat"]}, "label_names: expected a mapping"),
    ({"max_steps": 1}, r"max_steps: expected an int >= 2"),
    ({"sinks": "tensorbored"}, "unknown sink 'tensorbored'"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    kwargs = {"name": NAME, **kwargs}
    with pytest.raises(ConfigError, match=match):
        Tracker(kwargs.pop("name"), **kwargs)


@pytest.mark.core
def test_bad_calls_say_what_to_pass():
    tracker = Tracker(NAME, sinks=[])
    with pytest.raises(InputTypeError, match="mode: expected a non-empty string, got 3"):
        tracker.update([0], [1.0], mode=3)
    tracker.update([0], [1.0], mode="eval")
    with pytest.raises(InputTypeError, match="step: expected a non-negative int, got float 1.5"):
        tracker.end_epoch(1.5)
    with pytest.raises(InputTypeError, match="modes: expected a string, a list of strings or None, got 7"):
        tracker.end_epoch(1, 7)
    with pytest.raises(InputTypeError, match="epoch: expected an int or None"):
        tracker.end_epoch(1, epoch="2")
    assert tracker.end_epoch(np.int64(1))["eval"][0].mean == 1.0  # nothing was lost by the bad calls


def test_negative_step_is_refused_before_any_sink_sees_it(tmp_path):
    from labeltrack_log import InputTypeError
    from labeltrack_log.history import StatsHistory as _History

    tracker = Tracker("x", sinks={"type": "csv", "path": str(tmp_path / "s.csv")}, figures=None)
    tracker.update([0], [1.0])
    with pytest.raises(InputTypeError, match="step: expected a non-negative int, got int -1"):
        tracker.end_epoch(step=-1)
    tracker.end_epoch(step=5)  # the sink was not dropped: step 5 arrives
    tracker.close()
    assert _History.from_file(tmp_path / "s.csv").steps() == [5]
