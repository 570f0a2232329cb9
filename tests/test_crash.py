"""A training process killed with SIGKILL keeps everything logged at its completed epochs.

A real FastEstimator fit (tests/crash_train.py: torch, sklearn digits, train + eval) streams through
the LabelTracker to a TensorBoardSink and an MLflowSink and SIGKILLs itself when training epoch 4
begins: no close(), no atexit, no buffer flushed at exit. Band figures are drawn every 2nd epoch, so
the last completed epoch (3) ends with small stats writes only: a sink that leaves them in a buffer
(a figure's large write would push them out) loses them, and these tests catch it. The child also
writes its own record of each finished epoch (FE's global step, the labels its batches held), which
the sinks' output is checked against. Read back through a real `tensorboard` server and the event
files, a real `mlflow server`'s REST API, the spool file and the `labeltrack-log replay` command.
The last test is the other way a fit dies: an op raises mid-epoch, FE calls no `on_end`, and the
MLflow run must still end FAILED (read from the sqlite store). No mocks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastestimator")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tables import mode_dir  # noqa: E402  (tests/ is on sys.path, see conftest.py)
from polling import wait_for  # noqa: E402
from test_mlflow_outage import Rest  # noqa: E402

from labeltrack_log.naming import SUMMARY, STATS, figure_name, mlflow_key, tb_item_tag, tb_tag  # noqa: E402
from labeltrack_log.sinks import AGGREGATES  # noqa: E402
from labeltrack_log.sinks._spool import Spool  # noqa: E402

NAME = "ce_by_digit"  # the tracker's output name in tests/crash_train.py (examples/fe_torch_digits.py)
MODES = ("train", "eval")
TB_STATS = (*STATS, "mean-std", "mean+std")
FIGURE = figure_name(NAME, "std")  # bounds="std": one band figure per mode at each figure epoch
FIGURES_EVERY = 2  # figures at epoch 2 only: epoch 3, the last completed one, has stats only
KILL_EPOCH = 4  # killed when training epoch 4 begins: epochs 1-3 (train and eval) are complete
HERE = Path(__file__).parent


# ------------------------------------------------------------------------ the crash
@dataclass
class Crash:
    logdir: Path
    spool: Path
    run_id: str | None  # the MLflow run the sink created (None: the server was down)
    steps: dict[str, list[int]]  # mode -> FE's global step at each completed epoch
    figure_steps: dict[str, list[int]]  # mode -> steps of the completed epochs with a band figure
    labels: dict[str, dict[str, list[int]]]  # mode -> label text -> steps of the epochs whose batches held it


def crash_fit(tmp_path: Path, tracking_uri: str, experiment: str, spool_dir: Path, delivery: str,
              timeout: float = 5.0, close_timeout: float = 60.0) -> Crash:
    """Run tests/crash_train.py until it kills itself at the start of training epoch KILL_EPOCH.
    With process delivery, return once the orphaned delivery process has finished too."""
    cwd, record = tmp_path / "child", tmp_path / "record.jsonl"
    cwd.mkdir()
    argv = [sys.executable, str(HERE / "crash_train.py"), str(record), "--logdir", str(tmp_path / "runs"),
            "--tracking-uri", tracking_uri, "--experiment", experiment, "--timeout", str(timeout),
            "--delivery", delivery, "--close-timeout", str(close_timeout),
            "--spool-dir", str(spool_dir), "--kill-epoch", str(KILL_EPOCH), "--epochs", str(KILL_EPOCH + 2),
            "--figures", str(FIGURES_EVERY), "--subsample", "300"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "3", "MPLBACKEND": "Agg"}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    ends = [line for line in lines if line["event"] == "epoch_end"]
    assert lines[0]["event"] == "start"
    assert lines[-1] == {"event": "kill", "epoch": KILL_EPOCH, "step": ends[-1]["step"]}  # killed right after
    assert [(e["epoch"], e["mode"]) for e in ends] == [(epoch, mode) for epoch in range(1, KILL_EPOCH)
                                                       for mode in MODES]
    steps = {mode: [e["step"] for e in ends if e["mode"] == mode] for mode in MODES}
    assert steps["train"] == steps["eval"] and 0 < steps["train"][0] and np.all(np.diff(steps["train"]) > 0)
    figure_steps = {mode: [e["step"] for e in ends if e["mode"] == mode and e["epoch"] % FIGURES_EVERY == 0]
                    for mode in MODES}
    assert figure_steps["train"] and figure_steps["train"][-1] < steps["train"][-1]  # the last epoch has none
    labels: dict[str, dict[str, list[int]]] = {mode: {} for mode in MODES}
    for e in ends:
        for label in e["labels"]:
            labels[e["mode"]].setdefault(str(label), []).append(e["step"])
    assert all(len(labels[mode]) >= 5 for mode in MODES)  # a multi-label check, not a one-label one
    spool = Spool(lines[0]["spool"])
    wait_for(lambda: spool.busy(), lambda busy: not busy, "the delivery process to finish", close_timeout + 60)
    run_dir = mode_dir(tmp_path / "runs", "train").parent  # the training run's own TensorBoard run directory
    return Crash(run_dir, spool.path, lines[0]["run_id"], steps, figure_steps, labels)


# ------------------------------------------------------------------- TensorBoard
Series = dict[str, dict[str, list[tuple[int, float]]]]  # mode -> tag or key -> [(step, value)]


def get(url: str, path: str, **params):
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
        return json.loads(r.read())


def expected_tags(crash: Crash, mode: str) -> dict[str, list[int]]:
    """TensorBoard tag -> steps it must hold."""
    want = {tb_tag(NAME, label, stat): steps for label, steps in crash.labels[mode].items() for stat in TB_STATS}
    want.update({tb_tag(NAME, SUMMARY, agg): crash.steps[mode] for agg in AGGREGATES})
    return want


def tb_from_server(url: str, crash: Crash) -> tuple[Series, dict[str, list[int]]]:
    """Every scalar of the tracked name and the figure steps, through the tensorboard server's HTTP API."""
    scalars: Series = {}
    images: dict[str, list[int]] = {}
    for mode in MODES:
        want = expected_tags(crash, mode)
        tags = wait_for(lambda: get(url, "/data/plugin/scalars/tags")[mode], lambda t: set(want) <= set(t),
                        f"the {mode} scalar tags")
        assert {t for t in tags if t.startswith(NAME + "/")} == set(want)
        scalars[mode] = {}
        for tag, steps in want.items():
            points = wait_for(lambda: get(url, "/data/plugin/scalars/scalars", run=mode, tag=tag),
                              lambda p: len(p) >= len(steps), f"{mode}:{tag}")
            scalars[mode][tag] = [(int(step), float(value)) for _, step, value in points]
        entries = wait_for(lambda: get(url, "/data/plugin/images/images", run=mode, sample=0,
                                       tag=tb_item_tag(FIGURE, "figure")),
                           lambda e: len(e) >= len(crash.figure_steps[mode]), f"the {mode} figures")
        images[mode] = [e["step"] for e in entries]
    return scalars, images


