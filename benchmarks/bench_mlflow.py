"""MLflowSink vs a naive ``mlflow.log_metric`` loop vs raw chunked ``MlflowClient.log_batch``.

Workload (issue 3): 1,000 labels x 5 statistics x 20 steps = 100,000 values, against the embedded
sqlite store and against a local ``mlflow server`` over HTTP (started by this script, stopped after).

- naive: ``mlflow.log_metric(key, value, step=step)`` once per value, in a fluent run. At 2-26 ms a
  value the full 100,000 would take 4-40 minutes, so it is timed on ``--naive-values`` values
  (an equal slice of every step, after 20 untimed warm-up calls) and **extrapolated per value** to
  the full workload (the output says so).
- raw: what a careful user writes: build ``Metric`` objects and call ``client.log_batch`` in
  chunks of 1,000 (the server's per-request limit).
- sink: ``MLflowSink(label_budget=1000).log_stats(table, step=...)`` with inline delivery (the
  requests run in the calling thread, so the timing is the sink's own request cost); it also writes
  6 aggregate metrics per step (5,006 values per step, not 5,000).
- sink, process delivery (the default for a run the sink creates): the time the training thread
  spends in ``log_stats`` (appending to the spool), and the wall time until ``close()`` returns with
  everything delivered by the delivery process (its start-up, ``import mlflow``, included).

Raw, sink and the naive slice alternate step by step, each into its own run, so machine load hits
all three alike. Run
creation and ending are outside the timings. Targets: sink >= 25x faster than naive, and within
1.5x of raw log_batch.

Run: .venv/bin/python benchmarks/bench_mlflow.py [--labels 1000] [--steps 20] [--naive-values 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric  # noqa: E402

from labeltrack_log import StatsTable  # noqa: E402
from labeltrack_log.sinks.mlflow import MLflowSink  # noqa: E402

STATS = ("mean", "std", "min", "max", "count")


def make_tables(labels: int, steps: int, seed: int = 0) -> list[StatsTable]:
    rng = np.random.default_rng(seed)
    out = []
    for step in range(steps):
        mean = rng.random(labels) + 1.0 / (step + 1)
        std = rng.random(labels) / 10
        out.append(StatsTable(np.arange(labels), rng.integers(50, 150, labels), mean, std, mean - 2 * std,
                              mean + 2 * std, np.zeros(labels, dtype=int)))
    return out


def values_of(table: StatsTable) -> list[tuple[str, float]]:
    """(key, value) pairs a user would log for one step, with simple f-string keys."""
    out = []
    for i, lab in enumerate(table.labels.tolist()):
        for stat in STATS:
            out.append((f"ce/train/{lab}/{stat}", float(getattr(table, stat)[i])))
    return out


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError("mlflow server did not start within 90 s")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def bench_backend(label: str, uri: str, tables: list[StatsTable], naive_values: int) -> dict[str, float]:
    client = MlflowClient(uri)
    exp = client.create_experiment(f"bench-{label}-{time.time_ns()}")
    total = sum(len(t) for t in tables) * len(STATS)

    # Per step, alternating: raw chunked log_batch, the sink, then a slice of the naive loop (fluent
    # log_metric per value, into its own run) -- so machine load hits all three alike.
    raw_run = client.create_run(exp, run_name="raw").info.run_id
    sink = MLflowSink(uri, experiment_id=exp, run_name="sink", label_budget=len(tables[0]), close_timeout=600,
                      delivery="inline")
    mlflow.set_tracking_uri(uri)  # the naive user's own code; the sink never does this
    mlflow.start_run(experiment_id=exp, run_name="naive")
    for key, value in values_of(tables[0])[:20]:  # warm-up, untimed
        mlflow.log_metric(key + "/warmup", value, step=0)
    per_step = max(1, naive_values // len(tables))
    raw_time = sink_time = naive_time = 0.0
    naive_n = 0
    for step, table in enumerate(tables):
        start = time.perf_counter()
        ts = int(time.time() * 1000)
        metrics = [Metric(k, v, ts, step) for k, v in values_of(table)]
        for i in range(0, len(metrics), 1000):
            client.log_batch(raw_run, metrics=metrics[i:i + 1000], synchronous=True)
        raw_time += time.perf_counter() - start

        start = time.perf_counter()
        sink.log_stats(table, step=step, name="ce", mode="train")
        sink_time += time.perf_counter() - start

        subset = values_of(table)[step * per_step:(step + 1) * per_step]
        start = time.perf_counter()
        for key, value in subset:
            mlflow.log_metric(key, value, step=step)
        naive_time += time.perf_counter() - start
        naive_n += len(subset)
    mlflow.end_run()
    naive_per_value = naive_time / naive_n
    spooled = len(sink._backlog)
    start = time.perf_counter()
    sink.close()  # delivers anything the per-call budget pushed to the spool (counted below)
    close_time = time.perf_counter() - start if spooled else 0.0
    client.set_terminated(raw_run)

    # the default label budget (100): per-label metrics for 100 labels + aggregates + a CSV artifact
    small = MLflowSink(uri, experiment_id=exp, run_name="sink-budget-100")
    start = time.perf_counter()
    for step, table in enumerate(tables):
        small.log_stats(table, step=step, name="ce", mode="train")
    budget_time = time.perf_counter() - start
    small.close()

    # process delivery: what the training thread pays, and how long until everything is stored
    start = time.perf_counter()
    proc_sink = MLflowSink(uri, experiment=client.get_experiment(exp).name, run_name="sink-process",
                           label_budget=len(tables[0]), close_timeout=600)
    in_calls = 0.0
    for step, table in enumerate(tables):
        t0 = time.perf_counter()
        proc_sink.log_stats(table, step=step, name="ce", mode="train")
        in_calls += time.perf_counter() - t0
    proc_sink.close()
    end_to_end = time.perf_counter() - start
    assert proc_sink.delivery == "process" and not proc_sink.spool.path.exists()
    return {"total": total, "naive_per_value": naive_per_value, "naive_n": naive_n, "raw": raw_time,
            "sink": sink_time + close_time, "spooled": spooled, "budget100": budget_time,
            "process_calls": in_calls, "process_total": end_to_end}


def report(label: str, r: dict[str, float], steps: int) -> None:
    naive_total = r["naive_per_value"] * r["total"]
    print(f"\n== {label}: {int(r['total']):,} values ({int(r['total']) // steps:,} per step x {steps} steps)")
    print(f"naive mlflow.log_metric : {r['naive_per_value'] * 1e3:7.2f} ms/value, timed on {int(r['naive_n'])} values, "
          f"EXTRAPOLATED to {naive_total:8.1f} s for all {int(r['total']):,}")
    print(f"raw chunked log_batch   : {r['raw']:8.2f} s  ({r['raw'] / steps * 1e3:.0f} ms/step)")
    print(f"MLflowSink.log_stats    : {r['sink']:8.2f} s  ({r['sink'] / steps * 1e3:.0f} ms/step"
          + (f"; {int(r['spooled'])} batches went over the per-call budget and were delivered by close()" if r["spooled"] else "")
          + ")")
    print(f"  sink vs naive : {naive_total / r['sink']:6.1f}x faster   (target >= 25x)")
    print(f"  sink / raw    : {r['sink'] / r['raw']:6.2f}x            (target <= 1.5x)")
    print(f"  default label_budget=100 (100 labels + aggregates + CSV table artifact): {r['budget100']:.2f} s")
    print(f"MLflowSink, process delivery: {r['process_calls']:.2f} s inside log_stats in the training thread "
          f"({r['process_calls'] / steps * 1e3:.0f} ms/step); {r['process_total']:.2f} s from construction until close() "
          f"returned with everything delivered ({naive_total / r['process_total']:.1f}x faster than naive end to end)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--naive-values", type=int, default=300)
    args = parser.parse_args()
    tables = make_tables(args.labels, args.steps)
    tmp = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    try:
        os.chdir(tmp)  # the embedded store's artifacts and any spool stay in the temp dir
        sqlite = bench_backend("sqlite", f"sqlite:///{tmp / 'mlflow.db'}", tables, args.naive_values)
        report("embedded sqlite", sqlite, args.steps)
        proc, url = start_server(tmp / "server")
        try:
            http = bench_backend("http", url, tables, args.naive_values)
        finally:
            stop_server(proc)
        report(f"mlflow server over HTTP ({url}, sqlite backend, --workers 1)", http, args.steps)
    finally:
        os.chdir("/")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
