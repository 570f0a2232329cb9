"""MLflowSink: per-label statistics as batched MLflow metrics, band figures as step-indexed images.

Design, in short:

- **MLflow out of the training process.** By default (``delivery="auto"``: a run the sink creates,
  on POSIX) the sink never imports mlflow: batches are appended to its spool file and a delivery
  child process sends them (:mod:`._delivery`). ``import mlflow`` and a fresh sqlite store cost a
  training process ~2 s of CPU and ~200k objects that slow every later garbage collection; a slow or
  dead server cannot stall a training step. ``delivery="inline"`` (always used to join an explicit
  ``run_id``, an ``experiment_id`` or an active fluent run, which are checked when the sink is built)
  sends from the training process, as described next.
- **Own client, explicit run.** The sink holds its own ``MlflowClient(tracking_uri)`` and run id and
  never touches MLflow's fluent globals (no ``set_tracking_uri``/``set_experiment``/``start_run``).
- **Batched.** One ``log_stats`` becomes requests of at most 1000 metrics each (the server's limit),
  keys from :func:`labeltrack_log.naming.mlflow_key`.
- **Bounded, never raising, never losing data.** Every inline request runs synchronously with
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` set to the time left of
  the call's budget (``timeout``, default 5 s). These two environment variables are set only while
  the sink's own request runs (under a process-wide lock) and restored afterwards: another thread
  calling MLflow at that very moment would see them too. When a request fails with a transient error
  (connection refused, timeout, HTTP 5xx/408/429) or the budget is spent, that batch and every later
  one go to an append-only JSON-lines spool (see :mod:`._spool`); later calls replay the spool in
  order (at most one probe every ``retry_interval`` seconds; ``flush()`` and ``close()`` always try).
  A permanent error (HTTP 4xx: e.g. the run was deleted) is logged once and everything after it is
  spooled too, for ``labeltrack-log replay`` once the cause is fixed.
- **Exactly once.** Replayed batches are looked up before they are sent, so a batch that was
  stored but whose answer was lost is not sent twice (details and the residual risk in :mod:`._spool`).

Values: NaN is logged as NaN (MLflow stores it; the UI leaves a gap). +/-inf is logged as NaN
(MLflow's SQL stores would turn it into +/-1.8e308 and wreck the chart's axis); per-label
``nonfinite`` counts still record non-finite inputs.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
import math
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Mapping

import numpy as np

from ..errors import ConfigError, missing_extra
from ..grouping import StatsTable
from ..naming import STATS, SUMMARY, image_key, mlflow_key, mlflow_key_of_part, quantile_stats, table_file
from . import DEFAULT_LABEL_BUDGET, Sink, ensure_writable_dir, exit_status
from ._delivery import SUPPORTED as PROCESS_SUPPORTED
from ._delivery import Channel, DeliveryProcess
from ._spool import (Spool, check_uri, deliver, find_or_create_run, get_existing, http_limits, import_mlflow, is_http,
                     is_transient, open_client, png_b64, replay_spool, short_error)
from .files import table_csv

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

__all__ = ["MLflowSink", "replay_spool"]

logger = logging.getLogger(__name__)

MAX_METRICS_PER_REQUEST = 1000
MAX_RESTARTS = 3  # of a delivery process that exited unexpectedly
ROTATE_BYTES = 256 << 10  # process delivery: a delivered spool file past this size is replaced by a new one
DELIVERIES = ("auto", "process", "inline")
_STAT_KEYS = STATS + ("nonfinite",)
NAMES_TAG = "labeltrack.names"  # run tag: the tracked names in the run, comma-separated, in first-logged order


def _resolve_uri(tracking_uri: str | None, mlflow: Any) -> str:
    """The explicit URI, else the one the user set (``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``;
    ``mlflow`` is None when it was not imported: then only the variable can be set),
    else ``sqlite:///<abs cwd>/mlflow.db``."""
    if tracking_uri is not None:
        if not isinstance(tracking_uri, str):
            raise ConfigError(f"tracking_uri: expected a str URI, got {type(tracking_uri).__name__} {tracking_uri!r}")
        return tracking_uri
    if mlflow is not None and mlflow.tracking.is_tracking_uri_set():
        return mlflow.get_tracking_uri()
    if mlflow is None and os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve().as_posix()}"


