"""StatsHistory: the per (name, mode) sequence of StatsTables over steps, bounded in memory.

Each (name, mode) series keeps every appended step until it holds ``max_steps`` of them; from
then on it thins evenly (every 2nd, then every 4th, ... appended table) and always keeps the
latest, so memory stays bounded over arbitrarily long training while the whole run stays visible.

A history can be rebuilt from what the CSV/JSONL file sinks wrote (:meth:`StatsHistory.from_file`),
so figures can be re-rendered after training. Only numpy is imported here.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from .grouping import StatsTable, natural_key  # natural_key: defined once, in the core

__all__ = ["StatsHistory", "DenseHistory", "natural_key", "FILE_COLUMNS"]

#: Columns of the CSV/JSONL file-sink schema, in order.
FILE_COLUMNS = ("wall_time", "name", "mode", "step", "label", "label_name", "count", "mean", "std", "min", "max", "nonfinite")
_REQUIRED = ("name", "mode", "step", "label", "count", "mean", "std", "min", "max")
_INT_TEXT = re.compile(r"[+-]?\d+")
DEFAULT_MAX_STEPS = 256

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseHistory:
    """Labels x steps matrices of one (name, mode) series, ready for plotting.

    Every statistic is a float array of shape ``(len(labels), len(steps))`` holding NaN where a
    label has no row at a step (e.g. a label that appears late). A label present with only
    non-finite values has ``count`` 0 and NaN mean/std/min/max.

    Attributes:
        name: tracked name.
        mode: mode.
        labels: label values in natural order (ints numerically, strings digit-aware).
        steps: int64 array of the kept steps, increasing.
        count, mean, std, min, max, nonfinite: the matrices.
    """

    name: str
    mode: str
    labels: np.ndarray
    steps: np.ndarray
    count: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nonfinite: np.ndarray


class _Series:
    """The kept (ordinal, step, table) entries of one (name, mode)."""

    __slots__ = ("ordinals", "steps", "tables", "stride", "appended", "version", "dense", "dense_version", "kind")

    def __init__(self) -> None:
        self.ordinals: list[int] = []
        self.steps: list[int] = []
        self.tables: list[StatsTable] = []
        self.stride = 1
        self.appended = 0
        self.version = 0
        self.dense: DenseHistory | None = None
        self.dense_version = -1
        self.kind: str | None = None

    def __getstate__(self) -> dict[str, Any]:  # pickles without the dense cache
        state = {k: getattr(self, k) for k in self.__slots__}
        state.update(dense=None, dense_version=-1)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def append(self, table: StatsTable, step: int, limit: int) -> None:
        self.version += 1
        if self.steps and step == self.steps[-1]:  # same step again: the newer table wins
            self.tables[-1] = table
            return
        if self.ordinals and self.ordinals[-1] % self.stride:  # drop the previous latest if off-grid
            del self.ordinals[-1], self.steps[-1], self.tables[-1]
        self.ordinals.append(self.appended)
        self.steps.append(step)
        self.tables.append(table)
        self.appended += 1
        while len(self.ordinals) > limit:
            self.stride *= 2
            keep = [i for i, o in enumerate(self.ordinals) if o % self.stride == 0]
            if keep[-1] != len(self.ordinals) - 1:
                keep.append(len(self.ordinals) - 1)  # always keep the latest
            self.ordinals = [self.ordinals[i] for i in keep]
            self.steps = [self.steps[i] for i in keep]
            self.tables = [self.tables[i] for i in keep]


class StatsHistory:
    """Per-label statistics over steps for every (name, mode), bounded in memory.

    Args:
        max_steps: most steps kept per (name, mode); beyond it the series is thinned evenly and
            the latest step is always kept. At least 2.

    Attributes:
        label_names: label value -> display name, filled by :meth:`from_file` from the
            ``label_name`` column (empty otherwise); figures use it when given no names.

    Example:
        >>> from labeltrack_log import GroupedStats
        >>> h = StatsHistory(max_steps=100)
        >>> g = GroupedStats()
        >>> for step in (1, 2):
        ...     g.update([0, 1, 1], [0.5 / step, 1.0, 3.0])
        ...     h.append(g.compute(), step=step, name="loss", mode="train")
        ...     g.reset()
        >>> h.names(), h.modes(), h.steps()
        (['loss'], ['train'], [1, 2])
        >>> h.dense().mean.tolist()
        [[0.5, 0.25], [2.0, 2.0]]
    """

    def __init__(self, max_steps: int = DEFAULT_MAX_STEPS) -> None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 2:
            raise ValueError(f"max_steps: expected an int >= 2, got {max_steps!r}")
        self.max_steps = int(max_steps)
        self.label_names: dict[Any, str] = {}
        self._series: dict[tuple[str, str], _Series] = {}

    # ----------------------------------------------------------------- writing
    def append(self, table: StatsTable, *, step: int, name: str, mode: str) -> None:
        """Record ``table`` as the statistics of ``name`` in ``mode`` at ``step``.

        Steps of one (name, mode) must not decrease; appending the latest step again replaces it.

        Raises:
            TypeError: ``table`` is not a StatsTable or ``step`` is not an int.
            ValueError: ``step`` is smaller than the latest step of this (name, mode).
        """
        if not isinstance(table, StatsTable):
            raise TypeError(f"append: expected a StatsTable, got {type(table).__name__}")
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"append: expected an int step, got {step!r}")
        for what, value in (("name", name), ("mode", mode)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"append: expected a non-empty string {what}, got {value!r}")
        series = self._series.setdefault((name, mode), _Series())
        if series.steps and step < series.steps[-1]:
            raise ValueError(
                f"append: expected step >= {series.steps[-1]} (the latest step of {name!r}/{mode!r}), got {step}"
            )
        kind = _label_kind(table)
        if kind is not None and series.kind not in (None, kind):
            raise TypeError(f"append: expected {series.kind} labels as in earlier steps of {name!r}/{mode!r}, got {kind} labels")
        series.kind = series.kind or kind
        series.append(table, int(step), self.max_steps)

    def extend(self, other: "StatsHistory") -> None:
        """Append every table of ``other`` (series by series, in step order)."""
        for (name, mode), series in other._series.items():
            for step, table in zip(series.steps, series.tables):
                self.append(table, step=step, name=name, mode=mode)
        self.label_names.update(other.label_names)

    # ----------------------------------------------------------------- reading
    def __len__(self) -> int:
        """Number of (name, mode) series."""
        return len(self._series)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """The (name, mode) pairs, in the order they were first appended."""
        return iter(list(self._series))

    def names(self) -> list[str]:
        """Tracked names, in first-appended order."""
        return list(dict.fromkeys(name for name, _ in self._series))

    def modes(self, name: str | None = None) -> list[str]:
        """Modes (of ``name`` if given), in first-appended order."""
        if name is not None:
            self._check_name(name)
        return list(dict.fromkeys(m for n, m in self._series if name is None or n == name))

    def resolve(self, name: str | None = None, mode: str | None = None) -> tuple[str, str]:
        """The (name, mode) meant by possibly omitted ``name``/``mode``.

        Raises:
            ValueError: the history is empty, a name/mode is unknown, or one was omitted while
                the history holds several (the message lists the choices).
        """
        if not self._series:
            raise ValueError("StatsHistory is empty: expected at least one appended table")
        if name is None:
            names = self.names()
            if len(names) > 1:
                raise ValueError(f"name: the history holds several names, expected one of {names}, got None")
            name = names[0]
        else:
            self._check_name(name)
        modes = self.modes(name)
        if mode is None:
            if len(modes) > 1:
                raise ValueError(f"mode: {name!r} has several modes, expected one of {modes}, got None")
            mode = modes[0]
        elif mode not in modes:
            raise ValueError(f"mode: expected one of {modes} for name {name!r}, got {mode!r}")
        return name, mode

    def _check_name(self, name: str) -> None:
        if name not in self.names():
            raise ValueError(f"name: expected one of {self.names()}, got {name!r}")

    def steps(self, name: str | None = None, mode: str | None = None) -> list[int]:
        """The kept steps of a series, increasing."""
        return list(self._series[self.resolve(name, mode)].steps)

    def tables(self, name: str | None = None, mode: str | None = None) -> list[StatsTable]:
        """The kept tables of a series, aligned with :meth:`steps`."""
        return list(self._series[self.resolve(name, mode)].tables)

    def items(self, name: str | None = None, mode: str | None = None) -> list[tuple[int, StatsTable]]:
        """(step, table) pairs of a series."""
        series = self._series[self.resolve(name, mode)]
        return list(zip(series.steps, series.tables))

    def latest(self, name: str | None = None, mode: str | None = None) -> StatsTable:
        """The most recent table of a series (its step is ``steps(name, mode)[-1]``)."""
        return self._series[self.resolve(name, mode)].tables[-1]

    def version(self, name: str | None = None, mode: str | None = None) -> int:
        """A counter that changes whenever the series is appended to (for caching renderers)."""
        return self._series[self.resolve(name, mode)].version

    def dense(self, name: str | None = None, mode: str | None = None) -> DenseHistory:
        """Labels x steps matrices of a series with NaN where a label is missing (cached)."""
        key = self.resolve(name, mode)
        series = self._series[key]
        if series.dense is None or series.dense_version != series.version:
            series.dense = _densify(key[0], key[1], series.steps, series.tables)
            series.dense_version = series.version
        return series.dense

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}/{m}: {len(s.steps)} steps" for (n, m), s in self._series.items())
        return f"StatsHistory({parts})"

    # ------------------------------------------------------------- from files
    @classmethod
    def from_file(cls, path: str | Path, max_steps: int = DEFAULT_MAX_STEPS) -> "StatsHistory":
        """Load what a CSVSink (``.csv``) or JSONLSink (``.jsonl``/``.ndjson``/``.json``) wrote.

        Other suffixes are sniffed: a first character ``{`` means JSONL, anything else CSV.

        Raises:
            FileNotFoundError: no such file.
            ValueError: missing columns or a value that is not a number, naming the line.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson", ".json"):
            return cls.from_jsonl(path, max_steps)
        if suffix == ".csv":
            return cls.from_csv(path, max_steps)
        with path.open(encoding="utf-8", errors="replace") as fh:  # a binary file fails below, naming its line
            head = fh.read(4096).lstrip()
        return (cls.from_jsonl if head.startswith("{") else cls.from_csv)(path, max_steps)

    @classmethod
    def from_csv(cls, path: str | Path, max_steps: int = DEFAULT_MAX_STEPS) -> "StatsHistory":
        """Load the rows a CSVSink wrote (header row, NaN as ``nan``). See :meth:`from_file`.

        A torn row (a full disk cut a line short: a wrong number of fields, or a last line
        without its newline) is skipped with a warning naming the line; the rest is read."""
        path = Path(path)
        torn_tail = _torn_tail(path)
        limit = csv.field_size_limit()
        # a field can be as long as the file (a 200 kB label our own sink wrote): never refuse it
        csv.field_size_limit(max(limit, min(path.stat().st_size + 1, 2**31 - 1)))
        try:
            with path.open(newline="", encoding="utf-8", errors="strict") as fh:
                reader = csv.reader(fh)
                try:
                    header = next(reader, [])
                    missing = [c for c in _REQUIRED if c not in header]
                    if missing:
                        raise ValueError(f"{path}: expected CSV columns {list(FILE_COLUMNS)}, got {header} (missing {missing})")
                    return cls._from_rows(path, _csv_rows(path, reader, header, torn_tail), max_steps)
                except csv.Error as err:
                    raise ValueError(f"{path}:{reader.line_num}: expected CSV rows, got an error: {err}") from None
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}: expected UTF-8 text, got byte {err.object[err.start:err.start + 1]!r} "
                                     f"at byte offset {err.start} of a read block") from None
        finally:
            csv.field_size_limit(limit)

    @classmethod
    def from_jsonl(cls, path: str | Path, max_steps: int = DEFAULT_MAX_STEPS) -> "StatsHistory":
        """Load the rows a JSONLSink wrote (one object per line, NaN as null). See :meth:`from_file`.

        A torn last line (no newline at its end: a full disk cut it short) is skipped with a
        warning naming the line; the rest is read. Invalid JSON elsewhere is an error."""
        path = Path(path)
        torn_tail = _torn_tail(path)

        def rows() -> Iterator[tuple[int, Mapping[str, Any]]]:
            with path.open(encoding="utf-8") as fh:
                lineno = 0
                try:
                    for lineno, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        if torn_tail and not line.endswith("\n"):
                            logger.warning("%s:%d: skipped a torn last line (no newline at its end: the write was cut "
                                           "short, e.g. by a full disk); read everything before it", path, lineno)
                            continue
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as err:
                            raise ValueError(
                                f"{path}:{lineno}: expected one JSON object per line, got invalid JSON at column {err.colno} ({err.msg})"
                            ) from None
                        if not isinstance(row, dict):
                            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                        missing = [c for c in _REQUIRED if c not in row]
                        if missing:
                            raise ValueError(
                                f"{path}:{lineno}: expected keys {list(FILE_COLUMNS)}, got {sorted(row)} (missing {missing})"
                            )
                        yield lineno, row
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{lineno + 1}: expected UTF-8 text, got byte "
                                     f"{err.object[err.start:err.start + 1]!r}") from None

        return cls._from_rows(path, rows(), max_steps, typed=True)

    @classmethod
    def _from_rows(cls, path: Path, rows: Iterable[tuple[int, Mapping[str, Any]]], max_steps: int,
                   typed: bool = False) -> "StatsHistory":
        """``typed``: the rows keep the label's type (JSON), so a string label "3" stays a string;
        CSV has no types, and labels that all look like integers are read as integers."""
        # (name, mode) -> step -> label text -> (label_name, count, mean, std, min, max, nonfinite)
        groups: dict[tuple[str, str], dict[int, dict[str, tuple]]] = {}
        string_labels: set[tuple[str, str]] = set()  # (name, mode) whose labels are JSON strings
        for lineno, row in rows:
            where = f"{path}:{lineno}"
            step = _to_int(row["step"], "step", where)
            record = (
                row.get("label_name"),
                _to_int(row["count"], "count", where),
                _to_float(row["mean"], "mean", where),
                _to_float(row["std"], "std", where),
                _to_float(row["min"], "min", where),
                _to_float(row["max"], "max", where),
                _to_int(row.get("nonfinite"), "nonfinite", where, default=0),
            )
            key = (str(row["name"]), str(row["mode"]))
            groups.setdefault(key, {}).setdefault(step, {})[str(row["label"])] = record  # later rows win
            if typed and isinstance(row["label"], str):
                string_labels.add(key)
        history = cls(max_steps)
        for (name, mode), by_step in groups.items():
            texts = {t for labels in by_step.values() for t in labels}
            # only canonical decimals ("7", "-3"; not "007" or "+1") are ints, so distinct texts stay distinct
            as_int = (name, mode) not in string_labels and all(_INT_TEXT.fullmatch(t) and str(int(t)) == t for t in texts)
            for step in sorted(by_step):
                table, names = _table(by_step[step], as_int)
                history.append(table, step=step, name=name, mode=mode)
                history.label_names.update(names)
        return history


