"""Band figures vs FastEstimator's visualize_logs, side by side in one run.

FastEstimator's side is what its LabelTracker + ImageSaver do at the end of training: one
``Summary`` per label whose history holds a ``ValWithError(mean - std, mean, mean + std)`` per
step under the key ``"<metric> ($\\mu \\pm \\sigma$)"``, drawn by
``fastestimator.summary.logs.log_plot.visualize_logs`` (plotly + kaleido) to a PNG. Ours is
``band_figure`` + ``figure_to_png`` on a StatsHistory holding the same numbers, both fresh and
with a reused ``BandFigure`` (what a training loop does every epoch). Both sides are warmed up
first (FE's first call starts kaleido); times are medians of ``--repeat`` runs, with a
garbage collection before each run (outside the timing).

Targets: >= 3x faster than FE for 10 labels x 20 steps including PNG encoding; PNG <= 300 KB;
<= 1.5 s for 1,000 labels x 20 steps.

Run: MLFLOW_DISABLE_TELEMETRY=true .venv/bin/python benchmarks/bench_figures.py [--repeat 5] [--fe-1000]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from labeltrack_log import StatsHistory, StatsTable  # noqa: E402
from labeltrack_log.figures import BandFigure, band_figure, figure_to_png  # noqa: E402

STEPS_PER_EPOCH = 100


def make_data(num_labels: int, epochs: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-label mean/std/min/max/count per epoch: decreasing losses with noise, a few hard labels."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(1.5, 2.5, num_labels)
    floor = rng.gamma(2.0, 0.08, num_labels)
    floor[rng.random(num_labels) < 0.1] += 0.7
    e = np.arange(1, epochs + 1)
    mean = floor[:, None] + (start - floor)[:, None] * np.exp(-e[None, :] / rng.uniform(2, 6, num_labels)[:, None])
    mean *= rng.lognormal(0, 0.03, mean.shape)
    std = mean * 0.8
    return {"mean": mean, "std": std, "min": np.maximum(mean - 2 * std, 0.0), "max": mean + 3 * std,
            "count": np.full(mean.shape, 100), "steps": e * STEPS_PER_EPOCH}


def to_history(data: dict[str, np.ndarray], upto: int | None = None) -> StatsHistory:
    history = StatsHistory()
    labels = np.arange(data["mean"].shape[0])
    for j, step in enumerate(data["steps"][:upto]):
        history.append(
            StatsTable(labels, data["count"][:, j], data["mean"][:, j], data["std"][:, j], data["min"][:, j],
                       data["max"][:, j], np.zeros(len(labels), dtype=np.int64)),
            step=int(step), name="ce", mode="eval",
        )
    return history


def to_fe_summaries(data: dict[str, np.ndarray]) -> list:
    """The Summary objects FE's LabelTracker hands to ImageSaver (bounds='std')."""
    from fastestimator.summary.summary import Summary, ValWithError

    key = "ce ($\\mu \\pm \\sigma$)"
    summaries = []
    for i in range(data["mean"].shape[0]):
        summary = Summary(name=str(i))
        for j, step in enumerate(data["steps"]):
            mean, std = float(data["mean"][i, j]), float(data["std"][i, j])
            summary.history["eval"][key][int(step)] = ValWithError(mean - std, mean, mean + std)
        summaries.append(summary)
    return summaries


def timed(cases: dict[str, Callable[[], int]], repeat: int) -> dict[str, tuple[float, float, int]]:
    """Per case: one warm-up call (FE: starts kaleido), then the median and the minimum seconds
    of ``repeat`` calls and the last call's PNG size. A full garbage collection runs before every timed call,
    outside the timing (figures are cyclic garbage; this keeps GC pauses out of both sides)."""
    results = {}
    for name, fn in cases.items():
        size = fn()
        times = []
        for _ in range(repeat):
            gc.collect()
            t0 = time.perf_counter()
            size = fn()
            times.append(time.perf_counter() - t0)
        results[name] = (statistics.median(times), min(times), size)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--fe-1000", action="store_true", help="also time FE on 1,000 labels (slow)")
    args = parser.parse_args()
    from fastestimator.summary.logs.log_plot import visualize_logs

    tmp = Path(tempfile.mkdtemp(prefix="bench-figures-"))

    def fe(summaries: list) -> Callable[[], int]:
        def run() -> int:
            path = tmp / "fe.png"
            visualize_logs(summaries, save_path=str(path), verbose=False)
            return path.stat().st_size
        return run

    def ours_fresh(history: StatsHistory) -> Callable[[], int]:
        return lambda: len(figure_to_png(band_figure(history)))

    def ours_reused(data: dict[str, np.ndarray]) -> Callable[[], int]:
        # A training loop: one BandFigure, drawn again after every epoch. Time the last epoch's
        # draw + PNG (the renderer has drawn the previous epochs already).
        renderer = BandFigure()
        partial = to_history(data, upto=len(data["steps"]) - 1)
        renderer.draw(partial)
        full = to_history(data)
        return lambda: len(figure_to_png(renderer.draw(full)))

    small = make_data(10, 20)
    big = make_data(1000, 20, seed=1)
    cases = {
        "FE visualize_logs, 10 labels x 20 steps": fe(to_fe_summaries(small)),
        "band_figure + PNG, 10 x 20 (fresh figure)": ours_fresh(to_history(small)),
        "BandFigure.draw + PNG, 10 x 20 (reused)": ours_reused(small),
        "band_figure + PNG, 1,000 x 20 (fresh)": ours_fresh(to_history(big)),
    }
    if args.fe_1000:
        cases["FE visualize_logs, 1,000 labels x 20 steps"] = fe(to_fe_summaries(big))
    results = timed(cases, args.repeat)
    print(f"{'case (%d runs after a warm-up call)' % args.repeat:<46}{'median s':>10}{'min s':>8}{'PNG KB':>8}")
    for name, (median, fastest, size) in results.items():
        print(f"{name:<46}{median:>10.3f}{fastest:>8.3f}{size / 1024:>8.0f}")
    fe_r, fresh_r, reuse_r, big_r = (results[n] for n in list(results)[:4])
    print()
    for what, ours in (("fresh figure", fresh_r), ("reused BandFigure", reuse_r)):
        ratio_median, ratio_min = fe_r[0] / ours[0], fe_r[1] / ours[1]
        print(f"speed-up vs FE, 10 x 20, {what:<18} median {ratio_median:5.1f}x   min {ratio_min:5.1f}x   (target >= 3x)")
    print(f"PNG size 10 x 20: ours {fresh_r[2] / 1024:.0f} KB vs FE {fe_r[2] / 1024:.0f} KB (target <= 300 KB)")
    print(f"1,000 x 20: median {big_r[0]:.3f} s, min {big_r[1]:.3f} s, {big_r[2] / 1024:.0f} KB (target <= 1.5 s, <= 300 KB)")

if __name__ == "__main__":
    main()
