"""FastEstimator adapter: a drop-in ``LabelTracker`` trace that streams to labeltrack-log sinks.

:class:`LabelTracker` takes the same arguments as ``fastestimator.trace.xai.LabelTracker`` and
writes the same output at the end of training (a list of FE ``Summary`` objects registered with
``system.add_graph``), so ``ImageSaver``, ``ImageViewer`` and ``Traceability`` keep working. In
addition it feeds a :class:`~labeltrack_log.GroupedStats` per batch (no per-sample Python loop,
no stored samples), sends the per-label table of every epoch to its sinks (TensorBoard, MLflow,
files) at FE's ``system.global_step``, and renders band figures for them.

Importing this module needs the ``fastestimator`` extra; ``import labeltrack_log`` does not.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Union

import numpy as np

from .errors import ConfigError, missing_extra
from .grouping import GroupedStats, StatsTable, to_numpy
from .history import StatsHistory
from .naming import figure_name
from .sinks import Sink, make_sinks

try:
    from fastestimator.summary.summary import Summary, ValWithError
    from fastestimator.trace.trace import Trace
    from fastestimator.util.base_util import to_set
    from fastestimator.util.data import Data
    from fastestimator.util.traceability_util import traceable
except ModuleNotFoundError as err:  # fastestimator itself, or the tensorflow/torch it imports
    if (err.name or "").split(".")[0] not in ("fastestimator", "tensorflow", "torch"):
        raise
    raise missing_extra(err.name.split(".")[0], "fastestimator", "labeltrack_log.fastestimator.LabelTracker") from err

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["LabelTracker"]

logger = logging.getLogger(__name__)

_BOUNDS = ("std", "range", None)  # FE's options, in the order FE writes their keys
_FIGURE_BOUNDS = ("std", "range")  # band figures; the mean-only bound (None) gets no figure of its own
_TRANSIENT = ("system", "_sinks", "_failed")  # never part of the saved/pickled state


class _FirstSeen:
    """Labels in order of first appearance, as FE orders its Summary list (its dict's insertion order).

    The keys are the Python objects FE would get from ``.item()`` (``1.0`` for float labels), so a
    lookup with the int label of a :class:`StatsTable` finds them (``1 == 1.0``, same hash). Cost per
    batch: a table lookup for small non-negative ints; ``np.unique`` only while new labels appear.
    """

    def __init__(self) -> None:
        self.keys: Dict[Any, None] = {}
        self._known = np.zeros(0, dtype=bool)  # small non-negative int labels already seen

    def update(self, labels: np.ndarray) -> None:
        if labels.size == 0:
            return
        small = labels.dtype.kind in "iuf"
        if small:
            ints = labels.astype(np.int64, copy=False)
            lo, hi = ints.min(), ints.max()
            small = 0 <= lo and hi < 1 << 16
            if small and hi < len(self._known) and self._known[ints].all():
                return
        _, first = np.unique(labels, return_index=True)
        for key in labels[np.sort(first)].tolist():  # one entry per distinct label in the batch
            self.keys.setdefault(key)
        if small:
            if hi >= len(self._known):
                self._known = np.concatenate([self._known, np.zeros(int(hi) + 1 - len(self._known), dtype=bool)])
            self._known[ints] = True


def _class_ids(labels: np.ndarray) -> np.ndarray:
    """(N,) as is, (N, 1) flattened, one-hot/probabilities (N, C>1) -> argmax class ids."""
    if labels.ndim == 2:
        return labels[:, 0] if labels.shape[1] == 1 else labels.argmax(axis=1)
    return labels


def _per_sample(values: np.ndarray) -> np.ndarray:
    """(N,) as is, (N, 1) flattened; other shapes go to GroupedStats, which explains the error."""
    return values[:, 0] if values.ndim == 2 and values.shape[1] == 1 else values


@traceable()
class LabelTracker(Trace):
    """Track a metric grouped by label (e.g. per-class loss) and stream it to TensorBoard, MLflow, files.

    A drop-in replacement for ``fastestimator.trace.xai.LabelTracker``: the first seven arguments
    and the end-of-training output are the same, so ``ImageSaver``/``ImageViewer`` on
    ``outputs`` and ``Traceability`` reports keep working. Unlike FE's trace it keeps
    O(number of labels) memory (a streaming :class:`~labeltrack_log.GroupedStats` per mode), logs
    every epoch instead of only at the end, survives NaN metrics (counted, excluded), accepts
    one-hot labels, and never stops training because a sink failed.

    Args:
        label: Key of the labels by which to group. Shapes (N,), (N, 1), or one-hot/probabilities
            (N, C) (grouped by ``argmax``; FE's own trace fails on those).
        metric: Key of the per-sample metric, shape (N,) or (N, 1) (e.g. FE's
            ``CrossEntropy(..., average_loss=False)``).
        label_mapping: ``{DisplayName: LabelValue}`` as in FE: names shown in graphs and sinks;
            labels not in it are not reported. None reports every label under its own value.
        bounds: ``None``, ``"std"``, ``"range"`` or several of them: the FE Summary keys written
            (mean +- std, (min, mean, max), or the mean alone) and the band figures rendered.
        mode: Mode(s) to track, as in FE (``"eval"``, ``["train", "eval"]``, ``"!infer"``, None
            for all). One accumulator per mode.
        ds_id: Dataset id(s) to track, as in FE. Batches of every tracked ds_id of a mode are
            pooled, like FE's trace does.
        outputs: Output key; default ``"<metric>_by_<label>"``. Also the name used in the sinks.
        sinks: Where each epoch's table goes: anything :func:`labeltrack_log.sinks.make_sinks`
            accepts (``"tensorboard"``, ``["tensorboard", "mlflow"]``, dicts with options, Sink
            instances, a .toml/.json path). None: the ``LABELTRACK_SINKS`` environment variable,
            else no sinks.
        figures: When band figures are rendered and sent to the sinks: ``"end"`` (default: once,
            at the end of training), ``"epoch"`` (every epoch), an int N (every N epochs and at the
            end), or None (never).
        max_steps: Steps kept per mode for the figures (older ones are thinned evenly).

    Attributes:
        label_summaries: FE's output in the making: ``{label or display name: fe Summary}`` in FE's
            order (first appearance), the same attribute FE's trace has.
        history: a :class:`~labeltrack_log.StatsHistory` of the reported tables (for figures).
        sinks: the sinks in use (a sink that raised is dropped; reopened after a restore).

    Raises:
        ConfigError (a ValueError): bad ``bounds``, ``figures`` or sink configuration.

    Example:
        >>> from labeltrack_log.fastestimator import LabelTracker
        >>> tracker = LabelTracker(label="y", metric="ce", label_mapping={"cat": 0, "dog": 1},
        ...                        bounds=["std", "range"], mode=["train", "eval"], sinks=None)
        >>> tracker.outputs, sorted(tracker.mode)
        (['ce_by_y'], ['eval', 'train'])
    """

    def __init__(self,
                 label: str,
                 metric: str,
                 label_mapping: Optional[Dict[str, Any]] = None,
                 bounds: Union[None, str, Iterable[Union[str, None]]] = "std",
                 mode: Union[None, str, Iterable[str]] = "eval",
                 ds_id: Union[None, str, Iterable[str]] = None,
                 outputs: Optional[str] = None,
                 *,
                 sinks: Any = None,
                 figures: Union[None, str, int] = "end",
                 max_steps: int = 256) -> None:
        super().__init__(inputs=[label, metric], outputs=outputs or f"{metric}_by_{label}", mode=mode, ds_id=ds_id)
        bounds = set(to_set(bounds)) or {None}
        bad = [b for b in bounds if b not in _BOUNDS]
        if bad:
            raise ConfigError(f"bounds: expected None, 'std', 'range' or a list of them, got {sorted(map(repr, bad))}")
        if not (figures in (None, "end", "epoch") or (isinstance(figures, int) and not isinstance(figures, bool) and figures > 0)):
            raise ConfigError(f"figures: expected 'end', 'epoch', a positive int (every N epochs) or None, got {figures!r}")
        self.bounds = bounds
        self.figures = figures
        # Same attribute as FE's trace: {LabelValue: DisplayName}, or None.
        self.label_mapping = {val: key for key, val in label_mapping.items()} if label_mapping else None
        self.label_summaries: Dict[Any, Summary] = {}  # FE's output, in FE's order
        self.history = StatsHistory(max_steps=max_steps)
        self._stats: Dict[str, GroupedStats] = {}  # mode -> this epoch's accumulator
        self._first_seen = _FirstSeen()
        self._logged: Dict[str, int] = {}  # mode -> last step sent to the sinks
        self._drawn: Dict[str, int] = {}  # mode -> last step with figures
        self._sink_config = sinks
        self._sinks: Optional[List[Sink]] = make_sinks(sinks)  # built now: bad config fails before training
        self._failed: List[Sink] = []
        self._configure(self._sinks)

    @property
    def label_key(self) -> str:
        return self.inputs[0]

    @property
    def metric_key(self) -> str:
        return self.inputs[1]

    @property
    def sinks(self) -> List[Sink]:
        """The sinks still in use (a sink that raised is dropped); reopened after a restore."""
        if self._sinks is None:
            self._sinks = self._reopen()
        return self._sinks

    # ------------------------------------------------------------------ FE hooks
    def on_begin(self, data: Data) -> None:
        if not self.system.global_step:  # a fresh fit(); a RestoreWizard's load_state comes after this
            self.history = StatsHistory(max_steps=self.history.max_steps)
            self._stats, self._logged, self._drawn = {}, {}, {}
        self.sinks  # noqa: B018 - reopen sinks closed by an earlier on_end

    def on_batch_end(self, data: Data) -> None:
        labels = _class_ids(to_numpy(data[self.label_key], f"labels '{self.label_key}'"))
        values = _per_sample(to_numpy(data[self.metric_key], f"metric '{self.metric_key}'"))
        stats = self._stats.get(self.system.mode)
        if stats is None:
            stats = self._stats[self.system.mode] = GroupedStats()
        stats.update(labels, values)
        self._first_seen.update(labels)

    def on_epoch_end(self, data: Data) -> None:
        stats = self._stats.pop(self.system.mode, None)
        if stats is None:
            return
        table = self._shown(stats.compute())
        mode, step = self.system.mode, self.system.global_step
        self._record_summaries(table, mode, step)
        step = int(step or 0)
        if step <= self._logged.get(mode, -1):  # e.g. the eval epoch FE re-runs after a restore
            logger.info("%s: %s step %d was already logged; not sending it again", self.outputs[0], mode, step)
            return
        self._logged[mode] = step
        self.history.append(table, step=step, name=self.outputs[0], mode=mode)
        self._each("log_stats", table, step=step, name=self.outputs[0], mode=mode)
        if self.figures == "epoch" or (isinstance(self.figures, int) and self.system.epoch_idx % self.figures == 0):
            self._draw(mode)
        self._each("flush")

    def on_end(self, data: Data) -> None:
        summaries = list(self.label_summaries.values())
        self.system.add_graph(self.outputs[0], summaries)  # so Traceability can draw it
        data.write_without_log(self.outputs[0], summaries)  # for ImageSaver / ImageViewer
        if self.figures is not None:
            for mode in self.history.modes(self.outputs[0]) if self.history.names() else []:
                if self._drawn.get(mode) != self._logged.get(mode):
                    self._draw(mode)
        self._close_sinks()

    # ------------------------------------------------------------------ adapters
    def _shown(self, table: StatsTable) -> StatsTable:
        """Only the labels of ``label_mapping`` (FE skips the others), in natural order."""
        if self.label_mapping is None:
            return table
        return table.take([i for i, lab in enumerate(table.labels.tolist()) if lab in self.label_mapping])

    def _record_summaries(self, table: StatsTable, mode: str, step: Optional[int]) -> None:
        """Write the epoch into FE's Summary objects exactly as FE's LabelTracker does."""
        mapping, metric = self.label_mapping, self.metric_key
        for key in self._first_seen.keys:  # FE's dict order: first appearance
            if key not in table or (mapping is not None and key not in mapping):
                continue
            row = table[key]
            name = mapping[key] if mapping is not None else key
            summary = self.label_summaries.get(name)
            if summary is None:
                summary = self.label_summaries[name] = Summary(name=name)
            history = summary.history[mode]
            if "std" in self.bounds:
                history[f"{metric} ($\\mu \\pm \\sigma$)"][step] = ValWithError(row.mean - row.std, row.mean, row.mean + row.std)
            if "range" in self.bounds:
                history[f"{metric} ($min, \\mu, max$)"][step] = ValWithError(row.min, row.mean, row.max)
            if None in self.bounds:
                history[metric][step] = row.mean

    def _draw(self, mode: str) -> None:
        """Render one band figure per bound for ``mode`` and hand it to every sink."""
        from .figures import band_figure

        name, step = self.outputs[0], self._logged[mode]
        self._drawn[mode] = step
        if not self.sinks:
            return
        for bound in (b for b in _FIGURE_BOUNDS if b in self.bounds):
            try:
                fig = band_figure(self.history, name=name, mode=mode, bound=bound, label_names=self._display())
            except Exception:
                logger.error("%s: rendering the %s figure of %s failed; figures are turned off",
                             name, bound or "mean", mode, exc_info=True)
                self.figures = None
                return
            self._each("log_figure", fig, step=step, name=figure_name(name, bound), mode=mode)

    # --------------------------------------------------------------------- sinks
    def _display(self) -> Optional[Dict[Any, str]]:
        return {val: str(key) for val, key in self.label_mapping.items()} if self.label_mapping else None

    def _configure(self, sinks: List[Sink]) -> None:
        names = self._display()
        if names is None:  # keep whatever names the sinks were configured with
            return
        for sink in list(sinks):
            self._call(sink, "set_label_names", names)

    def _reopen(self) -> List[Sink]:
        """Rebuild the sinks from the configuration (after a restore, or after on_end closed them)."""
        try:
            sinks = make_sinks(self._sink_config)
        except Exception:
            logger.error("%s: could not reopen the sinks from %r; continuing without sinks",
                         self.outputs[0], self._sink_config, exc_info=True)
            return []
        closed = [s for s in sinks if s.closed]
        if closed:
            logger.warning("%s: sink(s) %s were closed by an earlier on_end and cannot be reopened; pass sink "
                           "names or dicts instead of instances to have them reopened", self.outputs[0], closed)
        sinks = [s for s in sinks if not s.closed]
        self._sinks = sinks
        self._failed = []
        self._configure(sinks)
        return self._sinks

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for sink in list(self.sinks):
            self._call(sink, method, *args, **kwargs)

    def _call(self, sink: Sink, method: str, *args: Any, **kwargs: Any) -> None:
        """Call ``sink.method``; a sink that raises is logged once and skipped from then on."""
        try:
            getattr(sink, method)(*args, **kwargs)
        except Exception:
            logger.error("%s: sink %r failed in %s(); it is skipped for the rest of training (other sinks continue)",
                         self.outputs[0], sink, method, exc_info=True)
            if self._sinks is not None and sink in self._sinks:
                self._sinks.remove(sink)
            self._failed.append(sink)

    def _close_sinks(self) -> None:
        for sink in list(self._sinks or []):  # sinks not reopened yet need no closing
            self._call(sink, "close")
        for sink in self._failed:  # release what a broken sink holds; its error was already logged
            try:
                sink.close()
            except Exception:  # noqa: BLE001
                logger.debug("closing failed sink %r raised again", sink, exc_info=True)
        self._sinks, self._failed = None, []

    # ---------------------------------------------------------------- state
    def __getstate__(self) -> Dict[str, Any]:
        """The state FE's ``System.save_state`` and pickle store: everything but the system and open sinks."""
        return {key: value for key, value in self.__dict__.items() if key not in _TRANSIENT}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Restore ``state``. A live tracker (``System.load_state``) keeps its open sinks and sink
        configuration; an unpickled one reopens its sinks from the saved configuration when next used."""
        live = {key: self.__dict__[key] for key in ("_sinks", "_failed", "_sink_config") if key in self.__dict__}
        self.__dict__.update(state)
        self.__dict__.update(live)  # load_state into a live tracker: its own sinks and sink configuration win
        self.__dict__.setdefault("_sinks", None)
        self.__dict__.setdefault("_failed", [])
        for summary in self.label_summaries.values():  # FE's Summary drops this when pickled, then
            summary.__dict__.setdefault("system_config", None)  # cannot be pickled a second time
