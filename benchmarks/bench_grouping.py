"""GroupedStats vs FastEstimator 1.7's LabelTracker, side by side in one process.

Workload (issue 2): 1,000,000 samples, 1,000 labels, batches of 256. FE's LabelTracker is driven as
FE's Estimator drives it: ``on_batch_end(Data)`` for every batch, then ``on_epoch_end``. Ours:
``GroupedStats.update`` per batch, then ``compute()``. Both get the same batches, once as numpy
arrays and once as torch tensors (what FE's torch backend hands a trace). Best of --repeat runs.

Then the accumulator's peak memory (tracemalloc) at two sizes of N, to show it does not grow with N.

Then quantiles (issue 13): GroupedStats(quantiles=(0.1, 0.25, 0.5, 0.75, 0.9)) against plain
GroupedStats on the same batches, side by side (target: at most 2x), and its peak memory at two N.

    .venv/bin/python benchmarks/bench_grouping.py [--samples 1000000] [--labels 1000] [--batch 256]
"""

from __future__ import annotations

import argparse
import logging
import time
import tracemalloc

import numpy as np

from labeltrack_log import GroupedStats


def batches(n: int, labels: int, batch: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, labels, n)
    loss = rng.gamma(2.0, 0.5, n).astype(np.float32)
    return [(y[i : i + batch], loss[i : i + batch]) for i in range(0, n, batch)]


FIVE_LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9)


def run_ours(data, quantiles=None) -> float:
    t0 = time.perf_counter()
    g = GroupedStats(quantiles=quantiles)
    for y, loss in data:
        g.update(y, loss)
    g.compute()
    return time.perf_counter() - t0


def run_fe(data) -> float:
    from fastestimator.test.unittest_util import sample_system_object
    from fastestimator.trace.xai import LabelTracker
    from fastestimator.util.data import Data

    tracker = LabelTracker(label="y", metric="ce", bounds="std", mode="eval")
    tracker.system = sample_system_object()
    tracker.system.mode = "eval"
    tracker.system.global_step = 1
    t0 = time.perf_counter()
    for y, loss in data:
        tracker.on_batch_end(Data({"y": y, "ce": loss}))
    tracker.on_epoch_end(Data())
    return time.perf_counter() - t0


def best(fn, data, repeat: int) -> float:
    return min(fn(data) for _ in range(repeat))


def peak_memory(n: int, labels: int, batch: int, quantiles=None) -> int:
    """Peak bytes allocated while accumulating n samples (the input batches are created lazily)."""
    rng = np.random.default_rng(1)
    y_all = rng.integers(0, labels, batch * 64)
    v_all = rng.gamma(2.0, 0.5, batch * 64).astype(np.float32)
    tracemalloc.start()
    g = GroupedStats(quantiles=quantiles)
    done = 0
    while done < n:
        k = (done // batch) % 64
        g.update(y_all[k * batch : (k + 1) * batch], v_all[k * batch : (k + 1) * batch])
        done += batch
    g.compute()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    data = batches(args.samples, args.labels, args.batch)
    n = args.samples
    print(f"workload: {n:,} samples, {args.labels:,} labels, batches of {args.batch} ({len(data):,} batches)")
    rows = [("numpy batches", data)]
    try:
        import torch

        rows.append(("torch batches", [(torch.from_numpy(y), torch.from_numpy(v)) for y, v in data]))
    except ImportError:
        pass
    print(f"{'input':<15} {'FE LabelTracker':>18} {'GroupedStats':>16} {'ratio':>8}")
    for label, batch_data in rows:
        run_ours(batch_data)  # warm up
        fe = best(run_fe, batch_data, args.repeat)
        ours = best(run_ours, batch_data, args.repeat)
        print(f"{label:<15} {n / fe / 1e6:>12.2f} M/s {n / ours / 1e6:>10.1f} M/s {fe / ours:>7.0f}x"
              f"   ({fe * 1e3:.0f} ms vs {ours * 1e3:.1f} ms)")
    print("accumulator peak memory (tracemalloc), 1,000 labels:")
    for size in (args.samples, 10 * args.samples):
        print(f"  N = {size:>11,}: {peak_memory(size, args.labels, args.batch) / 1e6:.2f} MB")

    print(f"quantiles {FIVE_LEVELS} vs plain, same batches (target: ratio <= 2x):")
    print(f"{'input':<15} {'plain':>14} {'5 quantiles':>14} {'ratio':>8}")
    for label, batch_data in rows:
        run_ours(batch_data, FIVE_LEVELS)  # warm up
        plain = best(run_ours, batch_data, args.repeat)
        quant = best(lambda d: run_ours(d, FIVE_LEVELS), batch_data, args.repeat)
        print(f"{label:<15} {plain * 1e3:>11.1f} ms {quant * 1e3:>11.1f} ms {quant / plain:>7.2f}x")
    print(f"accumulator peak memory (tracemalloc) with 5 quantiles, {args.labels:,} labels, gamma(2, 0.5) losses:")
    for size in (args.samples, 10 * args.samples):
        print(f"  N = {size:>11,}: {peak_memory(size, args.labels, args.batch, FIVE_LEVELS) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