# ------------------------------------------------------------------ helpers
def _label_kind(table: StatsTable) -> str | None:
    """"number" or "string" for a table's labels (None for an empty table)."""
    if not len(table):
        return None
    return "string" if table.labels.dtype.kind in "USO" else "number"


def _torn_tail(path: Path) -> bool:
    """Whether the file's last line lacks its newline (every line our sinks write ends with one)."""
    with path.open("rb") as fh:
        fh.seek(0, 2)
        if fh.tell() == 0:
            return False
        fh.seek(-1, 2)
        return fh.read(1) != b"\n"


def _csv_rows(path: Path, reader: Any, header: list[str], torn_tail: bool) -> Iterator[tuple[int, dict[str, str]]]:
    """The CSV records as (line, row) with torn ones skipped (a warning names the line)."""
    previous: tuple[int, list[str]] | None = None
    for fields in reader:
        if previous is not None:
            yield from _csv_row(path, previous, header)
        previous = (reader.line_num, fields)
    if previous is not None:
        if torn_tail:
            logger.warning("%s:%d: skipped a torn last row (no newline at its end: the write was cut short, e.g. by a "
                           "full disk); read everything before it", path, previous[0])
        else:
            yield from _csv_row(path, previous, header)


def _csv_row(path: Path, record: tuple[int, list[str]], header: list[str]) -> Iterator[tuple[int, dict[str, str]]]:
    lineno, fields = record
    if not fields:
        return  # a blank line
    if fields == header:
        return  # a header repeated further down (two writers that each started the file, before sinks were shared)
    if len(fields) != len(header):
        logger.warning("%s:%d: skipped a torn row (%d fields, expected %d: the write was cut short, e.g. by a full "
                       "disk); read the rows around it", path, lineno, len(fields), len(header))
        return
    yield lineno, dict(zip(header, fields))


