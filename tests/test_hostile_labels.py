"""Hostile label names (issue 11, items 4, 7, 8): non-UTF-8 file names, long labels whose
shortened names collide, a label called ``_summary``. Real backends: TensorBoard event files read
back with tensorboard's own EventAccumulator, a real MLflow server, the file sinks read back."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from tables import mode_dir  # noqa: E402  (tests/ is on sys.path, see conftest.py)

from labeltrack_log import GroupedStats, StatsHistory, Tracker
from labeltrack_log.naming import SUMMARY, component
from labeltrack_log.sinks import Sink
from labeltrack_log.sinks.files import CSVSink, JSONLSink

# 'caf\udce9' is what os.listdir gives for the file name b"caf\xe9" (Latin-1) on a UTF-8 system;
# the literal text 'caf\\udce9' is an ordinary label that looks like its escaped form.
HOSTILE = ["caf\udce9", "cafe", "caf\\udce9", "\udcff\udcfe", "ok"]


def table(labels, values=None):
    g = GroupedStats()
    values = np.arange(len(labels), dtype=float) + 1.0 if values is None else values
    g.update(list(labels) * 2, np.concatenate([values, values + 1.0]))
    return g.compute()


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ----------------------------------------------------------------------------- 11.4
def test_surrogate_labels_reach_every_file_sink_through_the_tracker(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    csv_path, jsonl_path = tmp_path / "t.csv", tmp_path / "t.jsonl"
    sinks = [{"type": "tensorboard", "logdir": str(tmp_path / "tb")},
             {"type": "csv", "path": str(csv_path)}, {"type": "jsonl", "path": str(jsonl_path)}]
    with Tracker("loss", sinks=sinks, figures="end") as tracker:
        for step in (1, 2):
            tracker.update(HOSTILE * 3, np.arange(3 * len(HOSTILE), dtype=float) * step, mode="train")
            tracker.end_epoch(step)
        assert len(tracker.sinks) == 3, "a sink was dropped"
    assert "failed" not in caplog.text, caplog.text
    g = GroupedStats()
    g.update(HOSTILE * 3, np.arange(3 * len(HOSTILE), dtype=float) * 2)
    want = {lab: g.compute()[lab].mean for lab in HOSTILE}

    # JSONL: the JSON escape \udce9 reads back as the very same label
    hist = StatsHistory.from_file(jsonl_path)
    latest = hist.latest()
    assert sorted(latest.labels.tolist()) == sorted(HOSTILE)
    assert {lab: latest[lab].mean for lab in HOSTILE} == pytest.approx(want)
    assert hist.steps() == [1, 2]

    # CSV: written visibly escaped, and still five distinct labels with the right values
    text = csv_path.read_text(encoding="utf-8")  # valid UTF-8
    rows = [r for r in csv.DictReader(text.splitlines()) if r["step"] == "2"]
    assert len(rows) == len(HOSTILE) and len({r["label"] for r in rows}) == len(HOSTILE)
    assert "caf\\udce9" in {r["label"] for r in rows}
    assert sorted(float(r["mean"]) for r in rows) == pytest.approx(sorted(want.values()))

    # TensorBoard: five distinct per-label series with both steps
    scalars = tb_scalars(mode_dir(tmp_path / "tb", "train"))
    means = {tag: pts for tag, pts in scalars.items() if tag.endswith("/mean") and f"/{SUMMARY}/" not in tag}
    assert len(means) == len(HOSTILE)
    assert all([s for s, _ in pts] == [1, 2] for pts in means.values())
    assert sorted(pts[-1][1] for pts in means.values()) == pytest.approx(sorted(want.values()), rel=1e-6)


def test_surrogate_names_and_modes_do_not_fail_a_sink(tmp_path):
    pytest.importorskip("tensorboard")
    from labeltrack_log.sinks.tensorboard import TensorBoardSink

    t = table(["a", "b"])
    for sink in (TensorBoardSink(tmp_path / "tb"), CSVSink(tmp_path / "x.csv"), JSONLSink(tmp_path / "x.jsonl")):
        with sink:
            sink.log_stats(t, step=1, name="loss\udce9", mode="tr\udce9in")
    assert StatsHistory.from_file(tmp_path / "x.jsonl").names() == ["loss\udce9"]
    assert len(StatsHistory.from_file(tmp_path / "x.csv").latest()) == 2


# ----------------------------------------------------------------------------- 11.7
def colliding_pair(prefix: str) -> tuple[str, str]:
    """Two long labels that share their first 60 characters and their 24-bit hash."""
    seen: dict[str, str] = {}
    i = 0
    while True:
        label = f"{prefix}{i:08d}.png"
        digest = hashlib.sha1(label.encode()).hexdigest()[:6]
        if digest in seen:
            return seen[digest], label
        seen[digest] = label
        i += 1


PREFIX = "/data/datasets/imagenet/train/n01440764/very/long/directory/structure/img_"
PATHS = [f"{PREFIX}{i:08d}.png" for i in range(20_000)]


def test_shortened_long_labels_collide_without_the_check():
    """The premise: the shortened names alone do collide for these labels."""
    assert len({component(p, "tag") for p in PATHS}) < len(PATHS)
    a, b = colliding_pair(PREFIX)
    assert component(a) == component(b)


def test_twenty_thousand_file_path_labels_get_distinct_tensorboard_tags(tmp_path):
    pytest.importorskip("tensorboard")
    from labeltrack_log.sinks.tensorboard import TensorBoardSink

    values = np.arange(len(PATHS), dtype=float)
    g = GroupedStats()
    g.update(np.array(PATHS, dtype=object), values)
    t = g.compute()
    with TensorBoardSink(tmp_path, label_budget=len(PATHS)) as sink:
        sink.log_stats(t, step=1, name="loss", mode="train")
        sink.log_stats(t, step=2, name="loss", mode="train")  # stable over steps
    scalars = tb_scalars(mode_dir(tmp_path, "train"))
    means = {tag: pts for tag, pts in scalars.items() if tag.endswith("/mean") and f"/{SUMMARY}/" not in tag}
    assert len(means) == len(PATHS)  # no tag shared by two labels
    assert sorted(pts[0][1] for pts in means.values()) == sorted(values.tolist())
    assert all(len(pts) == 2 for pts in means.values())


def test_label_parts_are_distinct_stable_and_never_reserved():
    sink = Sink(label_budget=10)
    for kind in ("tag", "mlflow"):
        parts = sink.label_parts(PATHS, "loss", kind)
        assert len(set(parts)) == len(PATHS)
        assert sink.label_parts(PATHS[::-1], "loss", kind) == parts[::-1]  # a label keeps its part
    # a later label whose plain part was handed out already (to a clash) is told apart too
    a, b = colliding_pair(PREFIX)
    s = Sink()
    pa, pb = s.label_parts([a, b], "x")
    assert pa != pb and pb == f"{pa}-2"
    assert s.label_parts([pb], "x") != [pb]  # the literal text of that suffixed part
    assert SUMMARY not in Sink().label_parts([SUMMARY, "_summary", str(SUMMARY)], "x")


@pytest.mark.timeout(180)
def test_mlflow_keys_of_colliding_long_labels_and_a_summary_label(mlflow_server):
    pytest.importorskip("mlflow")
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_sink_mlflow import history, metric_keys

    from labeltrack_log.naming import mlflow_key
    from labeltrack_log.sinks.mlflow import MLflowSink

    a, b = colliding_pair(PREFIX)
    labels = [a, b, "_summary"]
    g = GroupedStats()
    g.update(labels, [0.1, 9.0, 5.0])
    g.update(labels, [0.1, 9.0, np.nan])  # the "_summary" label has a nonfinite value
    with MLflowSink(mlflow_server.url, experiment="collisions", delivery="inline") as sink:
        sink.log_stats(g.compute(), step=1, name="ce", mode="eval")
        parts = sink.label_parts(PATHS, "ce", "mlflow")
        assert len(set(parts)) == len(PATHS)  # the same check the sink's keys go through
    run_id = sink.run_id  # after close: inside, it waits only `timeout` for the run
    keys = metric_keys(mlflow_server.url, run_id)
    means = {k: history(mlflow_server.url, run_id, k) for k in keys if k.endswith("/mean")}
    assert sorted(v[0][1] for v in means.values()) == pytest.approx([0.1, 5.0, 9.0])  # three keys, one value each
    agg = history(mlflow_server.url, run_id, mlflow_key("ce", "eval", SUMMARY, "nonfinite"))
    assert agg == [(1, 1.0)]  # the aggregate alone, not also the label's nonfinite count
    own = history(mlflow_server.url, run_id, mlflow_key("ce", "eval", "_summary", "nonfinite"))
    assert own == [(1, 1.0)] and mlflow_key("ce", "eval", "_summary", "nonfinite") != mlflow_key("ce", "eval", SUMMARY, "nonfinite")


# ----------------------------------------------------------------------------- 11.8
def test_a_label_called_summary_never_shares_a_tensorboard_tag_with_the_aggregates(tmp_path):
    pytest.importorskip("tensorboard")
    from labeltrack_log.sinks.tensorboard import TensorBoardSink

    g = GroupedStats()
    g.update(["_summary", "_summary", "x"], [1.0, np.nan, 3.0])
    with TensorBoardSink(tmp_path) as sink:
        sink.log_stats(g.compute(), step=1, name="loss", mode="train")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (path,) = mode_dir(tmp_path, "train").glob("*tfevents*")
    (event,) = [e for e in EventFileLoader(str(path)).Load() if e.step == 1 and e.summary.value]
    tags = [v.tag for v in event.summary.value]
    assert len(tags) == len(set(tags)), "two values under one tag in one event"
    assert {t for t in tags if t.startswith("loss/_summary/")} == {f"loss/_summary/{a}" for a in
                                                                    ("macro_mean", "worst_mean", "best_mean", "spread", "num_labels", "nonfinite")}
    own = [t for t in tags if t.startswith("loss/_summary-")]
    assert own and f"{own[0].rsplit('/', 1)[0]}/nonfinite" in tags
