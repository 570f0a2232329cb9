"""The Sink contract, run over every built-in sink against its real backend.

Each case builds a real sink under a fresh root directory (TensorBoard event files, an MLflow
sqlite store, CSV/JSONL files, PNG files) and reads back, from what the backend stored, the steps
written for a (name, mode). The same checks then hold for every sink: context manager, idempotent
close, pickling, the error for a bad step or table, a call after close, hostile label names that
must not write outside the sink's directory, and a table with no labels.
"""

from __future__ import annotations

import csv
import json
import glob
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from labeltrack_log import GroupedStats, InputTypeError, StatsTable
from labeltrack_log.naming import SUMMARY, component, figure_file, image_key, mlflow_key
from labeltrack_log.sinks import Sink
from labeltrack_log.sinks.files import CSVSink, ImageDirSink, JSONLSink

HOSTILE = ["../x", "a/b", "C:\\x", "ünï 标签", "$\\mu$"]
BAD_STEPS = [1.5, "3", True, None, np.float64(2.0), [1]]


# ------------------------------------------------------------------ read-back per backend
def csv_steps(sink: CSVSink, name: str, mode: str) -> set[int]:
    with open(sink.path, encoding="utf-8", newline="") as f:
        return {int(r["step"]) for r in csv.DictReader(f) if (r["name"], r["mode"]) == (name, mode)}


def jsonl_steps(sink: JSONLSink, name: str, mode: str) -> set[int]:
    rows = [json.loads(line) for line in sink.path.read_text(encoding="utf-8").splitlines()]
    return {r["step"] for r in rows if (r["name"], r["mode"]) == (name, mode)}


def image_steps(sink: ImageDirSink, name: str, mode: str) -> set[int]:
    stem = figure_file(name, mode, 0)[: -len("0.png")]
    return {int(p.name[len(stem):-4]) for p in sink.directory.glob(f"{glob.escape(stem)}*.png")}


def tensorboard_steps(sink, name: str, mode: str) -> set[int]:
    from tensorboard.compat.proto import event_pb2

    prefix, steps = component(name, "tag") + "/", set()
    for path in sink.run_dir(mode).glob("*tfevents*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):  # TFRecord framing: length, its CRC, the record, its CRC
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 16 + n
            if any(v.tag.startswith(prefix) for v in event.summary.value):
                steps.add(event.step)
    return steps


def mlflow_steps(sink, name: str, mode: str) -> set[int]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=sink.tracking_uri)
    steps = {m.step for m in client.get_metric_history(sink.run_id, mlflow_key(name, mode, SUMMARY, "num_labels"))}
    prefix = "images/" + image_key(name, mode, "figure").replace("/", "~") + "+step+"
    for f in client.list_artifacts(sink.run_id, "images"):
        if f.path.startswith(prefix):
            steps.add(int(f.path[len(prefix):].split("+")[0]))
    return steps


# ---------------------------------------------------------------------------- the cases
@dataclass
class Case:
    build: Callable[..., Sink]  # (root, **sink options) -> sink
    steps: Callable[[Sink, str, str], set]  # steps stored for (name, mode), read from the backend


def _tensorboard(root: Path, **kw) -> Sink:
    pytest.importorskip("tensorboard")
    from labeltrack_log.sinks.tensorboard import TensorBoardSink

    return TensorBoardSink(root / "tb", **kw)


def _mlflow(root: Path, **kw) -> Sink:
    pytest.importorskip("mlflow")
    from labeltrack_log.sinks.mlflow import MLflowSink

    # artifacts go to ./mlruns of the cwd, which the `root` fixture makes the root
    return MLflowSink(f"sqlite:///{root.as_posix()}/mlflow.db", experiment="contract", spool_dir=root / "spool", **kw)


CASES = {
    "csv": Case(lambda root, **kw: CSVSink(root / "stats.csv", **kw), csv_steps),
    "jsonl": Case(lambda root, **kw: JSONLSink(root / "stats.jsonl", **kw), jsonl_steps),
    "images": Case(lambda root, **kw: ImageDirSink(root / "images", **kw), image_steps),
    "tensorboard": Case(_tensorboard, tensorboard_steps),
    "mlflow": Case(_mlflow, mlflow_steps),  # process delivery (the default)
    "mlflow-inline": Case(lambda root, **kw: _mlflow(root, delivery="inline", **kw), mlflow_steps),
}


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    return CASES[request.param]


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The sink's directory, three levels below tmp_path, so that ``../`` escapes stay visible."""
    path = tmp_path / "a" / "b" / "root"
    path.mkdir(parents=True)
    monkeypatch.chdir(path)
    return path


def table(labels=(0, 1, 2)) -> StatsTable:
    g = GroupedStats()
    labels = list(labels)
    g.update(labels * 2, np.arange(2 * len(labels), dtype=float))
    return g.compute()


def figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1), dpi=20)
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def log(sink: Sink, step, name: str = "ce", mode: str = "train", t: StatsTable | None = None) -> None:
    sink.log_stats(table() if t is None else t, step=step, name=name, mode=mode)
    sink.log_figure(figure(), step=step, name=name, mode=mode)


