"""Sinks: where per-label tables and band figures are written.

A :class:`Sink` receives a :class:`~labeltrack_log.StatsTable` for a (name, mode, step) and, at
chosen points, a rendered matplotlib figure. :func:`make_sinks` is the only place that turns a
configuration (names, dicts, files, the ``LABELTRACK_SINKS`` environment variable) into sinks.

Built-in sink names: ``tensorboard``, ``mlflow``, ``csv``, ``jsonl``, ``images``. Third-party
sinks register a ``Sink`` subclass in the ``labeltrack_log.sinks`` entry-point group.

The built-in classes are importable from here, loaded on first use (PEP 562), so
``import labeltrack_log.sinks`` imports neither tensorboard nor mlflow::

    from labeltrack_log.sinks import TensorBoardSink, MLflowSink, CSVSink, JSONLSink, ImageDirSink
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, InputTypeError
from ..grouping import StatsTable
from ..naming import component, label_text

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "Sink",
    "BudgetView",
    "AGGREGATES",
    "apply_budget",
    "check_table",
    "ensure_writable_dir",
    "make_sinks",
    "register_sink",
    "available_sinks",
    "DEFAULT_LABEL_BUDGET",
    "TensorBoardSink",
    "MLflowSink",
    "CSVSink",
    "JSONLSink",
    "ImageDirSink",
    "END_STATUSES",
    "exit_status",
    "SinkSpec",
    "sink_specs",
]

logger = logging.getLogger(__name__)

DEFAULT_LABEL_BUDGET = 100
ENV_VAR = "LABELTRACK_SINKS"
_NO_TABLE = object()  # Sink._check_call of a log_figure

#: What :meth:`Sink.close` may be told about how the training ended (None: not said).
END_STATUSES = (None, "FINISHED", "FAILED", "KILLED")


def exit_status(exc_type: type[BaseException] | None, exc: BaseException | None = None) -> str:
    """How a ``with`` block ended, as a run status: ``"FINISHED"`` for a clean exit (also
    ``sys.exit(0)`` / ``sys.exit(None)``), ``"KILLED"`` for KeyboardInterrupt (Ctrl-C),
    ``"FAILED"`` for any other exception (also ``sys.exit(3)``).

    Example:
        >>> exit_status(None), exit_status(KeyboardInterrupt), exit_status(SystemExit, SystemExit(0))
        ('FINISHED', 'KILLED', 'FINISHED')
        >>> exit_status(ValueError, ValueError("x")), exit_status(SystemExit, SystemExit(3))
        ('FAILED', 'FAILED')
    """
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, KeyboardInterrupt):
        return "KILLED"
    if issubclass(exc_type, SystemExit):
        code = exc.code if isinstance(exc, SystemExit) else None
        return "FINISHED" if code in (None, 0) else "FAILED"
    return "FAILED"


class Sink:
    """Base class of every sink. Subclasses implement :meth:`log_stats` and usually :meth:`log_figure`.

    ``flush`` and ``close`` default to no-ops; ``close`` is idempotent (subclasses override
    :meth:`_close`, which runs at most once). A sink is a context manager.

    The contract every built-in sink keeps, and that a custom sink gets by starting its
    ``log_stats``/``log_figure`` with :meth:`_check_call`:

    * a call after :meth:`close` raises ``ValueError`` ("expected an open sink, got a closed one");
    * ``table`` must be a :class:`~labeltrack_log.StatsTable` (else ``InputTypeError``); one with
      no labels is fine;
    * ``step`` must be an int (a numpy integer too; not a bool, float or str), else
      ``InputTypeError``, and not negative;
    * where series are named after labels, :meth:`label_texts` gives their texts (distinct, and
      stable over steps).

    Args:
        label_budget: At most this many labels get their own series; beyond it only the labels
            in the budget (``label_names`` order, else natural order) get per-label series, while
            aggregates across all labels are always written (see :meth:`budget`).
        label_names: Optional mapping label value -> display name used in tags, keys and files.

    Example:
        >>> class PrintSink(Sink):
        ...     def log_stats(self, table, *, step, name, mode):
        ...         print(name, mode, step, len(table))
        >>> with PrintSink() as s:
        ...     s.log_stats(StatsTable.empty(), step=1, name="loss_by_y", mode="eval")
        loss_by_y eval 1 0
    """

    def __init__(self, *, label_budget: int = DEFAULT_LABEL_BUDGET, label_names: Mapping[Any, str] | None = None) -> None:
        if not isinstance(label_budget, int) or isinstance(label_budget, bool) or label_budget < 1:
            raise ConfigError(f"label_budget: expected a positive int, got {label_budget!r}")
        self.label_budget = label_budget
        self.label_names: dict[Any, str] = dict(label_names or {})
        self._texts: dict[Hashable, _Texts] = {}  # scope -> label texts handed out so far
        self._parts: dict[tuple[Hashable, str], _Parts] = {}  # (scope, kind) -> label parts handed out so far
        self._closed = False
        self.end_status: str | None = None  # how the training ended, as told to close()

    # --------------------------------------------------------------- contract
    def log_stats(self, table: StatsTable, *, step: int, name: str, mode: str) -> None:
        """Write the per-label statistics of ``name`` in ``mode`` at ``step``."""
        raise NotImplementedError

    def log_figure(self, figure: "Figure", *, step: int, name: str, mode: str) -> None:
        """Write a rendered figure (a matplotlib Figure; the caller keeps ownership). Default: check
        the call (see :meth:`_check_call`), then ignore the figure."""
        self._check_call(step)

    def flush(self) -> None:
        """Make everything logged so far durable/visible. Default: nothing to do."""

    def close(self, status: str | None = None) -> None:
        """Flush and release resources. Safe to call more than once (only the first call counts).

        Args:
            status: How the training ended: ``"FINISHED"``, ``"FAILED"``, ``"KILLED"`` (see
                :func:`exit_status`), or None (not said; a sink that records a status, such as
                MLflow's run status, treats it as FINISHED). Stored as :attr:`end_status` before
                :meth:`_close` runs.
        """
        if status not in END_STATUSES:
            raise ConfigError(f"status: expected one of {list(END_STATUSES)}, got {status!r}")
        if self._closed:
            return
        self._closed = True
        self.end_status = status
        self._close()

    @classmethod
    def destination(cls, options: Mapping[str, Any]) -> Hashable | None:
        """The destination a sink built as ``cls(**options)`` would write to, as a hashable key, or
        None when sinks of this class are never shared (the default). Within one process,
        trackers whose sink configurations have the same key share one sink instance (see
        :class:`labeltrack_log.Run`). Built-in sinks key on their file, directory or MLflow run."""
        return None

    def _close(self) -> None:
        self.flush()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    # ------------------------------------------------------------- checks
    def _check_call(self, step: Any, table: Any = _NO_TABLE) -> int:
        """The checks every ``log_stats`` (with its ``table``) and ``log_figure`` (without) makes
        first: the sink is open, ``table`` is a StatsTable, ``step`` passes :meth:`check_step`.

        Returns:
            ``step`` as a Python int.

        Raises:
            ValueError: the sink is closed.
            InputTypeError (a TypeError): ``table`` is not a StatsTable or ``step`` is not an int.
        """
        if self._closed:
            raise ValueError(f"{type(self).__name__}: expected an open sink, got a closed one (create a new sink)")
        if table is not _NO_TABLE:
            check_table(table)
        return self.check_step(step)

    def check_step(self, step: Any) -> int:
        """``step`` as an int; InputTypeError for a negative step, a bool, float, str, ..."""
        ok = isinstance(step, (int, np.integer)) and not isinstance(step, bool)
        if not ok or step < 0:
            raise InputTypeError(f"step: expected a non-negative int, got {type(step).__name__} {step!r}")
        if step >= 2**63:  # TensorBoard and MLflow store int64 steps; a file holding more could not be read back
            raise InputTypeError(f"step: expected an int below 2**63 (int64), got {step!r}")
        return int(step)

    # ------------------------------------------------------------- labels
    def set_label_names(self, names: Mapping[Any, str] | None) -> None:
        """Set the label value -> display name mapping (the FE trace passes its label_mapping).
        Label texts are handed out afresh from the next call on."""
        self.label_names = dict(names or {})
        self._texts.clear()
        self.__dict__.setdefault("_parts", {}).clear()

    def label_text(self, label: Any) -> str:
        """Display text of ``label`` (its name in :attr:`label_names`, else the label as text)."""
        return label_text(label, self.label_names)

    def label_texts(self, labels: Sequence[Any], scope: Hashable = None) -> list[str]:
        """The texts that name the series of ``labels``: distinct, and stable within ``scope``.

        A label's text is its :meth:`label_text`, with ``" (<label>)"`` appended where another
        label of ``scope`` (e.g. the tracked name) shares that display name, so their series never
        mix. A label keeps the text it got first, so its series keeps one name over steps: a label
        that later shares an earlier label's display name is the one suffixed. Labels that first
        appear together and share a name are all suffixed.

        Example:
            >>> s = Sink(label_names={0: "cat", 1: "cat"})
            >>> s.label_texts([0, 1, 2], "loss"), s.label_texts([2, 1], "loss")
            (['cat (0)', 'cat (1)', '2'], ['2', 'cat (1)'])
        """
        state = self._texts.get(scope)
        if state is None:
            state = self._texts[scope] = _Texts()
        out = [state.texts.get(lab) for lab in labels]
        if None in out:
            state.assign([lab for lab, t in zip(labels, out) if t is None], self.label_text)
            out = [state.texts[lab] for lab in labels]
        return out  # type: ignore[return-value]

    def label_parts(self, labels: Sequence[Any], scope: Hashable = None, kind: str = "tag") -> list[str]:
        """The tag/key component of each label's series: distinct within ``scope``, stable, and
        never a reserved component (:data:`labeltrack_log.naming.SUMMARY`).

        A label's part is :func:`labeltrack_log.naming.component` of its :meth:`label_texts` text
        (``kind``: ``"tag"`` for TensorBoard, ``"mlflow"`` for metric keys). Two texts whose parts
        clash (the 24-bit hash of a long or changed name is rare to collide, not impossible) are
        told apart by checking every part handed out: the later one gets ``-2`` (``-3``, ...).

        Example:
            >>> Sink().label_parts(["a/b", "a_b", "_summary"], "loss")
            ['a_b-3ec69c', 'a_b', '_summary-c40ce9']
        """
        texts = self.label_texts(labels, scope)
        parts = self.__dict__.setdefault("_parts", {})
        state = parts.get((scope, kind))
        if state is None:
            state = parts[(scope, kind)] = _Parts(kind)
        return [state.part(text) for text in texts]

    def budget(self, table: StatsTable) -> "BudgetView":
        """:func:`apply_budget` with this sink's budget; the labels of :attr:`label_names` come first."""
        return apply_budget(table, self.label_budget, list(self.label_names) or None)

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(exit_status(exc_type, exc))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Texts:
    """The label texts of one scope: label -> text, the display names and the texts in use."""

    def __init__(self) -> None:
        self.texts: dict[Any, str] = {}
        self.names: set[str] = set()
        self.taken: set[str] = set()

    def assign(self, labels: list[Any], shown: Callable[[Any], str]) -> None:
        """Give ``labels`` (new to this scope) their texts; ``shown`` is the display name of a label."""
        names = [shown(lab) for lab in labels]
        together = Counter(names)
        for lab, name in zip(labels, names):
            text = name
            if name in self.names or name in self.taken or together[name] > 1:
                text = f"{name} ({label_text(lab)})"
            base, n = text, 1
            while text in self.taken:  # e.g. a label whose display name is literally "cat (1)"
                n += 1
                text = f"{base} #{n}"
            self.texts[lab] = text
            self.names.add(name)
            self.taken.add(text)


class _Parts:
    """The tag/key parts of one (scope, kind): label text -> part, and the parts in use."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.parts: dict[str, str] = {}
        self.taken: set[str] = set()

    def part(self, text: str) -> str:
        part = self.parts.get(text)
        if part is None:
            base = part = component(text, self.kind)  # never the reserved SUMMARY: that is hashed
            n = 1
            while part in self.taken:
                n += 1
                part = f"{base}-{n}"
            self.parts[text] = part
            self.taken.add(part)
        return part


def check_table(table: Any) -> StatsTable:
    """``table`` if it is a StatsTable, else InputTypeError."""
    if not isinstance(table, StatsTable):
        raise InputTypeError(f"table: expected a StatsTable, got {type(table).__name__} (GroupedStats.compute() returns one)")
    return table


def ensure_writable_dir(path: Path, what: str) -> None:
    """Create directory ``path`` now and prove a file can be created in it, so a bad destination
    fails when the sink is built, not at the first epoch end. Otherwise raise ConfigError naming ``what``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = f"cannot create directory: {err.strerror or err}"
    else:
        try:
            probe = path / f".labeltrack-probe-{os.getpid()}-{uuid.uuid4().hex}"
            with open(probe, "xb"):
                pass
            probe.unlink()
            return
        except OSError as err:
            reason = f"cannot create a file in it: {err.strerror or err}"
    raise ConfigError(f"{what}: expected a directory that can be created and written, got {str(path)!r} ({reason})")


# ------------------------------------------------------------------ label budget
@dataclass(frozen=True)
class BudgetView:
    """What a sink writes for one table under its label budget.

    Attributes:
        table: the rows that get per-label series (all of them when within budget).
        aggregates: statistics across all labels with data: ``macro_mean`` (mean of the per-label
            means), ``worst_mean`` (largest per-label mean), ``best_mean``, ``spread`` (std of the
            per-label means, ddof=0), ``num_labels`` and ``nonfinite`` (total non-finite values).
        over_budget: whether some labels were left out of ``table``.
        worst_label: display-independent label value with the largest mean (None if no data).
    """

    table: StatsTable
    aggregates: dict[str, float]
    over_budget: bool
    worst_label: Any


#: Every aggregate :func:`aggregates` can return (the last two always, the others when a label has data).
AGGREGATES = ("macro_mean", "worst_mean", "best_mean", "spread", "num_labels", "nonfinite")


def aggregates(table: StatsTable) -> tuple[dict[str, float], Any]:
    """Aggregate statistics across the labels of ``table`` (see :data:`AGGREGATES`) and the label
    with the largest mean."""
    seen = (table.count > 0) & np.isfinite(table.mean)  # a mean overflows to inf only for values near 1e308
    means = table.mean[seen]
    agg = {"num_labels": float(len(table)), "nonfinite": float(table.nonfinite.sum())}
    if len(means):
        worst = int(np.argmax(means))
        # scaled by a power of two first, so means near the float limits give a finite macro mean
        # and spread (as GroupedStats does for the per-label statistics)
        scale = float(np.ldexp(1.0, min(int(np.frexp(np.abs(means).max())[1]), 1023)))
        with np.errstate(over="ignore"):
            agg.update(
                macro_mean=float((means / scale).mean() * scale),
                worst_mean=float(means[worst]),
                best_mean=float(means.min()),
                spread=float((means / scale).std() * scale),
            )
        return agg, table.labels[seen][worst : worst + 1].tolist()[0]
    return agg, None


def apply_budget(table: StatsTable, budget: int, preferred: Sequence[Any] | None = None) -> BudgetView:
    """Split ``table`` for a sink with a label ``budget``.

    Within budget every row is kept. Over budget the kept rows are the labels of ``preferred``
    (e.g. the label mapping's order) that are present, then the first labels in natural order,
    up to ``budget`` rows.
    """
    agg, worst = aggregates(table)
    if len(table) <= budget:
        return BudgetView(table, agg, False, worst)
    rows: list[int] = []
    if preferred:
        lookup = {lab: i for i, lab in enumerate(table.labels.tolist())}
        seen: set[int] = set()
        for lab in preferred:
            i = lookup.get(lab)
            if i is not None and i not in seen:
                rows.append(i)
                seen.add(i)
            if len(rows) == budget:
                break
        if len(rows) < budget:
            rest = [i for i in range(len(table)) if i not in seen]
            rows.extend(rest[: budget - len(rows)])
    else:
        rows = list(range(budget))
    return BudgetView(table.take(rows), agg, True, worst)


# --------------------------------------------------------------------- registry
_BUILTIN: dict[str, str] = {
    "tensorboard": "labeltrack_log.sinks.tensorboard:TensorBoardSink",
    "mlflow": "labeltrack_log.sinks.mlflow:MLflowSink",
    "csv": "labeltrack_log.sinks.files:CSVSink",
    "jsonl": "labeltrack_log.sinks.files:JSONLSink",
    "images": "labeltrack_log.sinks.files:ImageDirSink",
}
_LAZY = {"TensorBoardSink": "tensorboard", "MLflowSink": "mlflow", "CSVSink": "csv", "JSONLSink": "jsonl",
         "ImageDirSink": "images"}  # class name -> built-in sink name


def __getattr__(name: str) -> Any:
    """PEP 562: the built-in sink classes, imported on first access (``TensorBoardSink`` loads
    tensorboard, ``MLflowSink`` mlflow; a missing extra raises when the sink is constructed)."""
    if name in _LAZY:
        module, _, attr = _BUILTIN[_LAZY[name]].partition(":")
        cls = getattr(importlib.import_module(module), attr)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


_REGISTERED: dict[str, type[Sink]] = {}
ENTRY_POINT_GROUP = "labeltrack_log.sinks"


def register_sink(name: str, cls: type[Sink]) -> None:
    """Register a sink class under ``name`` for :func:`make_sinks` (entry points do this too)."""
    if not (isinstance(cls, type) and issubclass(cls, Sink)):
        raise ConfigError(f"register_sink: expected a Sink subclass, got {cls!r}")
    _REGISTERED[name] = cls


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_sinks() -> list[str]:
    """Every name :func:`make_sinks` accepts: built-ins, registered classes and entry points."""
    return sorted(set(_BUILTIN) | set(_REGISTERED) | set(_entry_points()))


def _resolve(name: str) -> type[Sink]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        module, _, attr = _BUILTIN[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    eps = _entry_points()
    if name in eps:
        cls = eps[name].load()
        if not (isinstance(cls, type) and issubclass(cls, Sink)):
            raise ConfigError(f"entry point '{name}' in group {ENTRY_POINT_GROUP}: expected a Sink subclass, got {cls!r}")
        return cls
    raise ConfigError(f"unknown sink {name!r}; valid names: {', '.join(available_sinks())}")


def _options(cls: type[Sink]) -> list[str]:
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is object:
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names:
                names.append(p.name)
    return names


def _load_file(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: tomllib is 3.11+, tomli is its backport
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise ConfigError(f"{path}: reading TOML needs Python 3.11+ or 'pip install tomli'; "
                                  "a .json file works everywhere") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: expected valid TOML, got an error: {err}") from None
        if "sinks" not in data:
            raise ConfigError(f"{path}: expected a TOML file with a [[sinks]] array of tables, got keys {sorted(data)}")
        return data["sinks"]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: expected valid JSON, got an error: {err}") from None
        return data["sinks"] if isinstance(data, dict) and "sinks" in data else data
    raise ConfigError(f"{path}: expected a .toml or .json sink configuration file")


def _looks_like_path(text: str) -> bool:
    return text.lower().endswith((".toml", ".json"))


@dataclass(frozen=True)
class SinkSpec:
    """A sink not built yet: the registered ``kind`` (e.g. ``"tensorboard"``), its class and the
    (checked) constructor options. :func:`sink_specs` returns these; ``build()`` makes the sink."""

    kind: str
    cls: type
    options: Mapping[str, Any]

    def build(self, **defaults: Any) -> Sink:
        """``cls(**options)``, with ``defaults`` for the options the configuration did not set."""
        valid = _options(self.cls)
        return self.cls(**{**{k: v for k, v in defaults.items() if k in valid}, **self.options})

    def destination(self, **defaults: Any) -> Hashable | None:
        """The destination key of the sink :meth:`build` would make (see :meth:`Sink.destination`)."""
        valid = _options(self.cls)
        return self.cls.destination({**{k: v for k, v in defaults.items() if k in valid}, **self.options})


def _spec(name: str, options: Mapping[str, Any]) -> SinkSpec:
    cls = _resolve(name)
    valid = _options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"sink {name!r}: unknown option(s) {unknown}; valid options: {', '.join(valid)}")
    return SinkSpec(name, cls, dict(options))


def sink_specs(config: Any = None) -> list[SinkSpec | Sink]:
    """What :func:`make_sinks` would build, without building it: a :class:`SinkSpec` per configured
    sink (checked: unknown names and options raise ConfigError) and Sink instances as given.
    Accepts the same ``config`` forms as :func:`make_sinks`."""
    if config is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if not env:
            return []
        if env.startswith(("[", "{")):
            try:
                parsed = json.loads(env)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{ENV_VAR}: expected sink names, a file path or JSON, got invalid JSON: {err}") from None
            return sink_specs(parsed)
        if _looks_like_path(env):
            return sink_specs(Path(env))
        return sink_specs([part.strip() for part in env.split(",") if part.strip()])
    if isinstance(config, Sink):
        return [config]
    if isinstance(config, Path) or (isinstance(config, str) and _looks_like_path(config)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"sink configuration file {str(path)!r} does not exist")
        return sink_specs(_load_file(path))
    if isinstance(config, str):
        return [_spec(config, {})]
    if isinstance(config, Mapping):
        options = dict(config)
        kind = options.pop("type", None)
        if not isinstance(kind, str):
            raise ConfigError(f"sink dict: expected a 'type' key naming the sink ({', '.join(available_sinks())}), got {config!r}")
        return [_spec(kind, options)]
    if isinstance(config, Iterable) and not isinstance(config, (bytes, bytearray)):
        specs: list[SinkSpec | Sink] = []
        for item in config:
            if isinstance(item, (list, tuple)):
                raise ConfigError(f"sink list: expected names, dicts or Sink instances, got a nested {type(item).__name__}")
            specs.extend(sink_specs(item))
        return specs
    raise ConfigError(
        f"sink configuration: expected a name, dict, Sink, list, .toml/.json path or None, got {type(config).__name__}"
    )


def make_sinks(config: Any = None) -> list[Sink]:
    """Build sinks from a configuration.

    ``config`` may be a sink name (``"tensorboard"``, ``"mlflow"``, ``"csv"``, ``"jsonl"``,
    ``"images"`` or a registered/entry-point name), a dict ``{"type": name, **options}``, a
    :class:`Sink` instance, a list of these, a path to a ``.toml`` (``[[sinks]]`` tables) or
    ``.json`` file holding such a list, or ``None``: then the ``LABELTRACK_SINKS`` environment
    variable (same forms: names separated by commas, or a file path, or JSON), else no sinks.

    Every call builds new sinks; trackers share sinks through :class:`labeltrack_log.Run` instead.

    Raises:
        ConfigError (a ValueError): unknown sink name or option, listing the valid ones.
        MissingExtraError (a ModuleNotFoundError): the sink needs an extra that is not installed.

    Example:
        >>> [type(s).__name__ for s in make_sinks([{"type": "csv", "path": "/tmp/lt-doctest.csv"}])]
        ['CSVSink']
    """
    specs = sink_specs(config)
    sinks: list[Sink] = []
    try:
        for spec in specs:
            sinks.append(spec if isinstance(spec, Sink) else spec.build())
    except Exception:
        for s in sinks:  # do not leak sinks built before the bad entry
            if not any(s is spec for spec in specs):
                s.close()
        raise
    return sinks
