"""CSVSink, JSONLSink and ImageDirSink: real files read back with pandas and PIL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from labeltrack_log import ConfigError, GroupedStats
from labeltrack_log.sinks.files import FIELDS, CSVSink, ImageDirSink, JSONLSink

pd = pytest.importorskip("pandas")


def table(labels, values):
    g = GroupedStats()
    g.update(labels, values)
    return g.compute()


@pytest.mark.parametrize("cls,reader", [(CSVSink, pd.read_csv), (JSONLSink, lambda p: pd.read_json(p, lines=True))])
def test_tidy_rows_round_trip_with_pandas(tmp_path: Path, cls, reader):
    path = tmp_path / "out" / f"stats.{cls.__name__.lower()}"
    t1 = table([0, 1, 1, 2], [1.0, 2.0, 4.0, math.nan])
    t2 = table([0, 1], [3.0, 5.0])
    with cls(path, label_names={0: "cat", 1: "dog ü/x"}) as sink:
        sink.log_stats(t1, step=10, name="ce_by_y", mode="eval")
        sink.log_stats(t2, step=20, name="ce_by_y", mode="train")
    with cls(path) as sink:  # append-only: a second sink adds rows, no second header
        sink.log_stats(t2, step=30, name="ce_by_y", mode="train")
    df = reader(path)
    assert list(df.columns) == list(FIELDS)
    assert len(df) == 3 + 2 + 2
    row = df[(df.step == 10) & (df.label == 1)].iloc[0]
    assert (row["name"], row["mode"], row["label_name"], row["count"]) == ("ce_by_y", "eval", "dog ü/x", 2)
    assert row["mean"] == 3.0 and row["std"] == pytest.approx(math.sqrt(2)) and (row["min"], row["max"]) == (2.0, 4.0)
    nan_row = df[(df.step == 10) & (df.label == 2)].iloc[0]
    assert nan_row["count"] == 0 and nan_row["nonfinite"] == 1 and np.isnan(nan_row["mean"])
    assert df[df.step == 30]["label_name"].tolist() == ["0", "1"]


def test_csv_floats_round_trip_exactly(tmp_path: Path):
    t = table([5], [0.1 + 0.2])
    with CSVSink(tmp_path / "s.csv") as sink:
        sink.log_stats(t, step=1, name="x", mode="eval")
    assert pd.read_csv(tmp_path / "s.csv", float_precision="round_trip")["mean"][0] == 0.1 + 0.2


def test_jsonl_is_strict_json_with_null_for_nan(tmp_path: Path):
    with JSONLSink(tmp_path / "s.jsonl") as sink:
        sink.log_stats(table(["a"], [math.inf]), step=1, name="x", mode="eval")
    obj = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])
    assert obj["label"] == "a" and obj["mean"] is None and obj["nonfinite"] == 1


def test_image_dir_sink_names_like_imagesaver_and_stays_inside(tmp_path: Path):
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(2, 1), dpi=50)
    fig.add_subplot().plot([0, 1], [1, 0])
    out = tmp_path / "imgs"
    with ImageDirSink(out) as sink:
        sink.log_figure(fig, step=7, name="ce_by_y", mode="eval")
        sink.log_figure(fig, step=8, name="../../evil/x", mode="a/b")
    files = sorted(p.name for p in out.iterdir())
    assert files[0].startswith("__") or "evil" in files[0]
    assert "ce_by_y_eval_step_7.png" in files
    assert all(p.parent == out for p in out.iterdir()) and len(files) == 2
    with Image.open(out / "ce_by_y_eval_step_7.png") as im:
        assert im.size == (100, 50)
    assert not (tmp_path / "evil").exists()


def test_bad_destinations_fail_at_construction(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create directory"):
        CSVSink(blocker / "sub" / "s.csv")
    with pytest.raises(ConfigError, match="expected a file path, got the directory"):
        JSONLSink(tmp_path)
    with pytest.raises(ConfigError, match="cannot create directory"):
        ImageDirSink(blocker / "imgs")


def test_close_is_idempotent_and_sink_pickles(tmp_path: Path):
    import pickle

    sink = CSVSink(tmp_path / "s.csv")
    sink.log_stats(table([1], [1.0]), step=1, name="x", mode="eval")
    clone = pickle.loads(pickle.dumps(sink))
    sink.close()
    sink.close()
    assert sink.closed
    clone.log_stats(table([1], [2.0]), step=2, name="x", mode="eval")
    clone.close()
    assert pd.read_csv(tmp_path / "s.csv")["step"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="closed"):
        sink.log_stats(table([1], [1.0]), step=3, name="x", mode="eval")


def test_figure_files_of_different_name_mode_pairs_never_collide():
    from labeltrack_log.naming import figure_file, table_file

    assert figure_file("a_b", "c", 1) != figure_file("a", "b_c", 1)
    assert table_file("a_b", "c", 1) != table_file("a", "b_c", 1)
    assert figure_file("ce_by_y", "eval", 3) == "ce_by_y_eval_step_3.png"  # the usual case stays readable
