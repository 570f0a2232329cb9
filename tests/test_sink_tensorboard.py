"""TensorBoardSink against a real `tensorboard` server (read back through its HTTP data API) and
the raw event files (every record's CRC checked with tensorboard's own reference implementation).

One server is started for the module on a root logdir; every test writes into its own
sub-directory (runs are named ``<test dir>/<mode>``) and polls the server with a deadline.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("tensorboard")

import servers  # noqa: E402  (tests/ is on sys.path via conftest)
from tensorboard.compat.proto import event_pb2  # noqa: E402
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference_crc  # noqa: E402
from tensorboard.summary.writer.record_writer import RecordWriter  # noqa: E402

from labeltrack_log import ConfigError, GroupedStats, StatsTable  # noqa: E402
from labeltrack_log.figures import figure_to_png  # noqa: E402
from labeltrack_log.sinks import make_sinks  # noqa: E402
from labeltrack_log.sinks.tensorboard import LAYOUT_TAG, TensorBoardSink, _FastRecordWriter, masked_crc32c  # noqa: E402
from tables import mode_dir, shown_order  # noqa: E402
from polling import wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STATS = ("mean", "std", "min", "max", "count", "mean-std", "mean+std")
SUMMARY = ("macro_mean", "worst_mean", "best_mean", "spread", "num_labels", "nonfinite")


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tb(tmp_path_factory: pytest.TempPathFactory):
    """One real tensorboard server for the module, on an (initially empty) root logdir."""
    root = tmp_path_factory.mktemp("tb-root")
    proc = servers.tensorboard_server(root, root.parent / "tensorboard-module.log")
    proc.root = root
    yield proc
    proc.stop()


def get(tb, path: str, raw: bool = False, **params):
    url = f"{tb.url}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read()
    return body if raw else json.loads(body)


def scalars(tb, run: str, tag: str, steps: list[int]) -> dict[int, object]:
    """{step: value} of a scalar series, once the server has every step in ``steps``."""
    got = wait_for(lambda: get(tb, "/data/plugin/scalars/scalars", run=run, tag=tag),
                   lambda r: sorted(p[1] for p in r) == sorted(steps), f"{run}:{tag} steps {steps}")
    return {p[1]: p[2] for p in got}


def f32(x: float) -> float:
    return float(np.float32(x))


def same(got, expected: float) -> bool:
    if np.isnan(expected):
        return got == "NaN"
    return got == f32(expected)


def read_records(path: Path) -> list[event_pb2.Event]:
    """Parse an event file, checking both CRCs of every record with tensorboard's pure-Python CRC."""
    data = path.read_bytes()
    events, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == reference_crc(header)
        body = data[pos + 12 : pos + 12 + n]
        assert struct.unpack("<I", data[pos + 12 + n : pos + 16 + n])[0] == reference_crc(body), f"bad CRC in {path}"
        events.append(event_pb2.Event.FromString(body))
        pos += 16 + n
    assert pos == len(data)
    return events


def event_files(run_dir: Path) -> list[Path]:
    files = sorted(run_dir.glob("*tfevents*"))
    assert files, f"no event file in {run_dir}"
    return files


def table_of(seed: int, labels, n: int = 400, nan_label=None, all_nan_label=None) -> StatsTable:
    rng = np.random.default_rng(seed)
    labels = list(labels)
    lab = [labels[i] for i in rng.integers(0, len(labels), n)] + labels  # every label at least once
    val = rng.normal(1.0, 0.5, len(lab))
    lab_arr = np.array(lab)
    if nan_label is not None:
        val[np.flatnonzero(lab_arr == nan_label)[:3]] = np.nan
    if all_nan_label is not None:
        val[lab_arr == all_nan_label] = np.inf
    g = GroupedStats()
    g.update(lab_arr, val)
    return g.compute()


def label_values(t: StatsTable, label) -> dict[str, float]:
    r = t[label]
    return {"mean": r.mean, "std": r.std, "min": r.min, "max": r.max, "count": r.count,
            "mean-std": r.mean - r.std, "mean+std": r.mean + r.std}


def summary_values(t: StatsTable) -> dict[str, float]:
    m = t.mean[t.count > 0]
    return {"macro_mean": m.mean(), "worst_mean": m.max(), "best_mean": m.min(), "spread": m.std(),
            "num_labels": len(t), "nonfinite": int(t.nonfinite.sum())}


