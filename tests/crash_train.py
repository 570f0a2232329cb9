"""A real FastEstimator fit (torch, sklearn digits) with the LabelTracker streaming to TensorBoard and
MLflow, that SIGKILLs itself at the start of a chosen training epoch. Run by tests/test_crash.py.

Besides the sinks' own output it writes a record (JSON lines, flushed line by line) that the test
checks the sinks against: one ``epoch_end`` line per finished epoch and mode with FE's global step
and the labels seen in that epoch's batches, the spool path of the MLflow sink, and a ``kill`` line
just before the SIGKILL.

    python tests/crash_train.py RECORD --logdir DIR --tracking-uri URI --experiment NAME
        [--timeout S] [--spool-dir DIR] [--delivery auto|process|inline] [--close-timeout S]
        [--kill-epoch N] [--epochs N] [--subsample N] [--figures N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

import fe_torch_digits  # noqa: E402
import numpy as np  # noqa: E402
from fastestimator.trace.trace import Trace  # noqa: E402

from labeltrack_log.sinks.mlflow import MLflowSink  # noqa: E402
from labeltrack_log.sinks.tensorboard import TensorBoardSink  # noqa: E402


class Record:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a", encoding="utf-8")

    def write(self, **fields) -> None:
        self.file.write(json.dumps(fields) + "\n")
        self.file.flush()  # the process dies by SIGKILL: nothing may wait in a buffer


class KillAtEpoch(Trace):
    """Records what each epoch saw; SIGKILLs the process when training epoch ``epoch`` begins."""

    def __init__(self, epoch: int, record: Record) -> None:
        super().__init__(inputs="y", mode=None)
        self.epoch, self.record = epoch, record
        self.seen: set[int] = set()

    def on_epoch_begin(self, data) -> None:
        self.seen = set()
        if self.system.mode == "train" and self.system.epoch_idx == self.epoch:
            self.record.write(event="kill", epoch=self.system.epoch_idx, step=int(self.system.global_step))
            os.kill(os.getpid(), signal.SIGKILL)

    def on_batch_end(self, data) -> None:
        self.seen.update(np.asarray(data["y"]).reshape(-1).tolist())

    def on_epoch_end(self, data) -> None:
        self.record.write(event="epoch_end", mode=self.system.mode, epoch=self.system.epoch_idx,
                          step=int(self.system.global_step), labels=sorted(self.seen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record")
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--spool-dir", default=None)
    parser.add_argument("--delivery", default="auto")
    parser.add_argument("--close-timeout", type=float, default=60.0)
    parser.add_argument("--kill-epoch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--subsample", type=int, default=300)
    parser.add_argument("--figures", type=int, default=2, help="band figures every N epochs")
    args = parser.parse_args()

    record = Record(args.record)
    mlflow_sink = MLflowSink(tracking_uri=args.tracking_uri, experiment=args.experiment, timeout=args.timeout,
                             spool_dir=args.spool_dir, delivery=args.delivery, close_timeout=args.close_timeout)
    run_id = mlflow_sink.run_id if mlflow_sink.delivery == "inline" else None  # process: created in the background
    record.write(event="start", spool=str(mlflow_sink.spool.path), run_id=run_id)
    estimator, _ = fe_torch_digits.build_estimator(
        epochs=args.epochs, sinks=[TensorBoardSink(args.logdir), mlflow_sink], subsample=args.subsample,
        tracker_mode=["train", "eval"], figures=args.figures, extra_traces=[KillAtEpoch(args.kill_epoch, record)])
    estimator.fit()
    record.write(event="finished")  # never reached: the test fails if it is


if __name__ == "__main__":
    main()
