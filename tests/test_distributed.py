"""Multi-process training with the real engine: torch.distributed (gloo, 127.0.0.1), 2 and 4 spawned ranks.

Each group of ranks is spawned once per module (spawning costs seconds per rank on this machine)
and runs every scenario (tests/dist_worker.py); the tests below compare what each rank got with
one process over all samples, and check that rank 0 alone wrote. A hang fails: the ranks'
collectives time out after 60 s, the join after 240 s, the test after 300 s.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as tmp  # noqa: E402

import dist_worker  # noqa: E402
import servers  # noqa: E402
from labeltrack_log import GroupedStats, StatsHistory, StatsTable, Tracker  # noqa: E402

pytestmark = pytest.mark.timeout(300)

JOIN_TIMEOUT = 240
SCENARIOS = list(dist_worker.stats_scenarios(2))


def spawn(world: int, root: Path) -> dict:
    """Run dist_worker.run on ``world`` ranks; returns {"ranks": [result per rank], "workdirs": Path}."""
    out, workdirs = root / "out", root / "work"
    out.mkdir()
    for r in range(world):
        for sub in ("", "run", "per_rank", "sub"):  # the Tracker, Run, Run(sync=None) and subgroup parts of dist_worker
            (workdirs / sub / f"rank{r}").mkdir(parents=True)
    ctx = tmp.start_processes(dist_worker.run, args=(world, servers.free_port(), str(out), str(workdirs)),
                              nprocs=world, start_method="spawn", join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish within {JOIN_TIMEOUT} s")
    except BaseException as err:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        errors = "\n".join(f.read_text() for f in sorted(out.glob("*.err")))
        raise AssertionError(f"the ranks failed: {err}\n{errors}") from None
    return {"ranks": [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)], "workdirs": workdirs}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def group(request, tmp_path_factory):
    world = request.param
    return world, spawn(world, tmp_path_factory.mktemp(f"dist{world}"))


def table(d: dict) -> StatsTable:
    return StatsTable(**d)


def assert_same_stats(got: StatsTable, want: StatsTable, scale: float = 1.0) -> None:
    """Labels, count and nonfinite exactly; mean/std/min/max to floating-point rounding.

    ``scale``: the values' magnitude. Values near 1e8 carry only ~1e-8 absolute precision each
    (eps * 1e8), so two exact orders of summation may differ by ~1e-10 there."""
    assert got.labels.tolist() == want.labels.tolist()
    assert got.labels.dtype.kind == want.labels.dtype.kind
    np.testing.assert_array_equal(got.count, want.count)
    np.testing.assert_array_equal(got.nonfinite, want.nonfinite)
    for col in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(getattr(got, col), getattr(want, col), rtol=1e-11, atol=1e-12 * scale, err_msg=col)


def one_process(shards: list) -> StatsTable:
    g = GroupedStats()
    for batches in shards:
        for labels, values in batches:
            g.update(labels, values)
    return g.compute()


@pytest.mark.parametrize("branch", ["stats", "stats_reduce", "stats_ring"], ids=["gather", "all_reduce", "ring"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_synced_equals_one_process_on_every_rank(group, scenario, branch):
    world, res = group
    want = one_process(dist_worker.stats_scenarios(world)[scenario])
    got = [table(r[branch][scenario]["table"]) for r in res["ranks"]]
    assert_same_stats(got[0], want, scale={"large_offset": 1e8, "float_limits": 1e308}.get(scenario, 1.0))
    for other in got[1:]:  # bit-identical on every rank
        assert other == got[0]
    for r in res["ranks"]:
        assert r[branch][scenario]["twice_equal"], "a second synced() gave another result"
        assert r[branch][scenario]["local_unchanged"], "synced() changed the local accumulator"
        assert table(r[branch][scenario]["merge_again"]) == got[0], "the synced accumulator does not merge as itself"
        shards = dist_worker.stats_scenarios(world)[scenario]
        extra = [[dist_worker.extra_batch(want.labels.tolist())]]
        assert_same_stats(table(r[branch][scenario]["grown"]), one_process(shards + extra + shards),
                          scale={"large_offset": 1e8, "float_limits": 1e308}.get(scenario, 1.0))
        # the same bytes whichever collective carried them (all_to_all_single or the ring all_gather)
        assert table(r["stats_ring"][scenario]["table"]) == table(r["stats"][scenario]["table"])


@pytest.mark.parametrize("branch", ["gather", "reduce"])
def test_synced_carries_quantile_sketches_and_zero_one_flags_exactly(group, branch):
    """Issue 13: synced() gives the quantiles of one process over all samples (the sketches merge
    exactly, so the estimates are equal, not close), and the 0/1 flags of the CI bound."""
    world, res = group
    for scenario, shards in dist_worker.stats_scenarios(world).items():
        ref = GroupedStats(quantiles=dist_worker.QUANTILES)
        for batches in shards:
            for labels, values in batches:
                ref.update(labels, values)
        want = ref.compute()
        want_q = [want.quantile(q).tolist() for q in dist_worker.QUANTILES]
        for r in res["ranks"]:
            labels, got_q, binary = r["quantiles"][branch, scenario]
            assert labels == want.labels.tolist(), scenario
            np.testing.assert_array_equal(np.array(got_q, dtype=float), np.array(want_q, dtype=float), err_msg=scenario)
            assert binary == want.binary.tolist(), scenario


def test_scenarios_cover_the_issue(group):
    world, res = group
    tables = {name: table(res["ranks"][0]["stats"][name]["table"]) for name in SCENARIOS}
    assert 1000 in tables["different_label_sets"] and tables["different_label_sets"][1000].count == 2 * world  # 2 per batch, world batches on the last rank
    assert tables["string_labels"].labels.dtype.kind == "U" and "ant" in tables["string_labels"]
    assert tables["bool_labels"].labels.tolist() == [False, True]
    assert tables["int64_limits"].labels[[0, -1]].tolist() == [np.iinfo(np.int64).min, np.iinfo(np.int64).max]
    assert len(tables["100k_labels"]) == 100_000
    assert tables["nan_on_one_rank"][2].nonfinite == 2 and tables["nan_on_one_rank"][3].nonfinite == 1
    assert len(tables["nobody_saw_anything"]) == 0
    assert tables["rank_without_samples"].count.sum() == 40 * (world - 1)


@pytest.mark.parametrize("branch", ["stats", "stats_reduce"], ids=["all_gather", "all_reduce"])
def test_synced_is_exact_near_the_float_limits(group, branch):
    """Values near 1e300 / 8e307 on different ranks (GroupedStats scales them by a power of two per
    label before squaring): the synced statistics equal one process over the union, label by
    label (counts exactly, mean and std to rounding of each label's magnitude), and no std is inf
    or NaN where one process gives a finite one."""
    world, res = group
    want = one_process(dist_worker.stats_scenarios(world)["float_limits"])
    assert np.isfinite(want.std).all() and want.max[0] > 1e300 and want.min[2] < -8e307
    for r in res["ranks"]:
        got = table(r[branch]["float_limits"]["table"])
        np.testing.assert_array_equal(got.count, want.count)
        assert np.isfinite(got.std).all() and np.isfinite(got.mean).all(), (got.mean, got.std)
        for i in range(len(want)):
            size = max(abs(want.min[i]), abs(want.max[i]))
            for col in ("mean", "std", "min", "max"):
                np.testing.assert_allclose(getattr(got, col)[i], getattr(want, col)[i], rtol=1e-12, atol=1e-14 * size,
                                           err_msg=f"label {want.labels[i]} {col}")


def test_a_small_sync_is_one_collective(group):
    """With gloo each collective is a round trip of every process: a sync of up to ~1,800 labels
    (with quantile sketches too) is one exchange (a direct one: all_to_all_single, one step where
    gloo's ring all_gather takes world - 1), a Tracker epoch end one more for the modes."""
    world, res = group
    for r in res["ranks"]:
        assert r["collectives"] == {"plain_1000_labels": 1, "plain_1000_labels_by": ["all_to_all_single"],
                                    "quantiles_50_labels": 1, "tracker_two_modes": 3}


def test_different_label_kinds_raise_on_every_rank(group):
    world, res = group
    for r in res["ranks"]:
        assert r["kind_mismatch"] is not None and "same kind of labels on every rank" in r["kind_mismatch"]


def test_quantiles_on_some_ranks_only_raise_on_every_rank(group):
    world, res = group
    for r in res["ranks"]:
        assert r["quantile_mismatch"] is not None and "expected every rank to track the same quantiles" in r["quantile_mismatch"]


def _reference(world: int, csv: Path | None = None) -> tuple[list[dict], StatsHistory]:
    sinks = {"type": "csv", "path": str(csv)} if csv else None
    with Tracker("loss_by_y", sinks=sinks, sync=None, figures=None) as ref:
        returned = []
        for per_rank in dist_worker.tracker_epochs(world):
            for step_modes in per_rank:
                for mode, batches in step_modes.items():
                    for labels, values in batches:
                        ref.update(labels, values, mode=mode)
            returned.append(ref.end_epoch(step=100 * (len(returned) + 1)))
    return returned, ref.history


def test_tracker_returns_global_tables_and_history_on_every_rank(group):
    world, res = group
    want, history = _reference(world)
    for r, got in enumerate(res["ranks"]):
        assert [sorted(e) for e in got["returned"]] == [["eval", "train"]] * 2, f"rank {r} (rank 1 has no eval data)"
        for e, tables in enumerate(got["returned"]):
            for mode, t in tables.items():
                assert_same_stats(table(t), want[e][mode])
                assert table(t) == table(res["ranks"][0]["returned"][e][mode])
        for mode in ("train", "eval"):
            steps = [s for s, _ in got["history"][mode]]
            assert steps == history.steps("loss_by_y", mode) == [100, 200]
            for (_, t), ref in zip(got["history"][mode], history.tables("loss_by_y", mode)):
                assert_same_stats(table(t), ref)
    assert res["ranks"][0]["returned"][1]["train"].get("nonfinite") is not None
    assert sum(res["ranks"][0]["returned"][1]["train"]["nonfinite"]) == 3  # rank 0's NaNs, counted once
    # sync=None keeps the local shard (today's behaviour)
    for r, got in enumerate(res["ranks"]):
        assert (sum(got["local"][0]["train"]["count"]) == 16 * (2 + r))


def test_a_subgroup_syncs_over_its_own_ranks_and_writes_on_its_rank_zero(group):
    """``synced(group)`` / ``Tracker(sync=group)`` with the ranks split in two halves: each rank
    gets the statistics of its half only, identical within the half; only each half's rank 0 writes."""
    world, res = group
    halves = [list(range(world // 2)), list(range(world // 2, world))]
    shards = dist_worker.stats_scenarios(world)["different_label_sets"]
    epoch = dist_worker.tracker_epochs(world)[0]
    for half in halves:
        want = one_process([shards[r] for r in half])
        want_tracker = one_process([epoch[r]["train"] for r in half])
        for r in half:
            sub = res["ranks"][r]["subgroups"]
            assert_same_stats(table(sub["synced"]), want)
            assert table(sub["synced"]) == table(res["ranks"][half[0]]["subgroups"]["synced"])
            assert_same_stats(table(sub["table"]), want_tracker)
            leader = r == half[0]
            assert sub["num_sinks"] == (1 if leader else 0), f"rank {r}"
            assert bool(sub["written"]) == leader, f"rank {r} wrote {sub['written']}"
    # the halves differ (rank world - 1 alone sees label 1000): each really synced its own half
    assert 1000 not in table(res["ranks"][0]["subgroups"]["synced"])
    assert 1000 in table(res["ranks"][world - 1]["subgroups"]["synced"])


def test_only_rank_zero_writes(group, tmp_path):
    world, res = group
    work = res["workdirs"]
    assert res["ranks"][0]["num_sinks"] == 3
    for r in range(1, world):
        assert res["ranks"][r]["num_sinks"] == 0
        assert list((work / f"rank{r}").rglob("*")) == [], f"rank {r} wrote files"
    root = work / "rank0"
    # CSV: every row once, the same rows as one process writes
    csv = next(root.rglob("*.csv"))
    _, ref_history = _reference(world, tmp_path / "ref.csv")
    assert len(csv.read_text().splitlines()) == len((tmp_path / "ref.csv").read_text().splitlines())
    back = StatsHistory.from_csv(csv)
    for mode in ("train", "eval"):
        assert back.steps("loss_by_y", mode) == [100, 200]
        for got, ref in zip(back.tables("loss_by_y", mode), ref_history.tables("loss_by_y", mode)):
            np.testing.assert_array_equal(got.count, ref.count)
    # TensorBoard: one event file per mode
    events = sorted(root.rglob("events.out.tfevents*"))
    assert sorted(p.parent.name for p in events) == ["eval", "train"], events
    # MLflow: exactly one run in the sqlite store, FINISHED, every key logged once per epoch
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(root / 'mlflow.db').as_posix()}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    keys = list(runs[0].data.metrics)
    assert keys
    for key in keys[:20]:
        assert [m.step for m in client.get_metric_history(runs[0].info.run_id, key)] == [100, 200], key


def test_a_run_on_every_rank_builds_its_sinks_on_rank_zero_only(group):
    """Every rank creates ``Run(sinks=[CSV, TensorBoard, MLflow sqlite])`` and two trackers on it:
    only rank 0 builds sinks (one CSV, TensorBoard files, exactly one MLflow run); the other ranks
    build none (no files, no MLflow run, no spool, no delivery child), and every rank gets the
    global tables."""
    world, res = group
    work = res["workdirs"] / "run"
    runs = [r["run"] for r in res["ranks"]]
    assert runs[0]["sinks"] == [3, 3, 3]
    total = int(_reference(world)[0][1]["train"].count.sum())  # one process over every rank's last epoch
    for r, got in enumerate(runs):
        assert got["train_count"] == total, f"rank {r} did not get the global table"
        if r:
            assert got["sinks"] == [0, 0, 0], f"rank {r} built sinks"
            assert got["children"] == [], f"rank {r} started child processes {got['children']}"
            assert got["written"] == [] and list((work / f"rank{r}").rglob("*")) == [], f"rank {r} wrote {got['written']}"
    root = work / "rank0"
    history = StatsHistory.from_csv(root / "labeltrack.csv")
    assert history.steps("loss_by_y", "train") == history.steps("acc_by_y", "eval") == [100, 200]
    assert [int(t.count.sum()) for t in history.tables("loss_by_y", "train")][-1] == total
    events = sorted(root.rglob("events.out.tfevents*"))
    assert sorted(p.parent.name for p in events) == ["eval", "train"] and {p.parent.parent.name for p in events} == {"ddp"}, events
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(root / 'mlflow.db').as_posix()}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(found) == 1 and found[0].info.status == "FINISHED" and found[0].info.run_name == "ddp"
    assert any(k.startswith("acc_by_y") for k in found[0].data.metrics) and any(k.startswith("loss_by_y") for k in found[0].data.metrics)
    # Run(sync=None) with Tracker(sync=None): a record per rank, each of its own shard
    for r, got in enumerate(runs):
        assert got["per_rank_count"] == 16 * (2 + r)
        (back,) = StatsHistory.from_csv(res["workdirs"] / "per_rank" / f"rank{r}" / "labeltrack.csv").tables("loss_by_y", "train")
        assert int(back.count.sum()) == 16 * (2 + r)


@pytest.mark.parametrize(("n", "world", "drop_last"), [(10, 4, False), (12, 4, False), (7, 3, True), (1, 4, False)])
def test_not_padded_keeps_every_sample_once(n, world, drop_last):
    from torch.utils.data import DistributedSampler

    from labeltrack_log.distributed import not_padded

    kept = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3, drop_last=drop_last)
        order = list(sampler)
        mask = not_padded(sampler)
        assert len(mask) == len(order)
        kept += [i for i, keep in zip(order, mask) if keep]
    padded_total = world * len(list(DistributedSampler(range(n), num_replicas=world, rank=0, drop_last=drop_last)))
    assert padded_total != n or n % world == 0 or drop_last  # the cases do pad (or drop)
    if drop_last:
        assert len(kept) == len(set(kept)) == n - n % world
    else:
        assert sorted(kept) == list(range(n))


def test_not_padded_names_what_it_expects():
    from labeltrack_log.distributed import not_padded
    from labeltrack_log.errors import InputTypeError

    with pytest.raises(InputTypeError, match="expected a torch.utils.data.DistributedSampler"):
        not_padded([1, 2, 3])


def test_ddp_example_runs_under_torchrun(tmp_path):
    """examples/ddp_torch_digits.py under torchrun, 2 CPU ranks: padding excluded, rank 0 alone wrote."""
    import os
    import subprocess
    import sys

    example = Path(__file__).parent.parent / "examples" / "ddp_torch_digits.py"
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(servers.free_port()), str(example), "--output-dir", str(out), "--epochs", "2",
           "--sinks", "csv,tensorboard"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(example.parent.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = proc.stdout + proc.stderr
    assert "train samples 1401 of 1401, eval samples 396 of 396" in log  # 1401 pads to 1402 on 2 ranks
    assert "2 ranks, 2 epochs" in log
    history = StatsHistory.from_csv(out / "stats.csv")
    assert history.steps("ce_by_digit", "train") == history.steps("ce_by_digit", "eval") and len(history.steps("ce_by_digit", "eval")) == 2
    assert [int(t.count.sum()) for t in history.tables("ce_by_digit", "train")] == [1401, 1401]
    assert sorted(p.parent.name for p in out.rglob("events.out.tfevents*")) == ["eval", "train"]