def tb_from_files(logdir: Path) -> tuple[Series, dict[str, list[int]]]:
    """The same, read from the event files with tensorboard's EventAccumulator."""
    scalars: Series = {}
    images: dict[str, list[int]] = {}
    for mode in MODES:
        acc = EventAccumulator(str(logdir / mode), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        scalars[mode] = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]
                         if t.startswith(NAME + "/")}
        images[mode] = [im.step for im in acc.Images(tb_item_tag(FIGURE, "figure"))]
    return scalars, images


def check_tensorboard(tb: tuple[Series, dict[str, list[int]]], crash: Crash) -> None:
    """Every label of every completed epoch, every statistic, and each figure drawn: once each."""
    scalars, images = tb
    for mode in MODES:
        want = expected_tags(crash, mode)
        assert set(scalars[mode]) == set(want), mode
        for tag, steps in want.items():
            assert [s for s, _ in scalars[mode][tag]] == steps, (mode, tag)
            assert all(np.isfinite(v) for _, v in scalars[mode][tag]), (mode, tag)
        assert images[mode] == crash.figure_steps[mode], mode


# ------------------------------------------------------------------------ MLflow
def tb_key(mlflow_key_: str) -> str:
    """The TensorBoard tag of the same value as an MLflow key ``<name>/<mode>/<label>/<stat>``."""
    _, _, label, stat = mlflow_key_.split("/")
    return tb_tag(NAME, SUMMARY if label == SUMMARY else label, stat)  # the reserved aggregate is told by its type


def expected_keys(crash: Crash) -> dict[str, list[int]]:
    """MLflow metric key -> steps it must hold."""
    want = {mlflow_key(NAME, mode, label, stat): steps
            for mode in MODES for label, steps in crash.labels[mode].items() for stat in STATS}
    want.update({mlflow_key(NAME, mode, SUMMARY, agg): crash.steps[mode] for mode in MODES for agg in AGGREGATES})
    return want


