"""Run: one training run, one record. Trackers attach to a run and share its sinks.

A training run usually tracks several things (per-class loss *and* accuracy, train *and* eval)
with several :class:`~labeltrack_log.Tracker` objects. They must end up in one MLflow run, one
TensorBoard run directory with one Custom Scalars layout, and one CSV/JSONL file with one header.
Two things make that so:

* a process-level, reference-counted **sink registry**: sinks are keyed by their destination
  (:meth:`labeltrack_log.sinks.Sink.destination`: TensorBoard logdir and run name, the resolved
  CSV/JSONL path, the ImageDir directory, MLflow's tracking URI, experiment and run). Trackers whose
  configurations name the same destination get the same sink instance; a Sink instance handed to
  several trackers is shared the same way. A sink is closed when its last user releases it, with
  the worst status any user reported (FAILED or KILLED over FINISHED). An exception that ends
  the process (one nobody caught, e.g. out of a FastEstimator ``fit()``, which then never calls
  its traces' ``on_end``) closes the sinks still shared with its status (FAILED, KILLED for
  Ctrl-C): see :func:`_install_excepthook`;
* a :class:`Run`: the context a tracker attaches to (``Tracker(..., run=run)``). It holds the sink
  configuration its trackers use by default, option defaults for the sinks built in it (its
  ``name`` is the TensorBoard run directory and the MLflow run name), and, used as a ``with``
  block, keeps its sinks open until the block ends and reports how it ended (FINISHED, FAILED on
  an exception or ``sys.exit(3)``, KILLED on Ctrl-C). A tracker given no run gets one of its own.

In multi-process training (``torch.distributed``, world size > 1) a run is by default the one
record of the whole job: only rank 0 builds its sinks (``Run(sync="auto")``), every other rank
builds none, so a script that creates the same run on every rank (as under torchrun) writes one
set of files and one MLflow run. ``Run(sync=None)`` is a record per process (every rank builds
its sinks; give each rank its own destinations).

Only the standard library is imported here (:mod:`labeltrack_log.distributed` when a run first
builds its sinks; it never imports torch for ``sync="auto"`` or None).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .sinks import END_STATUSES, Sink, SinkSpec, exit_status, sink_specs

if TYPE_CHECKING:  # pragma: no cover
    from .tracker import Tracker

__all__ = ["Run", "shared_sinks"]

logger = logging.getLogger(__name__)

_RANK = {None: 0, "FINISHED": 0, "KILLED": 1, "FAILED": 2}


def _worse(a: str | None, b: str | None) -> str | None:
    return b if _RANK[b] > _RANK[a] or a is None else a


class _Entry:
    __slots__ = ("sink", "key", "users", "status", "options")

    def __init__(self, sink: Sink, key: Hashable, options: Mapping[str, Any] | None) -> None:
        self.sink, self.key, self.users, self.status, self.options = sink, key, 0, None, options


class _Registry:
    """The process's shared sinks: destination key -> entry, with a use count per sink."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._by_key: dict[Hashable, _Entry] = {}
        self._by_id: dict[int, _Entry] = {}

    def acquire(self, spec: SinkSpec | Sink, defaults: Mapping[str, Mapping[str, Any]]) -> Sink:
        """The shared sink for ``spec`` (built now if no open sink has its destination), one use more."""
        with self._lock:
            if isinstance(spec, Sink):
                entry = self._by_id.get(id(spec))
                if entry is None or entry.sink is not spec:
                    entry = self._add(spec, ("instance", id(spec)), None)
                entry.users += 1
                return spec
            extra = dict(defaults.get(spec.kind, {}))
            if any(k in spec.options for k in extra):  # defaults apply as a whole, to a configuration
                extra = {}  # that sets none of them (an explicit logdir keeps its own run names)
            options = {**extra, **spec.options}
            key = spec.destination(**extra)
            entry = self._by_key.get(key) if key is not None else None
            if entry is not None and entry.sink.closed:  # closed by hand: start a new one
                self._remove(entry)
                entry = None
            if entry is None:
                entry = self._add(spec.build(**extra), key, options)
            elif entry.options is not None and _differs(entry.options, options):
                logger.warning("sink %r is shared by trackers whose configurations name the same destination; "
                               "the first configuration's options are used (%s), not %s",
                               entry.sink, dict(entry.options), options)
            entry.users += 1
            return entry.sink

    def release(self, sink: Sink, status: str | None) -> None:
        """One use less; the last one closes the sink (with the worst status reported)."""
        with self._lock:
            entry = self._by_id.get(id(sink))
            if entry is None or entry.sink is not sink:
                sink.close(status)
                return
            entry.users -= 1
            entry.status = _worse(entry.status, status)
            if entry.users > 0:
                return
            self._remove(entry)
        sink.close(entry.status)  # outside the lock: an MLflow close may wait for its delivery

    def users(self, sink: Sink) -> int:
        entry = self._by_id.get(id(sink))
        return entry.users if entry is not None and entry.sink is sink else 0

    def _add(self, sink: Sink, key: Hashable, options: Mapping[str, Any] | None) -> _Entry:
        entry = _Entry(sink, key if key is not None else ("instance", id(sink)), options)
        self._by_key[entry.key] = entry
        self._by_id[id(sink)] = entry
        _install_excepthook()
        return entry

    def close_all(self, status: str) -> None:
        """Close every sink still shared, whoever uses it, with ``status`` (or a worse one a user
        reported): what is left open when an exception ends the process."""
        with self._lock:
            entries = list(self._by_id.values())
            for entry in entries:
                self._remove(entry)
        for entry in entries:
            try:
                entry.sink.close(_worse(entry.status, status))
            except Exception:  # noqa: BLE001 - the process is ending: close the others all the same
                logger.exception("could not close sink %r", entry.sink)

    def _remove(self, entry: _Entry) -> None:
        if self._by_key.get(entry.key) is entry:
            del self._by_key[entry.key]
        if self._by_id.get(id(entry.sink)) is entry:
            del self._by_id[id(entry.sink)]


