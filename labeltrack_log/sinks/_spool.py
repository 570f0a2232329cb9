"""The MLflowSink's batches: how one is delivered, the on-disk spool of those not delivered yet,
and :func:`replay_spool` (behind ``labeltrack-log replay``).

A batch is a dict, one MLflow request's worth: ``metrics`` (at most 1000), ``image``, ``text`` (an
artifact), ``create_run`` or ``end_run``. The spool is two files:

- ``<name>.jsonl``: append-only, one JSON object per line, one line per batch. Every line carries
  ``seq`` (increasing within the file), ``kind``, ``tracking_uri``, ``experiment``, ``run_id``
  (``null`` while the run is not created yet) and ``sink_run`` (the tag that finds the run again).
  The file is never rewritten, only appended to, so a crash loses at most the line being written
  (an incomplete line is ignored with a warning, and the next append starts on a new line).
- ``<name>.jsonl.cursor``: small JSON ``{"delivered_seq": N, "run_id": "..."}`` replaced atomically
  after each delivered batch: every line with ``seq <= N`` has been delivered. Replays resume where
  they stopped.

Exactly once: a replayed batch is looked up before it is sent (:func:`deliver` with ``check``): a
metrics batch is skipped if the history of its first key already holds its step and millisecond
timestamp (unique per batch), an image if ``images/`` holds its file, a run creation reuses the run
tagged with its ``sink_run``. So a batch that was stored but whose answer was lost is not sent again.
A metrics batch may carry run ``tags`` (``{"labeltrack.names": "ce,acc"}`` when a tracked name first
appears), sent in the same ``log_batch`` request; setting a tag again is harmless. Residual risk: an image whose PNG was stored but not its ``.webp`` thumbnail is sent again (a second
image at that step). Values are strict JSON: NaN is written as ``null``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import sqlite3
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar

import numpy as np

from ..errors import ConfigError, missing_extra

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

__all__ = ["Spool", "deliver", "replay_spool", "check_uri", "is_transient", "http_limits", "get_existing", "open_client"]

RUN_TAG = "labeltrack.sink_run"
REPLAY_TIMEOUT = 30.0
STORE_LOCK_TIMEOUT = 300.0  # longest wait for another process creating or migrating a sqlite store
_MIGRATION_RACE = ("duplicate column name", "online migration expected", "table alembic_version already exists")
_ENV_LOCK = threading.Lock()
T = TypeVar("T")


class Spool:
    """An append-only JSON-lines spool file with a delivery cursor beside it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.cursor_path = self.path.with_name(self.path.name + ".cursor")
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def lock(self) -> int | None:
        """Take the spool's exclusive delivery lock (``<spool>.lock``) and return its file descriptor
        (closing it, or the process ending, releases the lock; a child that inherits it holds it).
        None where there is no ``fcntl`` (not POSIX). Raises BlockingIOError when it is held."""
        if fcntl is None:  # pragma: no cover - not POSIX
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def busy(self) -> bool:
        """Whether a delivery process holds the spool's lock right now."""
        if fcntl is None or not self.lock_path.exists():  # pragma: no cover - not POSIX
            return False
        try:
            with open(self.lock_path) as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
        except BlockingIOError:
            return True
        except FileNotFoundError:
            return False
        return False

    def exists(self) -> bool:
        """Whether the spool file has been written."""
        return self.path.is_file()

    def append(self, ops: list[dict[str, Any]]) -> None:
        """Append batches (dicts with a ``seq``) as JSON lines and flush them to the OS."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(op, allow_nan=False, separators=(",", ":")) + "\n" for op in ops)
        with open(self.path, "a+b") as f:
            if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                text = "\n" + text  # an earlier write was cut short: keep that torn line apart
            f.write(text.encode("utf-8"))
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        """Every batch in the file, in order."""
        ops: list[dict[str, Any]] = []
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                op = json.loads(line)
            except json.JSONDecodeError:  # a write cut short by a crash or a full disk
                logger.warning("%s: line %d: ignoring an incomplete line (%d characters: %r...)", self.path, i + 1,
                               len(line), line[:80])
                continue
            if not isinstance(op, dict) or not isinstance(op.get("seq"), int) or "kind" not in op:
                logger.warning("%s: line %d: ignoring a line that is not a spooled batch (%r...)", self.path, i + 1,
                               line[:80])
                continue
            if ops and op["seq"] <= ops[-1]["seq"]:
                continue  # written again after a full disk cut the first copy's write short: once is enough
            ops.append(op)
        return ops

    def state(self) -> dict[str, Any]:
        """The cursor: ``delivered_seq`` (-1 when nothing was delivered) and ``run_id``."""
        try:
            return json.loads(self.cursor_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"delivered_seq": -1, "run_id": None}

    def pending(self) -> list[dict[str, Any]]:
        """The batches not delivered yet, in order."""
        done = self.state()["delivered_seq"]
        return [op for op in self.read() if op["seq"] > done]

    def advance(self, seq: int, run_id: str | None) -> None:
        """Record that every batch up to ``seq`` is delivered (atomic replace of the cursor file)."""
        tmp = self.cursor_path.with_name(self.cursor_path.name + ".tmp")
        tmp.write_text(json.dumps({"delivered_seq": seq, "run_id": run_id}), encoding="utf-8")
        os.replace(tmp, self.cursor_path)

    def remove(self) -> None:
        """Delete the spool, its cursor and lock file (once everything in it is delivered)."""
        for p in (self.path, self.cursor_path, self.lock_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


# ------------------------------------------------------------------------- delivery
def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other URIs and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].split("?")[0]
    return None if not db or db == ":memory:" else Path(db)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold ``<db>.lock`` (an exclusive ``flock``) for a sqlite URI, so that only one process at a
    time creates or migrates the store's schema: MLflow's migrations are not safe to run
    concurrently (``duplicate column name: step``, "Online migration expected"). The lock file is
    left in place (removing it would race the next process). A lock that cannot be taken within
    ``STORE_LOCK_TIMEOUT`` (or no ``fcntl``) lets the caller go on without it."""
    db = sqlite_path(uri)
    if db is None or fcntl is None:
        yield
        return
    try:
        fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        logger.debug("no store lock for %s: %s", db, err)
        yield
        return
    try:
        deadline = time.monotonic() + STORE_LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    logger.warning("%s.lock: still held after %.0f s; opening the store without it", db,
                                   STORE_LOCK_TIMEOUT)
                    break
                time.sleep(0.05)  # poll: another process is creating the schema (a few seconds)
        yield
    finally:
        os.close(fd)  # releases the lock


