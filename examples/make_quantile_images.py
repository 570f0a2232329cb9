"""Write the README's quantile picture: the same skewed per-sample losses drawn as mean ± std
(docs/images/band_std_skewed.png) and with the "quantile" bound (docs/images/band_quantile_skewed.png).

    .venv/bin/python examples/make_quantile_images.py [out_dir]

Losses are lognormal per class (most samples near 0, a long tail of hard ones) with a few outliers
in class 3: mean - std runs below zero, a value no sample had, and the outliers widen the std band;
the median and p10..p90 stay where the samples are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from labeltrack_log import GroupedStats, StatsHistory
from labeltrack_log.figures import band_figure, figure_to_png

LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9)


def skewed_history(labels: int = 6, steps: int = 20, n: int = 6000, seed: int = 0) -> StatsHistory:
    rng = np.random.default_rng(seed)
    history = StatsHistory()
    for step in range(1, steps + 1):
        g = GroupedStats(quantiles=LEVELS)
        y = rng.integers(0, labels, n)
        loss = rng.lognormal(-1.5 - 0.06 * step + 0.15 * y, 1.1)
        hard = (y == 3) & (rng.random(n) < 0.01)
        loss[hard] += rng.uniform(5, 15, hard.sum())  # a few outliers in class 3
        g.update(y, loss)
        history.append(g.compute(), step=step * 100, name="ce_by_y", mode="eval")
    return history


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images")
    out.mkdir(parents=True, exist_ok=True)
    history = skewed_history()
    for bound in ("std", "quantile"):
        fig = band_figure(history, bound=bound, width=8.5)
        (out / f"band_{bound}_skewed.png").write_bytes(figure_to_png(fig, dpi=90))
        print(out / f"band_{bound}_skewed.png")


if __name__ == "__main__":
    main()
