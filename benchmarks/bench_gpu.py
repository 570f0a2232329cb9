"""GroupedStats fed CUDA tensors: throughput against the same batches as CPU tensors, side by side.

A GPU training loop hands the tracker per-sample losses and labels that live on the device. Each
``update`` copies them to the host (one synchronisation per batch). This measures what that costs
next to CPU tensors, for the batch sizes GPU training uses. Needs torch with a CUDA device.

    python benchmarks/bench_gpu.py [--samples 2000000] [--labels 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

from labeltrack_log import GroupedStats


def run(batches, sync) -> float:
    sync()
    t0 = time.perf_counter()
    g = GroupedStats()
    for y, v in batches:
        g.update(y, v)
    g.compute()
    return time.perf_counter() - t0


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2_000_000)
    parser.add_argument("--labels", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.samples:,} samples, "
          f"{args.labels:,} labels; best of {args.repeat}")
    print(f"{'batch':>6} {'CPU tensors':>14} {'CUDA tensors':>14} {'CUDA / CPU':>11}")
    for batch in (256, 1024, 8192):
        gen = torch.Generator().manual_seed(0)
        y = torch.randint(0, args.labels, (args.samples,), generator=gen)
        v = torch.rand(args.samples, generator=gen)
        cpu = [(y[i:i + batch], v[i:i + batch]) for i in range(0, args.samples, batch)]
        gpu = [(a.cuda(), b.cuda()) for a, b in cpu]
        times = {}
        for name, data in (("cpu", cpu), ("gpu", gpu)):
            run(data, torch.cuda.synchronize)  # warm-up
            times[name] = min(run(data, torch.cuda.synchronize) for _ in range(args.repeat))
        rate = {k: args.samples / t / 1e6 for k, t in times.items()}
        print(f"{batch:>6} {rate['cpu']:>10.1f} M/s {rate['gpu']:>10.1f} M/s {times['cpu'] / times['gpu']:>10.2f}x")


if __name__ == "__main__":
    main()
