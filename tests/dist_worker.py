"""The rank side of tests/test_distributed.py: one spawned process per rank, real torch.distributed (gloo).

Each rank runs every scenario of :func:`stats_scenarios` through ``GroupedStats.synced`` and then
a ``Tracker`` with CSV, TensorBoard and MLflow sinks at their default (relative) places inside its
own working directory, and writes what it got to ``<out>/rank<r>.pkl``. The data are generated here
by seed, so the test builds the one-process reference from the same functions.
"""

from __future__ import annotations

import os
import pickle
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

Batches = list[tuple[Any, Any]]

I64 = np.iinfo(np.int64)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([7, *key])


def stats_scenarios(world: int) -> dict[str, list[Batches]]:
    """Scenario name -> each rank's batches (a list of (labels, values) per rank)."""
    out: dict[str, list[Batches]] = {}

    def ranks(fn):  # fn(rank, rng) -> batches
        return [fn(r, _rng(len(out), r)) for r in range(world)]

    # Ranks see different label sets; the last rank alone sees label 1000; uneven batch counts.
    out["different_label_sets"] = ranks(lambda r, g: [
        (g.integers(r, r + 6, 20 + 3 * b) if r < world - 1 else np.r_[g.integers(r, r + 6, 10), [1000, 1000]],
         g.normal(r, 1.0 + r, 20 + 3 * b) if r < world - 1 else g.normal(r, 1.0, 12))
        for b in range(r + 1)])
    out["string_labels"] = ranks(lambda r, g: [
        ([["cat", "dog", "eel", "ant" if r == 0 else f"rank{r}"][i] for i in g.integers(0, 4, 30)], g.normal(0, 1, 30))])
    out["bool_labels"] = ranks(lambda r, g: [
        (np.ones(8, bool) if r == 0 else np.zeros(9, bool) if r == world - 1 else g.integers(0, 2, 10).astype(bool),
         g.normal(r, 1, 8 if r == 0 else 9 if r == world - 1 else 10))])
    # Rank 1 never calls update.
    out["rank_without_samples"] = ranks(lambda r, g: [] if r == 1 else [(g.integers(0, 5, 40), g.normal(0, 2, 40))])
    limits = np.array([I64.min, I64.min + 1, -(2**53) - 1, -1, 0, 1, 2**53 + 1, I64.max - 1, I64.max], dtype=np.int64)
    out["int64_limits"] = ranks(lambda r, g: [(limits[g.integers(0, len(limits), 50)], g.normal(0, 1, 50))])
    # 100,000 distinct labels over all ranks (wide int64 values: no lookup table), each rank a part.
    many = (np.arange(100_000, dtype=np.int64) * 92_233_720_368) - 2**62
    out["100k_labels"] = ranks(lambda r, g: [
        (many[(np.arange(len(many)) % world) == r], g.normal(0, 1, len(many) // world)),
        (many[g.integers(0, len(many), 5_000)], g.normal(0, 1, 5_000))])
    out["nan_on_one_rank"] = ranks(lambda r, g: [
        (np.array([0, 1, 2, 2, 2, 3]), np.array([1.0, 2.0, np.nan, np.inf, 3.0, np.nan]) if r == 0 else g.normal(0, 1, 6))])
    # The same int labels on every rank, first seen in the same unsorted order (one argsort sorts
    # every rank's state) and in a different order per rank.
    out["same_labels_unsorted"] = ranks(lambda r, g: [(np.tile([7, -3, 9, 1, 4], 6), g.normal(r, 1 + r, 30))])
    out["same_labels_other_order"] = ranks(lambda r, g: [(np.roll(np.tile([7, -3, 9, 1, 4], 6), r), g.normal(r, 1, 30))])
    out["large_offset"] = ranks(lambda r, g: [(g.integers(0, 3, 200), 1e8 + g.normal(0, 1, 200))])
    out["nobody_saw_anything"] = ranks(lambda r, g: [])
    # Values near the float limits (issue 11's per-label power-of-two scale): +1e300 on even ranks and
    # -1e300 on odd ones (label 0), one 1e300 among N(0, 1) on the last rank only (label 1), +-8e307
    # whose deviations cannot be squared (label 2), and an ordinary label next to them (label 3).
    out["float_limits"] = ranks(lambda r, g: [(
        np.repeat([0, 1, 2, 3], [5, 6, 4, 5]),
        np.concatenate([(1.0 if r % 2 == 0 else -1.0) * 1e300 * (1 + g.random(5)),
                        np.r_[g.normal(0, 1, 5), [1e300 if r == world - 1 else 0.5]],
                        (1.0 if r % 2 == 0 else -1.0) * 8e307 * (1 + 0.05 * g.random(4)),
                        g.normal(r, 1, 5)]))])
    return out


def extra_batch(labels: list) -> tuple[list, np.ndarray]:
    """A batch with every one of ``labels`` and one new label of the same kind (none for bools)."""
    if labels and isinstance(labels[0], str):
        new = ["new-label"]
    elif labels and isinstance(labels[0], bool):
        new = []
    else:
        new = [123_457 if 123_457 not in labels else 123_458]
    labels = list(labels) + new
    return labels, np.linspace(-1.0, 1.0, len(labels))


def tracker_epochs(world: int) -> list[list[dict[str, Batches]]]:
    """Per epoch, per rank: mode -> batches. Uneven batch counts, rank 1 has no eval data, NaN on rank 0."""
    epochs = []
    for e in range(2):
        per_rank = []
        for r in range(world):
            g = _rng(100 + e, r)
            train = [(g.integers(0, 10, 16), g.gamma(2.0, 1.0 + r, 16)) for _ in range(2 + r)]
            if r == 0 and e == 1:
                train[0][1][:3] = np.nan
            modes = {"train": train}
            if r != 1:
                modes["eval"] = [(g.integers(0, 10, 12), g.gamma(2.0, 1.0, 12))]
            per_rank.append(modes)
        epochs.append(per_rank)
    return epochs


QUANTILES = (0.1, 0.5, 0.9)


def _table(t: Any) -> dict:
    return t.to_dict()


def run(rank: int, world: int, port: int, out: str, workdirs: str) -> None:
    """Entry point of one rank (torch.multiprocessing passes the rank first)."""
    try:
        _run(rank, world, port, Path(out), Path(workdirs))
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _children() -> list[int]:
    """This process's child processes (an MLflow delivery child would be one)."""
    return sorted(int(pid) for task in Path("/proc/self/task").iterdir()
                  for pid in (task / "children").read_text().split())


def _run_on_every_rank(rank: int, workdirs: Path, epochs: list) -> dict[str, Any]:
    """Every rank creates the same ``Run(sinks=[CSV, TensorBoard, MLflow sqlite])`` and two
    trackers on it (as a script run under torchrun does): only rank 0 may build them (issue 12).
    Then a ``Run(sync=None)`` with ``Tracker(sync=None)``: a record per rank, each of its shard."""
    import torch.distributed as dist

    from labeltrack_log import Run, Tracker

    got: dict[str, Any] = {}
    os.chdir(workdirs / "run" / f"rank{rank}")
    sinks = ["csv", "tensorboard", {"type": "mlflow", "tracking_uri": f"sqlite:///{(Path.cwd() / 'mlflow.db').as_posix()}"}]
    with Run(sinks=sinks, name="ddp") as run:
        loss = Tracker("loss_by_y", run=run, figures="end")
        acc = Tracker("acc_by_y", run=run, figures=None)
        got["sinks"] = [len(run.sinks), len(loss.sinks), len(acc.sinks)]
        for e, per_rank in enumerate(epochs):
            for mode, batches in per_rank[rank].items():
                for labels, values in batches:
                    loss.update(labels, values, mode=mode)
                    acc.update(labels, (values > 2.0).astype(float), mode=mode)
            tables = loss.end_epoch(step=100 * (e + 1))
            acc.end_epoch(step=100 * (e + 1))
        got["train_count"] = int(tables["train"].count.sum())
        got["children"] = _children()
        got["written"] = sorted(str(p) for p in Path.cwd().rglob("*"))
    os.chdir(workdirs / "per_rank" / f"rank{rank}")
    with Run(sinks="csv", sync=None) as run:
        local = Tracker("loss_by_y", run=run, sync=None, figures=None)
        for labels, values in epochs[0][rank]["train"]:
            local.update(labels, values)
        got["per_rank_count"] = int(local.end_epoch(step=100)["train"].count.sum())
    dist.barrier()
    return got


def _subgroups(rank: int, world: int, workdirs: Path) -> dict[str, Any]:
    """``synced(group)`` and ``Tracker(sync=group)`` over a subgroup: the ranks split in two halves,
    each synced over its own half only; a Tracker writes on its group's rank 0 alone (global rank
    0 for the first half, ``world // 2`` for the second)."""
    import torch.distributed as dist

    from labeltrack_log import GroupedStats, Tracker

    halves = [list(range(world // 2)), list(range(world // 2, world))]
    groups = [dist.new_group(h) for h in halves]  # every rank creates every group, in the same order
    mine = groups[0 if rank < world // 2 else 1]
    got: dict[str, Any] = {}
    g = GroupedStats()
    for labels, values in stats_scenarios(world)["different_label_sets"][rank]:
        g.update(labels, values)
    got["synced"] = _table(g.synced(mine).compute())
    os.chdir(workdirs / "sub" / f"rank{rank}")
    with Tracker("loss_by_y", sinks="csv", sync=mine, figures=None) as tracker:
        got["num_sinks"] = len(tracker.sinks)
        for labels, values in tracker_epochs(world)[0][rank]["train"]:
            tracker.update(labels, values)
        got["table"] = _table(tracker.end_epoch(step=100)["train"])
    got["written"] = sorted(str(p.relative_to(Path.cwd())) for p in Path.cwd().rglob("*"))
    for group in groups:
        dist.destroy_process_group(group)
    return got


def _count_collectives(rank: int) -> dict[str, Any]:
    """How many collectives a sync costs (each is a round trip of every process with gloo): the
    real torch.distributed functions, wrapped to count their calls (and name them)."""
    import torch.distributed as dist

    from labeltrack_log import GroupedStats, Tracker

    calls: dict[str, Any] = {"n": 0, "names": []}
    real = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "all_gather_object", "broadcast",
                                                  "all_to_all_single", "all_to_all", "all_gather_into_tensor")}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            calls["names"].append(name)
            return fn(*args, **kwargs)
        return wrapper

    def count(fn) -> int:
        calls["n"], calls["names"] = 0, []
        for name, fn_real in real.items():
            setattr(dist, name, counting(name, fn_real))
        try:
            fn()
        finally:
            for name, fn_real in real.items():
                setattr(dist, name, fn_real)
        return calls["n"]

    g = GroupedStats()
    g.update(np.arange(1000) % 1000, np.linspace(0, 1, 1000) + rank)
    q = GroupedStats(quantiles=QUANTILES)
    q.update(np.arange(200) % 50, np.linspace(0, 1, 200) + rank)
    tracker = Tracker("t", sync="auto", figures=None)
    for mode in ("train", "eval"):
        tracker.update([0, 1], [1.0, 2.0], mode=mode)
    out: dict[str, Any] = {"plain_1000_labels": count(g.synced)}
    out["plain_1000_labels_by"] = calls["names"]
    out.update({"quantiles_50_labels": count(q.synced), "tracker_two_modes": count(lambda: tracker.end_epoch(step=1))})
    tracker.close()
    return out


def _run(rank: int, world: int, port: int, out: Path, workdirs: Path) -> None:
    import torch.distributed as dist

    from labeltrack_log import GroupedStats, Tracker
    from labeltrack_log.errors import InputTypeError

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    from labeltrack_log import distributed

    result: dict[str, Any] = {"stats": {}, "stats_reduce": {}, "stats_ring": {}}
    default_gather, default_direct = distributed._GATHER_MAX_BYTES, distributed._DIRECT_MAX_WORLD
    for key, name, shards in [(k, n, s) for k in result for n, s in stats_scenarios(world).items()]:
        # "stats_reduce": the same scenarios through the all_reduce branch (as with many ranks x labels);
        # "stats_ring": the first exchange by all_gather (as past _DIRECT_MAX_WORLD ranks), not all_to_all
        distributed._GATHER_MAX_BYTES = 0 if key == "stats_reduce" else default_gather
        distributed._DIRECT_MAX_WORLD = 1 if key == "stats_ring" else default_direct
        g = GroupedStats()
        for labels, values in shards[rank]:
            g.update(labels, values)
        before = g.compute()
        first = g.synced()
        second = g.synced()
        result[key][name] = {
            "table": _table(first.compute()),
            "twice_equal": first.compute() == second.compute(),
            "local_unchanged": g.compute() == before,
            "merge_again": _table(GroupedStats().merge(first).compute()),
        }
        # The synced accumulator keeps accumulating: new and old labels, then a merge into it.
        grown = g.synced()
        labels, values = extra_batch(first.compute().labels.tolist())
        grown.update(labels, values)
        result[key][name]["grown"] = _table(grown.merge(first).compute())
    distributed._GATHER_MAX_BYTES, distributed._DIRECT_MAX_WORLD = default_gather, default_direct
    # Different label kinds on different ranks: every rank raises, nobody hangs.
    g = GroupedStats()
    g.update([1, 2] if rank == 0 else ["a", "b"], [1.0, 2.0])
    try:
        g.synced()
        result["kind_mismatch"] = None
    except InputTypeError as err:
        result["kind_mismatch"] = str(err)

    # Quantiles tracked on rank 0 only: every rank raises (no rank waits in a collective the others skip).
    g = GroupedStats(quantiles=QUANTILES if rank == 0 else None)
    g.update([1, 2], [1.0, 2.0])
    try:
        g.synced()
        result["quantile_mismatch"] = None
    except InputTypeError as err:
        result["quantile_mismatch"] = str(err)

    # Quantile sketches and the 0/1 flags travel with synced() (issue 13), in both branches.
    result["quantiles"] = {}
    for branch in ("gather", "reduce"):
        distributed._GATHER_MAX_BYTES = default_gather if branch == "gather" else 0
        for name, shards in stats_scenarios(world).items():
            g = GroupedStats(quantiles=QUANTILES)
            for labels, values in shards[rank]:
                g.update(labels, values)
            t = g.synced().compute()
            result["quantiles"][branch, name] = (t.labels.tolist(), [t.quantile(q).tolist() for q in QUANTILES],
                                                 t.binary.tolist())
    distributed._GATHER_MAX_BYTES = default_gather

    # Tracker: default CSV/TensorBoard/MLflow places, relative to this rank's own working directory.
    os.chdir(workdirs / f"rank{rank}")
    epochs = tracker_epochs(world)
    returned = []
    with Tracker("loss_by_y", sinks=["csv", "tensorboard", "mlflow"], figures="end") as tracker, \
            Tracker("loss_by_y", sinks=None, sync=None, figures=None) as local:
        result["num_sinks"] = len(tracker.sinks)
        for e, per_rank in enumerate(epochs):
            for mode, batches in per_rank[rank].items():
                for labels, values in batches:
                    tracker.update(labels, values, mode=mode)
                    local.update(labels, values, mode=mode)
            tables = tracker.end_epoch(step=100 * (e + 1))
            returned.append({mode: _table(t) for mode, t in tables.items()})
            result.setdefault("local", []).append({m: _table(t) for m, t in local.end_epoch(step=100 * (e + 1)).items()})
    result["returned"] = returned
    result["history"] = {mode: [(s, _table(t)) for s, t in tracker.history.items("loss_by_y", mode)]
                         for mode in tracker.history.modes("loss_by_y")}
    result["run"] = _run_on_every_rank(rank, workdirs, epochs)
    result["collectives"] = _count_collectives(rank)
    result["subgroups"] = _subgroups(rank, world, workdirs)
    dist.barrier()
    dist.destroy_process_group()
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