def run_script(code: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, **kw)


def small_figure(w: int = 200, h: int = 150):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w / 50, h / 50), dpi=50)
    fig.add_subplot().plot([0, 1, 2], [1, 0, 2])
    return fig


# ------------------------------------------------------------------------------ scalars
def test_scalars_per_label_and_statistic_read_back(tb):
    logdir = tb.root / "scalars"
    names = {0: "cat", 1: "dog"}
    texts = {0: "cat", 1: "dog", 2: "2", 3: "3", 4: "4"}
    tables = {1: table_of(1, range(5)), 2: table_of(2, range(5), nan_label=3), 3: table_of(3, range(5), all_nan_label=4)}
    eval_table = table_of(9, range(5))
    with TensorBoardSink(logdir, label_names=names, run_name="r") as sink:
        for step, t in tables.items():
            sink.log_stats(t, step=step, name="loss", mode="train")
        sink.log_stats(eval_table, step=2, name="loss", mode="eval")

    expected_tags = {f"loss/{texts[lab]}/{s}" for lab in range(5) for s in STATS}
    expected_tags |= {f"loss/_summary/{s}" for s in SUMMARY} | {"loss/3/nonfinite", "loss/4/nonfinite"}
    tags = wait_for(lambda: get(tb, "/data/plugin/scalars/tags")["scalars/r/train"],
                    lambda r: set(r) == expected_tags, "the train run's scalar tags")
    assert set(tags) == expected_tags  # no nonfinite series for labels that never had one

    for lab in (0, 1, 3, 4):
        for stat in STATS:
            got = scalars(tb, "scalars/r/train", f"loss/{texts[lab]}/{stat}", [1, 2, 3])
            for step, t in tables.items():
                assert same(got[step], label_values(t, lab)[stat]), (lab, stat, step, got[step])
    assert scalars(tb, "scalars/r/train", "loss/3/nonfinite", [2]) == {2: 3.0}
    assert scalars(tb, "scalars/r/train", "loss/4/nonfinite", [3])[3] == f32(tables[3][4].nonfinite)
    assert scalars(tb, "scalars/r/train", "loss/4/mean", [1, 2, 3])[3] == "NaN"  # only inf seen: no mean
    for stat in SUMMARY:
        got = scalars(tb, "scalars/r/train", f"loss/_summary/{stat}", [1, 2, 3])
        for step, t in tables.items():
            assert same(got[step], summary_values(t)[stat]), (stat, step)
    got = scalars(tb, "scalars/r/eval", "loss/dog/mean", [2])
    assert got[2] == f32(eval_table[1].mean) != f32(tables[2][1].mean)


def test_one_event_per_call_with_every_value(tmp_path):
    t = table_of(0, range(20), nan_label=5)
    with TensorBoardSink(tmp_path / "logs") as sink:
        for step in range(3):
            sink.log_stats(t, step=step, name="ce", mode="train")
        sink.log_figure(small_figure(), step=2, name="ce", mode="train")
    (path,) = event_files(mode_dir(tmp_path / "logs", "train"))
    assert "tfevents" in path.name and str(os.getpid()) in path.name
    events = read_records(path)
    assert events[0].file_version == "brain.Event:2"
    stats_events = events[1:4]
    assert [e.step for e in stats_events] == [0, 1, 2]
    for i, e in enumerate(stats_events):
        scalar_tags = [v.tag for v in e.summary.value if v.WhichOneof("value") == "simple_value"]
        assert len(scalar_tags) == 20 * 7 + 1 + 6  # all labels x stats, one nonfinite, the aggregates
        assert len(set(scalar_tags)) == len(scalar_tags)
        assert sum(v.tag == LAYOUT_TAG for v in e.summary.value) == (1 if i == 0 else 0)  # charts unchanged
        values = {v.tag: v.simple_value for v in e.summary.value}
        assert values["ce/7/max"] == f32(t[7].max) and values["ce/5/nonfinite"] == 3
    assert events[4].step == 2 and events[4].summary.value[0].tag == "ce/figure"
    assert len(events) == 5


