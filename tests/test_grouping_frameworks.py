"""GroupedStats with real torch and TensorFlow tensors, and parity with FastEstimator's own LabelTracker."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from labeltrack_log import GroupedStats


def test_torch_tensors_any_dtype_and_device_free():
    torch = pytest.importorskip("torch")
    g = GroupedStats()
    g.update(torch.tensor([0, 1, 1]), torch.tensor([1.0, 2.0, 4.0]))
    g.update(torch.tensor([1.0, 0.0]), torch.tensor([6.0, 3.0], dtype=torch.bfloat16))  # float labels, bf16 values
    g.update(torch.tensor([True]).long(), torch.tensor([0.0], requires_grad=True))
    t = g.compute()
    assert t.labels.tolist() == [0, 1]
    assert t[0].count == 2 and t[0].mean == 2.0
    assert t[1].count == 4 and t[1].mean == 3.0 and t[1].min == 0.0 and t[1].max == 6.0


def test_cuda_tensors_give_the_numbers_of_their_cpu_copies():
    """Runs where a CUDA device exists (the project's GPU check); skipped elsewhere."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gen = torch.Generator().manual_seed(3)
    on_gpu, on_cpu = GroupedStats(), GroupedStats()
    for i in range(20):
        labels = torch.randint(0, 37, (257,), generator=gen)
        values = torch.rand(257, generator=gen) * 10 - 5
        values[i] = float("nan") if i % 3 == 0 else values[i]
        gpu_values = values.cuda().requires_grad_(True) * 1.0  # a loss still attached to its graph
        if i % 4 == 1:
            gpu_values = gpu_values.to(torch.bfloat16)  # mixed-precision training hands these
            values = values.to(torch.bfloat16).float()
        gpu_labels = labels.cuda() if i % 2 else labels.cuda().float()  # float labels, as in FE's tests
        on_gpu.update(gpu_labels, gpu_values)
        on_cpu.update(labels.numpy(), values.detach().numpy())
    a, b = on_gpu.compute(), on_cpu.compute()
    assert a.labels.tolist() == b.labels.tolist() and a.count.tolist() == b.count.tolist()
    assert a.nonfinite.tolist() == b.nonfinite.tolist() and a.nonfinite.sum() == 7
    for col in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(getattr(a, col), getattr(b, col), rtol=1e-12, atol=1e-12)


def test_tf_tensors():
    tf = pytest.importorskip("tensorflow")
    g = GroupedStats()
    g.update(tf.constant([2, 2, 5]), tf.constant([1.0, 3.0, 7.0]))
    g.update(tf.constant([5]), tf.constant([9.0], dtype=tf.float16))
    t = g.compute()
    assert t.labels.tolist() == [2, 5] and t[2].mean == 2.0 and t[5].mean == 8.0


def test_importing_core_does_not_import_frameworks():
    code = (
        "import sys, numpy as np, labeltrack_log as lt\n"
        "g = lt.GroupedStats(); g.update(np.array([1, 2]), np.array([0.5, 1.5])); g.compute()\n"
        "bad = [m for m in ('torch', 'tensorflow', 'mlflow', 'fastestimator', 'tensorboard') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("bounds", ["std", "range", None])
def test_identical_numbers_to_fastestimator_label_tracker(bounds):
    pytest.importorskip("fastestimator")
    torch = pytest.importorskip("torch")
    from fastestimator.test.unittest_util import sample_system_object
    from fastestimator.trace.xai import LabelTracker
    from fastestimator.util.data import Data

    rng = np.random.default_rng(7)
    tracker = LabelTracker(label="y", metric="ce", bounds=bounds, mode="eval")
    tracker.system = sample_system_object()
    tracker.system.mode = "eval"
    ours = {}
    for epoch, step in ((1, 10), (2, 20)):
        tracker.system.global_step = step
        tracker.on_epoch_begin(Data())
        g = GroupedStats()
        for _ in range(12):
            y = torch.tensor(rng.integers(0, 5, 32), dtype=torch.float32)  # FE's tests use float labels
            ce = torch.tensor(rng.gamma(2.0, 0.5, 32), dtype=torch.float32)
            tracker.on_batch_end(Data({"y": y, "ce": ce}))
            g.update(y, ce)
        tracker.on_epoch_end(Data())
        ours[step] = g.compute()
    data = Data()
    tracker.on_end(data)
    summaries = data[tracker.outputs[0]]
    assert len(summaries) == 5
    for summary in summaries:
        for key, by_step in summary.history["eval"].items():
            for step, val in by_step.items():
                row = ours[step][summary.name]
                if bounds == "std":
                    expected = (row.mean - row.std, row.mean, row.mean + row.std)
                    got = (val.y_min, val.y, val.y_max)
                elif bounds == "range":
                    expected = (row.min, row.mean, row.max)
                    got = (val.y_min, val.y, val.y_max)
                else:
                    expected, got = (row.mean,), (val,)
                assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), (summary.name, key, step)
