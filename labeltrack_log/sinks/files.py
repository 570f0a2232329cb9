"""Plain-file sinks: ``CSVSink`` and ``JSONLSink`` (tidy rows), ``ImageDirSink`` (PNG per figure).

The tidy row schema (one row per step x mode x label, append-only, loadable with
``pandas.read_csv`` / ``pandas.read_json(lines=True)`` and by
:meth:`labeltrack_log.StatsHistory.from_file`)::

    wall_time, name, mode, step, label, label_name, count, mean, std, min, max, nonfinite

followed, when the table tracks quantiles, by one column per level (``p10``, ``p25``, ``p50``, ...,
:func:`labeltrack_log.naming.quantile_stat`). ``label`` is the label value (text in CSV),
``label_name`` its display name as given by the label names, even where two labels share one (the
``label`` column tells them apart; the series names of the other sinks add `` (<label>)`` instead,
see :meth:`~labeltrack_log.sinks.Sink.label_texts`). :func:`table_columns` names the columns of a
table, :func:`tidy_rows` builds its rows in that order and :func:`csv_text` formats them; these
sinks and the MLflow sink's table artifact (:func:`table_csv`, the same format as a CSVSink file)
all go through them.

File sinks ignore the label budget: a file holds every label (that is where the full table goes).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Mapping, Sequence

from ..errors import ConfigError
from ..grouping import StatsTable
from ..history import FILE_COLUMNS
from ..naming import figure_file, label_text, quantile_stats, visible
from . import DEFAULT_LABEL_BUDGET, Sink, ensure_writable_dir

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["CSVSink", "JSONLSink", "ImageDirSink", "FIELDS", "table_columns", "tidy_rows", "csv_text", "table_csv"]

logger = logging.getLogger(__name__)

FIELDS = FILE_COLUMNS  # the tidy-row schema, defined once in history.py (which reads these files)


def table_columns(table: StatsTable) -> tuple[str, ...]:
    """The columns the file sinks write for ``table``: :data:`FIELDS`, then one per quantile level
    it tracks (``p10``, ``p50``, ... in level order; none without quantiles).

    Example:
        >>> from labeltrack_log import GroupedStats
        >>> g = GroupedStats(quantiles=(0.1, 0.5, 0.9)); g.update([0], [1.0])
        >>> table_columns(g.compute())[-4:]
        ('nonfinite', 'p10', 'p50', 'p90')
    """
    return FIELDS + quantile_stats(table.quantile_levels)


def tidy_rows(table: StatsTable, *, step: int, name: str, mode: str,
              label_names: Mapping[Any, str] | None = None) -> list[tuple]:
    """The rows of ``table`` in the :func:`table_columns` order, one per label, stamped with the time now.

    Example:
        >>> t = StatsTable([3], [2], [0.5], [0.1], [0.4], [0.6], [0])
        >>> tidy_rows(t, step=1, name="ce", mode="eval", label_names={3: "cat"})[0][1:]
        ('ce', 'eval', 1, 3, 'cat', 2, 0.5, 0.1, 0.4, 0.6, 0)
    """
    now = time.time()
    cols = table.to_dict()
    columns = [cols["labels"], cols["count"], cols["mean"], cols["std"], cols["min"], cols["max"], cols["nonfinite"]]
    columns += [table.quantile(q).tolist() for q in table.quantile_levels]
    return [(now, name, mode, step, lab, label_text(lab, label_names), *vals) for lab, *vals in zip(*columns)]


def csv_text(rows: list[tuple], header: bool | Sequence[str] = False) -> str:
    """Rows of :func:`tidy_rows` as CSV text, after a header line if ``header``: the given column
    names, or :data:`FIELDS` for ``True``.
    Floats are written with ``repr``: they round-trip exactly, NaN/inf as ``nan``, ``inf``, ``-inf``."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    if header:
        writer.writerow(FIELDS if header is True else header)
    for row in rows:
        writer.writerow([repr(v) if isinstance(v, float) else visible(v) if isinstance(v, str) else v for v in row])
    return buf.getvalue()


def table_csv(table: StatsTable, *, step: int, name: str, mode: str,
              label_names: Mapping[Any, str] | None = None) -> str:
    """Every label of ``table`` as CSV text with its header: what a new :class:`CSVSink` file holds
    after this one table (same columns, quantiles included), so
    :meth:`labeltrack_log.StatsHistory.from_file` and ``labeltrack-log render`` read it back.
    The MLflow sink's table artifact over the label budget."""
    rows = tidy_rows(table, step=step, name=name, mode=mode, label_names=label_names)
    return csv_text(rows, header=table_columns(table))


