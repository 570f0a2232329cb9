"""MLflowSink with process delivery (the default for a run it creates): the training process never
imports mlflow, a child process delivers the spool in order, and every failure of the server, the
child or the training process itself ends with each value stored exactly once, or kept for replay.

Real `mlflow server` processes (killed and restarted on the same port), a real TCP proxy that drops
answers, real SIGKILLs of the training process and of the delivery process. No mocks, no sleeps:
waits poll with a deadline."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("mlflow")
if os.name != "posix":  # pragma: no cover
    pytest.skip("process delivery needs POSIX", allow_module_level=True)

import servers  # noqa: E402
from polling import open_run_id  # noqa: E402
from test_mlflow_outage import BOUND, TIMEOUT, FaultyProxy, Rest, assert_exactly_once, expected_values, figure, png_steps, table, timed  # noqa: E402

from labeltrack_log import ConfigError  # noqa: E402
from labeltrack_log.sinks.mlflow import MLflowSink, replay_spool  # noqa: E402

ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MPLBACKEND": "Agg"}


def wait_until(condition, seconds: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.05)  # polling interval of a wait with a deadline, not a fixed sleep


def messages(caplog, level: int = logging.WARNING) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= level)


# A training process: the table of test_mlflow_outage.table, built here (that module imports mlflow)
PRELUDE = """
import json, os, signal, sys
import numpy as np
from matplotlib.figure import Figure
from labeltrack_log import StatsTable
from labeltrack_log.sinks.mlflow import MLflowSink

def table(step, n):
    labels = np.arange(n)
    mean = labels + step / 8
    return StatsTable(labels, np.full(n, 3), mean, np.full(n, 0.5), mean - 1, mean + 1, np.zeros(n, dtype=int))

def figure(step):
    fig = Figure(figsize=(2, 2), dpi=40)
    fig.add_subplot().plot([0, step])
    return fig
"""


# ------------------------------------------------------------------------------ tests
TRAINING = PRELUDE + """
url, experiment = sys.argv[1], sys.argv[2]
sink = MLflowSink(url, experiment=experiment, label_budget=50)
for step in range(4):
    sink.log_stats(table(step, 50), step=step, name="ce", mode="train")
    sink.flush()
sink.log_figure(figure(3), step=3, name="ce_band", mode="train")
imported_before_close = "mlflow" in sys.modules
sink.close()
print(json.dumps({"run_id": sink.run_id, "delivery": sink.delivery, "mlflow": imported_before_close or
                  "mlflow" in sys.modules, "spool_dir": sink.spool_dir.exists()}))