def check_same_as_tensorboard(values: dict[str, list[tuple[int, float]]], tb: Series, crash: Crash) -> None:
    """MLflow (or the spool) holds every key at each completed step exactly once, with TensorBoard's
    value (TensorBoard stores float32, MLflow float64: compared after rounding to float32)."""
    want = expected_keys(crash)
    assert set(values) == set(want)
    for key, steps in want.items():
        got = sorted(values[key])
        assert [s for s, _ in got] == steps, key  # each step exactly once
        mode = key.split("/")[1]
        assert [np.float32(v) for _, v in got] == [np.float32(v) for _, v in tb[mode][tb_key(key)]], key


def rest_values(rest: Rest, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {key: rest.history(run_id, key) for key in rest.keys(run_id)}


def figure_steps(keys_and_steps: list[tuple[str, int]]) -> dict[str, list[int]]:
    """mode -> steps of the band figure, from (MLflow image key with '~' or '/', step) pairs."""
    out: dict[str, list[int]] = {mode: [] for mode in MODES}
    for key, step in keys_and_steps:
        name, mode, item = key.replace("~", "/").split("/")
        assert (name, item) == (FIGURE, "figure"), key
        out[mode].append(step)
    return {mode: sorted(steps) for mode, steps in out.items()}


def rest_figure_steps(rest: Rest, run_id: str) -> dict[str, list[int]]:
    pngs = [p[len("images/"):].split("+") for p in rest.images(run_id) if p.endswith(".png")]
    assert all(parts[1] == "step" for parts in pngs), pngs
    return figure_steps([(parts[0], int(parts[2])) for parts in pngs])


def replay_cli(spool: Path, url: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "labeltrack-log"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "labeltrack_log.cli"]
    return subprocess.run([*argv, "replay", str(spool), "--tracking-uri", url], capture_output=True, text=True,
                          timeout=120, cwd=spool.parent, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


# ------------------------------------------------------------------------- tests
@pytest.mark.parametrize("delivery", ["process", "inline"])
def test_sigkill_keeps_completed_epochs_in_tensorboard_and_mlflow(tmp_path, mlflow_server, tensorboard_server,
                                                                 delivery):
    experiment = f"crash-{uuid.uuid4().hex[:8]}"
    crash = crash_fit(tmp_path, mlflow_server.url, experiment, spool_dir=tmp_path / "spool", delivery=delivery)

    tb = tb_from_server(tensorboard_server(crash.logdir).url, crash)  # what a user opening TensorBoard sees
    check_tensorboard(tb, crash)
    assert tb == tb_from_files(crash.logdir)  # and nothing else is in the event files

    rest = Rest(mlflow_server.url)
    (run,) = rest.runs_in(experiment)
    run_id = run["info"]["run_id"]
    if delivery == "inline":
        assert run["info"]["status"] == "RUNNING"  # never closed: the honest state of a killed run
        assert run_id == crash.run_id
    else:  # the delivery process outlived the training process, delivered everything and said so
        assert run["info"]["status"] == "KILLED"
    check_same_as_tensorboard(rest_values(rest, run_id), tb[0], crash)
    assert rest_figure_steps(rest, run_id) == crash.figure_steps  # each figure drawn, once
    assert not crash.spool.exists()  # the server was up: everything went straight to it


@pytest.mark.parametrize("delivery", ["process", "inline"])
def test_sigkill_with_mlflow_down_leaves_completed_epochs_in_the_spool_for_replay(tmp_path, mlflow_server, delivery):
    experiment = f"crash-down-{uuid.uuid4().hex[:8]}"
    spool_dir = tmp_path / "spool"
    with socket.socket() as held:  # bound, never listening: connections are refused for the whole run,
        held.bind(("127.0.0.1", 0))  # and no other server can take the port meanwhile
        down = f"http://127.0.0.1:{held.getsockname()[1]}"
        crash = crash_fit(tmp_path, down, experiment, spool_dir=spool_dir, delivery=delivery, timeout=1,
                          close_timeout=2)
    assert crash.run_id is None

    tb = tb_from_files(crash.logdir)
    check_tensorboard(tb, crash)

    assert sorted(spool_dir.iterdir()) == [crash.spool]  # one spool, no cursor: nothing was delivered
    ops = [json.loads(line) for line in crash.spool.read_text(encoding="utf-8").splitlines()]  # every line whole
    assert [op["seq"] for op in ops] == list(range(len(ops)))
    assert ops[0]["kind"] == "create_run" and ops[0]["experiment"] == experiment and ops[0]["tracking_uri"] == down
    n_epochs, n_figures = KILL_EPOCH - 1, len(crash.figure_steps["train"])
    assert Counter(op["kind"] for op in ops[1:]) == {"metrics": 2 * n_epochs, "image": 2 * n_figures}  # no end_run
    spooled: dict[str, list[tuple[int, float]]] = {}
    for op in ops:
        for key, value, _, step in op.get("metrics", []):
            spooled.setdefault(key, []).append((step, np.nan if value is None else value))
    check_same_as_tensorboard(spooled, tb[0], crash)
    assert figure_steps([(op["key"], op["step"]) for op in ops if op["kind"] == "image"]) == crash.figure_steps

    # the server is back (here: another one, named on the command line): replay delivers everything once
    out = replay_cli(crash.spool, mlflow_server.url)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == f"replayed {len(ops)} batch(es) from {crash.spool}"
    rest = Rest(mlflow_server.url)
    (run,) = rest.runs_in(experiment)
    assert run["info"]["status"] == "RUNNING"  # the spool holds no end of run: the process never ended it
    run_id = run["info"]["run_id"]
    delivered = rest_values(rest, run_id)
    check_same_as_tensorboard(delivered, tb[0], crash)
    assert {k: sorted(v) for k, v in delivered.items()} == {k: sorted(v) for k, v in spooled.items()}
    assert rest_figure_steps(rest, run_id) == crash.figure_steps


# --------------------------------------------------------------- an exception out of fit()
RAISES_IN_FIT = """
import sys
sys.path.insert(0, {examples!r})
import fastestimator as fe
from fastestimator.op.tensorop import LambdaOp
from fastestimator.op.tensorop.loss import CrossEntropy
from fastestimator.op.tensorop.model import ModelOp, UpdateOp
from fe_torch_digits import digits_data, mlp
from labeltrack_log.fastestimator import LabelTracker

uri, experiment = sys.argv[1], sys.argv[2]
train, evaluation = digits_data(300)
steps = -(-len(train) // 32)  # training steps per epoch


class Diverges:
    # a network op that raises at its ``at``-th call (the warmup calls it once): mid-epoch 2
    def __init__(self, at):
        self.calls, self.at = 0, at

    def __call__(self, y):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("loss diverged")
        return y


model = fe.build(model_fn=mlp, optimizer_fn="adam")
network = fe.Network(ops=[
    ModelOp(model=model, inputs="x", outputs="y_pred"),
    CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True),
    CrossEntropy(inputs=("y_pred", "y"), outputs="sample_ce", from_logits=True, average_loss=False),
    LambdaOp(fn=Diverges(1 + steps + 3), inputs="y", outputs="y_checked", mode="train"),
    UpdateOp(model=model, loss_name="ce"),
])
tracker = LabelTracker(label="y", metric="sample_ce", mode=["train", "eval"], outputs="ce_by_digit",
                       sinks=[{{"type": "mlflow", "tracking_uri": uri, "experiment": experiment}}])
estimator = fe.Estimator(pipeline=fe.Pipeline(train_data=train, eval_data=evaluation, batch_size=32),
                         network=network, epochs=3, traces=[tracker], log_steps=0)
print("steps", steps, flush=True)
estimator.fit()  # raises in epoch 2: FE never calls the trace's on_end
print("not reached")
"""


@pytest.mark.timeout(300)
def test_an_exception_out_of_fit_ends_the_mlflow_run_failed(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    script = RAISES_IN_FIT.format(examples=str(Path(__file__).parents[1] / "examples"))
    out = subprocess.run([sys.executable, "-c", script, uri, "fit-raises"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=240, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert out.returncode == 1 and "RuntimeError: loss diverged" in out.stderr, out.stderr[-3000:]
    assert "not reached" not in out.stdout
    steps = int(out.stdout.split("steps ")[1].split()[0])
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fit-raises").experiment_id])
    assert run.info.status == "FAILED"  # not KILLED: the training did not stop from outside, it raised
    history = client.get_metric_history(run.info.run_id, mlflow_key("ce_by_digit", "train", SUMMARY, "num_labels"))
    assert [m.step for m in history] == [steps]  # epoch 1 was delivered, epoch 2 never ended