class _RowSink(Sink):
    """Shared part of the CSV and JSONL sinks: one open append-mode file, a row per label."""

    _what = "file sink"
    _default = "labeltrack.txt"

    def __init__(self, path: str | os.PathLike | None = None, *, label_budget: int = DEFAULT_LABEL_BUDGET,
                 label_names: Mapping[Any, str] | None = None) -> None:
        super().__init__(label_budget=label_budget, label_names=label_names)
        self.path = Path(path if path is not None else self._default)
        if self.path.is_dir():
            raise ConfigError(f"{self._what}: expected a file path, got the directory {str(self.path)!r}")
        ensure_writable_dir(self.path.parent, self._what)
        self._file: io.TextIOWrapper | None = None
        self._open()  # fail now, not at the first epoch end

    def _open(self) -> io.TextIOWrapper:
        if self._file is None:
            try:
                # backslashreplace: a lone surrogate (a non-UTF-8 file name from os.listdir) in a
                # name or mode is written visibly instead of failing the whole call
                self._file = open(self.path, "a", encoding="utf-8", errors="backslashreplace", newline="")
                if self._file.tell() == 0:  # a new (or empty) file: the header, at once
                    self._write_header(self._file)
                    self._file.flush()
            except OSError as err:
                raise ConfigError(f"{self._what}: cannot open {str(self.path)!r} for appending: {err.strerror or err}") from None
        return self._file

    @classmethod
    def destination(cls, options: Mapping[str, Any]) -> Hashable | None:
        """One sink per resolved file path and format (so one header, rows never interleaved)."""
        path = options.get("path")
        return (cls.__name__, str(Path(path if path is not None else cls._default).resolve()))

    def _write_header(self, f: io.TextIOWrapper) -> None:
        """Called once when the file is new."""

    def log_stats(self, table: StatsTable, *, step: int, name: str, mode: str) -> None:
        """Append one row per label and flush to disk (with quantile columns ``p10`` ... when the
        table has quantiles)."""
        step = self._check_call(step, table)
        f = self._open()
        rows = tidy_rows(table, step=step, name=name, mode=mode, label_names=self.label_names)
        f.write(self._format(rows, table_columns(table)))
        self.flush()

    def _format(self, rows: list[tuple], columns: tuple[str, ...]) -> str:
        """The text of ``rows`` (of :func:`tidy_rows`, in the order of ``columns``)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Flush the file to the OS and to disk."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def _close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None  # reopened (append) on the next write
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class CSVSink(_RowSink):
    """Append tidy rows to a CSV file (header written once, when the file is new).

    Example:
        >>> from labeltrack_log import GroupedStats
        >>> g = GroupedStats(); g.update([0, 1], [0.5, 1.5])
        >>> with CSVSink("/tmp/lt-doctest-stats.csv") as sink:
        ...     sink.log_stats(g.compute(), step=1, name="loss_by_y", mode="eval")
    """

    _what = "CSVSink"
    _default = "labeltrack.csv"

    _columns: tuple[str, ...] = FIELDS  # the header of the file (quantile columns after FIELDS)
    _header_only = False  # the file holds nothing but the header this sink wrote

    def _write_header(self, f: io.TextIOWrapper) -> None:
        self._columns, self._header_only = FIELDS, True
        f.write(csv_text([], header=True))

    def _open(self) -> io.TextIOWrapper:
        new = self._file is None
        f = super()._open()
        if new and not self._header_only:  # appending to an existing file: keep its header
            try:
                with open(self.path, newline="", encoding="utf-8") as fh:
                    first = next(csv.reader(fh), None)
                self._columns = tuple(first) if first else FIELDS
            except OSError:
                self._columns = FIELDS
        return f

    def _format(self, rows: list[tuple], columns: tuple[str, ...]) -> str:
        if rows and isinstance(rows[0][4], str):
            rows = self._distinct_labels(rows)
        if columns != self._columns and columns[len(FIELDS):]:  # the table has quantile columns the header lacks
            if self._header_only:  # nothing written yet: the header takes this table's columns
                self._file.seek(0)
                self._file.truncate()
                self._columns = columns
                self._file.write(csv_text([], header=columns))
            elif not getattr(self, "_warned_columns", False):
                self._warned_columns = True
                logger.warning("CSVSink %s: its header has quantile columns %s, the table has %s; "
                               "only the header's columns are written (use a new file for other levels)",
                               self.path, list(self._columns[len(FIELDS):]), list(columns[len(FIELDS):]))
        self._header_only = self._header_only and not rows
        if columns != self._columns:  # the file's header decides: its columns, NaN for levels the table lacks
            where = {c: i for i, c in enumerate(columns)}
            rows = [tuple(row[where[c]] if c in where else math.nan for c in self._columns) for row in rows]
        return csv_text(rows)

    def _distinct_labels(self, rows: list[tuple]) -> list[tuple]:
        """CSV text cannot hold a lone surrogate (``"caf\\udce9"``): such a label is written
        visibly escaped (:func:`labeltrack_log.naming.visible`). The texts handed out are checked,
        as :meth:`Sink.label_texts` does: a label that can be written as is keeps its text, and an
        escaped text that equals another label's gets `` #2`` (`` #3``, ...)."""
        key = (rows[0][1], rows[0][2])  # (name, mode): the scope in which labels must stay distinct
        cells = self.__dict__.setdefault("_cells", {})
        state = cells.get(key)
        if state is None:
            if all(visible(row[4]) is row[4] for row in rows):
                return rows  # nothing escaped: every label is its own text
            state = cells[key] = ({}, set())
        texts, taken = state
        new = [row[4] for row in rows if row[4] not in texts]
        for plain in (True, False):  # labels written as they are first, then the escaped ones
            for lab in new:
                text = visible(lab)
                if (text is lab) != plain:
                    continue
                base, n = text, 1
                while text in taken:
                    n += 1
                    text = f"{base} #{n}"
                texts[lab] = text
                taken.add(text)
        return [(*row[:4], texts[row[4]], *row[5:]) for row in rows]