# ---------------------------------------------------------------------------- the contract
def test_context_manager_and_close_is_idempotent(case: Case, root: Path):
    with case.build(root) as sink:
        assert isinstance(sink, Sink) and not sink.closed
        log(sink, 1)
    assert sink.closed
    sink.close()  # a second close does nothing
    assert sink.closed and case.steps(sink, "ce", "train") == {1}
    failing = case.build(root)
    with pytest.raises(RuntimeError, match="boom"):  # the block's exception propagates ...
        with failing:
            raise RuntimeError("boom")
    assert failing.closed  # ... and the sink is closed all the same


def test_a_call_after_close_is_a_value_error_and_writes_nothing(case: Case, root: Path):
    sink = case.build(root)
    log(sink, 0)
    sink.close()
    with pytest.raises(ValueError, match="expected an open sink, got a closed one"):
        sink.log_stats(table(), step=1, name="ce", mode="train")
    with pytest.raises(ValueError, match="expected an open sink, got a closed one"):
        sink.log_figure(figure(), step=1, name="ce", mode="train")
    sink.flush()  # harmless after close
    assert case.steps(sink, "ce", "train") == {0}


def test_bad_step_or_table_is_the_same_error_everywhere(case: Case, root: Path):
    with case.build(root) as sink:
        for bad in BAD_STEPS:
            with pytest.raises(InputTypeError, match=rf"step: expected a non-negative int, got {type(bad).__name__} "):
                sink.log_stats(table(), step=bad, name="ce", mode="train")
            with pytest.raises(InputTypeError, match=rf"step: expected a non-negative int, got {type(bad).__name__} "):
                sink.log_figure(figure(), step=bad, name="ce", mode="train")
        with pytest.raises(InputTypeError, match="table: expected a StatsTable, got dict"):
            sink.log_stats({}, step=1, name="ce", mode="train")
        with pytest.raises(InputTypeError, match="step: expected a non-negative int, got int -1"):
            sink.log_stats(table(), step=-1, name="ce", mode="train")
        with pytest.raises(InputTypeError, match="step: expected a non-negative int, got int -1"):
            sink.log_figure(figure(), step=-1, name="ce", mode="train")
        log(sink, np.int64(2))  # numpy integers are ints
    assert case.steps(sink, "ce", "train") == {2}


def test_pickled_copy_keeps_working(case: Case, root: Path):
    names = {0: "cat", 1: "cat"}
    sink = case.build(root, label_budget=7, label_names=names)
    log(sink, 0)
    copy = pickle.loads(pickle.dumps(sink))
    assert type(copy) is type(sink) and copy.label_budget == 7 and copy.label_names == names and not copy.closed
    assert copy.label_texts([1, 0], "ce") == sink.label_texts([1, 0], "ce")  # series keep their names
    log(copy, 1, t=table([1, 2]))
    copy.close()
    log(sink, 2)
    sink.close()
    assert case.steps(sink, "ce", "train") == {0, 1, 2}


def test_hostile_names_write_nothing_outside_the_sink_directory(case: Case, root: Path, tmp_path: Path):
    name, mode = "../../n/ce", "C:\\m/../x"
    sink = case.build(root, label_budget=2, label_names=dict(enumerate(HOSTILE)))  # over budget: full tables too
    log(sink, 0, name, mode, t=table(HOSTILE))  # hostile labels ...
    log(sink, 1, name, mode, t=table(range(len(HOSTILE))))  # ... and hostile display names
    sink.close()
    steps = case.steps(sink, name, mode)
    assert 1 in steps and steps <= {0, 1}
    for where, dirs, files in os.walk(tmp_path):
        for entry in dirs + files:
            path = Path(where, entry)
            assert path in root.parents or path == root or root in path.parents, f"{path} is outside {root}"


def test_a_table_without_labels_is_accepted(case: Case, root: Path):
    with case.build(root) as sink:
        sink.log_stats(StatsTable.empty(), step=0, name="ce", mode="train")
        log(sink, 1)
    steps = case.steps(sink, "ce", "train")
    assert 1 in steps and steps <= {0, 1}


# ------------------------------------------------------------------ label texts (the base)
def test_label_texts_are_distinct_and_keep_their_first_text():
    sink = Sink(label_names={0: "cat", 1: "cat", 2: "dog", 3: "cat (1)", 4: "dog"})
    assert sink.label_texts([2], "ce") == ["dog"]
    assert sink.label_texts([0, 1, 2], "ce") == ["cat (0)", "cat (1)", "dog"]  # first seen together: all suffixed
    assert sink.label_texts([4, 3], "ce") == ["dog (4)", "cat (1) (3)"]  # later: the newcomer is suffixed
    assert sink.label_texts([0, 1, 2, 3, 4], "ce") == ["cat (0)", "cat (1)", "dog", "cat (1) (3)", "dog (4)"]
    assert sink.label_texts([1, 2], "other") == ["cat", "dog"]  # scopes are independent
    sink.set_label_names({0: "a", 1: "b"})
    assert sink.label_texts([0, 1], "ce") == ["a", "b"]

    same_text = Sink().label_texts([1, "1", "1 (1)"])  # int 1 and str "1" show the same text
    assert same_text == ["1 (1)", "1 (1) #2", "1 (1) (1 (1))"]  # distinct all the same
