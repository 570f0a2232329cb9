"""FastEstimator + TensorFlow on sklearn's digits: the same as fe_torch_digits.py, TF backend.

The tracker line is identical for both backends: the trace reads TF and torch tensors alike.

    .venv/bin/python examples/fe_tf_digits.py --output-dir /tmp/digits-tf --epochs 5
    .venv/bin/tensorboard --logdir /tmp/digits-tf/runs
    .venv/bin/mlflow ui --backend-store-uri sqlite:////tmp/digits-tf/mlflow.db
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))

import fastestimator as fe  # noqa: E402
import tensorflow as tf  # noqa: E402
from fastestimator.op.tensorop.loss import CrossEntropy  # noqa: E402
from fastestimator.op.tensorop.model import ModelOp, UpdateOp  # noqa: E402
from fastestimator.trace.io import ImageSaver  # noqa: E402
from fe_torch_digits import DIGIT_NAMES, digits_data, working_dir  # noqa: E402

from labeltrack_log.fastestimator import LabelTracker  # noqa: E402


def mlp() -> tf.keras.Model:
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(64,)),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(10),
    ])


def build_estimator(*, epochs: int = 3, sinks: Any = ("tensorboard", "mlflow"), subsample: int | None = None,
                    batch_size: int = 32, image_dir: str | None = None, tracker_mode: Any = "eval",
                    label_mapping: dict | None = None, bounds: Any = "std", figures: Any = "end",
                    extra_traces: Sequence[Any] = ()) -> tuple[fe.Estimator, LabelTracker]:
    """The FE estimator of this example (TensorFlow backend), and its tracker."""
    train, evaluation = digits_data(subsample)
    pipeline = fe.Pipeline(train_data=train, eval_data=evaluation, batch_size=batch_size)
    model = fe.build(model_fn=mlp, optimizer_fn="adam")
    network = fe.Network(ops=[
        ModelOp(model=model, inputs="x", outputs="y_pred"),
        CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True),
        CrossEntropy(inputs=("y_pred", "y"), outputs="sample_ce", from_logits=True, average_loss=False),
        UpdateOp(model=model, loss_name="ce"),
    ])
    tracker = LabelTracker(label="y", metric="sample_ce", label_mapping=label_mapping, bounds=bounds,
                           mode=tracker_mode, outputs="ce_by_digit", sinks=list(sinks), figures=figures)
    traces: list[Any] = [tracker, *extra_traces]
    if image_dir is not None:
        traces.append(ImageSaver(inputs="ce_by_digit", save_dir=image_dir))
    estimator = fe.Estimator(pipeline=pipeline, network=network, epochs=epochs, traces=traces, log_steps=0)
    return estimator, tracker


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
                                       label_mapping=DIGIT_NAMES, bounds=["std", "range"])
        estimator.fit()
    return out


if __name__ == "__main__":
    main()
