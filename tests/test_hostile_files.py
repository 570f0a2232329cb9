"""Torn and hostile CSV/JSONL files (issue 11, items 10 and 13): the readers skip a torn row with
a warning naming its line and read the rest; ``labeltrack-log render`` reads back everything our
sinks write and answers a bad file with one line naming file, line and column, exit code 2."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from labeltrack_log import GroupedStats, InputTypeError, StatsHistory
from labeltrack_log.history import FILE_COLUMNS
from labeltrack_log.sinks.files import CSVSink, JSONLSink

ROOT = Path(__file__).resolve().parents[1]


def write(cls, path: Path, steps=(1, 2, 3), labels=(0, 1, 2)) -> None:
    with cls(path) as sink:
        for step in steps:
            g = GroupedStats()
            g.update(list(labels) * 2, np.linspace(55.0106, 60.123456789, 2 * len(labels)) * step)
            sink.log_stats(g.compute(), step=step, name="ce", mode="eval")


def render(path: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "labeltrack_log.cli", "render", str(path), "-o", str(out)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=out.parent)


def cut(path: Path, drop: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-drop])


# ----------------------------------------------------------------------------- 11.10
@pytest.mark.parametrize("drop", [3, 9, 30])  # inside the last field, inside 'max', several fields
def test_a_torn_last_csv_row_is_skipped_with_a_warning_and_the_rest_is_read(tmp_path, caplog, drop):
    path = tmp_path / "t.csv"
    write(CSVSink, path)
    whole = StatsHistory.from_file(path)
    cut(path, drop)
    caplog.set_level(logging.WARNING)
    h = StatsHistory.from_file(path)
    lines = path.read_text().splitlines()
    assert f"{path}:{len(lines)}:" in caplog.text and "torn" in caplog.text
    assert h.steps() == [1, 2, 3]
    assert h.tables()[:2] == whole.tables()[:2]
    last = h.latest()
    assert last.labels.tolist() == [0, 1]  # the torn row (label 2) is left out, not read half
    assert last.select([0, 1]) == whole.latest().select([0, 1])


def test_a_torn_csv_row_in_the_middle_is_skipped_and_the_rows_around_it_are_read(tmp_path, caplog):
    path = tmp_path / "t.csv"
    write(CSVSink, path, steps=(1,))
    cut(path, 12)  # the disk filled up mid-row ...
    write(CSVSink, path, steps=(2,))  # ... then had room again: the next row starts on the torn line
    caplog.set_level(logging.WARNING)
    h = StatsHistory.from_file(path)
    assert f"{path}:4:" in caplog.text and "fields" in caplog.text
    assert h.steps() == [1, 2]
    assert h.tables()[0].labels.tolist() == [0, 1]  # label 2 of step 1 was torn
    assert h.tables()[1].labels.tolist() == [1, 2]  # label 0 of step 2 shared its line


def test_a_torn_last_jsonl_line_is_skipped_and_render_draws_the_rest(tmp_path, caplog):
    path = tmp_path / "t.jsonl"
    write(JSONLSink, path)
    cut(path, 20)
    caplog.set_level(logging.WARNING)
    h = StatsHistory.from_file(path)
    assert f"{path}:9:" in caplog.text and "torn" in caplog.text
    assert h.steps() == [1, 2, 3] and h.latest().labels.tolist() == [0, 1]
    out = tmp_path / "figs"
    proc = render(path, out)
    assert proc.returncode == 0, proc.stderr
    assert "t.jsonl:9" in proc.stderr and list(out.glob("*.png"))


# ----------------------------------------------------------------------------- 11.13
def test_render_reads_a_200_kb_label_our_csv_sink_wrote(tmp_path):
    path = tmp_path / "t.csv"
    long_label = "x" * 200_000
    write(CSVSink, path, labels=(long_label, "b"))
    assert StatsHistory.from_file(path).latest().labels.tolist() == ["b", long_label]
    proc = render(path, tmp_path / "figs")
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "figs").glob("*.png"))


def test_sinks_refuse_a_step_no_reader_could_read_back(tmp_path):
    with CSVSink(tmp_path / "t.csv") as sink:
        with pytest.raises(InputTypeError, match=r"below 2\*\*63"):
            sink.log_stats(GroupedStats().compute(), step=10**30, name="ce", mode="eval")


def header() -> str:
    return ",".join(FILE_COLUMNS) + "\n"


@pytest.mark.parametrize(
    "suffix, text, where",
    [
        (".csv", header() + "1.0,ce,eval,1e30,0,0,2,1.0,0.5,0.5,1.5,0\n", (2, "step")),
        (".csv", header() + "1.0,ce,eval,1,0,0,2,abc,0.5,0.5,1.5,0\n", (2, "mean")),
        (".csv", header() + "1.0,ce,eval,1,0,0,2,1.0,0.5,0.5,1.5,0\n1.0,ce,eval,2,0,0,x,1,0.5,0.5,1.5,0\n", (3, "count")),
        (".jsonl", '{"name": "ce", "mode": "eval", "step": 1e30, "label": 0, "count": 1, "mean": 1, "std": 0, "min": 1, '
                   '"max": 1}\n', (1, "step")),
        (".jsonl", '{"name": "ce", "mode": "eval", "step": 1, "label": 0, "count": 1, "mean": 1, "std": 0, "min": 1, '
                   '"max": 1}\n{"name": "ce", oops}\n{}\n', (2, "column 16")),
    ],
    ids=["csv-step-1e30", "csv-not-a-number", "csv-bad-count", "jsonl-step-1e30", "jsonl-invalid-json"],
)
def test_render_on_a_bad_file_is_one_line_naming_file_line_and_column(tmp_path, suffix, text, where):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text, encoding="utf-8")
    proc = render(path, tmp_path / "figs")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    line, column = where
    assert f"{path}:{line}" in err and column in err, err


def test_render_on_a_binary_file_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(header().encode() + b"\xff\xfe\x00garbage\n")
    proc = render(path, tmp_path / "figs")
    assert proc.returncode == 2 and "\n" not in proc.stderr.strip() and str(path) in proc.stderr, proc.stderr


def test_render_on_a_binary_file_with_an_unknown_suffix_names_the_file(tmp_path):
    path = tmp_path / "stats.log"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff" * 10)
    proc = render(path, tmp_path / "figs")
    assert proc.returncode == 2 and "\n" not in proc.stderr.strip() and str(path) in proc.stderr, proc.stderr
