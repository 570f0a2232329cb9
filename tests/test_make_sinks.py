"""make_sinks: every config form, the environment variable, entry points, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from labeltrack_log import ConfigError
from labeltrack_log.sinks import Sink, available_sinks, make_sinks, register_sink
from labeltrack_log.sinks.files import CSVSink, ImageDirSink, JSONLSink


def kinds(sinks):
    out = [type(s).__name__ for s in sinks]
    for s in sinks:
        s.close()
    return out


def test_name_dict_instance_and_list(tmp_path: Path):
    inst = CSVSink(tmp_path / "a.csv")
    sinks = make_sinks(["csv", {"type": "jsonl", "path": str(tmp_path / "b.jsonl")}, inst, "images"])
    assert kinds(sinks) == ["CSVSink", "JSONLSink", "CSVSink", "ImageDirSink"]
    assert sinks[2] is inst
    assert make_sinks(None) == []


def test_toml_and_json_files(tmp_path: Path):
    toml = tmp_path / "sinks.toml"
    toml.write_text(textwrap.dedent(f"""
        [[sinks]]
        type = "csv"
        path = "{tmp_path / 'x.csv'}"

        [[sinks]]
        type = "images"
        directory = "{tmp_path / 'imgs'}"
    """))
    assert kinds(make_sinks(toml)) == ["CSVSink", "ImageDirSink"]
    assert kinds(make_sinks(str(toml))) == ["CSVSink", "ImageDirSink"]
    js = tmp_path / "sinks.json"
    js.write_text(json.dumps([{"type": "jsonl", "path": str(tmp_path / "y.jsonl")}, "csv"]))
    assert kinds(make_sinks(js)) == ["JSONLSink", "CSVSink"]


def test_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LABELTRACK_SINKS", "csv, jsonl")
    assert kinds(make_sinks(None)) == ["CSVSink", "JSONLSink"]
    monkeypatch.setenv("LABELTRACK_SINKS", json.dumps([{"type": "csv", "path": str(tmp_path / "e.csv")}]))
    sinks = make_sinks(None)
    assert sinks[0].path == tmp_path / "e.csv"
    kinds(sinks)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("tensorbord", r"unknown sink 'tensorbord'; valid names: csv, images, jsonl, mlflow, tensorboard"),
        ({"type": "csv", "pth": "x.csv"}, r"sink 'csv': unknown option\(s\) \['pth'\]; valid options: path, label_budget"),
        ({"path": "x.csv"}, "expected a 'type' key naming the sink"),
        ({"type": "csv", "label_budget": 0}, "label_budget: expected a positive int, got 0"),
        (42, "expected a name, dict, Sink, list, .toml/.json path or None, got int"),
        ("missing.toml", "sink configuration file 'missing.toml' does not exist"),
        ([["csv"]], "got a nested list"),
    ],
)
def test_bad_config_is_a_clear_error(config, match):
    with pytest.raises(ConfigError, match=match):
        make_sinks(config)


def test_registered_class_and_entry_point(tmp_path: Path):
    class Collect(Sink):
        def log_stats(self, table, *, step, name, mode):
            pass

    register_sink("collect", Collect)
    assert "collect" in available_sinks()
    assert kinds(make_sinks("collect")) == ["Collect"]
    with pytest.raises(ConfigError, match="expected a Sink subclass"):
        register_sink("bad", dict)  # type: ignore[arg-type]

    # A real installed distribution exposing a sink through the entry-point group.
    pkg = tmp_path / "plug"
    (pkg / "ltplug").mkdir(parents=True)
    (pkg / "ltplug" / "__init__.py").write_text(
        "from labeltrack_log.sinks import Sink\n"
        "class PlugSink(Sink):\n"
        "    def log_stats(self, table, *, step, name, mode):\n"
        "        pass\n"
    )
    dist = pkg / "ltplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ltplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[labeltrack_log.sinks]\nplug = ltplug:PlugSink\n")
    code = "from labeltrack_log.sinks import make_sinks; print(type(make_sinks('plug')[0]).__name__)"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(pkg)}, capture_output=True, text=True)
    assert out.stdout.strip() == "PlugSink", out.stderr


def test_malformed_files_and_environment_are_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "bad.toml").write_text("[[sinks]\ntype = ")
    (tmp_path / "bad.json").write_text("[{'type': 'csv'}]")
    with pytest.raises(ConfigError, match="bad.toml: expected valid TOML"):
        make_sinks(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="bad.json: expected valid JSON"):
        make_sinks(tmp_path / "bad.json")
    monkeypatch.setenv("LABELTRACK_SINKS", "[csv")
    with pytest.raises(ConfigError, match="LABELTRACK_SINKS: expected sink names, a file path or JSON"):
        make_sinks(None)
