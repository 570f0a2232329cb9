"""Memory of the grouping core per distinct label (issue 11.12), measured with tracemalloc.

For each kind of label (small ints that use the lookup table, large ints, strings of 12
characters), feed N distinct labels once and measure what the accumulator holds after
``compute()`` (state only: the staging buffers, a fixed ~1.6 MB, are subtracted by measuring a
one-label accumulator the same way). Also the peak of ``compute()`` itself, whose table is a copy.

    .venv/bin/python benchmarks/bench_grouping_memory.py [--labels 1000000]
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc

import numpy as np

from labeltrack_log import GroupedStats


def held(labels: np.ndarray) -> tuple[int, int]:
    """(bytes held by an accumulator that saw ``labels`` once, peak bytes during compute())."""
    gc.collect()
    tracemalloc.start()
    g = GroupedStats()
    for i in range(0, len(labels), 1 << 16):
        g.update(labels[i : i + (1 << 16)], np.ones(min(1 << 16, len(labels) - i)))
    g.num_labels  # noqa: B018 - flush
    now, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    table = g.compute()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del table
    return now, peak - now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--labels", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.labels
    rng = np.random.default_rng(0)
    kinds = {
        "small ints (0..65535, lookup table)": np.arange(min(n, 65_536), dtype=np.int64),
        "large ints": rng.choice(2**62, size=n, replace=False).astype(np.int64),
        "strings (12 chars)": np.array([f"label_{i:06d}" for i in range(n)], dtype=object),
    }
    print(f"{'labels':<38}{'N':>10}{'bytes/label held':>18}{'compute() peak/label':>22}")
    for what, labels in kinds.items():
        base, _ = held(labels[:1])
        total, peak = held(labels)
        print(f"{what:<38}{len(labels):>10}{(total - base) / len(labels):>18.0f}{peak / len(labels):>22.0f}")


if __name__ == "__main__":
    main()
