"""FastEstimator + PyTorch on sklearn's digits: per-class loss and accuracy in TensorBoard and MLflow.

The only labeltrack-log lines are the import and the ``LabelTracker(...)`` calls: they take FE's
LabelTracker arguments plus ``sinks=``. Their FE output still feeds FE's ``ImageSaver``. The two
trackers (loss and accuracy by class, train and eval) share one run: one MLflow run, one
TensorBoard run with one Custom Scalars layout.

Run (everything is written under the output directory, default: the current one)::

    .venv/bin/python examples/fe_torch_digits.py --output-dir /tmp/digits --epochs 5
    .venv/bin/tensorboard --logdir /tmp/digits/runs
    .venv/bin/mlflow ui --backend-store-uri sqlite:////tmp/digits/mlflow.db   # artifacts: /tmp/digits/mlruns
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import fastestimator as fe  # noqa: E402
import torch  # noqa: E402
from fastestimator.op.tensorop import LambdaOp  # noqa: E402
from fastestimator.op.tensorop.loss import CrossEntropy  # noqa: E402
from fastestimator.op.tensorop.model import ModelOp, UpdateOp  # noqa: E402
from fastestimator.trace.io import ImageSaver  # noqa: E402

from labeltrack_log.fastestimator import LabelTracker  # noqa: E402

DIGIT_NAMES = {f"digit {i}": i for i in range(10)}  # FE's label_mapping: {DisplayName: LabelValue}


def digits_data(subsample: int | None = None, seed: int = 0) -> tuple[fe.dataset.NumpyDataset, fe.dataset.NumpyDataset]:
    """sklearn's 8x8 digits (no download) as FE train/eval datasets (x: 64 floats in [0, 1], y: int)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    if subsample:
        order = order[:subsample]
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)
    cut = int(len(y) * 0.78)
    return (fe.dataset.NumpyDataset({"x": x[:cut], "y": y[:cut]}),
            fe.dataset.NumpyDataset({"x": x[cut:], "y": y[cut:]}))


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def build_estimator(*, epochs: int = 3, sinks: Any = ("tensorboard", "mlflow"), subsample: int | None = None,
                    batch_size: int = 32, image_dir: str | None = None, tracker_mode: Any = "eval",
                    label_mapping: dict | None = None, bounds: Any = "std", figures: Any = "end",
                    extra_traces: Sequence[Any] = (), accuracy: bool = False) -> tuple[fe.Estimator, LabelTracker]:
    """The FE estimator of this example, and its loss tracker (tests reuse this with other settings).
    ``accuracy``: also track per-sample accuracy by class (``acc_by_digit``), into the same sinks."""
    train, evaluation = digits_data(subsample)
    pipeline = fe.Pipeline(train_data=train, eval_data=evaluation, batch_size=batch_size)
    model = fe.build(model_fn=mlp, optimizer_fn="adam")
    network = fe.Network(ops=[
        ModelOp(model=model, inputs="x", outputs="y_pred"),
        CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True),
        CrossEntropy(inputs=("y_pred", "y"), outputs="sample_ce", from_logits=True, average_loss=False),
        UpdateOp(model=model, loss_name="ce"),
        *([LambdaOp(fn=lambda y_pred, y: (torch.argmax(y_pred, dim=-1) == y).float(), inputs=("y_pred", "y"),
                    outputs="sample_acc")] if accuracy else []),  # 1.0 where the class is right
    ])
    tracker = LabelTracker(label="y", metric="sample_ce", label_mapping=label_mapping, bounds=bounds,
                           mode=tracker_mode, outputs="ce_by_digit", sinks=list(sinks), figures=figures)
    traces: list[Any] = [tracker, *extra_traces]
    if accuracy:  # a second tracker, same sinks: same MLflow run, same TensorBoard run and layout
        traces.append(LabelTracker(label="y", metric="sample_acc", label_mapping=label_mapping, bounds=bounds,
                                   mode=tracker_mode, outputs="acc_by_digit", sinks=list(sinks), figures=figures))
    if image_dir is not None:
        traces.append(ImageSaver(inputs="ce_by_digit", save_dir=image_dir))
    estimator = fe.Estimator(pipeline=pipeline, network=network, epochs=epochs, traces=traces, log_steps=0)
    return estimator, tracker


@contextlib.contextmanager
def working_dir(path: Path) -> Iterator[None]:
    """Run in ``path``, so the sinks' defaults (./runs, sqlite:///mlflow.db, ./mlruns) land there."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=".", help="where runs/, mlflow.db, mlruns/ and images/ go")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--subsample", type=int, default=None, help="use only this many digits (faster)")
    args = parser.parse_args(argv)
    out = Path(args.output_dir).absolute()
    (out / "images").mkdir(parents=True, exist_ok=True)
    with working_dir(out):
        estimator, _ = build_estimator(epochs=args.epochs, subsample=args.subsample, image_dir=str(out / "images"),
                                       label_mapping=DIGIT_NAMES, bounds=["std", "range"],
                                       tracker_mode=["train", "eval"], accuracy=True)
        estimator.fit()
    return out


if __name__ == "__main__":
    main()
