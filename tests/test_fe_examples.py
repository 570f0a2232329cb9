"""The examples run end to end in a temporary directory and leave what they promise behind."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastestimator")
from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from labeltrack_log.naming import tb_tag  # noqa: E402
from tables import mode_dir  # noqa: E402  (tests/ is on sys.path, see conftest.py)

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
STEPS = math.ceil(int(1797 * 0.78) / 32)  # train batches per epoch: 78% of the 1797 digits, batch 32


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_plain_torch_loop(tmp_path: Path, capsys: pytest.CaptureFixture):
    import plain_torch_loop

    out = tmp_path / "plain"
    plain_torch_loop.main(["--output-dir", str(out), "--epochs", "2", "--sinks", "tensorboard,mlflow,csv"])
    assert "worst class" in capsys.readouterr().out
    for mode in ("train", "eval"):
        assert (out / f"ce_by_digit_{mode}.png").read_bytes()[:4] == b"\x89PNG"
        assert scalar_steps(mode_dir(out / "runs", mode), tb_tag("ce_by_digit", "digit 7", "mean")) == [STEPS, 2 * STEPS]
    with (out / "stats.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10 * 2 * 2 and {r["label_name"] for r in rows} == set(plain_torch_loop.NAMES.values())
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")  # the embedded default, in the output directory
    (run,) = client.search_runs(["0"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "ce_by_digit/eval/digit 7/mean")] == [STEPS, 2 * STEPS]


def test_demo_runs_example_a_on_the_embedded_defaults(tmp_path: Path, capsys: pytest.CaptureFixture):
    import demo

    out = demo.main(["--epochs", "1"])  # output directory: the current one (a tmp dir in tests)
    assert out == tmp_path
    printed = capsys.readouterr().out
    assert ".venv/bin/tensorboard --logdir runs" in printed
    assert ".venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db" in printed
    assert scalar_steps(mode_dir(tmp_path / "runs", "eval"), tb_tag("ce_by_digit", "digit 0", "mean")) == [STEPS]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(["0"])
    assert client.get_metric_history(run.info.run_id, "ce_by_digit/eval/digit 0/mean")[0].step == STEPS
    assert {f.path.split("~")[0] for f in client.list_artifacts(run.info.run_id, "images")} == {
        "images/ce_by_digit_std_band", "images/ce_by_digit_range_band",  # loss and accuracy: one run
        "images/acc_by_digit_std_band", "images/acc_by_digit_range_band"}
    acc = client.get_metric_history(run.info.run_id, "acc_by_digit/train/digit 0/mean")
    assert acc and 0.0 <= acc[-1].value <= 1.0
    assert (tmp_path / "images" / "ce_by_digit_train_epoch_1.png").read_bytes()[:4] == b"\x89PNG"