"""


def test_the_training_process_never_imports_mlflow(mlflow_server, tmp_path):
    out = subprocess.run([sys.executable, "-c", TRAINING, mlflow_server.url, "no-import"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["delivery"] == "process" and result["mlflow"] is False
    assert result["spool_dir"] is False  # delivered: the spool and its directory are gone
    rest = Rest(mlflow_server.url)
    assert_exactly_once(rest, result["run_id"], [0, 1, 2, 3], 50)
    assert png_steps(rest.images(result["run_id"])) == [3]
    assert rest.run(result["run_id"])["info"]["status"] == "FINISHED"


def test_outage_mid_training_every_value_arrives_exactly_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="labeltrack_log")
    root, n_labels = tmp_path / "server", 210  # 1056 metrics per step: two requests
    server = servers.mlflow_server(root)
    try:
        rest = Rest(server.url)
        sink = MLflowSink(server.url, experiment="outage", timeout=TIMEOUT, retry_interval=0.2, label_budget=n_labels,
                          spool_dir=tmp_path / "spool")
        assert sink.delivery == "process"

        def log(step: int) -> None:
            assert timed(sink.log_stats, table(step, n_labels), step=step, name="ce", mode="train") < 1
            assert timed(sink.log_figure, figure(step), step=step, name="ce_band", mode="train") < 1

        for step in range(3):
            log(step)
        run_id = open_run_id(sink)  # waits for the delivery process to create the run
        wait_until(lambda: png_steps(rest.images(run_id)) == [0, 1, 2], what="steps 0-2 delivered")
        server.kill()
        for step in range(3, 6):
            log(step)  # the server is down: calls return at once, batches wait in the spool
        wait_until(lambda: (sink.flush(), str(sink.spool.path) in messages(caplog))[1], what="the outage warning")
        server = servers.mlflow_server(root, port=server.port)
        for step in range(6, 8):
            log(step)
        assert timed(sink.close) < 60
        assert not sink.spool.path.exists() and not sink.spool.cursor_path.exists()
        assert_exactly_once(rest, run_id, list(range(8)), n_labels)
        assert png_steps(rest.images(run_id)) == list(range(8))
        assert rest.run(run_id)["info"]["status"] == "FINISHED"
        assert "answers again" in messages(caplog, logging.INFO)
    finally:
        server.stop()


def test_lost_answers_are_not_delivered_twice(mlflow_server):
    proxy = FaultyProxy(mlflow_server.port)
    rest = Rest(mlflow_server.url)
    try:
        sink = MLflowSink(proxy.url, experiment="lost-answers-process", timeout=TIMEOUT, retry_interval=0.1)
        sink.log_stats(table(0, 4), step=0, name="ce", mode="train")
        run_id = open_run_id(sink)
        wait_until(lambda: rest.history(run_id, "ce/train/0/mean") == [(0, 0.0)], what="step 0")
        proxy.drop = "/runs/set-tag"  # the last request of log_image: PNG and thumbnail are stored
        sink.log_figure(figure(1), step=1, name="ce_band", mode="train")
        wait_until(lambda: proxy.dropped, what="the dropped image answer")
        proxy.drop = "/runs/log-batch"
        sink.log_stats(table(1, 4), step=1, name="ce", mode="train")
        wait_until(lambda: len(proxy.dropped) == 2, what="the dropped log-batch answer")
        proxy.drop = None
        sink.close()
        assert [p.rsplit("/", 1)[-1].split("?")[0] for p in proxy.dropped] == ["set-tag", "log-batch"]
        assert_exactly_once(rest, run_id, [0, 1], 4)
        assert png_steps(rest.images(run_id)) == [1]
        assert rest.run(run_id)["info"]["status"] == "FINISHED"
    finally:
        proxy.close()


def test_server_down_throughout_close_is_bounded_and_the_spool_replays(tmp_path, caplog):
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    sink = MLflowSink(url, experiment="down-process", run_name="late", timeout=1, retry_interval=0.2,
                      close_timeout=2, spool_dir=tmp_path / "spool")
    for step in range(3):
        assert timed(sink.log_stats, table(step, 5), step=step, name="ce", mode="train") < 1
    with pytest.raises(ConfigError, match="being delivered right now"):  # the delivery process holds it
        replay_spool(sink.spool.path)
    assert timed(sink.close) < 2 + 10 + BOUND  # close_timeout, the delivery process's grace, slack
    spool = sink.spool.path
    assert len(spool.read_text().splitlines()) == 1 + 3 + 1  # create run, 3 metrics batches, end run
    assert f"labeltrack-log replay {spool}" in messages(caplog)
    assert sink.run_id is None
    server = servers.mlflow_server(tmp_path / "server", port=port)
    try:
        assert replay_spool(spool) == 5
        rest = Rest(url)
        (run,) = rest.runs_in("down-process")
        assert run["info"]["run_name"] == "late" and run["info"]["status"] == "FINISHED"
        assert_exactly_once(rest, run["info"]["run_id"], [0, 1, 2], 5)
    finally:
        server.stop()


def test_a_rejected_batch_is_reported_in_the_training_process(mlflow_server, caplog):
    from mlflow import MlflowClient

    rest, client = Rest(mlflow_server.url), MlflowClient(mlflow_server.url)
    sink = MLflowSink(mlflow_server.url, experiment="rejected-process", timeout=TIMEOUT, retry_interval=0.1)
    sink.log_stats(table(0, 3), step=0, name="ce", mode="train")
    run_id = open_run_id(sink)
    wait_until(lambda: rest.history(run_id, "ce/train/0/mean") == [(0, 0.0)], what="step 0")
    client.delete_run(run_id)  # someone deletes the run mid-training: the server answers 400
    sink.log_stats(table(1, 3), step=1, name="ce", mode="train")
    client_restored = False
    try:
        wait_until(lambda: (sink.flush(), "rejected" in messages(caplog, logging.ERROR))[1], what="the error")
        client.restore_run(run_id)
        client_restored = True
        sink.log_stats(table(2, 3), step=2, name="ce", mode="train")  # stays behind the rejected batch
        sink.close()
    finally:
        if not client_restored:
            client.restore_run(run_id)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(sink.spool.path) in errors[0]
    assert f"labeltrack-log replay {sink.spool.path}" in messages(caplog)
    assert [s for s, _ in rest.history(run_id, "ce/train/0/mean")] == [0]
    assert replay_spool(sink.spool.path) == 3  # step 1, step 2, end of run
    assert_exactly_once(rest, run_id, [0, 1, 2], 3)
    assert rest.run(run_id)["info"]["status"] == "FINISHED"


def test_a_killed_delivery_process_is_restarted_and_nothing_is_lost(mlflow_server, caplog):
    rest = Rest(mlflow_server.url)
    sink = MLflowSink(mlflow_server.url, experiment="child-killed", timeout=TIMEOUT, retry_interval=0.1)
    sink.log_stats(table(0, 6), step=0, name="ce", mode="train")
    run_id = open_run_id(sink)  # killed once the run exists
    first = sink._process.proc
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    for step in (1, 2):
        sink.log_stats(table(step, 6), step=step, name="ce", mode="train")  # restarts it
    assert sink._process.proc.pid != first.pid
    sink.close()
    assert "exited unexpectedly" in messages(caplog, logging.ERROR)
    assert_exactly_once(rest, run_id, [0, 1, 2], 6)
    assert rest.run(run_id)["info"]["status"] == "FINISHED"
    assert not sink.spool.path.exists()


KILLED = PRELUDE + """
sink = MLflowSink(sys.argv[1], experiment=sys.argv[2], close_timeout=30)
for step in range(3):
    sink.log_stats(table(step, 7), step=step, name="ce", mode="train")
