"""Wall time of a FastEstimator fit with labeltrack-log's LabelTracker against FE's own.

Both runs are the same PyTorch fit on sklearn's digits (examples/fe_torch_digits.py), with the
tracker's arguments at FE's defaults (mode "eval", bounds "std"; change them with --modes/--bounds):

* ours: ``labeltrack_log.fastestimator.LabelTracker`` with TensorBoard + MLflow sinks (a sqlite
  store in the output directory: a new one in each fresh process; in this process, created by the
  cold fit and reused by the warm ones) and the band figure(s) at the end. The MLflow sink runs with
  its default delivery (a delivery process: the training process never imports mlflow; the fit
  includes ``close()`` waiting until everything is delivered);
* FE:   ``fastestimator.trace.xai.LabelTracker`` + ``ImageSaver`` on its output (FE's way to see
  the graph: a plotly/kaleido PNG).

Three comparisons, printed one after the other:

* **cold, fresh processes** (the one that matters: a user runs one fit per script): each side's fit
  runs in its own new Python process, started as ``python bench_fe_trace.py --cold-child ours|fe``
  in a fresh, empty output directory (so ours creates a new ``mlflow.db``: MLflow's import and the
  schema migrations are paid, by the delivery process, on the other core; FE pays the start of
  plotly's kaleido exporter). Sides alternate
  (ours first, then FE first, ...) ``--cold-runs`` times each; medians are compared. Printed per
  process: the wall time from starting the process to its exit (interpreter, imports, the fit,
  exit), and inside it the time to build the estimator and ``fit()``, [inside the traces] and
  {in Python's garbage collector during build + fit}: FE's fit allocates enough for about a dozen
  full collections, whose cost grows with every live object, so what a tracker leaves in memory
  (an imported mlflow + SQLAlchemy store: ~220k objects) slows the whole fit, not only its hooks.
* **cold, in process**: the first fit of each side in this process, after one untimed warm-up fit
  without any tracker (torch, the data loader, FE itself).
* **warm, in process**: later fits in the same process (the store exists, kaleido is running): the
  cost of the tracker itself. Ours and FE's alternate ``--repeats`` times; the fastest of each is
  compared (on a shared machine single fits vary a lot: the fastest is the least disturbed one).

The wall-time ratio ours / FE is the number to watch (target <= 1.0). The time spent inside the
traces themselves (construction + hooks, timed around each call; FE's kaleido runs in a subprocess
and is counted through the ImageSaver call that waits for it) is printed too: it is the overhead
the trackers add, without the noise of the training around it.

    .venv/bin/python benchmarks/bench_fe_trace.py [--epochs 5] [--modes train,eval] [--bounds std,range]
        [--repeats 3] [--cold-runs 3]
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before the heavy imports: a cold child reports its import time

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

import fastestimator as fe  # noqa: E402
from fastestimator.trace.io import ImageSaver  # noqa: E402
from fastestimator.trace.xai import LabelTracker as FELabelTracker  # noqa: E402

import fe_torch_digits  # noqa: E402

from labeltrack_log.fastestimator import LabelTracker  # noqa: E402

_IMPORTED = time.perf_counter()


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


SIDES = {"ours": ours, "fe": theirs}


def cold_child(side: str, epochs: int, modes: list[str], bounds: list[str]) -> None:
    """One fit in this fresh process, in the (empty) current directory; prints its timings as JSON."""
    import gc

    out, in_gc, began = Path.cwd(), [0.0], [0.0]

    def collecting(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            in_gc[0] += time.perf_counter() - began[0]

    gc.callbacks.append(collecting)
    with contextlib.redirect_stdout(io.StringIO()):  # FE prints its progress
        fit, inside = timed_fit(epochs, lambda: SIDES[side](out, modes, bounds))
    gc.callbacks.remove(collecting)
    print(json.dumps({"imports": _IMPORTED - _STARTED, "fit": fit, "inside": inside, "gc": in_gc[0]}))


def cold_processes(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """``args.cold_runs`` fresh processes per side, alternating which side goes first."""
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "fe": []}
    argv = [sys.executable, str(Path(__file__).resolve()), "--epochs", str(args.epochs), "--modes", args.modes,
            "--bounds", args.bounds, "--cold-child"]
    for i in range(args.cold_runs):
        for side in ("ours", "fe") if i % 2 == 0 else ("fe", "ours"):
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                proc = subprocess.run([*argv, side], cwd=out, capture_output=True, text=True, timeout=600)
                wall = time.perf_counter() - start
                if proc.returncode != 0:
                    raise RuntimeError(f"cold {side} fit failed:\n{proc.stderr[-3000:]}")
                runs[side].append({"process": wall, **json.loads(proc.stdout.splitlines()[-1])})
    return runs


def print_cold_processes(runs: dict[str, list[dict[str, float]]], n: int) -> None:
    print(f"  cold, one fit per fresh process ({n} each, alternating): seconds from process start to exit, "
          "(imports), build + fit [inside the traces] {in the garbage collector}")

    def row(r: dict[str, float]) -> str:
        return f"{r['process']:6.2f} ({r['imports']:4.2f}) {r['fit']:6.2f} [{r['inside']:5.2f}] {{{r['gc']:4.2f}}}"

    for i in range(n):
        print(f"    run {i + 1}  ours {row(runs['ours'][i])}   FE {row(runs['fe'][i])}")
    med = {side: {k: statistics.median(r[k] for r in runs[side]) for k in runs[side][0]} for side in runs}
    o, f = med["ours"], med["fe"]
    print(f"    medians  ours {row(o)}   FE {row(f)}")
    print(f"  cold ratio ours / FE (medians): process {o['process'] / f['process']:.2f}, build + fit "
          f"{o['fit'] / f['fit']:.2f}  (target <= 1.0); inside the traces {o['inside'] / f['inside']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--modes", default="eval", help="tracker modes, comma-separated (FE's default: eval)")
    parser.add_argument("--bounds", default="std", help="tracker bounds, comma-separated (FE's default: std)")
    parser.add_argument("--repeats", type=int, default=3, help="warm fits of each (default 3)")
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh processes of each (default 3; 0: none)")
    parser.add_argument("--cold-child", choices=sorted(SIDES), help=argparse.SUPPRESS)  # internal: one cold fit
    args = parser.parse_args()
    modes, bounds = args.modes.split(","), args.bounds.split(",")
    if args.cold_child:
        cold_child(args.cold_child, args.epochs, modes, bounds)
        return
    print(f"FE fit on digits ({args.epochs} epochs, tracker on {'+'.join(modes)}, bounds {'+'.join(bounds)}):")
    print("  ours = labeltrack-log LabelTracker with TensorBoard + MLflow sinks and the figure(s) at the end")
    print("  FE   = FE's LabelTracker + ImageSaver")
    if args.cold_runs:
        print_cold_processes(cold_processes(args), args.cold_runs)
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
    print("  in one process, after a warm-up fit: seconds to build the estimator and fit, "
          "[inside the traces: construction + hooks]")
    for label, (o, f) in [("cold", cold)] + [(f"warm {i + 1}", p) for i, p in enumerate(warm)]:
        print(f"  {label:7s} ours {o[0]:6.2f} [{o[1]:5.2f}]   FE {f[0]:6.2f} [{f[1]:5.2f}]   "
              f"ratio {o[0] / f[0]:.2f} [{o[1] / f[1]:.2f}]")
    best = [min(p[side][0] for p in warm) for side in (0, 1)]
    inside = [statistics.median(p[side][1] for p in warm) for side in (0, 1)]
    print(f"  fit ratio ours / FE in one process: cold {cold[0][0] / cold[1][0]:.2f}; warm, fastest of {args.repeats} "
          f"({best[0]:.2f} / {best[1]:.2f}) {best[0] / best[1]:.2f}  (target <= 1.0)")
    print(f"  time inside the traces, ours / FE: cold {cold[0][1] / cold[1][1]:.2f}; warm, medians "
          f"({inside[0]:.2f} / {inside[1]:.2f}) {inside[0] / inside[1]:.2f}")


if __name__ == "__main__":
    main()
