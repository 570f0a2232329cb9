"""What a new user meets first (issue 10, item 7): every file the README links to is in the
repository (and not ignored by git), the sink classes import from ``labeltrack_log.sinks``
without importing tensorboard or mlflow, and the README names the tags the sinks write."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tables import mode_dir

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")  # markdown links and images: ](target)
LINKS = sorted({m for m in LINK.findall(README) if not re.match(r"[a-z]+:", m)})


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_readme_links_to_files():
    assert len(LINKS) >= 7 and all(not link.startswith("/") for link in LINKS), LINKS


@pytest.mark.parametrize("link", LINKS)
def test_every_file_the_readme_links_to_exists_and_is_not_ignored(link):
    path = ROOT / link
    assert path.is_file(), f"README links to {link}, which is not in the repository"
    assert path.stat().st_size > 0
    if shutil.which("git") and (ROOT / ".git").exists():
        assert git("check-ignore", "-q", link).returncode == 1, f"{link} is ignored by .gitignore"


@pytest.mark.skipif(not shutil.which("git") or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_gitignore_keeps_docs_images_but_ignores_the_image_sinks_default_directory():
    assert git("check-ignore", "-q", "docs/images/new_screenshot.png").returncode == 1
    assert git("check-ignore", "-q", "images/ce_by_y_eval_step_3.png").returncode == 0  # ImageDirSink's default


def test_sink_classes_import_from_the_package_without_importing_their_backends():
    code = textwrap.dedent("""
        import sys
        import labeltrack_log.sinks as sinks
        heavy = [m for m in ("tensorboard", "mlflow") if m in sys.modules]
        assert not heavy, heavy
        from labeltrack_log.sinks import CSVSink, JSONLSink, ImageDirSink
        assert not [m for m in ("tensorboard", "mlflow") if m in sys.modules]
        from labeltrack_log.sinks import TensorBoardSink, MLflowSink
        from labeltrack_log.sinks.tensorboard import TensorBoardSink as T
        from labeltrack_log.sinks.mlflow import MLflowSink as M
        assert TensorBoardSink is T and MLflowSink is M
        assert {"TensorBoardSink", "MLflowSink", "CSVSink", "JSONLSink", "ImageDirSink"} <= set(dir(sinks))
        assert set(sinks.__all__) >= {"TensorBoardSink", "MLflowSink", "CSVSink", "JSONLSink", "ImageDirSink"}
        try:
            sinks.NoSuchSink
        except AttributeError as err:
            assert "NoSuchSink" in str(err)
        else:
            raise AssertionError("expected AttributeError")
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_readme_shows_the_sink_imports():
    assert "from labeltrack_log.sinks import TensorBoardSink, MLflowSink, CSVSink, JSONLSink, ImageDirSink" in README


def test_the_readme_names_the_tensorboard_image_tag_the_sink_writes(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from labeltrack_log import Tracker

    with Tracker("ce_by_y", sinks={"type": "tensorboard", "logdir": str(tmp_path)}, bounds=("std", "range")) as tr:
        tr.update(np.array([0, 1, 1]), np.array([0.5, 1.0, 2.0]), mode="eval")
        tr.end_epoch(1)
    acc = EventAccumulator(str(mode_dir(tmp_path, "eval")))
    acc.Reload()
    tags = set(acc.Tags()["images"])
    assert tags == {"ce_by_y_std_band/figure", "ce_by_y_range_band/figure"}
    assert "`<name>_<bound>_band/figure`" in README
    for tag in tags:
        assert f"`{tag}`" in README