print(json.dumps({"spool": str(sink.spool.path)}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: the training process is gone
"""


def test_a_killed_training_process_is_delivered_in_full_and_marked_killed(mlflow_server, tmp_path):
    from labeltrack_log.sinks._spool import Spool

    experiment = f"parent-killed-{time.time_ns()}"
    out = subprocess.run([sys.executable, "-c", KILLED, mlflow_server.url, experiment], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    spool = Spool(json.loads(out.stdout.splitlines()[-1])["spool"])
    wait_until(lambda: not spool.exists() and not spool.busy(), 90, "the orphaned delivery process to finish")
    rest = Rest(mlflow_server.url)
    (run,) = rest.runs_in(experiment)
    assert run["info"]["status"] == "KILLED"  # every batch delivered, and the run says how it ended
    assert_exactly_once(rest, run["info"]["run_id"], [0, 1, 2], 7)


def test_a_torn_spool_line_is_skipped_and_the_batches_around_it_arrive(mlflow_server, caplog):
    rest = Rest(mlflow_server.url)
    sink = MLflowSink(mlflow_server.url, experiment="torn", timeout=TIMEOUT, retry_interval=0.1)
    sink.log_stats(table(0, 3), step=0, name="ce", mode="train")
    with open(sink.spool.path, "ab") as f:  # what a write cut short by a full disk leaves
        f.write(b'{"seq":99,"kind":"metrics","metr')
    sink.log_stats(table(1, 3), step=1, name="ce", mode="train")  # starts on a new line
    sink.close()
    assert "skipping a corrupt line" in messages(caplog, logging.ERROR)
    assert_exactly_once(rest, sink.run_id, [0, 1], 3)
    assert rest.run(sink.run_id)["info"]["status"] == "FINISHED"


def test_no_delivery_process_means_inline_delivery_not_lost_batches(mlflow_server, caplog, monkeypatch, tmp_path):
    rest = Rest(mlflow_server.url)
    from labeltrack_log.sinks import _delivery

    monkeypatch.setattr(_delivery.DeliveryProcess, "_shared", None)  # this process has no delivery process yet
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))  # and none can be started
    sink = MLflowSink(mlflow_server.url, experiment="no-child", timeout=TIMEOUT, delivery="process")
    assert sink.delivery == "inline"  # switched, with the run's creation as its backlog
    assert "could not start the MLflow delivery process" in messages(caplog, logging.ERROR)
    for step in range(2):
        sink.log_stats(table(step, 4), step=step, name="ce", mode="train")
    sink.close()
    assert_exactly_once(rest, sink.run_id, [0, 1], 4)
    assert rest.run(sink.run_id)["info"]["status"] == "FINISHED"
    assert not sink.spool.path.exists()


def test_a_long_run_spool_is_rotated_once_delivered(mlflow_server, monkeypatch):
    import labeltrack_log.sinks.mlflow as module

    monkeypatch.setattr(module, "ROTATE_BYTES", 4000)  # a few steps per spool file
    rest = Rest(mlflow_server.url)
    sink = MLflowSink(mlflow_server.url, experiment="rotate", timeout=TIMEOUT, retry_interval=0.1)
    files = []
    for step in range(12):
        sink.log_stats(table(step, 8), step=step, name="ce", mode="train")
        files.append(sink.spool.path)
        run_id = open_run_id(sink)
        wait_until(lambda: len(rest.history(run_id, "ce/train/0/mean")) == step + 1, what=f"step {step}")
    assert len(set(files)) >= 3  # rotated, every time only once everything in the old file was stored
    wait_until(lambda: sum(p.exists() for p in set(files)) == 1, what="the delivered files to be removed")
    assert files[-1].exists() and files[-1].stat().st_size < 2 * 4000 + 4000  # bounded, not the whole run
    sink.close()
    assert not any(p.exists() for p in set(files)) and not sink.spool_dir.exists()
    assert_exactly_once(rest, run_id, list(range(12)), 8)
    assert rest.run(run_id)["info"]["status"] == "FINISHED"


def test_one_delivery_process_serves_every_sink_of_the_process(mlflow_server, caplog):
    rest = Rest(mlflow_server.url)
    loss = MLflowSink(mlflow_server.url, experiment="shared-child", timeout=TIMEOUT, retry_interval=0.1)
    acc = MLflowSink(mlflow_server.url, experiment="shared-child", timeout=TIMEOUT, retry_interval=0.1)
    assert loss._process.proc is acc._process.proc and loss.spool.path != acc.spool.path
    pid = loss._process.proc.pid
    for step in range(3):
        loss.log_stats(table(step, 5), step=step, name="ce", mode="train")
        acc.log_stats(table(step, 4, offset=100.0), step=step, name="acc", mode="train")
    loss.close()
    assert acc._process.alive()  # closing one sink leaves the child serving the other
    acc.log_stats(table(3, 4, offset=100.0), step=3, name="acc", mode="train")
    acc.close()
    later = MLflowSink(mlflow_server.url, experiment="shared-child", timeout=TIMEOUT)  # a second fit(): no new child
    later.log_stats(table(0, 2), step=0, name="ce", mode="eval")
    assert later._process.proc.pid == pid
    later.close()
    assert_exactly_once(rest, loss.run_id, [0, 1, 2], 5)
    history = rest.history(acc.run_id, "acc/train/0/mean")
    assert [s for s, _ in history] == [0, 1, 2, 3] and history[0][1] == pytest.approx(100.0)
    assert {rest.run(r)["info"]["status"] for r in (loss.run_id, acc.run_id, later.run_id)} == {"FINISHED"}
    assert len({loss.run_id, acc.run_id, later.run_id}) == 3


TWO_KILLED = PRELUDE + """
sinks = [MLflowSink(sys.argv[1], experiment=sys.argv[2], close_timeout=30) for _ in range(2)]
assert sinks[0]._process.proc is sinks[1]._process.proc
for step in range(3):
    for sink in sinks:
        sink.log_stats(table(step, 5), step=step, name="ce", mode="train")
print(json.dumps({"spools": [str(s.spool.path) for s in sinks]}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_training_process_with_two_sinks_gets_both_runs_delivered_and_killed(mlflow_server, tmp_path):
    from labeltrack_log.sinks._spool import Spool

    experiment = f"two-killed-{time.time_ns()}"
    out = subprocess.run([sys.executable, "-c", TWO_KILLED, mlflow_server.url, experiment], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    spools = [Spool(p) for p in json.loads(out.stdout.splitlines()[-1])["spools"]]
    wait_until(lambda: not any(s.exists() or s.busy() for s in spools), 90, "the orphaned delivery process")
    rest = Rest(mlflow_server.url)
    runs = rest.runs_in(experiment)
    assert len(runs) == 2 and {r["info"]["status"] for r in runs} == {"KILLED"}
    for run in runs:
        assert_exactly_once(rest, run["info"]["run_id"], [0, 1, 2], 5)


def _log_in_a_fork_worker(sink, steps):  # runs in a multiprocessing fork worker, with the parent's sink
    for step in steps:
        sink.log_stats(table(step, 3, offset=50.0), step=step, name="worker", mode="train")


@pytest.mark.timeout(180)
def test_a_forked_worker_logging_through_the_parents_sink_loses_nothing(mlflow_server, caplog):
    import multiprocessing

    rest = Rest(mlflow_server.url)
    sink = MLflowSink(mlflow_server.url, experiment="fork", timeout=TIMEOUT, retry_interval=0.1)
    sink.log_stats(table(1, 3), step=1, name="ce", mode="train")
    run_id = open_run_id(sink)  # a fresh delivery process may take a while
    worker = multiprocessing.get_context("fork").Process(target=_log_in_a_fork_worker, args=(sink, [10, 11, 12]))
    worker.start()
    sink.log_stats(table(2, 3), step=2, name="ce", mode="train")  # while the worker logs
    worker.join(60)
    assert worker.exitcode == 0
    for step in (3, 4):
        sink.log_stats(table(step, 3), step=step, name="ce", mode="train")
    sink.close()
    assert sink.delivery == "process"  # the parent never decided its delivery process had died
    assert "exited unexpectedly" not in messages(caplog, logging.ERROR)
    for key, values in expected_values([1, 2, 3, 4], 3).items():
        assert rest.history(run_id, key) == values, key  # the parent lost nothing
    wait_until(lambda: len(rest.history(run_id, "worker/train/2/mean")) == 3, 60, "the worker's values")
    assert rest.history(run_id, "worker/train/2/mean") == [(s, 50.0 + 2 + s / 8) for s in (10, 11, 12)]
    assert rest.run(run_id)["info"]["status"] == "FINISHED"  # the worker, which does not own the run, never ends it
    wait_until(lambda: not sink.spool_dir.exists() or not any(sink.spool_dir.iterdir()), 60, "the worker's spool")


@pytest.mark.timeout(240)
def test_close_with_a_large_backlog_returns_within_close_timeout_and_says_how_to_replay(mlflow_server, caplog):
    rest = Rest(mlflow_server.url)
    sink = MLflowSink(mlflow_server.url, experiment="backlog", timeout=TIMEOUT, close_timeout=1.0, label_budget=2000)
    steps = list(range(8))
    for step in steps:  # 8 steps x 2000 labels: ~80 requests, far more than one second of delivery
        sink.log_stats(table(step, 2000), step=step, name="ce", mode="train")
    took = timed(sink.close)
    spool = sink.spool.path
    assert took < 1.0 + BOUND  # close_timeout plus slack, whatever the backlog
    warning = messages(caplog)
    assert f"labeltrack-log replay {spool}" in warning
    left = int(warning.split("MLflowSink: ")[1].split(" batch(es)")[0])
    assert 0 < left <= len(spool.read_text().splitlines())  # how many wait, counted
    assert replay_spool(spool) == left
    open_run_id(sink)  # close_timeout=1: the delivery process may report the run's id only after close
    for key in ("ce/train/0/mean", "ce/train/1999/max"):
        assert [s for s, _ in rest.history(sink.run_id, key)] == steps, key  # every step once
    assert rest.run(sink.run_id)["info"]["status"] == "FINISHED"
