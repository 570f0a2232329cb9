"""Tracker: the framework-agnostic core that turns per-batch (labels, values) into logged epochs.

A :class:`Tracker` keeps one :class:`~labeltrack_log.GroupedStats` per mode; at each epoch end it
computes the per-label tables, records them in a :class:`~labeltrack_log.StatsHistory`, sends
them to every sink, flushes, and renders band figures on the chosen schedule. A sink that raises
is logged once and skipped from then on: a failing sink never stops training. The FastEstimator
trace (:mod:`labeltrack_log.fastestimator`) is a thin adapter over this class; a plain training
loop uses it directly.

Only numpy is imported here; matplotlib is imported when a figure is first drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError, InputTypeError
from .figures import BOUNDS, BandFigure
from .grouping import GroupedStats, StatsTable
from .history import DEFAULT_MAX_STEPS, StatsHistory
from .naming import figure_name
from .run import Run
from .sinks import Sink, exit_status
from .sketch import check_levels

__all__ = ["Tracker"]

logger = logging.getLogger(__name__)

_TRANSIENT = ("_sinks", "_failed", "_renderers")  # never pickled: open sinks and figures
_LIVE = (*_TRANSIENT, "_sink_config", "_run", "_run_default")  # kept by a live tracker's __setstate__


class Tracker:
    """Track a metric grouped by label over epochs and stream it to sinks (TensorBoard, MLflow, files).

    Per batch, :meth:`update` adds the per-sample metric of one mode. Per epoch, :meth:`end_epoch`
    computes each mode's table, appends it to :attr:`history`, sends it to every sink, flushes,
    and sends band figures when they are due. :meth:`close` sends the final figures and closes
    the sinks. A sink that raises is logged once (with traceback) and skipped from then on; the
    other sinks still get everything.

    Trackers attach to a :class:`~labeltrack_log.Run` (``run=``; one of its own when none is given).
    Within one process, trackers whose sink configurations name the same destination share one
    sink (one MLflow run, one TensorBoard run directory and layout, one file with one header); a
    Sink instance given to several trackers is shared too. A shared sink closes when its last
    user closes. Used as a ``with`` block, the tracker closes with the block's status (an
    exception: FAILED, Ctrl-C: KILLED, a clean exit or ``sys.exit(0)``: FINISHED).

    The tracker pickles without its sinks (and figures); the copy reopens them from their
    configuration when something is next logged and does not send a step again that was already
    sent. Reading :attr:`sinks` never opens anything.
    :meth:`reset` starts a new run. Figures are redrawn in place (one per mode and bound): a sink
    gets the figure for the duration of its ``log_figure`` call, as the Sink contract says.

    Args:
        name: Name of the tracked quantity (e.g. ``"ce_by_y"``); used in every tag, key and file.
        sinks: Anything :func:`labeltrack_log.sinks.make_sinks` accepts (``"tensorboard"``,
            ``["tensorboard", "mlflow"]``, dicts with options, Sink instances, a .toml/.json
            path); None: the ``run``'s sinks if a run is given, else the ``LABELTRACK_SINKS``
            environment variable, else no sinks. Built now (or shared with an open sink of the same
            destination), so a bad configuration fails before training.
        label_names: Label value -> display name, handed to the sinks and the figures. None keeps
            the names the sinks were configured with.
        labels: Report only these label values (others are accumulated but never reported);
            None reports every label.
        figures: When band figures are sent to the sinks: ``"end"`` (once, in :meth:`close`),
            ``"epoch"`` (every epoch), an int N (every N epochs, and at the end) or None (never).
        bounds: Band figures drawn each time: ``"std"`` (mean ± std), ``"range"`` (min..max),
            ``"quantile"`` (median, p25–p75 and p10–p90 bands; needs ``quantiles``), or several;
            empty for none.
        max_steps: Steps kept per mode in :attr:`history` (older ones are thinned evenly).
        quantiles: Per-label quantile levels for every mode, e.g. ``(0.1, 0.25, 0.5, 0.75, 0.9)``
            (see :class:`~labeltrack_log.GroupedStats`); the sinks then write ``p10`` ... ``p90``.
        sync: Multi-process training (``torch.distributed``): ``"auto"`` reduces every epoch
            across the ranks of the default process group when torch.distributed is initialised
            with world size > 1 (else the tracker behaves as in one process); a process group
            reduces across that group; None never reduces. When reducing, :meth:`end_epoch` is a
            collective (call it on every rank), returns the same global tables on every rank, and
            :attr:`history` is global on every rank; only rank 0 of the group builds sinks (the
            other ranks write nothing: no files, runs, spools or child processes), so create the
            tracker after ``init_process_group``. torch is never imported for ``"auto"``. A tracker
            attached to a ``run`` writes only where the run does too: a ``Run`` is by default
            (``Run(sync="auto")``) the one record of the job, built on rank 0 only, so a
            ``sync=None`` tracker that should log every rank's shard needs ``Run(sync=None)``.
        run: The :class:`~labeltrack_log.Run` to attach to; None: a run of its own.

    Attributes:
        name: the tracked name.
        label_names: label value -> display name, or None.
        labels: the reported label values (a frozenset), or None for all.
        bounds: the band figures drawn, in order.
        history: a :class:`~labeltrack_log.StatsHistory` of every table sent.

    Raises:
        ConfigError (a ValueError): a bad argument or sink configuration.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "stats.csv")
        >>> with Tracker("loss_by_y", sinks={"type": "csv", "path": path},
        ...              label_names={0: "cat", 1: "dog"}, figures=None) as tracker:
        ...     tracker.update([0, 1, 1], [0.5, 1.0, 3.0], mode="train")
        ...     tables = tracker.end_epoch(step=10)
        >>> tables["train"].mean.tolist(), tracker.history.steps("loss_by_y", "train")
        ([0.5, 2.0], [10])
        >>> sorted({line.split(",")[5] for line in open(path).read().splitlines()[1:]})
        ['cat', 'dog']
    """

    def __init__(self,
                 name: str,
                 *,
                 sinks: Any = None,
                 label_names: Mapping[Any, str] | None = None,
                 labels: Iterable[Any] | None = None,
                 figures: str | int | None = "end",
                 bounds: str | Iterable[str] = ("std",),
                 max_steps: int = DEFAULT_MAX_STEPS,
                 quantiles: Sequence[float] | None = None,
                 run: Run | None = None,
                 sync: Any = "auto") -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name: expected a non-empty string, got {name!r}")
        try:
            self.quantiles: tuple[float, ...] = check_levels(quantiles)  # per-label quantiles for every mode
        except ValueError as err:
            raise ConfigError(str(err)) from None
        wanted = (bounds,) if isinstance(bounds, str) else tuple(bounds) if isinstance(bounds, Iterable) else ()
        if "quantile" in wanted and (0.5 not in self.quantiles or len(self.quantiles) < 3):
            raise ConfigError(
                f"bounds: 'quantile' draws the median with bands of the levels around it; expected quantiles "
                f"with 0.5 and at least 3 levels, e.g. quantiles=(0.1, 0.25, 0.5, 0.75, 0.9), got quantiles={quantiles!r}"
            )
        if label_names is not None and not isinstance(label_names, Mapping):
            raise ConfigError(f"label_names: expected a mapping label -> display name or None, got {type(label_names).__name__}")
        if labels is not None and (isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable)):
            raise ConfigError(f"labels: expected an iterable of label values or None, got {type(labels).__name__} {labels!r}")
        bounds = (bounds,) if isinstance(bounds, str) else tuple(bounds) if isinstance(bounds, Iterable) else (bounds,)
        bad = [b for b in bounds if b not in BOUNDS]
        if bad:
            raise ConfigError(f"bounds: expected some of {list(BOUNDS)}, got {bad}")
        if run is not None and not isinstance(run, Run):
            raise ConfigError(f"run: expected a labeltrack_log.Run or None, got {type(run).__name__} {run!r}")
        try:
            self.history = StatsHistory(max_steps=max_steps)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.name = name
        self.figures = figures
        self.bounds = tuple(dict.fromkeys(bounds))
        self.label_names = {lab: str(text) for lab, text in label_names.items()} if label_names is not None else None
        try:
            self.labels = frozenset(labels) if labels is not None else None
        except TypeError as err:
            raise ConfigError(f"labels: expected hashable label values (ints or strings), got {err}") from None
        self._stats: dict[str, GroupedStats] = {}  # mode -> accumulator of the epoch in progress
        self._logged: dict[str, int] = {}  # mode -> last step sent to the sinks
        self._drawn: dict[str, int] = {}  # mode -> last step with figures
        self._epochs: dict[str, int] = {}  # mode -> epochs sent (the every-N schedule without ``epoch=``)
        self._renderers: dict[tuple[str, str], BandFigure] = {}
        self._replay: set[str] = set()  # modes restored by __setstate__: their next repeated step is a re-run
        self._warned: set[str] = set()  # modes warned about a step that does not increase
        self._sink_config = sinks
        self._run_default = run is not None and sinks is None  # use the run's own sinks
        self._sync = sync
        self._run = run if run is not None else Run([], sync=sync)
        self._sinks: list[Sink] | None = None
        self._failed: list[Sink] = []
        self._run._attach(self)
        writes = self._writes()
        if not writes and not self._reduces():
            logger.warning("%s: this tracker does not reduce across ranks (sync=None) but its run writes on rank 0 only "
                           "(Run(sync=%r)): this rank's tables are returned, not written. Pass Run(sync=None) too for "
                           "a record per rank", name, self._run._sync)
        self._open(self._run._sinks_for(sinks, default=self._run_default) if writes else [])

    @property
    def figures(self) -> str | int | None:
        """The figure schedule: ``"end"``, ``"epoch"``, a positive int N, or None."""
        return self._figures

    @figures.setter
    def figures(self, figures: str | int | None) -> None:
        every_n = isinstance(figures, int) and not isinstance(figures, bool) and figures > 0
        if not (figures in (None, "end", "epoch") or every_n):
            raise ConfigError(f"figures: expected 'end', 'epoch', a positive int (every N epochs) or None, got {figures!r}")
        self._figures = figures

    @property
    def sinks(self) -> list[Sink]:
        """The sinks in use (a sink that raised is dropped); empty after :meth:`close` or unpickling
        until something is logged, which reopens them from the configuration (closed Sink
        instances cannot be). Reading this never opens anything."""
        return list(self._sinks or [])

    @property
    def run(self) -> Run:
        """The :class:`~labeltrack_log.Run` this tracker is attached to."""
        return self._run

    # ------------------------------------------------------------------ tracking
    def update(self, labels: Any, values: Any, mode: str = "train") -> None:
        """Add one batch of ``mode``: a label and a metric value per sample.

        ``labels`` and ``values`` are 1-D (numpy arrays, lists, torch or TensorFlow tensors), see
        :meth:`labeltrack_log.GroupedStats.update`.

        Raises:
            InputShapeError, InputTypeError: bad batch or mode, saying what to pass instead.
        """
        stats = self._stats.get(mode)
        if stats is None:
            if not isinstance(mode, str) or not mode:
                raise InputTypeError(f"mode: expected a non-empty string, got {mode!r}")
            stats = self._stats[mode] = GroupedStats(quantiles=self.quantiles or None)
        stats.update(labels, values)

    def end_epoch(self, step: int, modes: str | Iterable[str] | None = None, *,
                  epoch: int | None = None) -> dict[str, StatsTable]:
        """End the epoch of ``modes`` at ``step``: compute, record, send to the sinks, flush, draw.

        Each mode's accumulator is computed and reset. Its table (restricted to :attr:`labels`)
        is appended to :attr:`history` and sent to every sink, then the sinks are flushed and
        band figures are sent when due. A mode whose ``step`` is not above the last step it sent is
        not sent again: the epoch a framework re-runs after a restore quietly (INFO), any other
        with a WARNING (once per mode) saying to pass a step that increases, e.g. the global step.

        Args:
            step: The step the tables are logged at (e.g. the global training step).
            modes: The mode(s) to end; None: every mode updated since its last epoch end.
                A mode without updates is skipped.
            epoch: The 1-based epoch number for the every-N figure schedule; default: the
                number of epochs this tracker has sent for the mode.

        Returns:
            The computed table of each ended mode (a step not sent again included).

        Raises:
            InputTypeError: ``step`` is not a non-negative int, ``epoch`` is not an int, or a mode
                is not a string (checked before anything changes, so no sink is dropped for it).
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise InputTypeError(f"step: expected a non-negative int, got {type(step).__name__} {step!r}")
        if step >= 2**63:
            raise InputTypeError(f"step: expected an int below 2**63 (int64, as TensorBoard and MLflow store it), got {step!r}")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer))):
            raise InputTypeError(f"epoch: expected an int or None, got {type(epoch).__name__} {epoch!r}")
        step = int(step)
        names = list(self._stats) if modes is None else [modes] if isinstance(modes, str) else modes
        names = list(names) if isinstance(names, Iterable) else [names]
        if not all(isinstance(mode, str) for mode in names):
            raise InputTypeError(f"modes: expected a string, a list of strings or None, got {modes!r}")
        tables: dict[str, StatsTable] = {}
        sent = False
        names, step, synced = self._synced_epoch(names, step)
        for mode in names:
            stats = synced[mode] if synced is not None else self._stats.pop(mode, None)
            if stats is None:
                continue
            wants_histograms = any(getattr(sink, "histograms", False) for sink in (self._sinks or []))
            table = tables[mode] = self._restrict(stats.compute(histograms=wants_histograms))
            last = self._logged.get(mode, step - 1)
            replay = mode in self._replay
            self._replay.discard(mode)
            if step <= last:
                if replay and step == last:  # the epoch a framework re-runs after restoring its state
                    logger.info("%s: %s step %d was already logged; not sending it again", self.name, mode, step)
                elif mode not in self._warned:
                    self._warned.add(mode)
                    logger.warning("%s: %s step %d is not above the last step logged (%d), so this epoch and any "
                                   "other whose step does not increase are not logged. Pass end_epoch(step=...) a "
                                   "step that increases every epoch, e.g. the global step (batches trained so far), "
                                   "not a constant or the batch index", self.name, mode, step, last)
                else:
                    logger.info("%s: %s step %d is not above %d; not logged", self.name, mode, step, last)
                continue
            self._logged[mode] = step
            self._epochs[mode] = self._epochs.get(mode, 0) + 1
            self.history.append(table, step=step, name=self.name, mode=mode)
            self._each("log_stats", table, step=step, name=self.name, mode=mode)
            n = self._epochs[mode] if epoch is None else int(epoch)
            if self._figures == "epoch" or (isinstance(self._figures, int) and n % self._figures == 0):
                self._draw(mode)
            sent = True
        if sent:
            self._each("flush")
        return tables

    def reset(self) -> None:
        """Start a new run: forget the epochs in progress, the history and the steps sent."""
        self.history = StatsHistory(max_steps=self.history.max_steps)
        self._stats, self._logged, self._drawn, self._epochs = {}, {}, {}, {}
        self._replay, self._warned = set(), set()

    def close(self, status: str | None = None) -> None:
        """Send the figures of the last step (unless ``figures`` is None or they were sent) and
        give the sinks back (a shared sink closes with its last user). Safe to call more than
        once; logging again reopens the sinks.

        Args:
            status: How training ended, for sinks that record it (MLflow's run status):
                ``"FINISHED"``, ``"FAILED"``, ``"KILLED"`` or None (FINISHED). ``with Tracker(...)``
                passes the status of the block (see :func:`labeltrack_log.sinks.exit_status`).
        """
        if self._figures is not None:
            for mode, step in list(self._logged.items()):
                if self._drawn.get(mode) != step:
                    self._draw(mode)
        self._close_sinks(status)
        self._renderers = {}

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(exit_status(exc_type, exc))

    def __repr__(self) -> str:
        return f"Tracker({self.name!r}, figures={self._figures!r}, bounds={self.bounds!r})"

    def _join(self, run: Run) -> None:
        """Attach to ``run`` from now on (the FastEstimator trace: the Estimator's run). Open sinks
        stay as they are; sinks reopened later are shared through ``run`` with its option defaults."""
        if run is self._run:
            return
        self._run._detach(self)
        self._run, self._run_default = run, False
        run._attach(self)

    # ------------------------------------------------------------------ helpers
    def _synced_epoch(self, names: list[str], step: int) -> tuple[list[str], int, dict[str, GroupedStats] | None]:
        """Multi-process epoch end: (modes, step, mode -> all ranks' accumulator), or (names, step,
        None) when not reducing. Every rank reduces every mode that any rank updated (so a rank
        with no data of a mode still takes part); modes and step come from the gathered lists,
        so they are the same on every rank (rank 0's step wins if the ranks disagree)."""
        from .distributed import gather_objects, resolve_group

        reduce, group = resolve_group(self._sync)
        if not reduce:
            return names, step, None
        parts = gather_objects(([mode for mode in names if mode in self._stats], step), group)
        modes = list(dict.fromkeys(mode for ranks_modes, _ in parts for mode in ranks_modes))
        steps = {s for _, s in parts}
        if len(steps) > 1:
            logger.warning("%s: the ranks ended the epoch at different steps %s; logging rank 0's step %d",
                           self.name, sorted(steps), parts[0][1])
        empty = GroupedStats(quantiles=self.quantiles or None)
        return modes, parts[0][1], {mode: self._stats.pop(mode, empty).synced(group) for mode in modes}

    def _writes(self) -> bool:
        """Whether this process builds sinks: always, except on ranks other than 0 when this tracker
        reduces or its run is one record of a multi-process job (see ``Run(sync=...)``)."""
        from .distributed import writes_here

        return writes_here(self._sync) and self._run._writes()

    def _reduces(self) -> bool:
        from .distributed import resolve_group

        return resolve_group(self._sync)[0]

    def _restrict(self, table: StatsTable) -> StatsTable:
        if self.labels is None:
            return table
        return table.take([i for i, lab in enumerate(table.labels.tolist()) if lab in self.labels])

    def _draw(self, mode: str) -> None:
        """Render one band figure per bound for ``mode`` and hand it to every sink."""
        step = self._drawn[mode] = self._logged[mode]
        if self._sinks is None:
            self._reopen()
        if not self._sinks:
            return
        for bound in self.bounds:
            try:
                renderer = self._renderers.get((mode, bound))
                if renderer is None:
                    renderer = self._renderers[mode, bound] = BandFigure(bound=bound, label_names=self.label_names)
                fig = renderer.draw(self.history, name=self.name, mode=mode)
            except Exception:
                logger.error("%s: rendering the %s figure of %s failed; figures are turned off",
                             self.name, bound, mode, exc_info=True)
                self._figures = None
                return
            self._each("log_figure", fig, step=step, name=figure_name(self.name, bound), mode=mode)

    # --------------------------------------------------------------------- sinks
    def _open(self, sinks: list[Sink]) -> None:
        self._sinks, self._failed = sinks, []
        if self.label_names is not None:  # else keep whatever names the sinks were configured with
            for sink in list(sinks):
                names = getattr(sink, "label_names", None)
                if not names:
                    self._call(sink, "set_label_names", self.label_names)
                    continue
                clash = {lab: (names[lab], text) for lab, text in self.label_names.items()
                         if lab in names and names[lab] != text}
                if clash:  # a sink shared with a tracker that names these labels otherwise
                    logger.warning("%s: sink %r is shared with another tracker that names labels differently "
                                   "(label: (kept, this tracker's)) %s; the names it has are kept", self.name, sink, clash)
                if any(lab not in names for lab in self.label_names):
                    self._call(sink, "set_label_names", {**self.label_names, **names})

    def _reopen(self) -> None:
        """Reopen the sinks from the configuration (after unpickling, or after :meth:`close`), shared
        with any open sink of the same destination."""
        try:
            sinks = self._run._sinks_for(self._sink_config, default=self._run_default) if self._writes() else []
        except Exception:
            logger.error("%s: could not reopen the sinks from %r; continuing without sinks",
                         self.name, self._sink_config, exc_info=True)
            sinks = []
        closed = [s for s in sinks if s.closed]
        if closed:
            logger.warning("%s: sink(s) %s were closed by an earlier close() and cannot be reopened; pass sink "
                           "names or dicts instead of instances to have them reopened", self.name, closed)
            Run._release(closed, None)
        self._open([s for s in sinks if not s.closed])

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self._sinks is None:
            self._reopen()
        for sink in list(self._sinks or []):
            self._call(sink, method, *args, **kwargs)

    def _call(self, sink: Sink, method: str, *args: Any, **kwargs: Any) -> None:
        """Call ``sink.method``; a sink that raises is logged once and skipped from then on."""
        try:
            getattr(sink, method)(*args, **kwargs)
        except Exception:
            logger.error("%s: sink %r failed in %s(); it is skipped for the rest of training (other sinks continue)",
                         self.name, sink, method, exc_info=True)
            if self._sinks is not None and sink in self._sinks:
                self._sinks.remove(sink)
            self._failed.append(sink)

    def _close_sinks(self, status: str | None = None) -> None:
        """Give back the open sinks (none are reopened for this; a shared one closes with its last
        user) and the failed ones."""
        for sink in list(self._sinks or []):
            try:
                Run._release([sink], status)
            except Exception:
                logger.error("%s: sink %r failed in close(); it is skipped for the rest of training (other sinks "
                             "continue)", self.name, sink, exc_info=True)
        for sink in self._failed:  # its error was already logged
            try:
                Run._release([sink], status)
            except Exception:  # noqa: BLE001
                logger.debug("closing failed sink %r raised again", sink, exc_info=True)
        self._sinks, self._failed = None, []

    # --------------------------------------------------------------------- state
    def __getstate__(self) -> dict[str, Any]:
        """Everything but the open sinks and figures (the sink configuration is kept)."""
        state = {key: value for key, value in self.__dict__.items() if key not in _TRANSIENT}
        if state.get("_sync") is not None and not isinstance(state["_sync"], str):
            state["_sync"] = "auto"  # a process group does not pickle; the copy uses the default group
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore ``state``. A live tracker (e.g. FastEstimator's ``System.load_state``) keeps its
        open sinks and sink configuration; an unpickled one reopens its sinks when next used."""
        live = {key: self.__dict__[key] for key in _LIVE if key in self.__dict__}
        self.__dict__.update(state)
        self.__dict__.update(live)
        self.__dict__.setdefault("_sinks", None)
        self.__dict__.setdefault("_failed", [])
        self.__dict__.setdefault("_renderers", {})
        self.__dict__.setdefault("_sync", "auto")
        self.__dict__.setdefault("_run_default", False)
        self.__dict__.setdefault("_warned", set())
        if "_run" not in self.__dict__:
            self._run = Run([], sync=self._sync)
        self._run._attach(self)
        self._replay = set(self._logged)  # the next repeated step of these modes is a re-run epoch
