"""Optional dependencies stay optional: the core imports nothing heavy, and a missing extra
names the extra to install. Each check runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.core

HEAVY = ("torch", "tensorflow", "mlflow", "fastestimator", "tensorboard")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_core_modules_import_nothing_heavy():
    code = (
        "import sys\n"
        "import labeltrack_log, labeltrack_log.sinks, labeltrack_log.sinks.files, labeltrack_log.naming\n"
        "import labeltrack_log.history, labeltrack_log.figures, labeltrack_log.cli, labeltrack_log.distributed\n"
        "from labeltrack_log import StatsHistory, GroupedStats\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    out = run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "False"]


@pytest.mark.parametrize(
    ("blocked", "code", "extra"),
    [
        ("tensorboard", "from labeltrack_log.sinks.tensorboard import TensorBoardSink; TensorBoardSink('runs')", "tensorboard"),
        ("mlflow", "from labeltrack_log.sinks.mlflow import MLflowSink; MLflowSink()", "mlflow"),
        ("fastestimator", "import labeltrack_log.fastestimator", "fastestimator"),
        ("mlflow", "from labeltrack_log.sinks import make_sinks; make_sinks('mlflow')", "mlflow"),
    ],
)
def test_missing_extra_names_the_extra(blocked: str, code: str, extra: str):
    # Block the package the way an absent install looks to Python (import raises ImportError).
    prelude = f"import sys; sys.modules[{blocked!r}] = None\n"
    check = (
        "from labeltrack_log.errors import MissingExtraError\n"
        "try:\n"
        + "".join(f"    {line}\n" for line in code.split("; "))
        + "except MissingExtraError as err:\n"
        "    print('MISSING', err)\n"
    )
    out = run(prelude + check)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MISSING"), out.stdout + out.stderr
    assert f'pip install "labeltrack-log[{extra}]"' in out.stdout
