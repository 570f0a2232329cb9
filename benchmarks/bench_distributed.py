"""One ``GroupedStats.synced()`` per epoch vs gathering every sample, side by side, real gloo ranks.

Issue 12's workload: 2 and 4 ranks (torch.distributed gloo on 127.0.0.1, spawned processes), 1,000
and 100,000 labels, 1,000,000 samples per epoch split evenly over the ranks. Each rank's shard sees
every label. Two ways to get the per-label statistics of the whole epoch:

* ``synced``: ``GroupedStats.synced()`` on every rank (labels and O(labels) state: at 1,000
  labels one exchange of a fixed 128 KiB buffer (gloo: all_to_all_single); at 100,000 the
  labels, then all_reduces);
* ``naive``: what users write without this library: ``all_gather_object`` of every sample's
  (label, value) arrays (numpy, pickled compactly; not Python lists), then grouping on rank 0
  (with ``GroupedStats``, so the difference is the transfer, not a slow grouping).

Time: the slowest rank's wall time from a barrier to the end of its call, best of --repeat.
Bytes: what one rank contributes (the buffers of every collective for ``synced``; the pickled
sample arrays for ``naive``), at 1,000,000 and --big samples per epoch: ``synced``'s bytes
do not depend on the number of samples.

    .venv/bin/python benchmarks/bench_distributed.py [--repeat 5] [--big 4000000]
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

LABELS = (1_000, 100_000)
SAMPLES = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard(samples: int, labels: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    n = samples // world
    rng = np.random.default_rng([rank, labels, samples])
    return np.arange(n, dtype=np.int64) % labels, rng.gamma(2.0, 0.5, n).astype(np.float32)


def timed(dist, fn, repeat: int) -> float:
    import torch

    best = float("inf")
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        best = min(best, float(t))
    return best


def rank_main(rank: int, world: int, port: int, repeat: int, big: int, out: str) -> None:
    import torch.distributed as dist

    from labeltrack_log import GroupedStats
    from labeltrack_log.distributed import _sync

    import torch

    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1 for every rank
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    rows = []
    for labels in LABELS:
        row = {"world": world, "labels": labels}
        for samples in (SAMPLES, big):
            y, v = shard(samples, labels, rank, world)
            g = GroupedStats()
            g.update(y, v)
            result, sent = _sync(g)
            assert result.num_labels == labels
            row[f"sync_bytes_{samples}"] = sent
            row[f"naive_bytes_{samples}"] = len(pickle.dumps((y, v), protocol=pickle.HIGHEST_PROTOCOL))
            if samples == SAMPLES:
                row["sync_s"] = timed(dist, g.synced, repeat)

                def naive() -> None:
                    parts = [None] * world
                    dist.all_gather_object(parts, (y, v))
                    if rank == 0:
                        h = GroupedStats()
                        for py, pv in parts:
                            h.update(py, pv)
                        h.compute()

                row["naive_s"] = timed(dist, naive, max(1, repeat // 2))
        rows.append(row)
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_bytes(pickle.dumps(rows))


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--big", type=int, default=4_000_000, help="the second sample count for the bytes")
    parser.add_argument("--worlds", default="2,4")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (int(w) for w in args.worlds.split(",")):
            out = os.path.join(tmp, f"w{world}.pkl")
            mp.start_processes(rank_main, args=(world, free_port(), args.repeat, args.big, out), nprocs=world,
                               start_method="spawn", join=True)
            rows += pickle.loads(Path(out).read_bytes())
    mb = 1e6
    print(f"per epoch: {SAMPLES:,} samples over the ranks; best of {args.repeat} (synced) / {max(1, args.repeat // 2)} (naive)")
    print(f"| ranks | labels | synced | naive gather + group on rank 0 | speed-up | synced bytes/rank at {SAMPLES:,} / {args.big:,} samples "
          f"| naive bytes/rank at {SAMPLES:,} / {args.big:,} | bytes ratio at {SAMPLES:,} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sb, nb = r[f"sync_bytes_{SAMPLES}"], r[f"naive_bytes_{SAMPLES}"]
        print(f"| {r['world']} | {r['labels']:,} | {r['sync_s'] * 1e3:.1f} ms | {r['naive_s'] * 1e3:.1f} ms "
              f"| **{r['naive_s'] / r['sync_s']:.0f}x** | {sb / mb:.3f} MB / {r[f'sync_bytes_{args.big}'] / mb:.3f} MB "
              f"| {nb / mb:.1f} MB / {r[f'naive_bytes_{args.big}'] / mb:.1f} MB | {nb / sb:.0f}x |")


if __name__ == "__main__":
    main()