def _to_float(value: Any, column: str, where: str) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: column '{column}': expected a number or nan, got {value!r}") from None


def _to_int(value: Any, column: str, where: str, default: int | None = None) -> int:
    if (value is None or value == "") and default is not None:
        return default
    try:
        number = int(value) if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()) else float(value)
        if isinstance(number, float):
            if not number.is_integer():
                raise ValueError
            number = int(number)
        if not -(2**63) <= number < 2**63:
            raise ValueError(f"{where}: column '{column}': expected an integer in int64 range, got {value!r}")
        return number
    except ValueError as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: column '{column}': expected an integer, got {value!r}") from None
    except (TypeError, OverflowError):
        raise ValueError(f"{where}: column '{column}': expected an integer, got {value!r}") from None


def _table(rows: Mapping[str, tuple], as_int: bool) -> tuple[StatsTable, dict[Any, str]]:
    items = [(int(t) if as_int else t, rec) for t, rec in rows.items()]
    items.sort(key=lambda item: natural_key(item[0]))
    names = {lab: rec[0] for lab, rec in items if rec[0] not in (None, "") and str(rec[0]) != str(lab)}
    labels = np.array([lab for lab, _ in items], dtype=np.int64 if as_int else str)
    cols = list(zip(*(rec[1:] for _, rec in items))) if items else [()] * 6
    return StatsTable(labels, *cols), names