class JSONLSink(_RowSink):
    """Append one JSON object per row to a JSON-lines file (NaN/inf written as null).

    A label with lone surrogates (``"caf\\udce9"``, from a non-UTF-8 file name) is written as
    the JSON escape ``\\udce9`` and reads back as the very same string."""

    _what = "JSONLSink"
    _default = "labeltrack.jsonl"

    def _format(self, rows: list[tuple], columns: tuple[str, ...]) -> str:
        out = []
        floats = ("mean", "std", "min", "max", *columns[len(FIELDS):])  # quantile columns: floats too
        for row in rows:
            obj = dict(zip(columns, row))
            for key in floats:
                if not math.isfinite(obj[key]):
                    obj[key] = None
            out.append(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
        return "".join(out)  # nothing at all for a table without labels (not a blank line)


class ImageDirSink(Sink):
    """Write every figure as a PNG in ``directory``, named like FastEstimator's ImageSaver.

    File names: ``<name>_<mode>_step_<step>.png`` (FE's ImageSaver writes
    ``<key>_<mode>_epoch_<epoch>.png``); every component is made file-name safe.
    """

    def __init__(self, directory: str | os.PathLike = "images", *, dpi: float | None = None,
                 label_budget: int = DEFAULT_LABEL_BUDGET, label_names: Mapping[Any, str] | None = None) -> None:
        super().__init__(label_budget=label_budget, label_names=label_names)
        self.directory = Path(directory)
        self.dpi = dpi
        ensure_writable_dir(self.directory, "ImageDirSink directory")
        self.written: list[Path] = []

    @classmethod
    def destination(cls, options: Mapping[str, Any]) -> Hashable | None:
        """One sink per resolved directory."""
        return ("ImageDirSink", str(Path(options.get("directory") or "images").resolve()))

    def log_stats(self, table: StatsTable, *, step: int, name: str, mode: str) -> None:
        """Tables are not written by this sink (use CSVSink/JSONLSink next to it); the call is checked."""
        self._check_call(step, table)

    def log_figure(self, figure: "Figure", *, step: int, name: str, mode: str) -> None:
        """Save ``figure`` as ``<name>_<mode>_step_<step>.png`` (atomically: temp file + rename)."""
        from ..figures import figure_to_png

        path = self.directory / figure_file(name, mode, self._check_call(step))
        tmp = path.with_suffix(".png.tmp")
        try:
            tmp.write_bytes(figure_to_png(figure, dpi=self.dpi))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # only left if writing or renaming failed
        self.written.append(path)
        logger.info("saved figure to %s", path)

    def __repr__(self) -> str:
        return f"ImageDirSink({str(self.directory)!r})"
