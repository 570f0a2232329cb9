"""Issue 10: one training run, one record. Trackers share their sinks (one CSV with one header, one
MLflow run, one TensorBoard run directory with one merged layout), every training run gets its own
TensorBoard runs, the run status tells the truth, a step that does not increase is said out loud.
Real backends: files, a sqlite MLflow store, a real `tensorboard` server (and its real frontend in
headless Chromium where installed), a real FastEstimator fit on sklearn's digits."""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from labeltrack_log import Run, StatsHistory, Tracker
from labeltrack_log.cli import main as cli_main
from labeltrack_log.naming import figure_file, figure_name
from labeltrack_log.run import shared_sinks
from labeltrack_log.sinks import exit_status
from labeltrack_log.sinks.files import CSVSink, ImageDirSink

from tables import mode_dir, shown_order  # noqa: E402  (tests/ is on sys.path, see conftest.py)
from polling import wait_for  # noqa: E402

MODES = ("train", "eval")


def feed(tracker: Tracker, step: int, offset: float = 0.0, modes=MODES) -> None:
    for mode in modes:
        tracker.update([0, 1, 2, 0, 1, 2], [1.0 + offset, 2.0, 3.0, 1.5 + offset, 2.5, 3.5], mode=mode)
    tracker.end_epoch(step)


def shared_here(tmp_path: Path) -> list:
    """The shared sinks of this test (other tests may leave trackers unclosed, whose sinks stay shared)."""
    return [s for s in shared_sinks() if str(tmp_path) in repr(s)]


def csv_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ---------------------------------------------------------------------------- files
@pytest.mark.core
def test_two_trackers_share_one_csv_with_one_header_and_it_renders(tmp_path: Path):
    path = tmp_path / "labeltrack.csv"
    config = {"type": "csv", "path": str(path)}
    loss = Tracker("loss_by_y", sinks=config, figures=None)
    acc = Tracker("acc_by_y", sinks=[config], figures=None)  # the same file, named the same way
    assert loss.sinks[0] is acc.sinks[0]
    for step in (10, 20):
        feed(loss, step)
        feed(acc, step, offset=0.25)
    loss.close()
    assert not acc.sinks[0].closed  # still used by acc
    feed(acc, 30)
    acc.close()
    assert acc.sinks == [] and shared_here(tmp_path) == []
    lines = csv_lines(path)
    assert sum(line.startswith("wall_time,") for line in lines) == 1 and lines[0].startswith("wall_time,")
    names = {row["name"] for row in csv.DictReader(path.open(newline=""))}
    assert names == {"loss_by_y", "acc_by_y"}

    # a later run appends to the file without a second header
    with Tracker("loss_by_y", sinks=config, figures=None) as again:
        feed(again, 40)
    lines = csv_lines(path)
    assert sum(line.startswith("wall_time,") for line in lines) == 1
    history = StatsHistory.from_file(path)
    assert history.steps("acc_by_y", "eval") == [10, 20, 30]
    assert history.steps("loss_by_y", "train") == [10, 20, 40]
    assert cli_main(["render", str(path), "-o", str(tmp_path / "png")]) == 0
    last = {("acc_by_y", "train"): 30, ("acc_by_y", "eval"): 30, ("loss_by_y", "train"): 40, ("loss_by_y", "eval"): 40}
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == sorted(
        figure_file(figure_name(n, "std"), m, step) for (n, m), step in last.items())


@pytest.mark.core
def test_a_file_written_with_two_headers_by_an_older_version_still_renders(tmp_path: Path):
    path = tmp_path / "old.csv"
    for name in ("a", "b"):  # what two unshared sinks used to write into one file: a header each
        with Tracker(name, sinks=CSVSink(tmp_path / f"{name}.csv"), figures=None) as t:
            feed(t, 1)
    path.write_text((tmp_path / "a.csv").read_text() + (tmp_path / "b.csv").read_text())
    assert sum(line.startswith("wall_time,") for line in csv_lines(path)) == 2
    history = StatsHistory.from_file(path)
    assert history.steps("a", "train") == [1] and history.steps("b", "eval") == [1]