def _densify(name: str, mode: str, steps: list[int], tables: list[StatsTable]) -> DenseHistory:
    """Stack tables into labels x steps matrices (NaN where a label is missing)."""
    union: dict[Any, None] = {}
    previous = None
    for table in tables:
        if previous is not None and len(table.labels) == len(previous) and np.array_equal(table.labels, previous):
            continue
        union.update(dict.fromkeys(table.labels.tolist()))
        previous = table.labels
    labels_list = sorted(union, key=natural_key)
    index = {lab: i for i, lab in enumerate(labels_list)}
    n, m = len(labels_list), len(tables)
    stats = ("count", "mean", "std", "min", "max", "nonfinite")
    out = {s: np.full((n, m), np.nan) for s in stats}
    union_arr = np.array(labels_list) if labels_list else np.array([], dtype=np.int64)
    for j, table in enumerate(tables):
        if not len(table):
            continue
        if len(table) == n and np.array_equal(table.labels, union_arr):
            rows = slice(None)
        else:
            rows = np.fromiter((index[lab] for lab in table.labels.tolist()), dtype=np.int64, count=len(table))
        for s in stats:
            out[s][rows, j] = getattr(table, s)
    for arr in out.values():
        arr.flags.writeable = False
    return DenseHistory(name, mode, union_arr, np.asarray(steps, dtype=np.int64), **out)