def open_client(uri: str) -> "MlflowClient":
    """An ``MlflowClient`` for ``uri`` whose store is open: for a sqlite store its creation or
    migration runs under :func:`store_lock`, so processes starting together never race on the schema."""
    from mlflow import MlflowClient

    with store_lock(uri):  # MlflowClient opens (creates, migrates) the store in its constructor
        return MlflowClient(tracking_uri=uri)


def import_mlflow() -> Any:
    """``import mlflow``, or the MissingExtraError that names the ``mlflow`` extra."""
    try:
        import mlflow
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] != "mlflow":
            raise
        raise missing_extra("mlflow", "mlflow", "MLflowSink") from None
    return mlflow


def is_http(uri: str) -> bool:
    """Whether ``uri`` talks to a server over HTTP (which may be down) rather than a local store."""
    return urllib.parse.urlsplit(uri).scheme.lower() in ("http", "https")


def check_uri(uri: str) -> None:
    """Reject malformed tracking URIs before anything is sent (an unreachable one is fine)."""
    expected = "tracking_uri: expected a URI such as http://127.0.0.1:5000 or sqlite:////abs/path/mlflow.db"
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow's scheme-less special names
        return
    parts = urllib.parse.urlsplit(uri.strip())
    scheme = parts.scheme.lower()
    if len(scheme) < 2 or uri != uri.strip():  # no scheme, or a Windows drive letter
        raise ConfigError(f"{expected}, got {uri!r} (no scheme)")
    if scheme in ("http", "https"):
        try:
            port_ok = parts.port is None or 0 < parts.port < 65536
        except ValueError:
            port_ok = False
        if not parts.hostname or not port_ok or not uri.lower().startswith(f"{scheme}://"):
            raise ConfigError(f"{expected}, got {uri!r} (expected {scheme}://host[:port][/path])")
        return
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise ConfigError(f"{expected}, got {uri!r} (a sqlite URI starts with sqlite:///)")
        db = uri[len("sqlite:///"):].split("?")[0]
        if db and db != ":memory:":
            check_sqlite_path(Path(db))
        return
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    except ImportError:  # pragma: no cover - private API moved; let MLflow judge it
        return
    try:
        _tracking_store_registry.get_store_builder(uri)
    except Exception as err:
        raise ConfigError(f"{expected}, got {uri!r} ({err})") from None


