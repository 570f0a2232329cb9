"""Shared fixtures: real servers (see servers.py) and a clean environment for every test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")

import servers  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "core: runs with only numpy + matplotlib installed (numpy 2.x env)")


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never write into the checkout: each runs in its own temporary directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LABELTRACK_SINKS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One real `mlflow server` (sqlite backend, local artifact root) for the whole session."""
    proc = servers.mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield proc
    proc.stop()


@pytest.fixture
def tensorboard_server(tmp_path: Path):
    """Factory: start a real `tensorboard` server on a logdir; stopped after the test."""
    started: list[servers.ServerProcess] = []

    def start(logdir: Path) -> servers.ServerProcess:
        proc = servers.tensorboard_server(logdir, tmp_path / f"tensorboard-{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
