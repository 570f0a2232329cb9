"""TensorBoardSink.log_stats vs torch's SummaryWriter.add_scalar, side by side in one run.

Workload: 1,000 labels x 5 statistics (mean, std, min, max, count) x 20 steps, the same values
for every writer. Each writer flushes once per step (what the sink does on every call, so a
crash loses nothing logged). Times are medians of ``--repeat`` runs in fresh directories, with
the writers interleaved; imports (torch's pulls in TensorFlow) are outside the timings.

Rows:
* sink, budget 1000: every label gets its series; the sink writes 7 values per label (also
  mean-std / mean+std for the margin charts) + 6 aggregates = 7,006 values per step in ONE event.
* sink, default budget (100): 100 labels' series + aggregates + the full table as text.
* sink, fsync: as the first row plus ``os.fsync`` per call.
* sink, tensorboard's pure-Python CRC32C: as the first row with the fallback used when the
  google-crc32c wheel is not installed.
* one event per value: the sink's own file writer, but 5,000 events per step.
* torch add_scalar: ``SummaryWriter.add_scalar`` per value (5,000 calls per step) + ``flush()``.

Target: the sink is no slower than torch's add_scalar (ratio torch / sink >= 1).

Run: .venv/bin/python benchmarks/bench_tensorboard.py [--repeat 3] [--labels 1000] [--steps 20]
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

from labeltrack_log import GroupedStats, StatsTable, naming
from labeltrack_log.sinks import tensorboard as tbsink
from labeltrack_log.sinks.tensorboard import TensorBoardSink

STATS = ("mean", "std", "min", "max", "count")


def make_tables(labels: int, steps: int) -> list[StatsTable]:
    rng = np.random.default_rng(0)
    tables = []
    for _ in range(steps):
        g = GroupedStats()
        g.update(rng.integers(0, labels, labels * 20), rng.gamma(2.0, 0.5, labels * 20))
        tables.append(g.compute())
    return tables


def columns(t: StatsTable) -> list[tuple[str, float]]:
    """(tag, value) pairs of the 5 statistics per label, tags built once outside the timings."""
    out = []
    for lab, *vals in zip(t.labels.tolist(), t.mean.tolist(), t.std.tolist(), t.min.tolist(), t.max.tolist(),
                          t.count.tolist()):
        out.extend((naming.tb_tag("ce", str(lab), s), float(v)) for s, v in zip(STATS, vals))
    return out


def run_sink(tables: list[StatsTable], logdir: Path, **options) -> None:
    with TensorBoardSink(logdir, **options) as sink:
        for step, t in enumerate(tables):
            sink.log_stats(t, step=step, name="ce", mode="train")


def run_one_event_per_value(pairs: list[list[tuple[str, float]]], logdir: Path) -> None:
    from tensorboard.compat.proto import event_pb2

    run = logdir / "train"
    run.mkdir(parents=True)
    with open(run / "events.out.tfevents.0000000000.bench", "wb") as f:
        writer = tbsink._FastRecordWriter(f)
        writer.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        for step, step_pairs in enumerate(pairs):
            for tag, value in step_pairs:
                ev = event_pb2.Event(step=step, wall_time=time.time())
                ev.summary.value.add(tag=tag, simple_value=value)
                writer.write(ev.SerializeToString())
            f.flush()


def run_torch(pairs: list[list[tuple[str, float]]], logdir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir / "train"))
    for step, step_pairs in enumerate(pairs):
        for tag, value in step_pairs:
            writer.add_scalar(tag, value, step)
        writer.flush()
    writer.close()


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    tables = make_tables(args.labels, args.steps)
    pairs = [columns(t) for t in tables]
    import torch.utils.tensorboard  # noqa: F401  (imports TensorFlow: keep it out of the timings)

    def pure_python_crc(logdir: Path) -> None:
        saved, tbsink._crc32c_c = tbsink._crc32c_c, None
        try:
            run_sink(tables, logdir, label_budget=args.labels)
        finally:
            tbsink._crc32c_c = saved

    writers: dict[str, Callable[[Path], None]] = {
        f"sink, budget {args.labels} (1 event/step)": lambda d: run_sink(tables, d, label_budget=args.labels),
        "sink, default budget 100 + text table": lambda d: run_sink(tables, d),
        f"sink, budget {args.labels}, fsync per call": lambda d: run_sink(tables, d, label_budget=args.labels, fsync=True),
        f"sink, budget {args.labels}, tensorboard's pure-Python CRC": pure_python_crc,
        "one event per value (own writer)": lambda d: run_one_event_per_value(pairs, d),
        "torch SummaryWriter.add_scalar per value": lambda d: run_torch(pairs, d),
    }
    times: dict[str, list[float]] = {k: [] for k in writers}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat + 1):  # the first round warms up caches and lazy imports
            for i, (label, fn) in enumerate(writers.items()):
                logdir = Path(tmp) / f"r{r}-w{i}"
                gc.collect()
                t0 = time.perf_counter()
                fn(logdir)
                elapsed = time.perf_counter() - t0
                if r:
                    times[label].append(elapsed)
                sizes[label] = size_of(logdir)

    values = args.labels * len(STATS) * args.steps
    print(f"{args.labels} labels x {len(STATS)} stats x {args.steps} steps = {values:,} values; "
          f"median of {args.repeat} runs (cpu count {os.cpu_count()})")
    ours = statistics.median(times[next(iter(writers))])
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"  {label:<58} {med:8.3f} s  {sizes[label] / 1e6:6.2f} MB  x{med / ours:6.2f} of sink")
    torch_time = statistics.median(times["torch SummaryWriter.add_scalar per value"])
    print(f"ratio torch add_scalar / sink = {torch_time / ours:.1f} (target >= 1: sink no slower)")
    record = os.urandom(200_000)  # the CRC alone, on a 200 KB record (an event with ~1000 labels)
    for label, fn in (("google-crc32c", tbsink.masked_crc32c), ("tensorboard pure Python", tbsink._py_masked_crc32c)):
        n = 200 if fn is tbsink.masked_crc32c else 3
        t0 = time.perf_counter()
        for _ in range(n):
            fn(record)
        print(f"  CRC32C of a 200 KB record, {label:<24} {len(record) * n / (time.perf_counter() - t0) / 1e9:8.3f} GB/s")


if __name__ == "__main__":
    main()