@pytest.mark.core
def test_a_sink_instance_given_to_two_trackers_keeps_both_final_figures(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture):
    images = ImageDirSink(tmp_path / "images")
    table = CSVSink(tmp_path / "s.csv")
    caplog.set_level(logging.WARNING, logger="labeltrack_log")
    first = Tracker("loss_by_y", sinks=[images, table])
    second = Tracker("acc_by_y", sinks=[images, table])
    feed(first, 5)
    feed(second, 5)
    first.close()  # before: closed the shared instances, and the second tracker's figures were lost
    assert not images.closed
    second.close()
    assert images.closed and table.closed
    assert "expected an open sink" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == sorted(
        f"{name}_std_band_{mode}_step_5.png" for name in ("loss_by_y", "acc_by_y") for mode in MODES)


@pytest.mark.core
def test_run_gives_its_trackers_its_sinks_and_keeps_them_open_until_it_ends(tmp_path: Path):
    path = tmp_path / "run.csv"
    with Run({"type": "csv", "path": str(path)}) as run:
        loss = Tracker("loss_by_y", run=run, figures=None)
        feed(loss, 1)
        loss.close()
        assert not run.sinks[0].closed  # the run still holds it: the next tracker writes to the same file
        acc = Tracker("acc_by_y", run=run, figures=None)
        feed(acc, 1)
        assert acc.run is run and [t.name for t in run.trackers] == ["loss_by_y", "acc_by_y"]
    assert run.status == "FINISHED" and run.sinks == [] and acc.sinks == []
    assert sum(line.startswith("wall_time,") for line in csv_lines(path)) == 1
    assert {r["name"] for r in csv.DictReader(path.open(newline=""))} == {"loss_by_y", "acc_by_y"}


@pytest.mark.core
def test_reading_properties_creates_nothing(tmp_path: Path):
    path = tmp_path / "s.csv"
    with Tracker("x", sinks={"type": "csv", "path": str(path)}, figures=None) as tracker:
        feed(tracker, 1)
    size = path.stat().st_size
    copy = pickle.loads(pickle.dumps(tracker))
    for t in (tracker, copy):
        assert t.sinks == [] and t.run.sinks == []
    assert shared_here(tmp_path) == [] and path.stat().st_size == size
    feed(copy, 2)  # logging reopens
    assert [type(s) for s in copy.sinks] == [CSVSink]
    copy.close()


def test_run_sync_is_checked_at_construction_and_kept_by_a_copy(tmp_path: Path):
    """Run(sync=...) (issue 12): "auto", None or a process group; without torch.distributed a run
    builds its sinks as in one process whatever the setting, and a copy keeps the setting."""
    from labeltrack_log.errors import ConfigError

    with pytest.raises(ConfigError, match="sync: expected 'auto', None or a torch.distributed process group, got 'all'"):
        Run("csv", sync="all")
    for sync in ("auto", None):
        path = tmp_path / f"{sync}.csv"
        with Run({"type": "csv", "path": str(path)}, sync=sync) as run:
            assert [type(s) for s in run.sinks] == [CSVSink]
            feed(Tracker("x", run=run, sync=sync, figures=None), 1)
        assert path.read_text().startswith("wall_time") and pickle.loads(pickle.dumps(run))._sync == sync


@pytest.mark.core
def test_exit_status_of_a_with_block():
    assert exit_status(None) == "FINISHED"
    assert exit_status(SystemExit, SystemExit(0)) == exit_status(SystemExit, SystemExit(None)) == "FINISHED"
    assert exit_status(SystemExit, SystemExit(3)) == exit_status(SystemExit, SystemExit("bye")) == "FAILED"
    assert exit_status(KeyboardInterrupt, KeyboardInterrupt()) == "KILLED"
    assert exit_status(RuntimeError, RuntimeError("x")) == "FAILED"


