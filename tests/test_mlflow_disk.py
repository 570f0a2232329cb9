"""MLflowSink's spool on a small or full disk, and on an unusable directory (issue 11 items 2, 3, 5).

Real small file systems: tmpfs volumes mounted for the test (needs root / CAP_SYS_ADMIN, skipped
with the reason otherwise) and unmounted afterwards; a real `mlflow server`."""

from __future__ import annotations

import logging
import os
import subprocess
import uuid
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
if os.name != "posix":  # pragma: no cover
    pytest.skip("tmpfs volumes and process delivery need POSIX", allow_module_level=True)

from polling import open_run_id  # noqa: E402
from test_mlflow_delivery import messages, wait_until  # noqa: E402
from test_mlflow_outage import TIMEOUT, Rest, expected_values, table  # noqa: E402

from labeltrack_log import ConfigError  # noqa: E402
from labeltrack_log.sinks.mlflow import MLflowSink  # noqa: E402


@pytest.fixture
def small_disk(tmp_path):
    """Factory: a real tmpfs volume of ``size`` (e.g. "2m") mounted on a fresh directory."""
    mounted: list[Path] = []

    def mount(size: str, options: str = "") -> Path:
        where = tmp_path / f"volume-{len(mounted)}"
        where.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(where)],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs volume here (needs root/CAP_SYS_ADMIN): {out.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(volume: Path) -> Path:
    """Fill ``volume`` to the last byte with a file; returns it."""
    filler = volume / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def spool_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "spool" in r.getMessage()]


def test_a_healthy_server_keeps_the_spool_small_on_a_small_disk(mlflow_server, small_disk, caplog):
    volume = small_disk("2m")
    rest = Rest(mlflow_server.url)
    sink = MLflowSink(mlflow_server.url, experiment="small-disk", timeout=TIMEOUT, retry_interval=0.1,
                      spool_dir=volume / "spool", label_budget=50)
    steps = list(range(200))  # ~18 kB of spool per step: 3.6 MB in all, on a 2 MB volume
    for step in steps:
        sink.log_stats(table(step, 50), step=step, name="ce", mode="train")
        wait_until(lambda: sink.spool.state()["delivered_seq"] >= sink._journaled, 30, f"step {step} delivered")
    sink.close()
    assert spool_errors(caplog) == []  # the disk never filled: delivered data does not accumulate
    run_id = sink.run_id
    for key, values in expected_values(steps, 50).items():
        if key.endswith(("/mean", "/max")) and key.split("/")[2] in ("0", "49"):
            assert rest.history(run_id, key) == values, key
    assert rest.run(run_id)["info"]["status"] == "FINISHED"
    assert not any(volume.iterdir())


@pytest.mark.parametrize("delivery", ["process", "inline"])
def test_a_full_disk_is_reported_once_and_its_batches_are_delivered_from_memory(mlflow_server, small_disk, caplog,
                                                                               delivery):
    volume = small_disk("1m")
    rest = Rest(mlflow_server.url)
    port = mlflow_server.url.rsplit(":", 1)[1]
    # inline delivery spools only while the server is down: point it at a closed port first, then at the server
    url = mlflow_server.url if delivery == "process" else f"http://127.0.0.1:{int(port) ^ 1}"
    sink = MLflowSink(url, experiment=f"full-disk-{uuid.uuid4().hex[:6]}", timeout=TIMEOUT, retry_interval=0.1,
                      spool_dir=volume / "spool", delivery=delivery)
    if delivery == "process":
        open_run_id(sink)
    fill(volume)
    for step in range(5):
        sink.log_stats(table(step, 4), step=step, name="ce", mode="train")
    errors = spool_errors(caplog)
    assert len(errors) == 1 and str(sink.spool.path) in errors[0]  # once, naming the file
    if delivery == "inline":
        sink.tracking_uri = mlflow_server.url  # the server "comes back" (another address, same store)
        sink._client = None
    sink.close()
    assert len(spool_errors(caplog)) == 1, spool_errors(caplog)  # nothing lost: no second error
    (run,) = rest.runs_in(sink.experiment)
    for key, values in expected_values(list(range(5)), 4).items():
        assert rest.history(run["info"]["run_id"], key) == values, key
    assert run["info"]["status"] == "FINISHED"


def test_a_spool_disk_full_when_the_sink_is_built_is_a_config_error(small_disk):
    volume = small_disk("256k")
    (volume / "spool").mkdir()
    fill(volume)
    with pytest.raises(ConfigError, match=r"spool_dir: expected a directory with room for the spool, got .*spool"):
        MLflowSink("http://127.0.0.1:9", experiment="full", spool_dir=volume / "spool", delivery="process")
    assert [p.name for p in (volume / "spool").iterdir()] == []  # no half-written spool for replay to choke on


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_inline_delivery_with_an_unusable_spool_dir_is_a_config_error(tmp_path, small_disk, where):
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        spool_dir = tmp_path / "file" / "spool"
    else:
        spool_dir = small_disk("64k", ",ro") / "spool"
    with pytest.raises(ConfigError, match=r"spool_dir: expected a directory that can be created and written"):
        MLflowSink("http://127.0.0.1:9", experiment="x", spool_dir=spool_dir, delivery="inline", timeout=1)


def test_inline_delivery_leaves_no_spool_dir_behind_when_none_is_needed(mlflow_server, tmp_path):
    with MLflowSink(mlflow_server.url, experiment="clean", spool_dir=tmp_path / "a" / "b", delivery="inline") as sink:
        sink.log_stats(table(0, 2), step=0, name="ce", mode="train")
    assert not (tmp_path / "a").exists()