def check_sqlite_path(db: Path) -> None:
    """Reject a sqlite database MLflow could not open or write, from the file system alone (no
    mlflow): its directory must exist (MLflow does not create it) and be writable (SQLite writes
    journal files beside the database), and the database, if present, must be a writable file."""
    what = f"tracking_uri: the sqlite database {str(db)!r}"
    if not db.parent.is_dir():
        reason = "is not a directory" if db.parent.exists() else "does not exist"
        raise ConfigError(f"tracking_uri: the directory of the sqlite database {str(db)!r} {reason}")
    if db.exists() and not db.is_file():
        raise ConfigError(f"{what}: expected a database file, got a directory or another non-file")
    if not os.access(db.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: expected a writable directory, got {str(db.parent)!r}, which is not writable")
    if db.exists() and not os.access(db, os.R_OK | os.W_OK):
        raise ConfigError(f"{what}: expected a readable and writable file, got one without permission")


def is_transient(err: BaseException) -> bool:
    """Whether a failed request may succeed later (server down/slow/overloaded), as opposed to a
    request the server rejects (bad key, unknown or deleted run). A sqlite store that another process
    holds locked (SQLITE_BUSY/SQLITE_LOCKED, after SQLite's own wait) is transient too."""
    orig = getattr(err, "orig", err)  # SQLAlchemy wraps the DB-API error
    text = str(err).lower()
    if any(m in text for m in _MIGRATION_RACE):  # another process is migrating the store right now
        return True
    code = getattr(orig, "sqlite_errorcode", None) if isinstance(orig, sqlite3.Error) else None
    if code is not None and (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):  # primary code
        return True
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status >= 500 or status in (408, 429)
    response = getattr(err, "response", None)  # requests.HTTPError from artifact uploads
    if response is not None and getattr(response, "status_code", None):
        return response.status_code >= 500 or response.status_code in (408, 429)
    return isinstance(err, OSError)  # includes requests' ConnectionError/Timeout


@contextmanager
def http_limits(uri: str, seconds: float) -> Iterator[None]:
    """Run MLflow HTTP requests with no retries and a timeout of ``seconds`` (whole, at least 1)."""
    if not is_http(uri):
        yield
        return
    values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(seconds)))}
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# ---------------------------------------------------------------- delivering batches
def get_existing(get: Callable[[], T], expected: str) -> T:
    """Return ``get()``, an MLflow lookup by id; when MLflow answers that the id does not exist
    (HTTP 400/404) raise ``ConfigError("<expected> (<MLflow's reason>)")`` instead."""
    from mlflow.exceptions import MlflowException

    try:
        return get()
    except MlflowException as err:
        if err.get_http_status_code() in (400, 404):
            raise ConfigError(f"{expected} ({short_error(err)})") from None
        raise


def experiment_id_for(client: "MlflowClient", name: str | None, experiment_id: str | None) -> str:
    if experiment_id is not None:
        exp = get_existing(lambda: client.get_experiment(experiment_id),
                           f"experiment_id: expected the id of an existing experiment, got {experiment_id!r}")
    else:
        name = name or "Default"
        exp = client.get_experiment_by_name(name)
        if exp is None:
            from mlflow.exceptions import MlflowException

            try:
                return client.create_experiment(name)
            except MlflowException as err:  # created meanwhile by another process
                if err.error_code != "RESOURCE_ALREADY_EXISTS" or client.get_experiment_by_name(name) is None:
                    raise
                exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise ConfigError(f"experiment {exp.name!r} (id {exp.experiment_id}) is deleted: restore it or choose another")
    return exp.experiment_id


def find_or_create_run(client: "MlflowClient", op: Mapping[str, Any], search: bool) -> str:
    """Create the run described by a ``create_run`` batch; with ``search``, reuse the run already
    tagged with its ``sink_run`` (created by an earlier try whose answer was lost)."""
    exp_id = experiment_id_for(client, op.get("experiment"), op.get("experiment_id"))
    if search:
        found = client.search_runs([exp_id], f"tags.`{RUN_TAG}` = '{op['sink_run']}'", max_results=1)
        if found:
            return found[0].info.run_id
    run = client.create_run(exp_id, start_time=op["time"], tags={RUN_TAG: op["sink_run"]}, run_name=op.get("run_name"))
    return run.info.run_id


def image_prefix(key: str, step: int, timestamp: int) -> str:
    # MLflow's file name for a step-indexed image (MlflowClient.log_image, mlflow 3.x)
    return f"images/{key.replace('/', '~')}+step+{step}+timestamp+{timestamp}+"


