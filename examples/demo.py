"""What ``make demo`` runs: FastEstimator + PyTorch on digits with per-class loss and accuracy (train
and eval, one run) in TensorBoard and MLflow (./runs and sqlite:///mlflow.db in the output directory, default: the current one),
plus FE's ImageSaver PNG of the same tracker output. Takes well under a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).parent))

import fe_torch_digits  # noqa: E402


def shown(path: Path) -> str:
    """``path`` relative to the current directory when it lies below it, else absolute."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=".", help="where runs/, mlflow.db, mlruns/ and images/ go")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = fe_torch_digits.main(["--output-dir", args.output_dir, "--epochs", str(args.epochs)])
    images = sorted((out / "images").glob("*.png"))
    print(f"\nlabeltrack-log demo finished in {time.perf_counter() - start:.0f} s. Per-class loss and accuracy were written to:")
    print(f"  TensorBoard event files: {out / 'runs'}")
    print(f"  MLflow (sqlite):         {out / 'mlflow.db'}  (artifacts in {out / 'mlruns'})")
    for image in images:
        print(f"  FE ImageSaver PNG:       {image}")
    print("\nOpen them with (from this directory):")
    bin_dir = shown(Path(sys.executable).parent)
    print(f"  {bin_dir}/tensorboard --logdir {shown(out / 'runs')}")
    print(f"  {bin_dir}/mlflow ui --backend-store-uri sqlite:///{shown(out / 'mlflow.db')}")
    print("then browse http://127.0.0.1:6006 (Scalars, Custom Scalars, Images) and http://127.0.0.1:5000.")
    return out


if __name__ == "__main__":
    main()