def test_empty_table_and_shared_display_names(tmp_path):
    shared = StatsTable([0, 1, 2], [1, 1, 1], [0.25, 0.5, 0.75], [0, 0, 0], [0.25, 0.5, 0.75], [0.25, 0.5, 0.75], [0, 0, 0])
    with TensorBoardSink(tmp_path / "logs", label_names={0: "cat", 1: "cat"}) as sink:
        sink.log_stats(StatsTable.empty(), step=0, name="none", mode="train")
        sink.log_stats(shared, step=1, name="dup", mode="train")
    (path,) = event_files(mode_dir(tmp_path / "logs", "train"))
    empty, dup = (dict((v.tag, v.simple_value) for v in e.summary.value if v.tag != LAYOUT_TAG)
                  for e in read_records(path)[1:])
    assert empty["none/_summary/num_labels"] == 0 and np.isnan(empty["none/_summary/macro_mean"])
    assert len(empty) == len(SUMMARY)
    assert dup["dup/cat (0)/mean"] == 0.25 and dup["dup/cat (1)/mean"] == 0.5 and dup["dup/2/mean"] == 0.75


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=9000) | st.tuples(st.integers(4000, 70000), st.integers(0, 2**32 - 1)).map(
    lambda a: np.random.default_rng(a[1]).bytes(a[0])))
def test_fast_crc_equals_tensorboards(data):
    assert masked_crc32c(data) == reference_crc(data)
    a, b = io.BytesIO(), io.BytesIO()
    RecordWriter(a).write(data)
    _FastRecordWriter(b).write(data)
    assert a.getvalue() == b.getvalue()


def test_without_the_google_crc32c_wheel_the_fallback_gives_the_same_checksum(tmp_path):
    """The wheel is optional: blocked, tensorboard's pure-Python CRC32C writes the same bytes."""
    data = os.urandom(5000)
    (tmp_path / "rec.bin").write_bytes(data)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["google_crc32c"] = None  # as if the wheel were not installed
        from labeltrack_log.sinks import tensorboard as tb
        assert tb._crc32c_c is None
        data = open({str(tmp_path / "rec.bin")!r}, "rb").read()
        print(tb.masked_crc32c(data), tb.masked_crc32c(b""))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 0, out.stderr
    from labeltrack_log.sinks import tensorboard as tb

    assert tb._crc32c_c is not None  # this environment has the wheel: the C implementation is in use
    assert out.stdout.split() == [str(masked_crc32c(data)), str(masked_crc32c(b""))]
    assert masked_crc32c(data) == reference_crc(data)


# ---------------------------------------------------------------------- custom scalars
def test_custom_scalars_margin_charts(tb):
    logdir = tb.root / "layout"
    with TensorBoardSink(logdir, run_name="r") as sink:
        sink.log_stats(table_of(0, [0, 1]), step=0, name="margin", mode="train")
        sink.log_stats(table_of(1, [0, 1, 2]), step=1, name="margin", mode="train")  # new label: new layout
        sink.log_stats(table_of(2, [0, 1, 2]), step=2, name="margin", mode="train")

    def category():
        cats = get(tb, "/data/plugin/custom_scalars/layout")["category"]
        return next((c for c in cats if c["title"] == "margin"), None)

    cat = wait_for(category, lambda c: c is not None and len(c["chart"]) == 8, "the margin layout with 3 labels")
    charts = {c["title"]: c["margin"]["series"] for c in cat["chart"] if "margin" in c}
    (overlay,) = [c["multiline"]["tag"] for c in cat["chart"] if "multiline" in c]
    tags = ["margin/_summary/macro_mean", "margin/0/mean", "margin/1/mean", "margin/2/mean"]
    assert overlay == [re.escape(tag) + "$" for tag in tags]  # regexes matched from the start: exact tags
    assert charts["2: mean ± std"] == [{"value": "margin/2/mean", "lower": "margin/2/mean-std", "upper": "margin/2/mean+std"}]
    assert charts["0: min..max"] == [{"value": "margin/0/mean", "lower": "margin/0/min", "upper": "margin/0/max"}]
    assert charts["all labels: macro mean, best..worst label mean"] == [
        {"value": "margin/_summary/macro_mean", "lower": "margin/_summary/best_mean", "upper": "margin/_summary/worst_mean"}]
    for series, steps in ((charts["0: mean ± std"][0], [0, 1, 2]), (charts["2: min..max"][0], [1, 2])):
        regex = "|".join(f"({re.escape(series[k])})" for k in ("value", "lower", "upper"))  # as the UI asks
        got = wait_for(lambda: get(tb, "/data/plugin/custom_scalars/scalars", run="layout/r/train", tag=regex),
                       lambda r: set(series.values()) <= set(r["tag_to_events"]), f"margin series {series}")
        assert got["regex_valid"]
        step_lists = {tag: [e[1] for e in got["tag_to_events"][tag]] for tag in series.values()}
        assert all(s == steps for s in step_lists.values()), step_lists  # identical steps: no mismatch warning
    (path,) = event_files(logdir / "r" / "train")
    assert [e.step for e in read_records(path) if any(v.tag == LAYOUT_TAG for v in e.summary.value)] == [0, 1]


