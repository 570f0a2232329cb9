"""labeltrack-log in multi-process training: a plain PyTorch DDP loop on the digits data.

Every rank trains on its own shard (``DistributedSampler``) and feeds its own ``Tracker``; at each
``end_epoch`` the trackers reduce the per-label statistics across the ranks (``sync="auto"``, the
default), so every rank gets the same global tables, and only rank 0 writes (TensorBoard, MLflow
and CSV in ``--output-dir``). A ``DistributedSampler`` pads the shards by repeating samples
when the data do not split evenly; the ``not_padded`` mask drops the repeats, so the counts are
exactly the data set's (the model still trains on them: that is the sampler's business).

    torchrun --nproc_per_node 2 examples/ddp_torch_digits.py --output-dir /tmp/ddp --epochs 3
    tensorboard --logdir /tmp/ddp/runs

(CPU, gloo backend; on GPUs pass ``--backend nccl``, one process per GPU.)
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Sequence

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from labeltrack_log import Tracker  # noqa: E402
from labeltrack_log.distributed import not_padded  # noqa: E402

NAMES = {i: f"digit {i}" for i in range(10)}


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.int64)
    cut = int(len(y) * 0.78)
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def train(epochs: int, batch_size: int, sinks: Sequence[str], device: torch.device) -> Tracker:
    rank, world = dist.get_rank(), dist.get_world_size()
    train_set, eval_set = digits()
    train_sampler = DistributedSampler(train_set, shuffle=True, seed=0)
    eval_sampler = DistributedSampler(eval_set, shuffle=False)  # pads the last shard(s) by repeating samples
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=train_sampler)
    eval_loader = DataLoader(eval_set, batch_size=batch_size, sampler=eval_sampler)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    per_sample = nn.CrossEntropyLoss(reduction="none")

    files = {"csv": {"type": "csv", "path": "stats.csv"}}
    # Created after init_process_group: rank 0 builds the sinks, the other ranks build none.
    with Tracker("ce_by_digit", sinks=[files.get(s, s) for s in sinks], label_names=NAMES) as tracker:
        step = 0
        for epoch in range(epochs):
            train_sampler.set_epoch(epoch)
            model.train()
            train_keep = torch.from_numpy(not_padded(train_sampler)).to(device)  # after set_epoch
            for b, (x, y) in enumerate(train_loader):
                x, y = x.to(device), y.to(device)
                mask = train_keep[b * batch_size: b * batch_size + len(y)]
                loss = per_sample(model(x), y)
                optimizer.zero_grad()
                loss.mean().backward()
                optimizer.step()
                step += 1
                tracker.update(y[mask], loss.detach()[mask], mode="train")
            model.eval()
            keep = torch.from_numpy(not_padded(eval_sampler)).to(device)  # one flag per sample of this rank, in order
            with torch.no_grad():
                for b, (x, y) in enumerate(eval_loader):
                    x, y = x.to(device), y.to(device)
                    mask = keep[b * batch_size: b * batch_size + len(y)]
                    tracker.update(y[mask], per_sample(model(x), y)[mask], mode="eval")
            tables = tracker.end_epoch(step)  # a collective: every rank gets the global tables
            worst = tables["eval"].labels[np.nanargmax(tables["eval"].mean)].item()
            if rank == 0:
                logging.info("epoch %d: train samples %d of %d, eval samples %d of %d (padding excluded), "
                             "worst eval class %s", epoch + 1, tables["train"].count.sum(), len(train_set),
                             tables["eval"].count.sum(), len(eval_set), NAMES[worst])
    # Identical decisions on every rank: e.g. "stop when the worst class stops improving".
    decisions = [None] * world
    dist.all_gather_object(decisions, worst)
    assert len(set(decisions)) == 1, decisions
    return tracker


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="ddp-output", help="where rank 0 writes runs/, mlflow.db and stats.csv")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sinks", default="tensorboard,mlflow,csv", help="comma-separated: tensorboard, mlflow, csv")
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (one GPU per process)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dist.init_process_group(args.backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    out = Path(args.output_dir).absolute()
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    os.chdir(out)
    try:
        tracker = train(args.epochs, args.batch_size, [s.strip() for s in args.sinks.split(",") if s.strip()], device)
        if dist.get_rank() == 0:
            latest = tracker.history.latest("ce_by_digit", "eval")
            print(f"{dist.get_world_size()} ranks, {args.epochs} epochs: eval loss by digit "
                  f"{np.round(latest.mean, 3).tolist()} over {latest.count.sum()} samples; written to {out}")
    finally:
        dist.barrier()  # no rank leaves before the others are done (gloo's teardown can hang otherwise)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