# ---------------------------------------------------------------------------- steps
@pytest.mark.core
def test_a_constant_step_is_a_warning_once_per_tracker_and_mode(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="labeltrack_log")
    path = tmp_path / "s.csv"
    with Tracker("loss_by_y", sinks={"type": "csv", "path": str(path)}, figures=None) as tracker:
        for _ in range(4):  # a plain loop that passes the same step every epoch
            feed(tracker, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # once per mode
    for mode, message in zip(MODES, warnings):
        assert f"loss_by_y: {mode} step 0 is not above the last step logged (0)" in message
        assert "the global step" in message
    assert tracker.history.steps("loss_by_y", "train") == [0]


@pytest.mark.core
def test_the_epoch_re_run_after_a_restore_is_not_a_warning(caplog: pytest.LogCaptureFixture):
    tracker = Tracker("loss_by_y", figures=None)
    feed(tracker, 10)
    restored = pickle.loads(pickle.dumps(tracker))  # e.g. a checkpoint, loaded to resume
    caplog.set_level(logging.INFO, logger="labeltrack_log")
    feed(restored, 10)  # the framework re-runs the last epoch at the same step
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "already logged" in caplog.text
    feed(restored, 10)  # but a step that keeps not increasing is
    assert [r for r in caplog.records if r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------- MLflow
@pytest.fixture
def store(tmp_path: Path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(uri)


def _runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.mark.timeout(300)
def test_two_trackers_log_into_one_mlflow_run_and_reading_creates_no_run(store):
    uri, client = store
    config = {"type": "mlflow", "tracking_uri": uri, "experiment": "two"}
    with Tracker("loss_by_y", sinks=config, figures=None) as loss, \
            Tracker("acc_by_y", sinks=[config], figures=None) as acc:
        assert loss.sinks[0] is acc.sinks[0]
        for step in (1, 2):
            feed(loss, step)
            feed(acc, step, offset=0.5)
        shared = loss.sinks[0]
    run_id = shared.run_id  # after close: inside, it waits only `timeout` for the run
    assert loss.sinks == [] and acc.sinks == [] and loss.run.sinks == []  # read after the block: nothing opens
    (run,) = _runs(client, "two")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    for name in ("loss_by_y", "acc_by_y"):
        assert [m.step for m in client.get_metric_history(run_id, f"{name}/eval/0/mean")] == [1, 2]
    time.sleep(0.5)
    assert len(_runs(client, "two")) == 1


def _status_of(uri: str, client, experiment: str, body) -> str:
    config = {"type": "mlflow", "tracking_uri": uri, "experiment": experiment}
    holder, error = {}, None
    try:
        with Run(config) as run:
            tracker = Tracker("loss_by_y", run=run, figures=None)
            feed(tracker, 1)
            holder["sink"] = run.sinks[0]
            body()
    except BaseException as exc:  # checked below like a clean end, then raised again
        error = exc
    (got,) = _runs(client, experiment)
    assert got.info.run_id == holder["sink"].run_id and run.status == got.info.status
    if error is not None:
        raise error
    return got.info.status


LEFT_OPEN = """
import sys
from labeltrack_log import Tracker

uri, experiment, how = sys.argv[1:4]


def hook(exc_type, exc, tb):  # the user's own hook: still called, first
    print("user hook:", exc_type.__name__, file=sys.stderr, flush=True)
    sys.__excepthook__(exc_type, exc, tb)


sys.excepthook = hook
tracker = Tracker("loss_by_y", sinks={"type": "mlflow", "tracking_uri": uri, "experiment": experiment}, figures=None)
tracker.update([0, 1], [0.5, 2.0])
tracker.end_epoch(step=1)
if how in ("error", "interactive"):
    raise RuntimeError("diverged")  # nobody closes the tracker: the exception ends the process
if how == "ctrl-c":
    raise KeyboardInterrupt
# "open": the script ends without closing the tracker and without an exception
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how, status", [("error", "FAILED"), ("ctrl-c", "KILLED"), ("open", "KILLED"),
                                         ("interactive", "KILLED")])  # python -i: the session went on
def test_an_uncaught_exception_ends_the_runs_nobody_closed_with_its_status(store, tmp_path, how, status):
    uri, client = store
    flags = ["-i"] if how == "interactive" else []  # the prompt then reads the end of stdin and exits
    out = subprocess.run([sys.executable, *flags, "-c", LEFT_OPEN, uri, f"left-{how}", how], cwd=tmp_path,
                         capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
                         env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert (out.returncode == 0) == (how in ("open", "interactive")), out.stderr[-3000:]
    if how != "open":
        assert out.stderr.count("user hook:") == 1 and "Traceback" in out.stderr, out.stderr[-3000:]
    (run,) = wait_for(lambda: _runs(client, f"left-{how}"), lambda runs: runs and runs[0].info.status != "RUNNING",
                      "the run to end", 90)  # "open": the orphaned delivery process ends it after the script exited
    assert run.info.status == status  # an exception: FAILED; Ctrl-C or nobody said: KILLED
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_by_y/train/0/mean")] == [1]


@pytest.mark.timeout(300)
def test_run_status_tells_how_the_block_ended(store):
    uri, client = store

    def boom():
        raise RuntimeError("diverged")

    def ctrl_c():
        raise KeyboardInterrupt

    def exit_0():
        sys.exit(0)

    def exit_3():
        sys.exit(3)

    with pytest.raises(RuntimeError, match="diverged"):  # the exception still propagates
        _status_of(uri, client, "boom", boom)
    assert _runs(client, "boom")[0].info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt):
        _status_of(uri, client, "ctrl-c", ctrl_c)
    assert _runs(client, "ctrl-c")[0].info.status == "KILLED"
    with pytest.raises(SystemExit):
        _status_of(uri, client, "exit0", exit_0)
    assert _runs(client, "exit0")[0].info.status == "FINISHED"
    with pytest.raises(SystemExit):
        _status_of(uri, client, "exit3", exit_3)
    assert _runs(client, "exit3")[0].info.status == "FAILED"
    assert _status_of(uri, client, "clean", lambda: None) == "FINISHED"


@pytest.mark.timeout(300)
def test_with_tracker_and_with_sink_status(store):
    uri, client = store
    from labeltrack_log.sinks.mlflow import MLflowSink

    with pytest.raises(ValueError):
        with Tracker("x", sinks={"type": "mlflow", "tracking_uri": uri, "experiment": "tracker"}, figures=None) as t:
            feed(t, 1)
            raise ValueError("bad batch")
    assert _runs(client, "tracker")[0].info.status == "FAILED"
    with pytest.raises(SystemExit):
        with MLflowSink(uri, experiment="sink") as sink:
            sink.flush()
            sys.exit(0)
    assert _runs(client, "sink")[0].info.status == "FINISHED"


# ------------------------------------------------------------------------ TensorBoard
def _get(server, route: str, **params):
    url = f"{server.url}{route}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _wait(fn, ok, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if ok(last):
                return last
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


@pytest.mark.timeout(300)
def test_one_tensorboard_run_dir_and_layout_for_two_trackers_and_reruns_never_mix(tmp_path, tensorboard_server):
    pytest.importorskip("tensorboard")
    logdir = tmp_path / "tb"
    sinks = {"type": "tensorboard", "logdir": str(logdir)}

    def training(offset: float) -> str:
        with Run(sinks) as run:
            loss = Tracker("loss_by_y", run=run, label_names={0: "cat", 1: "dog", 2: "emu"}, figures=None)
            acc = Tracker("acc_by_y", run=run, figures=None)
            assert loss.sinks[0] is acc.sinks[0]
            for step in (10, 20, 30):
                feed(loss, step, offset)
                feed(acc, step, offset)
            return loss.sinks[0].run_name

    first = training(0.0)
    second = training(5.0)  # a rerun: its own run directory, even within the same second
    assert first != second and sorted([first, second]) == [first, second]  # sortable: the rerun sorts last
    assert sorted(p.name for p in logdir.iterdir()) == [first, second]
    for name in (first, second):
        assert sorted(p.name for p in (logdir / name).iterdir()) == ["eval", "train"]
        assert len(list((logdir / name / "train").glob("*tfevents*"))) == 1  # one writer per run dir

    server = tensorboard_server(logdir)
    for name, offset in ((first, 0.0), (second, 5.0)):
        got = _wait(lambda: _get(server, "/data/plugin/scalars/scalars", run=f"{name}/train", tag="loss_by_y/cat/mean"),
                    lambda r: len(r) == 3, f"the three steps of {name}")
        assert [p[1] for p in got] == [10, 20, 30] and got[0][2] == pytest.approx(1.25 + offset)
    layout = _wait(lambda: _get(server, "/data/plugin/custom_scalars/layout"),
                   lambda r: {c["title"] for c in r.get("category", [])} == {"loss_by_y", "acc_by_y"},
                   "one layout with both trackers' charts")
    cats = {c["title"]: c for c in layout["category"]}
    shown = [c["title"] for c in shown_order(cats["loss_by_y"]["chart"])]
    assert shown == ["all labels: every label's mean, macro mean", "all labels: macro mean, best..worst label mean",
                     "cat: mean ± std", "cat: min..max", "dog: mean ± std", "dog: min..max",
                     "emu: mean ± std", "emu: min..max"]
    overlay = shown_order(cats["acc_by_y"]["chart"])[0]["multiline"]["tag"]
    got = _wait(lambda: _get(server, "/data/plugin/custom_scalars/scalars", run=f"{second}/eval", tag="|".join(overlay)),
                lambda r: len(r.get("tag_to_events", {})) == 4, "every label's mean in the overlay chart")
    # one sink, one set of label names: acc_by_y (no names of its own) shows loss_by_y's names too
    assert set(got["tag_to_events"]) == {"acc_by_y/_summary/macro_mean", "acc_by_y/cat/mean", "acc_by_y/dog/mean",
                                         "acc_by_y/emu/mean"}


def test_run_name_picks_the_tensorboard_run_dir(tmp_path: Path):
    pytest.importorskip("tensorboard")
    with Run("tensorboard", name="baseline") as run:  # logdir "runs" in the cwd (a tmp dir in tests)
        feed(Tracker("loss_by_y", run=run, figures=None), 1)
    assert sorted(p.name for p in (tmp_path / "runs" / "baseline").iterdir()) == ["eval", "train"]
    with Tracker("loss_by_y", sinks={"type": "tensorboard", "run_name": "mine"}, run=Run(name="ignored"),
                 figures=None) as t:
        feed(t, 1)
    assert (tmp_path / "runs" / "mine" / "train").is_dir() and not (tmp_path / "runs" / "ignored").exists()


# --------------------------------------------------- the real frontend: chart order on screen
def _cdp_chart_titles(url: str, chromium: str, timeout: float = 60.0) -> list[str]:
    """Card titles of the Custom Scalars dashboard in the order the page shows them, read from a
    real headless Chromium over the DevTools protocol (``--remote-debugging-pipe``: fds 3 and 4)."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()

    def child_fds():  # the DevTools pipe: Chromium reads fd 3 and writes fd 4
        a, b = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
        os.dup2(a, 3)
        os.dup2(b, 4)

    proc = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                             "--window-size=1600,4000", "--user-data-dir=" + str(Path(os.environ.get("TMPDIR", "/tmp")) /
                                                                                   f"lt-chromium-{os.getpid()}"),
                             "about:blank"], preexec_fn=child_fds,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=False, start_new_session=True)
    os.close(to_child_r)
    os.close(from_child_w)
    writer, reader = os.fdopen(to_child_w, "wb", buffering=0), os.fdopen(from_child_r, "rb", buffering=0)
    buf, ids = b"", [0]

    def send(method: str, params: dict | None = None, session: str | None = None) -> dict:
        nonlocal buf
        ids[0] += 1
        msg = {"id": ids[0], "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        writer.write(json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in buf:
                chunk = reader.read(65536)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                buf += chunk
            raw, buf = buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == ids[0]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    script = """(() => { const out = [];
      const walk = (n) => { if (!n) return;
        if (n.tagName === 'TF-CUSTOM-SCALAR-MARGIN-CHART-CARD' || n.tagName === 'TF-CUSTOM-SCALAR-MULTI-LINE-CHART-CARD')
          out.push(n.title);
        if (n.shadowRoot) walk(n.shadowRoot);
        for (const c of n.children || []) walk(c); };
      walk(document.documentElement); return JSON.stringify(out); })()"""
    try:
        target = send("Target.createTarget", {"url": url})["targetId"]
        session = send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        deadline, titles = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            time.sleep(1.0)
            value = send("Runtime.evaluate", {"expression": script, "returnByValue": True}, session)["result"]["value"]
            titles = json.loads(value)
            if titles and len(titles) == len(set(titles)):
                time.sleep(1.0)  # let the last cards of the page be stamped
                again = json.loads(send("Runtime.evaluate", {"expression": script, "returnByValue": True},
                                        session)["result"]["value"])
                if again == titles:
                    return titles
        return titles
    finally:
        try:
            send("Browser.close")
        except (RuntimeError, OSError, BrokenPipeError):
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=15)
        writer.close()
        reader.close()


@pytest.mark.timeout(300)
def test_the_real_frontend_shows_the_overview_first_and_labels_in_natural_order(tmp_path, tensorboard_server):
    pytest.importorskip("tensorboard")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no Chromium to load TensorBoard's frontend (apt-get install chromium)")
    logdir = tmp_path / "tb"
    with Tracker("ce_by_y", sinks={"type": "tensorboard", "logdir": str(logdir)}, figures=None) as tracker:
        for step in (1, 2):
            tracker.update(list(range(10)) * 2, [float(i) for i in range(20)], mode="train")
            tracker.end_epoch(step)
    server = tensorboard_server(logdir)
    _wait(lambda: _get(server, "/data/plugin/custom_scalars/layout"), lambda r: r.get("category"), "the layout")
    titles = _cdp_chart_titles(f"{server.url}/#custom_scalars", chromium)
    expected = ["all labels: every label's mean, macro mean", "all labels: macro mean, best..worst label mean"]
    expected += [f"{lab}: {kind}" for lab in range(10) for kind in ("mean ± std", "min..max")]
    assert titles == expected


# ------------------------------------------------------------------------ FastEstimator
@pytest.mark.timeout(600)
def test_fe_fit_two_label_trackers_share_one_run_inside_fe_tensorboard_runs(tmp_path: Path, store):
    pytest.importorskip("fastestimator")
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import fe_torch_digits
    from fastestimator.trace.io import TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from labeltrack_log.fastestimator import LabelTracker

    uri, client = store
    sinks = ["tensorboard", {"type": "mlflow", "tracking_uri": uri, "experiment": "fe"},
             {"type": "csv", "path": str(tmp_path / "fe.csv")}]
    by_eval = LabelTracker("y", "sample_ce", outputs="ce_eval_by_digit", mode="eval", sinks=sinks, figures=None)
    explicit = LabelTracker("y", "sample_ce", outputs="ce_own_logdir", mode="eval", figures=None,
                            sinks={"type": "tensorboard", "logdir": str(tmp_path / "mine")})
    fe_tb = TensorBoard(log_dir=str(tmp_path / "logs"), update_freq=1, write_graph=False)
    estimator, tracker = fe_torch_digits.build_estimator(
        epochs=2, sinks=sinks, subsample=300, tracker_mode=["train", "eval"], figures=None,
        extra_traces=[by_eval, explicit, fe_tb])
    estimator.fit()

    stamp = estimator.system.experiment_time
    run_dir = tmp_path / "logs" / stamp
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [stamp]  # FE's run, nothing beside it
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    for mode in MODES:
        acc = EventAccumulator(str(run_dir / mode), size_guidance={"scalars": 0}).Reload()
        tags = acc.Tags()["scalars"]
        assert "ce" in tags  # FE's own loss curve ...
        assert "ce_by_digit/_summary/macro_mean" in tags  # ... and ours, in one TensorBoard run
        if mode == "eval":
            assert "ce_eval_by_digit/_summary/macro_mean" in tags
    custom = EventAccumulator(str(run_dir / "eval"), size_guidance={"tensors": 0}).Reload()
    from tensorboard.plugins.custom_scalar import layout_pb2

    (point,) = custom.Tensors("custom_scalars__config__")[-1:]
    layout = layout_pb2.Layout.FromString(point.tensor_proto.string_val[0])
    assert sorted(c.title for c in layout.category) == ["ce_by_digit", "ce_eval_by_digit"]  # one merged layout
    assert (mode_dir(tmp_path / "mine", "eval")).is_dir()  # an explicit logdir is kept

    (run,) = _runs(client, "fe")  # both trackers of the Estimator: one MLflow run
    steps = estimator.system.global_step
    assert run.info.status == "FINISHED"
    assert client.get_metric_history(run.info.run_id, "ce_eval_by_digit/eval/_summary/macro_mean")[-1].step == steps
    assert client.get_metric_history(run.info.run_id, "ce_by_digit/train/_summary/macro_mean")[-1].step == steps
    lines = csv_lines(tmp_path / "fe.csv")
    assert sum(line.startswith("wall_time,") for line in lines) == 1
    assert {r["name"] for r in csv.DictReader((tmp_path / "fe.csv").open(newline=""))} == {"ce_by_digit",
                                                                                          "ce_eval_by_digit"}
    assert tracker.sinks == [] and by_eval.sinks == []