def deliver(client: "MlflowClient", op: Mapping[str, Any], run_id: str, check: bool) -> bool:
    """Send one batch (not ``create_run``). With ``check``, skip it if it is already stored.
    Returns whether something was sent."""
    kind = op["kind"]
    if kind == "metrics":
        from mlflow.entities import Metric

        rows = op["metrics"]
        if check:
            key, _, ts, step = rows[0]
            if any(m.step == step and m.timestamp == ts for m in client.get_metric_history(run_id, key)):
                return False
        metrics = [Metric(k, math.nan if v is None else v, ts, step) for k, v, ts, step in rows]
        if op.get("tags"):
            from mlflow.entities import RunTag

            client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in op["tags"].items()],
                             synchronous=True)
        else:
            client.log_batch(run_id, metrics=metrics, synchronous=True)
    elif kind == "image":
        prefix = image_prefix(op["key"], op["step"], op["timestamp"])
        if check and any(f.path.startswith(prefix) and f.path.endswith("+compressed.webp")
                         for f in client.list_artifacts(run_id, "images")):
            return False
        image = op.get("_rgb")
        if image is None:
            from PIL import Image

            image = Image.open(io.BytesIO(base64.b64decode(op["png"]))).convert("RGB")
        client.log_image(run_id, image, key=op["key"], step=op["step"], timestamp=op["timestamp"], synchronous=True)
    elif kind == "text":
        client.log_text(run_id, op["text"], op["path"])  # overwrites: idempotent
    elif kind == "end_run":
        client.set_terminated(run_id, status=op["status"], end_time=op["time"])
    else:
        raise ValueError(f"spool batch {op.get('seq')}: unknown kind {kind!r}")
    return True


def png_b64(rgb: np.ndarray) -> str:
    """An RGB array as base64 PNG text (how an image batch is stored in the spool)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def short_error(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(getattr(err, "message", None) or err).split())
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- replay
def replay_spool(path: str | os.PathLike, tracking_uri: str | None = None) -> int:
    """Deliver, in order, the batches an :class:`MLflowSink` spooled while its server was down.

    Resumes after the last delivered batch (the ``.cursor`` file beside the spool) and skips
    batches already stored, so running it again never duplicates a value.

    Args:
        path: The spool file named in the sink's warning.
        tracking_uri: Send to this server instead of the one recorded in the spool.

    Returns:
        The number of batches sent by this call.

    Raises:
        ConfigError: no such spool, a malformed URI, or the server rejected a batch.
        ConnectionError: the server did not answer; the rest stays in the spool for a later replay.
    """
    import_mlflow()
    spool = Spool(path)
    if not spool.exists():
        raise ConfigError(f"replay: expected an MLflowSink spool file, got {str(path)!r}, which does not exist")
    try:
        lock = spool.lock()
    except BlockingIOError:
        raise ConfigError(f"replay: {path} is being delivered right now by an MLflowSink delivery process (it "
                          "stops within the sink's close_timeout after its training process ends): wait for it") from None
    try:
        return _replay(spool, tracking_uri)
    finally:
        if lock is not None:
            spool.lock_path.unlink(missing_ok=True)
            os.close(lock)


def _replay(spool: Spool, tracking_uri: str | None) -> int:
    path = spool.path
    state, ops = spool.state(), spool.pending()
    if not ops:
        logger.info("%s: nothing left to replay", path)
        return 0
    uri = tracking_uri or ops[0]["tracking_uri"]
    check_uri(uri)
    client = open_client(uri)
    run_id = state.get("run_id") or ops[0].get("run_id")
    sent = 0
    for i, op in enumerate(ops):
        try:
            with http_limits(uri, REPLAY_TIMEOUT):
                if op["kind"] == "create_run":
                    run_id = find_or_create_run(client, op, search=True)
                    sent += 1
                elif not (run_id or op.get("run_id")):
                    raise ConfigError(f"replay: {path} holds batches for a run it never created (no run id and no "
                                      f"create_run line before batch {op['seq']}); not a complete MLflowSink spool")
                else:
                    sent += deliver(client, op, run_id or op["run_id"], check=True)
        except ConfigError:
            raise
        except Exception as err:
            left = len(ops) - i
            if is_transient(err):
                raise ConnectionError(f"MLflow server at {uri} did not answer ({short_error(err)}); {left} "
                                      f"batch(es) remain in {path}: run the replay again once it is up") from None
            raise ConfigError(f"replaying batch {op['seq']} ({op['kind']}) of {path} to {uri} failed: "
                              f"{short_error(err)}; {left} batch(es) remain in the spool") from None
        spool.advance(op["seq"], run_id)
    logger.info("%s: delivered %d batch(es) to %s (run %s)", path, sent, uri, run_id)
    return sent
