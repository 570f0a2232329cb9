"""What the tracker hands its sinks, driven through FE's hooks: per-epoch tables at FE's global
step with display names, the figure schedule, the LABELTRACK_SINKS default, and sink reuse."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

fe = pytest.importorskip("fastestimator")
import torch  # noqa: E402
from fastestimator.util.data import Data  # noqa: E402
from test_fe_parity import drive, torch_float_epochs  # noqa: E402

from labeltrack_log.fastestimator import LabelTracker  # noqa: E402
from labeltrack_log.naming import figure_file, figure_name  # noqa: E402
from labeltrack_log.sinks.files import CSVSink  # noqa: E402

EPOCHS = torch_float_epochs() + torch_float_epochs()[:1]  # 3 epochs of 3 batches: steps 3, 6, 9


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_tables_reach_sinks_every_epoch_with_display_names(tmp_path: Path):
    path = tmp_path / "stats.csv"
    tracker = LabelTracker("y", "acc", outputs="out", mode=["train", "eval"], label_mapping={"good": 0, "bad": 1},
                           sinks={"type": "csv", "path": str(path)}, figures=None)
    seen_after_epoch = []
    original = tracker.on_epoch_end

    def on_epoch_end(data):  # read the file as a user would while training runs
        original(data)
        seen_after_epoch.append(len(rows(path)))

    tracker.on_epoch_end = on_epoch_end
    response, _ = drive(tracker, EPOCHS)
    assert seen_after_epoch == [2, 4, 6, 8, 10, 12]  # 2 mapped labels per epoch and mode, visible at once
    table = rows(path)
    assert {(r["label"], r["label_name"]) for r in table} == {("0", "good"), ("1", "bad")}  # label 2 not mapped
    assert sorted({int(r["step"]) for r in table}) == [3, 6, 9]
    summaries = {s.name: s.history for s in response["out"]}
    for r in table:
        want = summaries[r["label_name"]][r["mode"]]["acc ($\\mu \\pm \\sigma$)"][int(r["step"])]
        assert float(r["mean"]) == pytest.approx(want.y, rel=1e-12)
        assert float(r["mean"]) - float(r["std"]) == pytest.approx(want.y_min, rel=1e-12)


@pytest.mark.parametrize(("figures", "bounds", "expected_steps"), [
    ("end", "std", [9]),
    ("epoch", "std", [3, 6, 9]),
    (2, "std", [6, 9]),  # every 2nd epoch, and the end
    (None, "std", []),
    ("end", ["std", "range", None], [9]),
    ("epoch", None, []),  # the mean-only bound has no band figure
])
def test_figure_schedule(tmp_path: Path, figures, bounds, expected_steps):
    tracker = LabelTracker("y", "acc", outputs="out", mode=["train", "eval"], bounds=bounds, figures=figures,
                           sinks={"type": "images", "directory": str(tmp_path)})
    drive(tracker, EPOCHS)
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    drawn = [b for b in ("std", "range") if b in ([bounds] if not isinstance(bounds, list) else bounds)]
    assert files == sorted(figure_file(figure_name("out", bound), mode, step)
                           for bound in drawn for mode in ("train", "eval") for step in expected_steps)


def test_sinks_default_to_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LABELTRACK_SINKS", json.dumps([{"type": "jsonl", "path": str(tmp_path / "env.jsonl")}]))
    drive(LabelTracker("y", "acc", outputs="out", mode=["train", "eval"], figures=None), EPOCHS)
    lines = (tmp_path / "env.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 3 * 2 and json.loads(lines[0])["name"] == "out"  # labels x epochs x modes
    monkeypatch.delenv("LABELTRACK_SINKS")
    assert LabelTracker("y", "acc").sinks == []


def test_sink_instances_are_closed_at_the_end_and_not_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    sink = CSVSink(tmp_path / "stats.csv")
    tracker = LabelTracker("y", "acc", outputs="out", sinks=[sink], figures=None)
    _, system = drive(tracker, EPOCHS, modes=("eval",))
    assert sink.closed
    caplog.set_level(logging.WARNING, logger="labeltrack_log")
    tracker.on_begin(Data())  # e.g. estimator.test() after fit(): the closed instance cannot be reopened
    assert tracker.sinks == []  # nothing is reopened before something is logged
    system.mode = "test"
    tracker.on_batch_end(Data({"y": torch.tensor([0, 1]), "acc": torch.tensor([0.5, 0.25])}))
    tracker.on_epoch_end(Data())  # still fine: FE output only
    assert tracker.sinks == []
    assert any("cannot be reopened" in r.getMessage() for r in caplog.records)
    assert tracker.label_summaries[0].history["test"]["acc ($\\mu \\pm \\sigma$)"]


def test_failing_sink_in_hooks_logged_once(caplog: pytest.LogCaptureFixture, tmp_path: Path):
    class Broken(CSVSink):
        def log_stats(self, table, *, step, name, mode):
            raise ValueError("expected a table, got a chair")

    caplog.set_level(logging.ERROR, logger="labeltrack_log")
    good = tmp_path / "good.csv"
    tracker = LabelTracker("y", "acc", outputs="out", mode=["train", "eval"], figures="epoch",
                           sinks=[Broken(tmp_path / "broken.csv"), {"type": "csv", "path": str(good)}])
    response, _ = drive(tracker, EPOCHS)
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None
    assert "Broken" in caplog.records[0].getMessage() and "expected a table, got a chair" in caplog.text
    assert len(rows(good)) == 3 * 2 * 3  # 3 labels x 2 modes x 3 epochs
    assert len(response["out"]) == 3