def _differs(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    ignore = ("label_names",)  # each tracker sets its own label names
    try:
        return {k: v for k, v in a.items() if k not in ignore} != {k: v for k, v in b.items() if k not in ignore}
    except Exception:  # noqa: BLE001 - options that cannot be compared
        return False


_REGISTRY = _Registry()
_HOOKED = False  # whether this process's sys.excepthook closes the shared sinks


def _interactive() -> bool:
    """Whether an exception that reaches ``sys.excepthook`` leaves the process running: the
    interactive prompt (``python``, ``python -i``), IPython, ``code.interact``."""
    return hasattr(sys, "ps1") or bool(sys.flags.interactive) or "IPython" in sys.modules


def _install_excepthook() -> None:
    """Once per process, when the first sink is shared: chain ``sys.excepthook`` so that an
    exception that ends the process closes the sinks nobody closed with the status it means
    (:func:`~labeltrack_log.sinks.exit_status`: FAILED, KILLED for KeyboardInterrupt).

    Why: FastEstimator's ``Estimator.fit()`` does not call its traces' ``on_end`` when it raises,
    so a LabelTracker cannot close its sinks; left open, the MLflow delivery process would mark the
    run KILLED at exit. The hook the process had before is called first (it prints the traceback),
    unchanged. Only exceptions nobody caught reach it: a caught one, another thread's and
    ``sys.exit()`` do not, nor does it act in an interactive session (the prompt, ``python -i``,
    IPython/Jupyter), where the process goes on; those sinks end as before (closed by their users,
    else KILLED when the process exits). A hook installed later by the user replaces this one.
    """
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    previous = sys.excepthook

    def close_shared_sinks(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        try:
            previous(exc_type, exc, tb)
        finally:
            if not _interactive():  # at a prompt the session goes on after the traceback
                _REGISTRY.close_all(exit_status(exc_type, exc))

    sys.excepthook = close_shared_sinks


def shared_sinks() -> list[Sink]:
    """The sinks now shared in this process (open, with at least one user), for inspection."""
    with _REGISTRY._lock:
        return [e.sink for e in _REGISTRY._by_id.values() if e.users > 0]


class Run:
    """One training run: the trackers attached to it share their sinks (one MLflow run, one TensorBoard
    run directory and Custom Scalars layout, one CSV/JSONL file), and its status says how it ended.

    Trackers attach with ``Tracker(name, run=run)``; a tracker without ``sinks`` uses the run's
    ``sinks``. Within one process every tracker whose sink configuration names the same
    destination shares one sink instance anyway (see :mod:`labeltrack_log.run`); the run adds:

    * ``name``: the TensorBoard run directory (``<logdir>/<name>/<mode>``) and the MLflow run name
      of the sinks built for it, unless their configuration sets ``run_name``. None: TensorBoard
      picks ``<YYYYmmdd-HHMMSS>-<host>`` (a new directory per training run), MLflow a random name;
    * as a ``with`` block: the sinks stay open until the block ends, even while no tracker uses
      them, and are then closed with the block's status: ``FINISHED`` (also ``sys.exit(0)``),
      ``FAILED`` (an exception, ``sys.exit(3)``) or ``KILLED`` (KeyboardInterrupt). The exception
      propagates. :meth:`close` first closes every attached tracker (sending its final figures).

    Reading :attr:`sinks` or :attr:`trackers` never creates anything.

    Args:
        sinks: The default sink configuration of the run's trackers: anything
            :func:`labeltrack_log.sinks.make_sinks` accepts. None: the ``LABELTRACK_SINKS``
            environment variable, else no sinks. Checked now (a bad configuration raises
            ConfigError before training); built when the run is entered or first used.
        name: The run's name (see above), or None.
        defaults: Advanced: option defaults per sink kind for the sinks built in this run, e.g.
            ``{"tensorboard": {"logdir": "logs"}}`` (the FastEstimator trace uses this to write
            into FE's own TensorBoard runs). They apply as a whole, to a sink configuration that sets
            none of them.
        sync: Which processes of a multi-process job (``torch.distributed``) build the run's
            sinks, as for :class:`~labeltrack_log.Tracker`'s ``sync``. ``"auto"`` (default): when
            torch.distributed is initialised with world size > 1, the run is one record of the
            whole job and only rank 0 builds sinks (its own and its trackers'); the other ranks
            build none (no files, MLflow runs, spools or child processes), so enter the run after
            ``init_process_group``; otherwise every process builds them as usual. A process
            group: only that group's rank 0 builds them. None: the run is a record per process:
            every rank builds its sinks (pair it with ``Tracker(sync=None)`` to log each rank's
            own shard, and give each rank its own destinations). A tracker attached to the run
            builds sinks only on a rank where both its own ``sync`` and the run's allow it.
            Sink *instances* in ``sinks`` were built by the caller, on every rank that built
            them: pass configurations (names, dicts) to have them built on rank 0 only.

    Attributes:
        name: the run's name, or None.
        status: None while the run is open; then ``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``.

    Example:
        >>> import os, tempfile
        >>> from labeltrack_log import Run, Tracker
        >>> path = os.path.join(tempfile.mkdtemp(), "stats.csv")
        >>> with Run({"type": "csv", "path": path}) as run:
        ...     loss = Tracker("loss_by_y", run=run, figures=None)
        ...     acc = Tracker("acc_by_y", run=run, figures=None)
        ...     loss.update([0, 1], [0.5, 2.0]); acc.update([0, 1], [1.0, 0.0])
        ...     _ = loss.end_epoch(step=10), acc.end_epoch(step=10)
        ...     loss.sinks[0] is acc.sinks[0]
        True
        >>> run.status, sum(line.startswith("wall_time") for line in open(path))
        ('FINISHED', 1)
    """

    def __init__(self, sinks: Any = None, *, name: str | None = None,
                 defaults: Mapping[str, Mapping[str, Any]] | None = None, sync: Any = "auto") -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigError(f"name: expected a non-empty str or None, got {name!r}")
        if defaults is not None and not (isinstance(defaults, Mapping)
                                         and all(isinstance(v, Mapping) for v in defaults.values())):
            raise ConfigError(f"defaults: expected a mapping sink kind -> option defaults, got {defaults!r}")
        from .distributed import resolve_group

        resolve_group(sync)  # checked now: a bad value (or a group without torch.distributed) raises ConfigError
        self.name = name
        self._sync = sync
        self._config = sinks
        self._specs = sink_specs(sinks)  # checked now: a bad configuration fails before training
        self._defaults: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (defaults or {}).items()}
        if name is not None:
            for kind in ("tensorboard", "mlflow"):
                self._defaults.setdefault(kind, {}).setdefault("run_name", name)
        self._held: list[Sink] | None = None  # the run's own uses of its sinks (inside ``with``)
        self._own: list[Sink] | None = None  # the sinks built from the run's configuration
        self._trackers: list["Tracker"] = []
        self._entered = False
        self.status: str | None = None

    # ------------------------------------------------------------------ public
    @property
    def sinks(self) -> list[Sink]:
        """The open sinks of the run: its own and those of its attached trackers (creates nothing)."""
        out: list[Sink] = []
        for sink in [*(self._own or []), *(s for t in self._trackers for s in (t._sinks or []))]:
            if not sink.closed and not any(sink is o for o in out):
                out.append(sink)
        return out

    @property
    def trackers(self) -> list["Tracker"]:
        """The trackers attached to this run."""
        return list(self._trackers)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called (a closed run can be used again; it reopens)."""
        return self.status is not None

    def close(self, status: str | None = None) -> None:
        """Close every attached tracker (final figures), then release the run's own sinks.

        Args:
            status: ``"FINISHED"`` (default), ``"FAILED"`` or ``"KILLED"``: passed to the sinks
                (an MLflow run gets it as its status).
        """
        if status not in END_STATUSES:
            raise ConfigError(f"status: expected one of {list(END_STATUSES)}, got {status!r}")
        status = status or "FINISHED"
        for tracker in list(self._trackers):
            tracker.close(status)
        held, self._held, self._own = self._held, None, None
        for sink in held or []:
            _REGISTRY.release(sink, status)
        self._entered = False
        self.status = status

    def __enter__(self) -> "Run":
        self.status = None
        self._entered = True
        self._hold()  # open now: one MLflow run from the start, a bad destination fails here
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(exit_status(exc_type, exc))

    def __repr__(self) -> str:
        return f"Run(name={self.name!r}, trackers={[t.name for t in self._trackers]}, status={self.status!r})"

    # ------------------------------------------------------------ for trackers
    def _attach(self, tracker: "Tracker") -> None:
        if not any(t is tracker for t in self._trackers):
            self._trackers.append(tracker)
        if self.status is not None:
            self.status = None  # used again

    def _detach(self, tracker: "Tracker") -> None:
        self._trackers = [t for t in self._trackers if t is not tracker]

    def _writes(self) -> bool:
        """Whether this process builds the run's sinks (not on ranks other than 0 of a synced run)."""
        from .distributed import writes_here

        return writes_here(self._sync)

    def _hold(self) -> None:
        """The run's own use of its sinks, from ``with`` until :meth:`close`."""
        if self._held is None and not self._writes():
            self._held = []  # another rank owns the run's record
        if self._held is None:
            if self._own is not None and not any(s.closed for s in self._own):
                self._held = self._acquire(self._own)
            else:
                self._own = self._held = self._acquire(self._specs)

    def _sinks_for(self, config: Any = None, *, default: bool = True) -> list[Sink]:
        """One use of each sink of the run's configuration (``default``) or of ``config``, shared
        through the registry; the caller gives them back with :meth:`_release`. Empty on a rank
        that does not build the run's sinks."""
        if not self._writes():
            return []
        if not default:
            return self._acquire(sink_specs(config))
        if self._own is not None and not any(s.closed for s in self._own):
            return self._acquire(self._own)  # the same instances, also sinks that are never keyed
        self._own = self._acquire(self._specs)
        return list(self._own)

    def __getstate__(self) -> dict[str, Any]:
        """The configuration only: a copy opens its sinks again when used (never the original's uses)."""
        sync = self._sync if self._sync is None or isinstance(self._sync, str) else "auto"  # a group does not pickle
        return {"name": self.name, "_config": self._config, "_specs": self._specs, "_defaults": self._defaults,
                "_sync": sync}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.setdefault("_sync", "auto")
        self.__dict__.update(state)
        self._held = self._own = None
        self._trackers, self._entered, self.status = [], False, None

    def _acquire(self, specs: list[SinkSpec | Sink]) -> list[Sink]:
        sinks: list[Sink] = []
        try:
            for spec in specs:
                sinks.append(_REGISTRY.acquire(spec, self._defaults))
        except Exception:
            for sink in sinks:
                _REGISTRY.release(sink, None)
            raise
        return sinks

    @staticmethod
    def _release(sinks: list[Sink], status: str | None) -> None:
        for sink in sinks:
            _REGISTRY.release(sink, status)