# ------------------------------------------------------------------------------ images
def test_figure_in_images_tab(tb):
    logdir = tb.root / "images"
    fig = small_figure(200, 150)
    with TensorBoardSink(logdir, run_name="r") as sink:
        sink.log_figure(fig, step=1, name="band", mode="eval")
        sink.log_figure(fig, step=3, name="band", mode="eval")
    entries = wait_for(lambda: get(tb, "/data/plugin/images/images", run="images/r/eval", tag="band/figure", sample=0),
                       lambda r: len(r) == 2, "two images")
    assert [e["step"] for e in entries] == [1, 3]
    png = get(tb, "/data/plugin/images/individualImage?" + entries[1]["query"], raw=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (200, 150)
    assert png == figure_to_png(fig)
    import matplotlib.image

    assert matplotlib.image.imread(io.BytesIO(png)).shape == (150, 200, 4)


# ------------------------------------------------------------------------ label budget
def test_label_budget_keeps_preferred_labels_and_writes_table(tb):
    logdir = tb.root / "budget"
    names = {7: "seven", 2: "two", 9: "nine", 0: "zero"}  # order = preference
    tables = [table_of(s, range(10)) for s in (10, 11)]
    small = table_of(12, range(3))
    with TensorBoardSink(logdir, label_budget=3, label_names=names, run_name="r") as sink:
        for step, t in enumerate(tables):
            sink.log_stats(t, step=step, name="wide", mode="train")
        sink.log_stats(small, step=0, name="narrow", mode="train")

    tags = wait_for(lambda: get(tb, "/data/plugin/scalars/tags")["budget/r/train"],
                    lambda r: any(t.startswith("narrow/") for t in r), "budget run tags")
    wide_labels = {t.split("/")[1] for t in tags if t.startswith("wide/")}
    assert wide_labels == {"seven", "two", "nine", "_summary"}
    assert {t.split("/")[1] for t in tags if t.startswith("narrow/")} == {"zero", "1", "two", "_summary"}
    got = scalars(tb, "budget/r/train", "wide/_summary/macro_mean", [0, 1])
    assert got[1] == f32(tables[1].mean.mean())  # aggregates cover all 10 labels, not the 3 shown
    assert scalars(tb, "budget/r/train", "wide/_summary/num_labels", [0, 1]) == {0: 10.0, 1: 10.0}
    assert scalars(tb, "budget/r/train", "wide/nine/mean", [0, 1])[1] == f32(tables[1][9].mean)

    text_tags = wait_for(lambda: get(tb, "/data/plugin/text/tags"), lambda r: "budget/r/train" in r, "text tags")
    assert text_tags["budget/r/train"] == ["wide/table"]  # within budget: no table
    texts = wait_for(lambda: get(tb, "/data/plugin/text/text", run="budget/r/train", tag="wide/table"),
                     lambda r: len(r) == 2, "two tables")
    assert [t["step"] for t in texts] == [0, 1]
    html = texts[1]["text"]
    assert "<table>" in html and html.count("<tr>") == 11  # header + every label
    for lab in range(10):
        row = tables[1][lab]
        assert f"<td>{names.get(lab, lab)}</td>" in html
        assert f"<td>{row.mean:.6g}</td>" in html
    worst = max(range(10), key=lambda lab: tables[1][lab].mean)
    assert f"largest mean: {names.get(worst, worst)}" in html

    cats = wait_for(lambda: {c["title"]: c for c in get(tb, "/data/plugin/custom_scalars/layout")["category"]},
                    lambda r: "wide" in r, "layout of the wide name")
    titles = [c["title"] for c in shown_order(cats["wide"]["chart"])]
    assert titles[2:] == ["two: mean ± std", "two: min..max", "seven: mean ± std", "seven: min..max",
                          "nine: mean ± std", "nine: min..max"]  # the budget's labels, in natural order


# ---------------------------------------------------------------------- names are data
def test_path_like_names_stay_inside_logdir_and_tags_stay_readable(tb, tmp_path):
    parent = tb.root / "paths"
    logdir = parent / "logs"
    weird = ["../x", "a/b", "C:\\x", "ünï 标签", "$\\mu$"]
    t = table_of(3, weird)
    with TensorBoardSink(logdir, run_name="../../up") as sink:
        sink.log_stats(t, step=5, name="a/../loss", mode="../ev il")
        sink.log_figure(small_figure(), step=5, name="a/../loss", mode="../ev il")
    files = [p for p in parent.rglob("*") if p.is_file()]
    assert files and all(p.resolve().is_relative_to(logdir.resolve()) for p in files)
    assert sorted(p.name for p in parent.iterdir()) == ["logs"]
    (run_dir,) = {p.parent for p in files if "tfevents" in p.name}
    run = run_dir.relative_to(tb.root).as_posix()

    tags = wait_for(lambda: get(tb, "/data/plugin/scalars/tags")[run], lambda r: len(r) == 5 * 7 + 6, "weird tags")
    assert all(len(tag.split("/")) == 3 for tag in tags)
    label_parts = {tag.split("/")[1] for tag in tags} - {"_summary"}
    assert {"C:\\x", "ünï 标签", "$\\mu$"} <= label_parts  # unchanged: readable as written
    assert any(p.startswith(".._x-") for p in label_parts) and any(p.startswith("a_b-") for p in label_parts)
    assert len(label_parts) == 5
    (name_part,) = {tag.split("/")[0] for tag in tags}
    assert name_part.startswith("a_.._loss-")
    got = scalars(tb, run, f"{name_part}/ünï 标签/mean", [5])
    assert got[5] == f32(t["ünï 标签"].mean)
    cats = wait_for(lambda: {c["title"]: c for c in get(tb, "/data/plugin/custom_scalars/layout")["category"]},
                    lambda r: "a/../loss" in r, "layout with the weird name")
    assert "ünï 标签: mean ± std" in [c["title"] for c in cats["a/../loss"]["chart"]]
    images = wait_for(lambda: get(tb, "/data/plugin/images/tags"), lambda r: run in r, "image tag")
    assert list(images[run]) == [f"{name_part}/figure"]


# ------------------------------------------------------------------- imports / extras
def test_tensorflow_is_never_imported(tmp_path):
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed, so importing it cannot happen")
    result = run_script(
        """
        import json, sys
        from matplotlib.figure import Figure
        from labeltrack_log import GroupedStats
        from labeltrack_log.sinks import make_sinks
        g = GroupedStats(); g.update(list(range(300)), [0.5] * 300)
        (sink,) = make_sinks({"type": "tensorboard", "logdir": "logs", "label_budget": 10})
        sink.log_stats(g.compute(), step=1, name="x", mode="train")
        fig = Figure(); fig.add_subplot().plot([1, 2])
        sink.log_figure(fig, step=1, name="x", mode="train")
        sink.close()
        print(json.dumps({m: m in sys.modules for m in ("tensorflow", "torch", "tensorboard")}))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"tensorflow": False, "torch": False, "tensorboard": True}
    assert list(mode_dir(tmp_path / "logs", "train").glob("*tfevents*"))


def test_missing_tensorboard_names_the_extra(tmp_path):
    result = run_script(
        """
        import sys
        sys.modules["tensorboard"] = None  # as if it were not installed
        from labeltrack_log import MissingExtraError
        from labeltrack_log.sinks import make_sinks
        from labeltrack_log.sinks.tensorboard import TensorBoardSink
        for build in (lambda: TensorBoardSink("logs"), lambda: make_sinks("tensorboard")):
            try:
                build()
            except MissingExtraError as err:
                assert isinstance(err, ModuleNotFoundError)
                print(err)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all('pip install "labeltrack-log[tensorboard]"' in line for line in lines)
    assert not (tmp_path / "logs").exists()


# ------------------------------------------------------------------------- bad config
def test_unusable_logdir_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file")
    for bad in (blocker / "sub", blocker, "/proc/labeltrack-test/x", "/proc"):
        with pytest.raises(ConfigError, match="logdir: expected a directory that can be created and written"):
            TensorBoardSink(bad)
    with pytest.raises(ConfigError, match="logdir"):
        make_sinks({"type": "tensorboard", "logdir": str(blocker / "sub")})
    with pytest.raises(ConfigError, match="logdir: expected a non-empty path, got 3"):
        TensorBoardSink(3)
    with pytest.raises(ConfigError, match="label_budget"):
        TensorBoardSink(tmp_path / "ok", label_budget=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created on failure
    assert not Path("/proc/labeltrack-test").exists()


def test_bad_step_or_table_is_a_clear_error(tmp_path):
    with TensorBoardSink(tmp_path / "logs") as sink:
        with pytest.raises(TypeError, match="step: expected a non-negative int, got float 1.5"):
            sink.log_stats(table_of(0, [0]), step=1.5, name="x", mode="train")
        with pytest.raises(TypeError, match="expected a StatsTable, got dict"):
            sink.log_stats({}, step=1, name="x", mode="train")


# ---------------------------------------------------------------------- durability
def test_sigkill_loses_nothing_already_logged(tb):
    logdir = tb.root / "crash"
    result = run_script(
        f"""
        import os, signal
        from matplotlib.figure import Figure
        from labeltrack_log import StatsTable
        from labeltrack_log.sinks.tensorboard import TensorBoardSink
        def table(step):
            return StatsTable(list(range(10)), [5] * 10, [step * 10 + i for i in range(10)], [1] * 10,
                              [0] * 10, [99] * 10, [0] * 10)
        sink = TensorBoardSink({str(logdir)!r}, run_name="r")
        for step in range(4):
            sink.log_stats(table(step), step=step, name="crash", mode="train")
            if step == 1:
                fig = Figure(); fig.add_subplot().plot([1, 2])
                sink.log_figure(fig, step=step, name="crash", mode="train")
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no buffers flushed at exit
        sink.log_stats(table(4), step=4, name="crash", mode="train")
        """,
        logdir.parent,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    (path,) = event_files(logdir / "r" / "train")
    assert [e.step for e in read_records(path)[1:]] == [0, 1, 1, 2, 3]
    for lab in (0, 9):
        got = scalars(tb, "crash/r/train", f"crash/{lab}/mean", [0, 1, 2, 3])
        assert got == {s: float(s * 10 + lab) for s in range(4)}
    images = wait_for(lambda: get(tb, "/data/plugin/images/images", run="crash/r/train", tag="crash/figure", sample=0),
                      lambda r: len(r) == 1, "the figure logged before the crash")
    assert images[0]["step"] == 1


def test_two_processes_share_one_logdir(tb):
    logdir = tb.root / "two"
    code = """
        import sys
        from labeltrack_log.sinks.tensorboard import TensorBoardSink
        from labeltrack_log import StatsTable
        me = int(sys.argv[1])
        own = TensorBoardSink({logdir!r}, run_name=f"run{{me}}")  # same names, own run
        shared = TensorBoardSink({logdir!r}, run_name="shared")  # same run dir as the other process
        for step in range(40):
            t = StatsTable([0, 1], [2, 2], [me * 100 + step, -step], [1, 1], [0, 0], [9, 9], [0, 0])
            own.log_stats(t, step=step, name="shared", mode="train")
            shared.log_stats(t, step=step, name=f"proc{{me}}", mode="train")
        own.close(); shared.close()
        """
    script = textwrap.dedent(code.format(logdir=str(logdir)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env, cwd=tb.root,
                              stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
        p.stderr.close()
    for me in (1, 2):  # nothing mixed: each run holds only its own process's values
        got = scalars(tb, f"two/run{me}/train", "shared/0/mean", list(range(40)))
        assert got == {s: float(me * 100 + s) for s in range(40)}
        got = scalars(tb, "two/shared/train", f"proc{me}/0/mean", list(range(40)))  # nothing lost in the shared run
        assert got == {s: float(me * 100 + s) for s in range(40)}
    files = event_files(logdir / "shared" / "train")
    assert len(files) == 2
    for path in files:  # one file per process, records intact and not interleaved
        names = {v.tag.split("/")[0] for e in read_records(path) for v in e.summary.value if v.tag != LAYOUT_TAG}
        assert len(names) == 1


def test_forked_child_writes_its_own_file(tmp_path):
    result = run_script(
        """
        import os
        from labeltrack_log import StatsTable
        from labeltrack_log.sinks.tensorboard import TensorBoardSink
        t = StatsTable([0], [1], [0.5], [0.0], [0.5], [0.5], [0])
        sink = TensorBoardSink("logs")
        sink.log_stats(t, step=0, name="parent", mode="train")
        pid = os.fork()
        if pid == 0:
            sink.log_stats(t, step=1, name="child", mode="train")
            sink.close()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        sink.log_stats(t, step=2, name="parent", mode="train")
        sink.close()
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    by_name = {}
    for path in event_files(mode_dir(tmp_path / "logs", "train")):  # the child writes into the parent's run
        events = read_records(path)[1:]
        names = {v.tag.split("/")[0] for e in events for v in e.summary.value if v.tag != LAYOUT_TAG}
        by_name[frozenset(names)] = [e.step for e in events]
    assert by_name == {frozenset({"parent"}): [0, 2], frozenset({"child"}): [1]}


def test_pickled_copy_writes_a_new_file_with_the_full_layout(tb):
    logdir = tb.root / "pickle"
    sink = TensorBoardSink(logdir, label_budget=5)
    sink.log_stats(table_of(0, range(3)), step=0, name="p", mode="train")
    sink.log_stats(table_of(1, range(2)), step=0, name="q", mode="train")
    copy = pickle.loads(pickle.dumps(sink))
    sink.close()
    copy.log_stats(table_of(2, range(3)), step=1, name="p", mode="train")
    copy.close()
    assert copy.closed and copy.label_budget == 5
    records = {path: read_records(path) for path in event_files(mode_dir(logdir, "train"))}  # the copy's too
    assert len(records) == 2
    (copy_file,) = [p for p, events in records.items() if events[-1].step == 1]
    layouts = [e for e in records[copy_file] if any(v.tag == LAYOUT_TAG for v in e.summary.value)]
    assert len(layouts) == 1  # the copy's file carries the layout again, including name "q"
    got = scalars(tb, f"pickle/{sink.run_name}/train", "p/2/mean", [0, 1])
    assert got == {0: f32(table_of(0, range(3))[2].mean), 1: f32(table_of(2, range(3))[2].mean)}
    cats = wait_for(lambda: {c["title"]: c for c in get(tb, "/data/plugin/custom_scalars/layout")["category"]},
                    lambda r: "q" in r and "p" in r, "layout of p and q")
    assert len(cats["q"]["chart"]) == 2 + 2 * 2


def test_close_is_idempotent_and_closed_sink_refuses_writes(tmp_path):
    sink = TensorBoardSink(tmp_path / "logs")
    sink.log_stats(table_of(0, [0]), step=0, name="x", mode="train")
    sink.close()
    sink.close()
    assert sink.closed
    with pytest.raises(ValueError, match="expected an open sink"):
        sink.log_stats(table_of(0, [0]), step=1, name="x", mode="train")
    (path,) = event_files(mode_dir(tmp_path / "logs", "train"))
    assert [e.step for e in read_records(path)] == [0, 0]
    with TensorBoardSink(tmp_path / "unused"):
        pass
    assert list((tmp_path / "unused").iterdir()) == []  # run dirs are created lazily


def test_write_failure_is_logged_and_training_goes_on(tmp_path):
    result = run_script(
        """
        import logging, resource, signal
        from labeltrack_log.sinks.tensorboard import TensorBoardSink
        from labeltrack_log import StatsTable
        logging.basicConfig(level=logging.WARNING)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk / quota: writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        def table(n, width=1):
            labels = [f"{i:04d}" + "x" * (width - 1) for i in range(n)]
            return StatsTable(labels, [1] * n, [0.5] * n, [0.0] * n, [0.5] * n, [0.5] * n, [0] * n)
        sink = TensorBoardSink("logs", label_budget=10)
        sink.log_stats(table(5000, 2000), step=0, name="big", mode="train")   # its text table is too big
        sink.log_stats(table(3), step=1, name="small", mode="train")    # goes to a fresh event file
        sink.close()
        print("training finished")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "training finished" in result.stdout
    assert "could not write" in result.stderr and "values of 'big' at step 0" in result.stderr
    assert "these values are lost" in result.stderr
    files = event_files(mode_dir(tmp_path / "logs", "train"))
    assert len(files) == 2
    good = [f for f in files if f.stat().st_size < 100_000]
    assert len(good) == 1
    assert [e.step for e in read_records(good[0])] == [0, 1]
