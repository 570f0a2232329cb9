"""Several training processes started at once on one fresh sqlite store (issue 10 item 3).

Each process builds two MLflowSinks on the default store (``./mlflow.db`` in the shared working
directory), so up to six deliverers create and migrate the store's schema at the same moment. A
real race on a real sqlite file: every value of every sink must arrive, every run FINISHED."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("mlflow")

N_PROCESSES = 3
STEPS, LABELS = 3, 4

WORKER = """
import json, os, sys, time
import numpy as np
from labeltrack_log import StatsTable
from labeltrack_log.sinks.mlflow import MLflowSink

worker, go = int(sys.argv[1]), sys.argv[2]
while not os.path.exists(go):  # start together
    time.sleep(0.005)

def table(step, offset):
    labels = np.arange(%(labels)d)
    mean = labels + step / 8 + offset
    return StatsTable(labels, np.full(labels.size, 3), mean, np.full(labels.size, 0.5), mean - 1, mean + 1,
                      np.zeros(labels.size, dtype=int))

sinks = [MLflowSink(experiment="race", run_name=f"w{worker}-{i}", timeout=30, retry_interval=0.1,
                    delivery=sys.argv[3]) for i in range(2)]
for step in range(%(steps)d):
    for i, sink in enumerate(sinks):
        sink.log_stats(table(step, 100 * worker + 10 * i), step=step, name="ce" if i == 0 else "acc", mode="train")
for sink in sinks:
    sink.close()
print(json.dumps([sink.run_id for sink in sinks]))
""" % {"labels": LABELS, "steps": STEPS}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("delivery", ["process", "inline"])
def test_processes_creating_one_fresh_sqlite_store_at_once_lose_nothing(tmp_path, delivery):
    from mlflow import MlflowClient

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(w), str(go), delivery], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(N_PROCESSES)]
    time.sleep(3.0)  # let every worker import and reach the start line (a start signal, not a wait for a result)
    go.touch()
    results = []
    for p in procs:
        try:
            results.append(p.communicate(timeout=180))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in results]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for worker, (out, err) in enumerate(results):
        run_ids = json.loads(out.splitlines()[-1])
        assert all(run_ids), err[-3000:]
        for i, run_id in enumerate(run_ids):
            run = client.get_run(run_id)
            assert run.info.run_name == f"w{worker}-{i}"
            assert run.info.status == "FINISHED", err[-3000:]
            name = "ce" if i == 0 else "acc"
            for label in range(LABELS):
                history = client.get_metric_history(run_id, f"{name}/train/{label}/mean")
                got = sorted((m.step, m.value) for m in history)
                assert got == [(s, label + s / 8 + 100 * worker + 10 * i) for s in range(STEPS)], err[-3000:]
    assert not (tmp_path / "labeltrack-spool").exists()  # nothing left waiting for a replay