def _same_uri(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def _positive(value: Any, what: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{what}: expected a {kind} number of seconds, got {value!r}")
    return float(value)


def check_spool_dir(path: Path) -> None:
    """Inline delivery creates its spool directory only when a server fails; prove now that it can
    (create it and a file in it, then remove what was created), so an unusable ``spool_dir``
    (read-only, under a regular file) is a ConfigError when the sink is built, not a lost outage."""
    created, p = [], path
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        ensure_writable_dir(path, "spool_dir")
    finally:
        for d in created:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break


# ----------------------------------------------------------------------------- sink
class MLflowSink(Sink):
    """Write per-label statistics to MLflow as batched metrics and band figures as step-indexed images.

    Metric keys are ``<name>/<mode>/<label>/<stat>`` (stats ``mean, std, min, max, count``, plus
    ``nonfinite`` when non-zero) and ``<name>/<mode>/_summary/<aggregate>`` (``macro_mean``,
    ``worst_mean``, ``best_mean``, ``spread``, ``num_labels``, ``nonfinite``) at every step. Over the
    label budget only the budget's labels get metrics and the full table is stored as the artifact
    ``tables/<name>_<mode>_step<step>.csv``, in the format of a :class:`~labeltrack_log.sinks.CSVSink`
    file (quantile columns included; :meth:`labeltrack_log.StatsHistory.from_file` reads it).
    Figures go to ``log_image`` with key ``<name>/<mode>/figure`` (the Image grid shows them with a
    step slider).

    The run's tag ``labeltrack.names`` lists the tracked names it holds (``"loss_by_y,acc_by_y"``,
    in the order they were first logged; updated in the request of a new name's first metrics), so a
    run shared by several trackers says what is in it.

    When two labels share a display name, the later one is keyed as ``<display name> (<label>)``
    (see :meth:`Sink.label_texts`). Steps must be non-negative ints.

    The run: an explicit ``run_id`` is used as is; otherwise the active fluent run
    (``mlflow.active_run()``) is joined, unless ``tracking_uri`` names another server than the one it
    lives on; otherwise a run is created in ``experiment`` (created if missing). Only a run the sink
    created is ended by :meth:`close`, with ``close(status=...)`` or, used as a context manager, with
    the status of how the block ended (:func:`exit_status`: ``FINISHED`` for a clean exit including
    ``sys.exit(0)``, ``KILLED`` for Ctrl-C, ``FAILED`` for an exception or a non-zero exit); plain
    ``close()`` ends it ``FINISHED``. A copy made by pickling shares the run but never ends it.

    Delivery (``delivery``):

    * ``"process"`` (what ``"auto"`` picks for a run the sink creates, on POSIX): the training
      process never imports mlflow. Calls append to the spool file (replaced by a new one once it
      is past ``ROTATE_BYTES`` and fully delivered) and return; the process's one delivery child
      (started by the first sink that needs it, shared by every MLflowSink of the process, see
      :mod:`._delivery`) delivers in order, retrying a server that is down. A process forked after
      the sink was built logs through its own spool and delivery child into the same run. :meth:`flush` does
      not wait for the server; :meth:`close` waits until everything is delivered (at most
      ``close_timeout``, then what is left stays in the spool for ``labeltrack-log replay``) and
      :attr:`run_id` waits (at most ``timeout``) for the run to be created. Problems the child meets
      (server down, a rejected batch) are logged by this sink's logger at the next call. If the
      training process ends without :meth:`close` (killed, crashed, close forgotten), the child still
      delivers every batch and marks the run ``KILLED``; a child that dies is restarted (when none can
      be started, or one died ``MAX_RESTARTS`` times, the sink switches to inline delivery, with
      the undelivered batches as its backlog).
    * ``"inline"`` (what ``"auto"`` picks for ``run_id``/``experiment_id``/an active run, and on
      Windows): requests run in the calling thread, each call bounded by ``timeout``; batches a
      server did not take are spooled and replayed by later calls.

    Args:
        tracking_uri: MLflow tracking URI. None: ``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``
            if set, else ``sqlite:///<abs cwd>/mlflow.db`` (passed explicitly, not set globally).
        experiment: Experiment name for a new run (default ``MLFLOW_EXPERIMENT_NAME``, else ``Default``).
        run_id: Log into this existing run.
        run_name: Name of a new run.
        experiment_id: Existing experiment id for a new run, instead of ``experiment``.
        label_budget: Labels with their own metrics (see :class:`~labeltrack_log.sinks.Sink`).
        label_names: Label value -> display name.
        timeout: Longest time, in seconds, one request (inline: one call) waits on an unreachable
            or slow server (rounded up to whole seconds); then the batch stays spooled.
        retry_interval: After a failure, no request is tried for this long (inline: calls spool
            without contacting the server; process: the child's pause between probes).
        close_timeout: Time :meth:`close` may spend delivering what is left to a server that answers.
        spool_dir: Directory for spool files (default ``./labeltrack-spool``; with inline delivery
            created only when needed; a fully delivered spool is removed, with the directory if empty).
        delivery: ``"auto"`` (default), ``"process"`` or ``"inline"`` (see above).

    Raises:
        ConfigError: malformed tracking URI; unknown ``run_id`` or ``experiment_id``; a local store
            that cannot be opened; a spool directory that cannot be written; ``delivery="process"``
            with ``run_id``/``experiment_id``. (A well-formed http URI whose server is down is not an
            error.)
        MissingExtraError: mlflow is not installed.

    Example:
        >>> from labeltrack_log import GroupedStats
        >>> g = GroupedStats(); g.update([0, 1, 1], [0.5, 1.0, 3.0])
        >>> with MLflowSink(experiment="demo") as sink:  # doctest: +SKIP
        ...     sink.log_stats(g.compute(), step=1, name="loss_by_y", mode="train")
    """


    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None, run_id: str | None = None,
                 run_name: str | None = None, *, experiment_id: str | None = None,
                 label_budget: int = DEFAULT_LABEL_BUDGET, label_names: Mapping[Any, str] | None = None,
                 timeout: float = 5.0, retry_interval: float = 10.0, close_timeout: float = 60.0,
                 spool_dir: str | os.PathLike | None = None, delivery: str = "auto") -> None:
        super().__init__(label_budget=label_budget, label_names=label_names)
        if delivery not in DELIVERIES:
            raise ConfigError(f"delivery: expected one of {', '.join(map(repr, DELIVERIES))}, got {delivery!r}")
        self.timeout = _positive(timeout, "timeout")
        self.retry_interval = _positive(retry_interval, "retry_interval", allow_zero=True)
        self.close_timeout = _positive(close_timeout, "close_timeout")
        for what, value in (("experiment", experiment), ("run_id", run_id), ("run_name", run_name),
                            ("experiment_id", experiment_id)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{what}: expected a non-empty str, got {value!r}")
        if experiment is not None and experiment_id is not None:
            raise ConfigError(f"expected experiment or experiment_id, got both ({experiment!r}, {experiment_id!r})")
        if experiment is None and experiment_id is None:
            experiment, experiment_id = os.environ.get("MLFLOW_EXPERIMENT_NAME"), os.environ.get("MLFLOW_EXPERIMENT_ID")
        self.experiment, self.experiment_id, self.run_name = experiment, experiment_id, run_name
        self.sink_run = uuid.uuid4().hex  # tags a run this sink creates, so a retried create finds it
        self.spool_dir = Path(spool_dir if spool_dir is not None else "labeltrack-spool").resolve()
        self._seq = 0
        self._last_ms = 0
        self._keys: dict[tuple[str, str, str], tuple[str, ...]] = {}  # (name, mode, label text) -> keys (a cache)
        self._names: list[str] = []  # tracked names logged so far, in order (the run tag NAMES_TAG)

        loaded = sys.modules.get("mlflow")  # imported by the user: a fluent run or URI may be set
        active = loaded.active_run() if loaded is not None and run_id is None and delivery != "process" else None
        if delivery == "process" and (run_id is not None or experiment_id is not None or not PROCESS_SUPPORTED):
            why = ("needs a POSIX system" if not PROCESS_SUPPORTED else
                   f"creates its own run in an experiment given by name, got run_id={run_id!r}, "
                   f"experiment_id={experiment_id!r} (use delivery='auto' or 'inline': those are checked in this process)")
            raise ConfigError(f"delivery='process' {why}")
        if delivery == "process" or (delivery == "auto" and PROCESS_SUPPORTED and run_id is None
                                     and experiment_id is None and active is None):
            self._init_process(tracking_uri, loaded, run_name)
            return
        self.delivery = "inline"
        mlflow = import_mlflow()
        self.tracking_uri = _resolve_uri(tracking_uri, mlflow)
        if active is not None and (tracking_uri is None or _same_uri(tracking_uri, mlflow.get_tracking_uri())):
            self.tracking_uri, run_id = mlflow.get_tracking_uri(), active.info.run_id
        elif active is not None:
            logger.info("not joining the active run %s: it lives at %s, not %s", active.info.run_id,
                        mlflow.get_tracking_uri(), self.tracking_uri)
            active = None
        check_uri(self.tracking_uri)
        check_spool_dir(self.spool_dir)

        self._init_runtime()
        self._run_id: str | None = run_id
        self.owns_run = False
        if run_id is not None:
            if active is None:
                self._construct(lambda: self._verify_run(run_id), f"checking run_id {run_id!r}")
        else:
            create = self._op("create_run", run_name=run_name)
            self.owns_run = True
            if self._construct(lambda: setattr(self, "_run_id", find_or_create_run(self.client, create, False)),
                               "creating the run") is False:
                self._to_spool([create])

    def _init_process(self, tracking_uri: str | None, loaded: Any, run_name: str | None) -> None:
        """Process delivery: check what can be checked without mlflow, journal the run's creation
        and start the delivery process (see :mod:`._delivery`)."""
        if importlib.util.find_spec("mlflow") is None:
            raise missing_extra("mlflow", "mlflow", "MLflowSink")
        self.delivery = "process"
        self.tracking_uri = _resolve_uri(tracking_uri, loaded)
        check_uri(self.tracking_uri)
        ensure_writable_dir(self.spool_dir, "spool_dir")
        self._init_runtime()
        self._run_id = None
        self.owns_run = True
        if not self._journal([self._op("create_run", run_name=run_name, owned=True)]):
            self._unwritten = []
            err = self._disk_error
            try:
                self.spool.remove()
            except OSError:
                pass
            raise ConfigError(f"spool_dir: expected a directory with room for the spool, got {str(self.spool_dir)!r} "
                              f"(writing {self.spool.path} failed: {err}); free space there or pass another spool_dir")
        self._ensure_process()

    def _init_runtime(self) -> None:
        self._pid = os.getpid()  # the process that owns self.spool and self._process
        self._process: Channel | None = None
        self._journaled = -1  # seq of the last batch written to the spool
        self._unwritten: list[dict[str, Any]] = []  # spool lines the disk did not take (yet), in order
        self._disk_error: str | None = None  # why the disk last refused them (reported once)
        self._client: "MlflowClient | None" = None
        self._lock = threading.RLock()
        self._backlog: list[dict[str, Any]] = []
        self._retry_at = 0.0
        self._broken: str | None = None
        self._outage = False
        self.spool = self._new_spool()

    def _check_fork(self) -> None:
        """In a process forked after the sink was built (a ``multiprocessing`` fork worker): never
        touch the parent's spool file, cursor or delivery process. The child gets its own spool and
        delivery (it joins the parent's run: its id, or its tag if it is not created yet; the child
        never ends it), so the parent loses nothing and the child's values arrive too."""
        if self._pid == os.getpid():
            return
        parent = self.spool
        run_id = self._run_id
        deadline = time.monotonic() + self.timeout
        while run_id is None and self.delivery == "process":  # the parent's child writes it to the cursor
            try:
                run_id = parent.state().get("run_id")
            except (OSError, ValueError):
                pass
            if run_id is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.05)  # poll the parent's cursor, bounded by timeout
        self._init_runtime()
        self._run_id, self.owns_run = run_id, False
        logger.info("MLflowSink used in a forked process (pid %d): it logs through its own spool %s into run %s",
                    self._pid, self.spool.path, run_id or "(found by its tag)")

    def _new_spool(self) -> Spool:
        return Spool(self.spool_dir / f"mlflow-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.jsonl")

    def _rotate(self) -> None:
        """Process delivery: once the spool file is large and fully delivered, start a new one (the
        child removes the old), so a long run's spool does not grow without bound."""
        try:
            if self.spool.path.stat().st_size < ROTATE_BYTES or self.spool.state()["delivered_seq"] != self._journaled:
                return
        except (OSError, ValueError, KeyError):
            return
        new = self._new_spool()
        if self._process.rotate(new.path):
            self.spool = new

    @property
    def run_id(self) -> str | None:
        """The id of the run the sink logs to; None while it is not created (server down).

        With process delivery the delivery process creates the run: reading this waits, up to
        ``timeout`` seconds, until it has reported the id."""
        self._check_fork()
        if self._run_id is None and self._process is not None:
            with self._lock:
                self._process.wait_for(lambda: self._run_id is not None, self.timeout)
        return self._run_id

    @property
    def client(self) -> "MlflowClient":
        """The sink's own ``MlflowClient`` (created on first use, dropped when pickled)."""
        if self._client is None:
            self._client = open_client(self.tracking_uri)
        return self._client

    def _construct(self, call: Any, what: str) -> bool:
        """Run a constructor request: a malformed destination raises ConfigError, an unreachable
        http server returns False (the sink then spools)."""
        try:
            with http_limits(self.tracking_uri, self.timeout):
                call()
            return True
        except ConfigError:
            raise
        except Exception as err:
            if is_http(self.tracking_uri) and is_transient(err):
                self._outage = True
                self._retry_at = time.monotonic() + self.retry_interval
                logger.warning("MLflow server at %s is unreachable (%s: %s); %s is postponed and batches are "
                               "spooled to %s until it answers", self.tracking_uri, type(err).__name__,
                               short_error(err), what, self.spool.path)
                return False
            raise ConfigError(f"MLflowSink at {self.tracking_uri}: {what} failed: {short_error(err)}") from None

    def _verify_run(self, run_id: str) -> None:
        run = get_existing(lambda: self.client.get_run(run_id),
                           f"run_id: expected the id of an existing run at {self.tracking_uri}, got {run_id!r}")
        if run.info.lifecycle_stage == "deleted":
            raise ConfigError(f"run_id: expected an active run, got {run_id!r}, which is deleted at {self.tracking_uri}: "
                              "restore it or log to another run")

    # ------------------------------------------------------------------- batches
    def _now_ms(self) -> int:
        """Milliseconds, strictly increasing per sink: (key, step, timestamp) identifies a batch."""
        self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
        return self._last_ms

    def _op(self, kind: str, **fields: Any) -> dict[str, Any]:
        op = {"seq": self._seq, "kind": kind, "tracking_uri": self.tracking_uri, "experiment": self.experiment,
              "experiment_id": self.experiment_id, "run_id": self._run_id, "sink_run": self.sink_run,
              "time": self._now_ms(), **fields}
        self._seq += 1
        return op

    def _label_keys(self, name: str, mode: str, labels: list[Any]) -> list[tuple[str, ...]]:
        out = []
        for text in self.label_parts(labels, name, "mlflow"):  # distinct parts, never SUMMARY (issue 11.7/11.8)
            keys = self._keys.get((name, mode, text))
            if keys is None:
                keys = self._keys[(name, mode, text)] = tuple(mlflow_key_of_part(name, mode, text, s) for s in _STAT_KEYS)
            out.append(keys)
        return out

    def _stats_ops(self, table: StatsTable, step: int, name: str, mode: str) -> list[dict[str, Any]]:
        view = self.budget(table)
        ts = self._now_ms()
        rows: list[list[Any]] = []
        t = view.table
        cols = [np.where(np.isinf(c), np.nan, c).tolist() for c in (t.mean, t.std, t.min, t.max)]
        counts, nonfinite = t.count.tolist(), t.nonfinite.tolist()
        for i, keys in enumerate(self._label_keys(name, mode, t.labels.tolist())):
            for j in range(4):
                rows.append([keys[j], cols[j][i], ts, step])
            rows.append([keys[4], float(counts[i]), ts, step])
            if nonfinite[i]:
                rows.append([keys[5], float(nonfinite[i]), ts, step])
        qstats = quantile_stats(t.quantile_levels)
        if qstats:  # <name>/<mode>/<label>/p50 and friends
            qcols = [np.where(np.isinf(c), np.nan, c).tolist() for c in (t.quantile(q) for q in t.quantile_levels)]
            for i, text in enumerate(self.label_texts(t.labels.tolist(), name)):
                for stat, col in zip(qstats, qcols):
                    rows.append([mlflow_key(name, mode, text, stat), col[i], ts, step])
        if t.binary.any():  # 0/1 metrics: the 95% Wilson interval of the mean
            lo, hi = t.confidence_interval()
            for i, text in enumerate(self.label_texts(t.labels.tolist(), name)):
                if t.binary[i]:
                    rows.append([mlflow_key(name, mode, text, "ci_low"), float(lo[i]), ts, step])
                    rows.append([mlflow_key(name, mode, text, "ci_high"), float(hi[i]), ts, step])
        for stat, value in view.aggregates.items():
            rows.append([mlflow_key(name, mode, SUMMARY, stat), value if math.isfinite(value) else math.nan, ts, step])
        ops = [self._op("metrics", step=step, metrics=rows[i:i + MAX_METRICS_PER_REQUEST])
               for i in range(0, len(rows), MAX_METRICS_PER_REQUEST)]
        if name not in self._names:  # a new tracked name: the run says what it holds (same request)
            self._names.append(name)
            ops[0]["tags"] = {NAMES_TAG: ",".join(self._names)}
        if view.over_budget:
            # every label, in a CSVSink file's format (quantile columns too): StatsHistory.from_file reads it
            text = table_csv(table, step=step, name=name, mode=mode, label_names=self.label_names)
            ops.append(self._op("text", step=step, path=f"tables/{table_file(name, mode, step)}", text=text))
        return ops

    # ------------------------------------------------------------------ delivery
    def _attempt(self, op: dict[str, Any], deadline: float, check: bool) -> bool:
        """Try one batch; False (never an exception) when it must be spooled."""
        left = deadline - time.monotonic()
        if self._broken or left <= 0:
            return False
        try:
            with http_limits(self.tracking_uri, min(left, self.timeout)):
                if op["kind"] == "create_run":
                    self._run_id = find_or_create_run(self.client, op, search=check)
                else:
                    deliver(self.client, op, self._run_id, check)
            return True
        except Exception as err:
            if is_transient(err):
                self._retry_at = time.monotonic() + self.retry_interval
                if not self._outage:
                    self._outage = True
                    logger.warning("MLflow server at %s did not take a batch (%s: %s); spooling to %s and retrying "
                                   "in order later (or run: labeltrack-log replay %s)", self.tracking_uri,
                                   type(err).__name__, short_error(err), self.spool.path, self.spool.path)
            else:
                self._broken = f"{type(err).__name__}: {short_error(err)}"
                logger.error("MLflow at %s rejected a %s batch (%s); this and every later batch go to %s; fix the "
                             "cause, then run: labeltrack-log replay %s", self.tracking_uri, op["kind"], self._broken,
                             self.spool.path, self.spool.path)
            return False

    def _drain(self, deadline: float, force: bool) -> bool:
        """Replay the backlog in order; True when it is empty."""
        if not self._backlog:
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        done = 0
        while self._backlog:
            op = self._backlog[0]
            if not self._attempt(op, deadline, check=True):
                return False
            self._backlog.pop(0)
            done += 1
            if not self.spool.exists():
                continue  # delivered from memory: the disk never held it
            try:
                self.spool.advance(op["seq"], self._run_id)
            except OSError as err:  # harmless: a replay looks each batch up before sending it
                logger.warning("could not update the spool cursor %s: %s", self.spool.cursor_path, err)
        logger.info("MLflow server at %s answers again: delivered %d spooled batch(es)", self.tracking_uri, done)
        self._outage = False
        self._unwritten = []  # delivered from memory
        try:
            self.spool.remove()
        except OSError as err:
            logger.warning("could not remove the delivered spool %s: %s", self.spool.path, err)
        return True

    def _lines(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        lines = []
        for op in ops:
            line = {k: v for k, v in op.items() if not k.startswith("_")}
            line["run_id"] = line["run_id"] or self._run_id
            if "_rgb" in op:
                line["png"] = png_b64(op["_rgb"])
            if op["kind"] == "metrics":
                line["metrics"] = [[k, None if v != v else v, ts, s] for k, v, ts, s in op["metrics"]]
            lines.append(line)
        return lines

    def _journal(self, ops: list[dict[str, Any]]) -> bool:
        """Append ``ops`` to the spool as JSON lines (see :meth:`_write`)."""
        return self._write(self._lines(ops))

    def _write(self, new: list[dict[str, Any]]) -> bool:
        """Append spool lines, after any earlier lines the disk did not take; False when the disk
        failed: then they are kept in memory, in order, and written later, or delivered from memory
        at close. A full disk is reported once, as an error naming the spool."""
        lines = self._unwritten + new
        try:
            self.spool.append(lines)
        except Exception as err:
            first = self._disk_error is None
            self._disk_error = f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}"
            self._unwritten = lines
            if first:
                logger.error("could not write to the MLflow spool %s (%s): the batches it cannot take (%d so far) are "
                             "kept in memory, written as soon as it has room and otherwise delivered from memory "
                             "at close; free space on %s", self.spool.path, self._disk_error, len(lines),
                             self.spool.path.parent)
            return False
        if self._unwritten:
            logger.warning("the MLflow spool %s takes batches again: wrote the %d batch(es) kept in memory",
                           self.spool.path, len(self._unwritten))
            self._unwritten = []
        self._journaled = lines[-1]["seq"] if lines else self._journaled
        return True

    def _to_spool(self, ops: list[dict[str, Any]]) -> None:
        """Inline delivery: keep ``ops`` as the backlog (in memory) and in the spool (on disk)."""
        lines = self._lines(ops)
        self._write(lines)
        self._backlog.extend(lines)

    # ---------------------------------------------------------- process delivery
    def _on_report(self, report: dict[str, Any]) -> None:
        """A report from the delivery process (see :mod:`._delivery`)."""
        if report.get("run_id"):
            self._run_id = report["run_id"]
        if "msg" in report:
            logger.log(int(report.get("level", logging.WARNING)), "%s", report["msg"])

    def _ensure_process(self) -> bool:
        """Attach this sink's spool to the process's delivery child, starting it (or restarting one
        that exited unexpectedly: every open spool is handed to the new child). False when that is
        not possible (it cannot be started, or it died MAX_RESTARTS times): the sink then switches to
        inline delivery, with the spool's undelivered batches as its backlog."""
        channel = self._process
        if channel is not None and channel.alive():
            return True
        shared = DeliveryProcess.shared()
        with shared._lock:
            if not shared.alive():
                if shared.proc is not None:
                    shared.poll()
                    code = shared.proc.returncode
                    if shared.restarts + 1 > MAX_RESTARTS:
                        self._to_inline(f"the MLflow delivery process exited unexpectedly {shared.restarts + 1} "
                                        f"times (exit code {code}; see its messages above)")
                        return False
                    logger.error("the MLflow delivery process exited unexpectedly (exit code %s; see its messages "
                                 "above); restarting it: every batch is kept in %s", code, self.spool.path)
                try:
                    shared.start()
                except OSError as err:
                    self._to_inline(f"could not start the MLflow delivery process ({type(err).__name__}: {err})")
                    return False
            if channel is None or channel.id not in shared.channels:
                try:
                    lock = self.spool.lock()  # handed over to the child once it has opened the spool
                except BlockingIOError:
                    self._to_inline(f"the spool {self.spool.path} is being replayed by another process")
                    return False
                except OSError:
                    lock = None
                channel = shared.attach(self.spool, timeout=self.timeout, retry_interval=self.retry_interval,
                                        close_timeout=self.close_timeout, on_report=self._on_report,
                                        run_id=self._run_id, lock_fd=lock)
        self._process = channel
        return True

    def _to_inline(self, why: str) -> None:
        logger.error("%s; delivering from the training process instead (the batches not delivered yet are in %s)",
                     why, self.spool.path)
        if self._process is not None:
            self._process.detach()
        self.delivery, self._process = "inline", None
        self._retry_at = 0.0
        try:
            self._run_id = self._run_id or self.spool.state().get("run_id")
            self._backlog = (self.spool.pending() if self.spool.exists() else []) + self._unwritten
        except (OSError, ValueError) as err:
            logger.error("could not read the spool %s (%s): run labeltrack-log replay %s", self.spool.path, err,
                         self.spool.path)
            self._backlog = []

    def _submit(self, ops: list[dict[str, Any]], deadline: float | None = None, force: bool = False) -> None:
        self._check_fork()
        with self._lock:
            if self._run_id is None and not self._backlog and self._process is None:
                # a pickled copy whose run was not created yet: find it by its tag (or create it)
                ops.insert(0, self._op("create_run", run_name=self.run_name, owned=False))
                for op in ops:  # keep seq in line order
                    op["seq"], self._seq = self._seq, self._seq + 1
            if self.delivery == "process":
                if self._process is not None and self._process.alive():
                    self._rotate()
                if not self._journal(ops):
                    return
                if self._ensure_process():
                    self._process.nudge()
                    return
                self._drain(time.monotonic() + self.timeout, force=False)  # switched to inline: ops are in the backlog
                return
            if deadline is None:
                deadline = time.monotonic() + self.timeout
            if not self._drain(deadline, force):
                self._to_spool(ops)
                return
            for i, op in enumerate(ops):
                if not self._attempt(op, deadline, check=False):
                    self._to_spool(ops[i:])
                    return

    # ------------------------------------------------------------------ contract
    def log_stats(self, table: StatsTable, *, step: int, name: str, mode: str) -> None:
        """Log the statistics of ``name`` in ``mode`` at ``step``; never raises on server trouble."""
        step = self._check_call(step, table)
        with self._lock:
            ops = self._stats_ops(table, step, name, mode)
        self._submit(ops)

    def log_figure(self, figure: "Figure", *, step: int, name: str, mode: str) -> None:
        """Log ``figure`` with ``client.log_image`` (key ``<name>/<mode>/figure``) at ``step``; never
        raises on server trouble."""
        from ..figures import figure_to_rgb

        step = self._check_call(step)
        if self.delivery == "process":
            from ..figures import figure_to_png

            image = {"png": base64.b64encode(figure_to_png(figure)).decode("ascii")}
        else:
            image = {"_rgb": figure_to_rgb(figure)}
        with self._lock:
            op = self._op("image", key=image_key(name, mode, "figure"), step=step, timestamp=self._now_ms(), **image)
        self._submit([op])

    def flush(self) -> None:
        """Inline delivery: replay spooled batches now (within ``timeout``) if there are any.
        Process delivery: hand the delivery process what was logged (it is already in the spool
        file) and log its reports; does not wait for the server."""
        self._check_fork()
        with self._lock:
            if self.delivery == "process":
                if self._process is not None and self._ensure_process():
                    self._process.nudge()
                return
            self._drain(time.monotonic() + self.timeout, force=True)

    def _close(self) -> None:
        self._check_fork()
        if self.delivery == "process":
            self._close_process()
            return
        with self._lock:
            deadline = time.monotonic() + self.close_timeout
            if self.owns_run:
                self._submit([self._op("end_run", status=self._final_status())], deadline, force=True)
            else:
                self._drain(deadline, force=True)
            self._warn_backlog()

    def _final_status(self) -> str:
        return getattr(self, "end_status", None) or "FINISHED"

    def _warn_backlog(self) -> None:
        if self._backlog:
            logger.warning("MLflowSink: %d batch(es) for run %s could not be delivered to %s and are kept in %s. "
                           "Replay them when the server is back with: labeltrack-log replay %s",
                           len(self._backlog), self._run_id or "(not created yet)", self.tracking_uri,
                           self.spool.path, self.spool.path)

    def _close_process(self) -> None:
        with self._lock:
            if self.owns_run:
                self._journal([self._op("end_run", status=self._final_status())])
            if self._process is None and not self.spool.exists():
                return  # a copy that never logged anything
            if not self._ensure_process():  # switched to inline: the backlog ends with the end of run
                self._drain(time.monotonic() + self.close_timeout, force=True)
                self._warn_backlog()
                return
            deadline = time.monotonic() + self.close_timeout
            if not self._process.finish():
                logger.warning("MLflowSink: the delivery process did not finish within close_timeout=%ss; what it "
                               "did not deliver is kept in %s: labeltrack-log replay %s",
                               self.close_timeout, self.spool.path, self.spool.path)
            if self._unwritten:
                self._deliver_unwritten(deadline)
            try:
                self.spool_dir.rmdir()  # only when empty: nothing was left behind
            except OSError:
                pass

    def _deliver_unwritten(self, deadline: float) -> None:
        """At close, process delivery: the batches the full disk never took are delivered from
        memory, from this process (once the child delivered everything before them)."""
        done = self._process.done or {}
        lost = len(self._unwritten)
        if done.get("left") == 0:
            self._run_id = self._run_id or done.get("run_id")
            self.delivery, self._process = "inline", None
            self._backlog, self._unwritten = self._unwritten, []
            self._drain(deadline, force=True)
            lost = len(self._backlog)
        if lost:
            logger.error("MLflowSink: %d batch(es) for run %s could not be written to the spool %s (%s) nor "
                         "delivered: they are lost", lost, self._run_id, self.spool.path, self._disk_error)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(exit_status(exc_type, exc))  # sys.exit(0) FINISHED, Ctrl-C KILLED, else FAILED

    # ---------------------------------------------------------------- sharing
    @classmethod
    def destination(cls, options: Mapping[str, Any]) -> Hashable | None:
        """Sinks share when they name the same tracking URI, experiment and run (see :class:`Sink`):
        without ``run_id``/``run_name``, trackers of one process share one new run."""
        experiment, experiment_id = options.get("experiment"), options.get("experiment_id")
        if experiment is None and experiment_id is None:
            experiment, experiment_id = os.environ.get("MLFLOW_EXPERIMENT_NAME"), os.environ.get("MLFLOW_EXPERIMENT_ID")
        uri = _resolve_uri(options.get("tracking_uri"), sys.modules.get("mlflow"))
        return ("mlflow", uri.rstrip("/"), experiment, experiment_id, options.get("run_id"), options.get("run_name"))

    # ------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        self.run_id  # noqa: B018 - with process delivery: wait for the run, which the copy joins
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_client", "_lock", "_backlog", "spool", "_process")}
        state["owns_run"] = False  # the original ends the run it created
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()  # a fresh client (lazily), lock and spool file

    def __repr__(self) -> str:
        return (f"MLflowSink(tracking_uri={self.tracking_uri!r}, run_id={self._run_id!r}, delivery={self.delivery!r}, "
                f"label_budget={self.label_budget})")
