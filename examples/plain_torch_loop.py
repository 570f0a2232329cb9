"""labeltrack-log without FastEstimator: per-class loss in a plain PyTorch loop.

A ``Tracker`` does the bookkeeping: per batch, feed it the labels and the per-sample loss
(``reduction="none"``) of a mode; per epoch, ``end_epoch(step)`` sends each mode's table to the
sinks; when the ``with`` block ends, the band figures go to the sinks and the sinks are closed.

    .venv/bin/python examples/plain_torch_loop.py --output-dir /tmp/plain --epochs 5
    .venv/bin/tensorboard --logdir /tmp/plain/runs
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from labeltrack_log import StatsHistory, Tracker  # noqa: E402
from labeltrack_log.figures import band_figure  # noqa: E402

NAMES = {i: f"digit {i}" for i in range(10)}  # label value -> display name


def digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.int64)
    cut = int(len(y) * 0.78)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def train(output_dir: Path, epochs: int = 5, sinks: Sequence[str] = ("tensorboard", "mlflow"),
          batch_size: int = 32) -> StatsHistory:
    """Train a small MLP on digits, tracking per-class loss in train and eval; returns the history.

    Sinks are created in the current directory; the figures are saved in ``output_dir``.
    """
    torch.manual_seed(0)
    x_train, y_train, x_eval, y_eval = digits()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    per_sample = nn.CrossEntropyLoss(reduction="none")

    # The sinks' defaults (./runs, sqlite:///mlflow.db, ./mlruns) land in the working directory.
    files = {"csv": {"type": "csv", "path": "stats.csv"}, "jsonl": {"type": "jsonl", "path": "stats.jsonl"}}
    with Tracker("ce_by_digit", sinks=[files.get(name, name) for name in sinks], label_names=NAMES) as tracker:
        step = 0
        for _ in range(epochs):
            model.train()
            for i in range(0, len(y_train), batch_size):
                x, y = x_train[i:i + batch_size], y_train[i:i + batch_size]
                loss = per_sample(model(x), y)
                optimizer.zero_grad()
                loss.mean().backward()
                optimizer.step()
                step += 1
                tracker.update(y, loss.detach(), mode="train")  # torch tensors go in as they are
            model.eval()
            with torch.no_grad():
                for i in range(0, len(y_eval), batch_size):
                    x, y = x_eval[i:i + batch_size], y_eval[i:i + batch_size]
                    tracker.update(y, per_sample(model(x), y), mode="eval")
            tracker.end_epoch(step)  # both modes: history, sinks, flush

    for mode in ("train", "eval"):  # the same figure the sinks got, also as a file
        band_figure(tracker.history, name="ce_by_digit", mode=mode, label_names=NAMES).savefig(
            output_dir / f"ce_by_digit_{mode}.png")
    return tracker.history


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=".", help="where runs/, mlflow.db and the PNG files go")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sinks", default="tensorboard,mlflow", help="comma-separated: tensorboard, mlflow, csv, jsonl")
    args = parser.parse_args(argv)
    out = Path(args.output_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(out)
    try:
        history = train(out, epochs=args.epochs, sinks=[s.strip() for s in args.sinks.split(",") if s.strip()])
    finally:
        os.chdir(cwd)
    latest = history.latest("ce_by_digit", "eval")
    worst = latest.labels[np.nanargmax(latest.mean)].item()
    print(f"eval loss by digit after {args.epochs} epochs: worst class {NAMES[worst]} (mean {np.nanmax(latest.mean):.3f})")
    return out


if __name__ == "__main__":
    main()
