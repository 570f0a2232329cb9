"""MLflowSink with inline delivery (``delivery="inline"``: requests from the training process) when
the server goes away: bounded calls, an in-order spool, exactly-once replay (in-process and with
`labeltrack-log replay`), lost answers, a hung server; and four processes at once (default delivery).
The same failures with process delivery (the default): tests/test_mlflow_delivery.py.

Everything runs against real `mlflow server` processes (killed with SIGKILL for an outage), a real
TCP proxy that drops chosen answers, and a real socket that never answers. No mocks, no sleeps."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlflow")
requests = pytest.importorskip("requests")

import servers  # noqa: E402
from labeltrack_log import StatsTable  # noqa: E402
from labeltrack_log.naming import SUMMARY, mlflow_key  # noqa: E402
from labeltrack_log.sinks.mlflow import MLflowSink  # noqa: E402

STATS = ("mean", "std", "min", "max", "count")
AGGREGATES = ("macro_mean", "worst_mean", "best_mean", "spread", "num_labels", "nonfinite")
TIMEOUT = 2.0
BOUND = TIMEOUT + 3.0  # slack for a loaded machine; MLflow's defaults would block for 120-250 s


# ------------------------------------------------------------------------- helpers
class Rest:
    """Read-back through the server's REST API (one keep-alive session)."""

    def __init__(self, url: str) -> None:
        self.url, self.session = url, requests.Session()

    def get(self, endpoint: str, **params) -> dict:
        r = self.session.get(f"{self.url}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
        r.raise_for_status()
        return r.json()

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        data = self.get("metrics/get-history", run_id=run_id, metric_key=key, max_results=25000)
        assert not data.get("next_page_token")
        return [(int(m["step"]), float(m["value"])) for m in data.get("metrics", [])]

    def run(self, run_id: str) -> dict:
        return self.get("runs/get", run_id=run_id)["run"]

    def keys(self, run_id: str) -> set[str]:
        return {m["key"] for m in self.run(run_id)["data"].get("metrics", [])}

    def images(self, run_id: str) -> list[str]:
        return sorted(f["path"] for f in self.get("artifacts/list", run_id=run_id, path="images").get("files", []))

    def runs_in(self, experiment: str) -> list[dict]:
        exp = self.get("experiments/get-by-name", experiment_name=experiment)["experiment"]
        r = self.session.post(f"{self.url}/api/2.0/mlflow/runs/search", json={"experiment_ids": [exp["experiment_id"]]},
                              timeout=30)
        r.raise_for_status()
        return r.json().get("runs", [])


def table(step: int, n_labels: int, offset: float = 0.0) -> StatsTable:
    """A deterministic table whose values encode (offset, label, step)."""
    labels = np.arange(n_labels)
    mean = offset + labels + step / 8
    return StatsTable(labels, np.full(n_labels, 3), mean, np.full(n_labels, 0.5), mean - 1, mean + 1,
                      np.zeros(n_labels, dtype=int))


def expected_values(steps: list[int], n_labels: int, offset: float = 0.0) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] for every per-label metric (aggregates checked for steps only)."""
    want: dict[str, list[tuple[int, float]]] = {}
    for step in steps:
        t = table(step, n_labels, offset)
        for i in range(n_labels):
            for stat in STATS:
                value = float(getattr(t, stat)[i])
                want.setdefault(mlflow_key("ce", "train", str(i), stat), []).append((step, value))
    return want


def assert_exactly_once(rest: Rest, run_id: str, steps: list[int], n_labels: int, offset: float = 0.0) -> None:
    want = expected_values(steps, n_labels, offset)
    summary = {mlflow_key("ce", "train", SUMMARY, a) for a in AGGREGATES}
    assert rest.keys(run_id) == set(want) | summary
    for key, values in want.items():
        assert rest.history(run_id, key) == values, key  # every step once, in step order, right value
    for key in summary:
        assert [s for s, _ in rest.history(run_id, key)] == steps, key


def png_steps(paths: list[str]) -> list[int]:
    return sorted(int(p.split("+step+")[1].split("+")[0]) for p in paths if p.endswith(".png"))


def figure(step: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2), dpi=40)
    fig.add_subplot().plot([0, step])
    return fig


def timed(call, *args, **kwargs) -> float:
    start = time.monotonic()
    call(*args, **kwargs)
    return time.monotonic() - start


def warnings_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


class FaultyProxy:
    """A real TCP proxy in front of a server. While ``down``, it closes every new connection at once
    (the server looks down). Otherwise requests reach the server; while ``drop`` is a path fragment,
    the answer to a request whose path contains it is thrown away and the client's connection closed:
    the batch is stored, but the client cannot know it."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.drop: str | None = None
        self.down = False
        self.dropped: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            state = {"path": ""}
            threading.Thread(target=self._requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client, state), daemon=True).start()

    @staticmethod
    def _requests(src: socket.socket, dst: socket.socket, state: dict) -> None:
        try:
            while data := src.recv(65536):
                if data.split(b" ", 1)[0] in (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD"):
                    state["path"] = data.split(b" ", 2)[1].decode("latin-1")
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def _answers(self, src: socket.socket, dst: socket.socket, state: dict) -> None:
        try:
            while data := src.recv(65536):
                if self.drop and self.drop in state["path"]:
                    self.dropped.append(state["path"])
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (dst, src):
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the other pump; close() alone would not
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self.server.close()


# --------------------------------------------------------------------------- tests
def test_outage_mid_training_every_value_arrives_exactly_once(tmp_path, caplog):
    root, n_labels = tmp_path / "server", 210  # 1056 metrics per step: two requests
    server = servers.mlflow_server(root)
    try:
        rest = Rest(server.url)
        sink = MLflowSink(server.url, experiment="outage", timeout=TIMEOUT, retry_interval=0, label_budget=n_labels,
                          spool_dir=tmp_path / "spool", delivery="inline")

        def log(step: int) -> None:
            assert timed(sink.log_stats, table(step, n_labels), step=step, name="ce", mode="train") < BOUND
            assert timed(sink.log_figure, figure(step), step=step, name="ce_band", mode="train") < BOUND

        for step in range(3):
            log(step)
        assert not sink.spool.path.exists()
        server.kill()
        for step in range(3, 6):
            log(step)
        assert len(sink.spool.path.read_text().splitlines()) == 3 * 3  # 2 metrics batches + 1 image per step
        assert str(sink.spool.path) in warnings_text(caplog)
        server = servers.mlflow_server(root, port=server.port)
        for step in range(6, 8):
            log(step)  # the first call replays the spool, in order, before its own batches
        assert timed(sink.close) < 60
        assert not sink.spool.path.exists()  # all delivered: the spool is gone
        assert_exactly_once(rest, sink.run_id, list(range(8)), n_labels)
        assert png_steps(rest.images(sink.run_id)) == list(range(8))
        assert rest.run(sink.run_id)["info"]["status"] == "FINISHED"
    finally:
        server.stop()


def test_lost_answers_are_not_delivered_twice(mlflow_server):
    proxy = FaultyProxy(mlflow_server.port)
    rest = Rest(mlflow_server.url)
    try:
        sink = MLflowSink(proxy.url, experiment="lost-answers", timeout=TIMEOUT, retry_interval=0, delivery="inline")
        sink.log_stats(table(0, 4), step=0, name="ce", mode="train")
        proxy.drop = "/runs/set-tag"  # the last request of log_image: PNG and thumbnail are stored
        sink.log_figure(figure(1), step=1, name="ce_band", mode="train")
        proxy.drop = "/runs/log-batch"
        sink.log_stats(table(1, 4), step=1, name="ce", mode="train")  # replays the image, then loses this answer
        proxy.drop = None
        sink.flush()
        sink.close()
        assert [p.rsplit("/", 1)[-1] for p in proxy.dropped] == ["set-tag", "log-batch"]  # the faults happened
        assert_exactly_once(rest, sink.run_id, [0, 1], 4)
        assert png_steps(rest.images(sink.run_id)) == [1]
        assert rest.run(sink.run_id)["info"]["status"] == "FINISHED"
    finally:
        proxy.close()


def test_run_created_when_the_server_comes_back(mlflow_server):
    proxy = FaultyProxy(mlflow_server.port)
    rest = Rest(mlflow_server.url)
    experiment = f"late-in-process-{time.time_ns()}"
    try:
        proxy.down = True
        sink = MLflowSink(proxy.url, experiment=experiment, timeout=TIMEOUT, retry_interval=0, delivery="inline")
        assert sink.run_id is None
        for step in range(2):
            assert timed(sink.log_stats, table(step, 3), step=step, name="ce", mode="train") < BOUND
        assert len(sink.spool.path.read_text().splitlines()) == 3  # create run + 2 batches
        proxy.down = False
        sink.log_stats(table(2, 3), step=2, name="ce", mode="train")  # creates the run, replays, logs
        assert sink.run_id is not None and not sink.spool.path.exists()
        sink.close()
        (run,) = rest.runs_in(experiment)
        assert run["info"]["run_id"] == sink.run_id and run["info"]["status"] == "FINISHED"
        assert_exactly_once(rest, sink.run_id, [0, 1, 2], 3)
    finally:
        proxy.close()


def test_a_rejected_batch_is_spooled_and_replayable_once_fixed(mlflow_server, caplog):
    from mlflow import MlflowClient
    from labeltrack_log.sinks.mlflow import replay_spool

    rest, client = Rest(mlflow_server.url), MlflowClient(mlflow_server.url)
    sink = MLflowSink(mlflow_server.url, experiment="rejected", timeout=TIMEOUT, retry_interval=0, delivery="inline")
    sink.log_stats(table(0, 3), step=0, name="ce", mode="train")
    client.delete_run(sink.run_id)  # someone deletes the run mid-training: the server answers 400
    sink.log_stats(table(1, 3), step=1, name="ce", mode="train")  # does not raise
    client.restore_run(sink.run_id)
    sink.log_stats(table(2, 3), step=2, name="ce", mode="train")  # stays behind the rejected batch, in order
    sink.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "rejected" in errors[0] and str(sink.spool.path) in errors[0]
    assert f"labeltrack-log replay {sink.spool.path}" in warnings_text(caplog)
    assert [s for s, _ in rest.history(sink.run_id, "ce/train/0/mean")] == [0]  # nothing else yet
    assert replay_spool(sink.spool.path) == 3  # step 1, step 2, end of run
    assert replay_spool(sink.spool.path) == 0
    assert_exactly_once(rest, sink.run_id, [0, 1, 2], 3)
    assert rest.run(sink.run_id)["info"]["status"] == "FINISHED"


def test_hung_server_blocks_no_call_longer_than_the_timeout(tmp_path, caplog):
    hung = socket.create_server(("127.0.0.1", 0), backlog=64)  # accepts connections, never answers
    try:
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        start = time.monotonic()
        sink = MLflowSink(url, experiment="hung", timeout=1, retry_interval=0, spool_dir=tmp_path / "spool",
                          delivery="inline")
        assert time.monotonic() - start < 4  # one request, cut off after 1 s (MLflow's default: 120 s)
        for step in range(2):
            assert timed(sink.log_stats, table(step, 3), step=step, name="ce", mode="train") < 4
        assert timed(sink.close) < 4
        assert sink.spool.path.exists()
        assert f"labeltrack-log replay {sink.spool.path}" in warnings_text(caplog)
    finally:
        hung.close()


def replay_cli(spool: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "labeltrack-log"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "labeltrack_log.cli"]
    return subprocess.run([*argv, "replay", str(spool)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


def test_server_down_from_the_start_then_replayed_by_the_cli(tmp_path, caplog):
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    sink = MLflowSink(url, experiment="late", run_name="late-run", timeout=TIMEOUT, spool_dir=tmp_path / "spool",
                      delivery="inline")
    assert time.monotonic() - start < BOUND and sink.run_id is None
    for step in range(3):
        assert timed(sink.log_stats, table(step, 5), step=step, name="ce", mode="train") < BOUND
    assert timed(sink.log_figure, figure(2), step=2, name="ce_band", mode="train") < BOUND
    assert timed(sink.close) < BOUND
    spool = sink.spool.path
    lines = spool.read_text().splitlines()
    assert len(lines) == 1 + 3 + 1 + 1  # create run, 3 metrics batches, image, end run
    text = warnings_text(caplog)
    assert str(spool) in text and f"labeltrack-log replay {spool}" in text

    server = servers.mlflow_server(tmp_path / "server", port=port)
    try:
        first = replay_cli(spool)
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines()[-1] == f"replayed {len(lines)} batch(es) from {spool}"  # MLflow prints the run URL
        rest = Rest(url)
        (run,) = rest.runs_in("late")
        run_id = run["info"]["run_id"]
        assert run["info"]["run_name"] == "late-run" and run["info"]["status"] == "FINISHED"
        assert_exactly_once(rest, run_id, [0, 1, 2], 5)
        assert png_steps(rest.images(run_id)) == [2]

        again = replay_cli(spool)
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines()[-1] == f"replayed 0 batch(es) from {spool}"
        assert len(rest.runs_in("late")) == 1
        assert_exactly_once(rest, run_id, [0, 1, 2], 5)
    finally:
        server.stop()


def test_replay_of_a_missing_spool_or_down_server_is_a_clear_cli_error(tmp_path):
    out = replay_cli(tmp_path / "nope.jsonl")
    assert out.returncode == 2 and "does not exist" in out.stderr
    sink = MLflowSink(f"http://127.0.0.1:{servers.free_port()}", experiment="x", timeout=TIMEOUT,
                      spool_dir=tmp_path / "spool", delivery="inline")
    sink.close()
    out = replay_cli(sink.spool.path)
    assert out.returncode == 2 and "did not answer" in out.stderr and "2 batch(es) remain" in out.stderr


WORKER = """
import sys
sys.path.insert(0, {tests!r})
from test_mlflow_outage import table
from labeltrack_log.sinks.mlflow import MLflowSink
url, worker = sys.argv[1], int(sys.argv[2])
with MLflowSink(url, experiment="concurrent", run_name=f"worker-{{worker}}", label_budget=60) as sink:
    for step in range(5):
        sink.log_stats(table(step, 60, offset=1000.0 * worker), step=step, name="ce", mode="train")
print(sink.run_id, int(sink.spool.path.exists()))
"""


def test_four_processes_log_to_one_server_at_once(mlflow_server, tmp_path):
    code = WORKER.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = []
    for worker in range(4):
        cwd = tmp_path / f"worker{worker}"
        cwd.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", code, mlflow_server.url, str(worker)], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    rest = Rest(mlflow_server.url)
    run_ids = []
    for worker, (out, _) in enumerate(results):
        run_id, backlog = out.splitlines()[-1].split()  # MLflow prints the run URL before
        assert backlog == "0"
        run_ids.append(run_id)
        assert rest.run(run_id)["info"]["run_name"] == f"worker-{worker}"
        assert_exactly_once(rest, run_id, list(range(5)), 60, offset=1000.0 * worker)  # nothing lost or mixed
    assert len(set(run_ids)) == 4
