"""Wall time of a FastEstimator fit with labeltrack-log's LabelTracker against FE's own.

Both runs are the same PyTorch fit on sklearn's digits (examples/fe_torch_digits.py), with the
tracker's arguments at FE's defaults (mode "eval", bounds "std"; change them with --modes/--bounds):

* ours: ``labeltrack_log.fastestimator.LabelTracker`` with TensorBoard + MLflow sinks (one
  sqlite store, created by the cold fit) and the band figure(s) at the end;
* FE:   ``fastestimator.trace.xai.LabelTracker`` + ``ImageSaver`` on its output (FE's way to see
  the graph: a plotly/kaleido PNG).

Timed: building the estimator (the trace and its sinks included) and ``fit()``, side by side in one
process after one untimed warm-up fit without any tracker (torch, the data loader, FE itself):

* cold: the first fit of each in the process: ours pays MLflow's import and the creation of a
  fresh sqlite store (schema migrations), FE pays the start of plotly's kaleido exporter;
* warm: later fits in the same process (the store exists, kaleido is running): the cost of the
  tracker itself, as in every run after the first one. Ours and FE's alternate ``--repeats`` times.

The wall-time ratio ours / FE is the number to watch (target <= 1.0); on a shared machine single fits
vary a lot, so the warm comparison uses the fastest of ``--repeats`` fits (the least disturbed one).
The time spent inside the traces themselves (construction + hooks, timed around each call; FE's
kaleido runs in a subprocess and is counted through the ImageSaver call that waits for it) is
printed too: it is the overhead the trackers add, without the noise of the training around it.

    .venv/bin/python benchmarks/bench_fe_trace.py [--epochs 5] [--modes train,eval] [--bounds std,range]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

import fastestimator as fe  # noqa: E402
from fastestimator.trace.io import ImageSaver  # noqa: E402
from fastestimator.trace.xai import LabelTracker as FELabelTracker  # noqa: E402

import fe_torch_digits  # noqa: E402

from labeltrack_log.fastestimator import LabelTracker  # noqa: E402


def fe_estimator(epochs: int, traces: list) -> fe.Estimator:
    """The example's data and network (a fresh model) with the given traces."""
    example, _ = fe_torch_digits.build_estimator(epochs=epochs, sinks=[], figures=None)
    return fe.Estimator(pipeline=example.pipeline, network=example.network, epochs=epochs, traces=traces, log_steps=0)


HOOKS = ("on_begin", "on_epoch_begin", "on_batch_begin", "on_batch_end", "on_epoch_end", "on_end")


def instrument(traces: list, spent: list[float]) -> None:
    """Add the time spent in every hook of ``traces`` to ``spent[0]``."""
    for trace in traces:
        for hook in HOOKS:
            def timed(data, _hook=getattr(trace, hook)):
                start = time.perf_counter()
                try:
                    _hook(data)
                finally:
                    spent[0] += time.perf_counter() - start
            setattr(trace, hook, timed)


def timed_fit(epochs: int, make_traces) -> tuple[float, float]:
    """(seconds to build the estimator and fit, seconds inside the traces: construction and hooks)."""
    start = time.perf_counter()
    traces = make_traces()
    spent = [time.perf_counter() - start]
    instrument(traces, spent)
    fe_estimator(epochs, traces).fit()
    return time.perf_counter() - start, spent[0]


def ours(out: Path, modes: list[str], bounds: list[str]) -> list:
    sinks = [{"type": "tensorboard", "logdir": str(out / "runs")},
             {"type": "mlflow", "tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}]
    return [LabelTracker(label="y", metric="sample_ce", mode=modes, bounds=bounds, outputs="ce_by_digit",
                         sinks=sinks, figures="end")]


def theirs(out: Path, modes: list[str], bounds: list[str]) -> list:
    return [FELabelTracker(label="y", metric="sample_ce", mode=modes, bounds=bounds, outputs="ce_by_digit"),
            ImageSaver(inputs="ce_by_digit", save_dir=str(out))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--modes", default="eval", help="tracker modes, comma-separated (FE's default: eval)")
    parser.add_argument("--bounds", default="std", help="tracker bounds, comma-separated (FE's default: std)")
    parser.add_argument("--repeats", type=int, default=3, help="warm fits of each (default 3)")
    args = parser.parse_args()
    modes, bounds = args.modes.split(","), args.bounds.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)  # MLflow's artifacts (./mlruns) land in the temporary directory
        with contextlib.redirect_stdout(io.StringIO()):  # FE prints its progress
            fe_estimator(1, []).fit()  # warm-up: torch, the data loader, FE itself

            def pair() -> tuple:
                return (timed_fit(args.epochs, lambda: ours(root, modes, bounds)),
                        timed_fit(args.epochs, lambda: theirs(root, modes, bounds)))

            cold = pair()
            warm = [pair() for _ in range(args.repeats)]
        os.chdir("/")
    print(f"FE fit on digits ({args.epochs} epochs, tracker on {'+'.join(modes)}, bounds {'+'.join(bounds)}):")
    print("  ours = labeltrack-log LabelTracker with TensorBoard + MLflow sinks and the figure(s) at the end")
    print("  FE   = FE's LabelTracker + ImageSaver")
    print("  seconds to build the estimator and fit, and [inside the traces: construction + hooks]")
    for label, (o, f) in [("cold", cold)] + [(f"warm {i + 1}", p) for i, p in enumerate(warm)]:
        print(f"  {label:7s} ours {o[0]:6.2f} [{o[1]:5.2f}]   FE {f[0]:6.2f} [{f[1]:5.2f}]   "
              f"ratio {o[0] / f[0]:.2f} [{o[1] / f[1]:.2f}]")
    best = [min(p[side][0] for p in warm) for side in (0, 1)]
    inside = [statistics.median(p[side][1] for p in warm) for side in (0, 1)]
    print(f"  fit ratio ours / FE: cold {cold[0][0] / cold[1][0]:.2f}; warm, fastest of {args.repeats} "
          f"({best[0]:.2f} / {best[1]:.2f}) {best[0] / best[1]:.2f}  (target <= 1.0)")
    print(f"  time inside the traces, ours / FE: cold {cold[0][1] / cold[1][1]:.2f}; warm, medians "
          f"({inside[0]:.2f} / {inside[1]:.2f}) {inside[0] / inside[1]:.2f}")


if __name__ == "__main__":
    main()
