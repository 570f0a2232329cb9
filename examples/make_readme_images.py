"""Write the README's example band figures (docs/images/band_10_labels.png, band_300_labels.png).

The data is simulated but shaped like real per-class evaluation losses: every class has its own
difficulty and learning speed, per-sample losses are skewed (gamma distributed), a few classes
stay hard, one starts to overfit late, and in the 300-label run a handful of classes only enter
the evaluation set part-way through training. Per-sample losses go through GroupedStats and
StatsHistory exactly as during training.

Run: .venv/bin/python examples/make_readme_images.py [output_dir]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from labeltrack_log import GroupedStats, StatsHistory
from labeltrack_log.figures import band_figure, figure_to_png

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STEPS_PER_EPOCH = 391


def simulate(num_labels: int, epochs: int, per_class: int, seed: int, late: int = 0) -> StatsHistory:
    """Per-class eval losses over ``epochs``; the last ``late`` classes appear at epoch 8."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(1.6, 2.6, num_labels)  # initial loss (about ln(10) for 10 classes)
    floor = rng.gamma(2.0, 0.08, num_labels)  # irreducible loss per class
    speed = rng.uniform(2.5, 6.0, num_labels)  # epochs to learn
    hard = rng.choice(num_labels, size=max(1, num_labels // 12), replace=False)
    floor[hard] += rng.uniform(0.5, 0.9, len(hard))
    speed[hard] *= 2.0
    overfit = (hard[0] + 1) % num_labels  # one class whose loss turns up late
    history = StatsHistory()
    stats = GroupedStats()
    for epoch in range(1, epochs + 1):
        mean = floor + (start - floor) * np.exp(-epoch / speed)
        if epoch > 10:
            mean[overfit] += 0.05 * (epoch - 10)
        present = np.arange(num_labels - late if epoch < 8 else num_labels)
        labels = np.repeat(present, per_class)
        shape = 1.6  # skewed per-sample losses: most small, a tail of confidently wrong samples
        losses = rng.gamma(shape, mean[labels] / shape) * rng.lognormal(0.0, 0.05, len(labels))
        stats.update(labels, losses)
        history.append(stats.compute(), step=epoch * STEPS_PER_EPOCH, name="ce", mode="eval")
        stats.reset()
    return history


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    small = simulate(10, 20, per_class=1000, seed=3)
    fig = band_figure(small, label_names=dict(enumerate(CIFAR10)))
    (out / "band_10_labels.png").write_bytes(figure_to_png(fig))
    large = simulate(300, 20, per_class=50, seed=5, late=6)
    fig = band_figure(large)
    (out / "band_300_labels.png").write_bytes(figure_to_png(fig))
    for name in ("band_10_labels.png", "band_300_labels.png"):
        print(out / name, (out / name).stat().st_size // 1024, "KB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "docs" / "images")
