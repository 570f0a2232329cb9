"""FastEstimator adapter: a drop-in ``LabelTracker`` trace that streams to labeltrack-log sinks.

:class:`LabelTracker` takes the same arguments as ``fastestimator.trace.xai.LabelTracker`` and
writes the same output at the end of training (a list of FE ``Summary`` objects registered with
``system.add_graph``), so ``ImageSaver``, ``ImageViewer`` and ``Traceability`` keep working. In
addition it streams every epoch to sinks (TensorBoard, MLflow, files) at FE's
``system.global_step``, with band figures. All of that is done by :class:`labeltrack_log.Tracker`;
this module only adapts FE's hooks to it (label shapes, FE's label order and Summary output, the
state FE saves and restores).

Importing this module needs the ``fastestimator`` extra; ``import labeltrack_log`` does not.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np

from .errors import ConfigError, InputShapeError, missing_extra
from .grouping import StatsTable, to_numpy
from .history import StatsHistory
from .run import Run
from .sinks import Sink
from .tracker import Tracker

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

__all__ = ["LabelTracker", "estimator_run"]

# the Run of each Estimator's current fit, keyed by its System (one per Estimator, shared by its traces)
_RUNS: "weakref.WeakKeyDictionary[Any, Run]" = weakref.WeakKeyDictionary()


def _fe_tensorboard(system: Any) -> Optional[Any]:
    """FE's own ``fastestimator.trace.io.TensorBoard`` trace among the Estimator's traces, if any."""
    try:
        from fastestimator.schedule.schedule import Scheduler
        from fastestimator.trace.io.tensorboard import TensorBoard
    except ImportError:  # pragma: no cover - part of every FE 1.x
        return None
    for trace in getattr(system, "traces", None) or []:
        candidates = trace.get_all_values() if isinstance(trace, Scheduler) else [trace]
        for candidate in candidates:
            if isinstance(candidate, TensorBoard):
                return candidate
    return None


def estimator_run(system: Any) -> Run:
    """The :class:`~labeltrack_log.Run` of the Estimator's current ``fit()``: one per System and
    experiment time, shared by all its LabelTrackers. With FE's own TensorBoard trace in the
    Estimator, its TensorBoard sinks default to that trace's runs, ``<log_dir>/<experiment time>/<mode>``
    (FE's ``System.experiment_time``, set by every ``fit()``), so FE's curves and ours are one
    TensorBoard run."""
    stamp = getattr(system, "experiment_time", "") or ""
    run = _RUNS.get(system)
    if run is not None and getattr(run, "_fe_time", None) == stamp:
        return run
    fe_tb = _fe_tensorboard(system)
    defaults = {"tensorboard": {"logdir": fe_tb.root_log_dir, "run_name": stamp}} if fe_tb is not None and stamp else {}
    run = Run([], defaults=defaults)
    run._fe_time = stamp  # type: ignore[attr-defined]
    try:
        _RUNS[system] = run
    except TypeError:  # a System that cannot be weakly referenced: no sharing, still correct per trace
        pass
    return run

_BOUNDS = ("std", "range", None)  # FE's options, in the order FE writes their keys; None has no band figure


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


def _per_sample(values: np.ndarray, key: str = "metric") -> np.ndarray:
    """(N,) as is, (N, 1) flattened; a batch mean (0-d) is an error naming FE's own option
    (``average_loss=False``); other shapes go to GroupedStats, which explains the error."""
    if values.ndim == 0:
        raise InputShapeError(
            f"metric '{key}': expected one value per sample, got a scalar (0-d): a batch mean. In FastEstimator, "
            f"compute the loss per sample with average_loss=False (e.g. CrossEntropy(inputs=..., outputs='{key}', "
            "average_loss=False)) and keep a separate averaged loss for UpdateOp if you train on it."
        )
    return values[:, 0] if values.ndim == 2 and values.shape[1] == 1 else values


@traceable()
class LabelTracker(Trace):
    """Track a metric grouped by label (e.g. per-class loss) and stream it to TensorBoard, MLflow, files.

    A drop-in replacement for ``fastestimator.trace.xai.LabelTracker``: the first seven arguments
    and the end-of-training output are the same, so ``ImageSaver``/``ImageViewer`` on
    ``outputs`` and ``Traceability`` reports keep working. Unlike FE's trace it keeps
    O(number of labels) memory (a streaming :class:`~labeltrack_log.GroupedStats` per mode), logs
    every epoch instead of only at the end, survives NaN metrics (counted, excluded), accepts
    one-hot labels, and never stops training because a sink failed. The tracking, sinks and
    figures are a :class:`labeltrack_log.Tracker`'s; this trace feeds it from FE's hooks.

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
        run: A :class:`labeltrack_log.Run` to attach to. None (default): all LabelTrackers of one
            Estimator share one run per ``fit()`` (one MLflow run, one TensorBoard run, one file):
            sinks that name the same destination are shared, and with FE's
            ``fastestimator.trace.io.TensorBoard`` trace in the Estimator, a TensorBoard sink without
            an explicit ``logdir`` writes into that trace's ``<log_dir>/<experiment time>/<mode>``.
        max_steps: Steps kept per mode for the figures (older ones are thinned evenly).

    Attributes:
        label_summaries: FE's output in the making: ``{label or display name: fe Summary}`` in FE's
            order (first appearance), the same attribute FE's trace has.
        label_mapping: ``{LabelValue: DisplayName}`` (FE's attribute), or None.
        bounds: the set of FE bounds.
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
                 max_steps: int = 256,
                 run: Optional[Run] = None) -> None:
        super().__init__(inputs=[label, metric], outputs=outputs or f"{metric}_by_{label}", mode=mode, ds_id=ds_id)
        bounds = set(to_set(bounds)) or {None}
        bad = [b for b in bounds if b not in _BOUNDS]
        if bad:
            raise ConfigError(f"bounds: expected None, 'std', 'range' or a list of them, got {sorted(map(repr, bad))}")
        self.bounds = bounds
        # Same attribute as FE's trace: {LabelValue: DisplayName}, or None.
        self.label_mapping = {val: key for key, val in label_mapping.items()} if label_mapping else None
        self.label_summaries: Dict[Any, Summary] = {}  # FE's output, in FE's order
        self._first_seen = _FirstSeen()
        mapping = self.label_mapping
        self._tracker = Tracker(self.outputs[0], sinks=sinks, figures=figures, max_steps=max_steps,
                                bounds=[b for b in _BOUNDS if b in bounds and b is not None],
                                label_names={val: str(key) for val, key in mapping.items()} if mapping else None,
                                labels=mapping,  # FE reports only the mapped labels
                                run=run)
        self._explicit_run = run is not None

    @property
    def label_key(self) -> str:
        return self.inputs[0]

    @property
    def metric_key(self) -> str:
        return self.inputs[1]

    @property
    def history(self) -> StatsHistory:
        """The :class:`~labeltrack_log.StatsHistory` of the reported tables."""
        return self._tracker.history

    @property
    def sinks(self) -> List[Sink]:
        """The sinks still in use (a sink that raised is dropped); reopened after a restore."""
        return self._tracker.sinks

    @property
    def figures(self) -> Union[None, str, int]:
        """The figure schedule (see the ``figures`` argument)."""
        return self._tracker.figures

    @figures.setter
    def figures(self, figures: Union[None, str, int]) -> None:
        self._tracker.figures = figures

    @property
    def _sinks(self) -> Optional[List[Sink]]:
        return self._tracker._sinks  # None while closed (after on_end) or not yet reopened (after unpickling)

    def _close_sinks(self) -> None:
        """Close the sinks without final figures (what a process that stops here leaves behind)."""
        self._tracker._close_sinks()

    # ------------------------------------------------------------------ FE hooks
    def on_begin(self, data: Data) -> None:
        if not self.system.global_step:  # a fresh fit(); a RestoreWizard's load_state comes after this
            self._tracker.reset()
        if not getattr(self, "_explicit_run", False):
            run = estimator_run(self.system)
            self._tracker._join(run)
            fe_tb = run._defaults.get("tensorboard")
            if fe_tb:  # sinks built before the fit: FE's TensorBoard run, unless a logdir was configured
                for sink in self._tracker.sinks:
                    if hasattr(sink, "use_run_dir"):
                        sink.use_run_dir(fe_tb["logdir"], fe_tb["run_name"])
        # sinks closed by an earlier on_end reopen when this fit logs its first epoch

    def on_batch_end(self, data: Data) -> None:
        labels = _class_ids(to_numpy(data[self.label_key], f"labels '{self.label_key}'"))
        values = _per_sample(to_numpy(data[self.metric_key], f"metric '{self.metric_key}'"), self.metric_key)
        self._tracker.update(labels, values, mode=self.system.mode)
        self._first_seen.update(labels)

    def on_epoch_end(self, data: Data) -> None:
        mode, step = self.system.mode, self.system.global_step
        epoch = self.system.epoch_idx
        tables = self._tracker.end_epoch(int(step or 0), mode, epoch=epoch if isinstance(epoch, int) else None)
        if mode in tables:
            self._record_summaries(tables[mode], mode, step)

    def on_end(self, data: Data) -> None:
        summaries = list(self.label_summaries.values())
        self.system.add_graph(self.outputs[0], summaries)  # so Traceability can draw it
        data.write_without_log(self.outputs[0], summaries)  # for ImageSaver / ImageViewer
        self._tracker.close()  # final figures, then the sinks

    # ------------------------------------------------------------------ FE output
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

    # ---------------------------------------------------------------- state
    def __getstate__(self) -> Dict[str, Any]:
        """The state FE's ``System.save_state`` and pickle store: everything but the system (the
        tracker drops its open sinks)."""
        return {key: value for key, value in self.__dict__.items() if key != "system"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Restore ``state``. A live trace (``System.load_state``) keeps its tracker's open sinks and
        sink configuration; an unpickled one reopens its sinks from the saved configuration when next used."""
        live = self.__dict__.get("_tracker")
        self.__dict__.update(state)
        if live is not None and live is not self._tracker:
            live.__setstate__(self._tracker.__getstate__())
            self._tracker = live
        for summary in self.label_summaries.values():  # FE's Summary drops this when pickled, then
            summary.__dict__.setdefault("system_config", None)  # cannot be pickled a second time
