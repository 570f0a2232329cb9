"""Process delivery for :class:`~labeltrack_log.sinks.mlflow.MLflowSink`: MLflow stays out of the
training process.

Importing mlflow and opening its store costs a training process seconds of CPU (a fresh sqlite
store runs MLflow's schema migrations) and leaves ~200k objects that every later full garbage
collection walks. With ``delivery="process"`` the sink never imports mlflow: every batch is appended
to the sink's spool file (the JSON-lines format of :mod:`._spool`; here the journal of every batch,
not only the undelivered ones) and a child Python process, started with the sink, follows the file
and delivers the batches in order through an ``MlflowClient``, recording its progress in the
spool's cursor. The import and the store's start-up then overlap with training, at a lower CPU
priority (nice +10), and the training process's garbage collections do not walk MLflow's objects.

Parent -> child, on the child's stdin, one line each:

* an empty line: new batches were appended to the spool;
* ``next <path>``: the spool, fully delivered (the parent checked the cursor), has grown past
  ``ROTATE_BYTES``; later batches go to ``<path>``: remove the old file and follow the new one;
* ``close``: the sink is closing: deliver the rest (within ``close_timeout``) and exit;
* end of file without ``close``: the training process is gone (killed, crashed, or it exited
  without closing the sink): deliver the rest (within ``close_timeout``), mark the run the sink
  created ``KILLED`` and exit.

Child -> parent, JSON lines on the child's original stdout (MLflow's own prints go to stderr):
``{"run_id": ...}`` once the run exists, ``{"level": N, "msg": ...}`` for the parent's logger and
``{"done": true, "left": N}`` at the end. When the parent is gone, the child logs to its stderr.

A delivered spool (and its cursor and lock) is removed; one with batches left is kept for
``labeltrack-log replay``. The child holds an exclusive lock on ``<spool>.lock`` (taken by the
parent and inherited) from its start to its exit, so a replay never races it. POSIX only (``fcntl``, non-blocking pipes); elsewhere the sink delivers inline.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any, Callable

from ._spool import Spool, deliver, open_client, find_or_create_run, http_limits, is_transient, short_error

__all__ = ["DeliveryProcess", "SUPPORTED", "main"]

logger = logging.getLogger("labeltrack_log.sinks.mlflow")

SUPPORTED = os.name == "posix" and bool(sys.executable)  # a Python to start the child with
MIN_RETRY = 0.05  # seconds between two probes of a server that is down, at least
NICE = 10  # the child yields the CPU to training (measured: a fresh fit 0.96 -> 0.93 of FE's time)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_CHILD_CODE = ("import sys; sys.path.insert(0, sys.argv[1]); "
               "from labeltrack_log.sinks._delivery import main; sys.exit(main(sys.argv[2:]))")


# ============================================================================ parent side
class DeliveryProcess:
    """The training process's handle on its delivery child (see the module docstring).

    Args:
        spool: The sink's spool (journal) file.
        timeout: Longest wait of one request in the child.
        retry_interval: Pause of the child between probes of a server that does not answer.
        close_timeout: Time the child may spend delivering after ``close`` (or after the parent died).
        on_report: Called in the parent with each report dict the child sends.
        restarts: How many children of this spool exited unexpectedly before this one.
    """

    def __init__(self, spool: Spool, *, timeout: float, retry_interval: float, close_timeout: float,
                 on_report: Callable[[dict[str, Any]], None], restarts: int = 0) -> None:
        self.spool = spool
        self.args = ["--timeout", repr(timeout), "--retry-interval", repr(retry_interval),
                     "--close-timeout", repr(close_timeout)]
        self.close_timeout = close_timeout
        self.on_report = on_report
        self.proc: subprocess.Popen | None = None
        self._buffer = b""
        self.restarts = restarts
        self.done: dict[str, Any] | None = None  # the child's final report

    def start(self) -> None:
        """Start the child, handing it the spool's lock. Raises OSError when it cannot be started
        (BlockingIOError: someone else, e.g. a replay, holds the lock)."""
        lock = self.spool.lock()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_CODE, _PACKAGE_ROOT, str(self.spool.path), *self.args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, pass_fds=[lock],
                start_new_session=True)  # a Ctrl-C meant for training does not cut delivery short
        finally:
            os.close(lock)  # the child's inherited descriptor holds the lock until it exits
        os.set_blocking(self.proc.stdout.fileno(), False)
        os.set_blocking(self.proc.stdin.fileno(), False)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _send(self, line: bytes) -> bool:
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except BlockingIOError:  # the pipe is full of earlier nudges: the child has plenty to do
            pass
        except (OSError, ValueError):  # the child is gone
            return False
        return True

    def nudge(self) -> bool:
        """Tell the child that batches were appended; False if it is not running."""
        self.poll()
        return self.alive() and self._send(b"\n")

    def rotate(self, path: Path) -> bool:
        """Tell the child that later batches go to ``path`` (see the module docstring)."""
        return self.alive() and self._send(f"next {path}\n".encode())

    def poll(self) -> None:
        """Hand every report the child has sent so far to ``on_report`` (never blocks)."""
        if self.proc is None:
            return
        try:
            while chunk := os.read(self.proc.stdout.fileno(), 65536):
                self._buffer += chunk
        except (BlockingIOError, OSError, ValueError):
            pass
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if isinstance(report, dict):
                if report.get("done"):
                    self.done = report
                self.on_report(report)

    def wait_for(self, ready: Callable[[], bool], seconds: float) -> bool:
        """Poll reports until ``ready()`` or ``seconds`` pass or the child exits; returns ``ready()``."""
        deadline = time.monotonic() + seconds
        while not ready() and self.alive():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            select.select([self.proc.stdout], [], [], min(left, 0.5))
            self.poll()
        self.poll()
        return ready()

    def finish(self) -> bool:
        """Send ``close`` and wait until the child reports that it is done, or exits
        (``close_timeout`` plus a grace period); returns whether it finished by itself (a child past
        the grace period is killed)."""
        if self.proc is None:
            return True
        self._send(b"close\n")
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        finished = self.wait_for(lambda: self.done is not None, self.close_timeout + 10.0)
        if not finished and self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)  # after its report the child leaves at once (os._exit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.poll()
        self.proc.stdout.close()
        return finished or self.proc.returncode == 0


# ============================================================================= child side
class _Child:
    """Follow a spool file and deliver its batches in order (the delivery process's loop)."""

    def __init__(self, spool: Spool, timeout: float, retry_interval: float, close_timeout: float,
                 out: IO[bytes]) -> None:
        self.spool, self.timeout, self.close_timeout = spool, timeout, close_timeout
        self.retry_interval = max(retry_interval, MIN_RETRY)
        self.out: IO[bytes] | None = out
        state = spool.state()
        self.run_id: str | None = state.get("run_id")
        self.delivered = state["delivered_seq"]
        self.check = self.delivered >= 0  # an earlier deliverer may have sent the next batch unrecorded
        self.offset, self.pending = 0, deque()
        self.client: Any = None
        self.uri: str | None = None
        self.owned = False  # the spool creates the run: ours to end (KILLED when the parent vanished)
        self.next_paths: deque[str] = deque()  # spool files announced by "next", in order
        self.outage = False
        self.broken: str | None = None

    # ------------------------------------------------------------------ reports
    def report(self, **fields: Any) -> None:
        if self.out is not None:
            try:
                self.out.write(json.dumps(fields).encode() + b"\n")
                self.out.flush()
                return
            except OSError:  # the parent is gone: log here instead
                self.out = None
        if "msg" in fields:
            logging.getLogger("labeltrack_log.delivery").log(fields["level"], "%s", fields["msg"])

    def say(self, level: int, msg: str) -> None:
        self.report(level=level, msg=msg)

    # ------------------------------------------------------------------ reading
    def read_new(self) -> None:
        """Queue the complete lines appended since the last read."""
        try:
            with open(self.spool.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].split(b"\n"):
            if line.strip():
                try:
                    op = json.loads(line)
                except ValueError:  # e.g. a write cut short by a full disk, then appended to
                    self.say(logging.ERROR, f"{self.spool.path}: skipping a corrupt line ({len(line)} bytes: "
                                            f"{line[:80]!r}...)")
                    continue
                self.uri = self.uri or op["tracking_uri"]
                if op["kind"] == "create_run":
                    self.owned = bool(op.get("owned", True))
                if op["seq"] > self.delivered:
                    self.pending.append(op)

    # ----------------------------------------------------------------- delivery
    def deliver_pending(self, deadline: float) -> bool:
        """Deliver queued batches in order; True when none is left."""
        while self.pending and not self.broken:
            op = self.pending[0]
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                client = self.mlflow_client()
                with http_limits(self.uri, min(left, self.timeout)):
                    if op["kind"] == "create_run":
                        self.run_id = find_or_create_run(client, op, search=True)
                        self.report(run_id=self.run_id)
                    else:
                        deliver(client, op, self.run_id or op["run_id"], self.check)
            except Exception as err:
                self.failed(op, err)
                return False
            self.pending.popleft()
            self.check = False
            self.delivered = op["seq"]
            try:
                self.spool.advance(op["seq"], self.run_id)
            except OSError as err:  # harmless: a later deliverer looks its first batch up before sending it
                self.say(logging.WARNING, f"could not update the spool cursor {self.spool.cursor_path}: {err}")
            if self.outage:
                self.outage = False
                self.say(logging.INFO, f"MLflow server at {self.uri} answers again: delivering the spooled batches")
        return not self.pending

    def mlflow_client(self) -> Any:
        if self.client is None:
            self.client = open_client(self.uri)
        return self.client

    def failed(self, op: dict[str, Any], err: BaseException) -> None:
        self.check = True  # the batch may be stored although its answer was lost
        what = f"{type(err).__name__}: {short_error(err)}"
        if is_transient(err):
            if not self.outage:
                self.outage = True
                self.say(logging.WARNING, f"MLflow server at {self.uri or op['tracking_uri']} did not take a batch "
                                          f"({what}); batches wait in {self.spool.path} and are retried in order")
        else:
            self.broken = what
            self.say(logging.ERROR, f"MLflow at {self.uri or op['tracking_uri']} rejected a {op['kind']} batch "
                                    f"({what}); this and every later batch stay in {self.spool.path}; fix the cause, "
                                    f"then run: labeltrack-log replay {self.spool.path}")

    # --------------------------------------------------------------------- loop
    def run(self, inbox: "queue.Queue[str | None]") -> int:
        ending: str | None = None  # "close" or "gone"
        deadline = math.inf
        while True:
            self.read_new()
            idle = self.deliver_pending(deadline)
            while idle and self.next_paths:  # the old file is delivered: follow the next one
                self.switch(self.next_paths.popleft())
                idle = self.deliver_pending(deadline)
            now = time.monotonic()
            if ending and (idle or self.broken or now >= deadline):
                break
            wait = None if idle or self.broken else self.retry_interval
            if ending:
                wait = min(wait if wait is not None else math.inf, deadline - now)
            try:
                message = inbox.get(timeout=wait)
            except queue.Empty:
                continue
            while True:  # take every message that is already there
                if message and message.startswith("next "):
                    self.next_paths.append(message[len("next "):])
                elif message == "close" or (message is None and ending is None):
                    ending = ending or ("close" if message == "close" else "gone")
                    deadline = time.monotonic() + self.close_timeout
                try:
                    message = inbox.get_nowait()
                except queue.Empty:
                    break
        return self.finish(ending)

    def switch(self, path: str) -> None:
        """Remove the delivered spool file and follow ``path`` from its start."""
        self.spool.remove()
        self.spool, self.offset = Spool(path), 0
        try:
            self.spool.lock()  # held until this process exits, like the first one
        except OSError:
            pass
        self.read_new()

    def finish(self, ending: str) -> int:
        self.read_new()
        left = len(self.pending)
        if ending == "gone" and not left and not self.broken and self.owned and self.run_id and self.uri:
            try:
                with http_limits(self.uri, self.timeout):
                    self.mlflow_client().set_terminated(self.run_id, status="KILLED")
                self.say(logging.WARNING, f"the training process ended without closing its MLflowSink: every batch "
                                          f"was delivered and run {self.run_id} is marked KILLED")
            except Exception as err:
                self.say(logging.WARNING, f"could not mark run {self.run_id} KILLED: {short_error(err)}")
        if left == 0 and not self.broken:
            self.spool.remove()
        else:
            self.spool.lock_path.unlink(missing_ok=True)  # the lock is released when this process exits
            self.say(logging.WARNING,
                     f"MLflowSink: {left} batch(es) for run {self.run_id or '(not created yet)'} could not be "
                     f"delivered to {self.uri} and are kept in {self.spool.path}. Replay them when the server is "
                     f"back with: labeltrack-log replay {self.spool.path}")
        self.report(done=True, left=left, run_id=self.run_id)
        return 0


def _read_stdin(inbox: "queue.Queue[str | None]") -> None:
    for line in sys.stdin.buffer:
        inbox.put(line.decode(errors="replace").strip())
    inbox.put(None)  # end of file


def main(argv: list[str]) -> int:
    """Entry point of the delivery process: ``<spool> --timeout S --retry-interval S --close-timeout S``."""
    import argparse

    parser = argparse.ArgumentParser(prog="labeltrack-log MLflow delivery")
    parser.add_argument("spool")
    for flag in ("--timeout", "--retry-interval", "--close-timeout"):
        parser.add_argument(flag, type=float, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="labeltrack-log MLflow delivery: %(levelname)s %(message)s")
    try:
        os.nice(NICE)  # delivery waits for idle CPU; close() leaves it the whole machine
    except OSError:  # pragma: no cover - not permitted: run at normal priority
        pass
    out = os.fdopen(os.dup(1), "wb")  # reports go to the parent; MLflow's own prints go to stderr
    os.dup2(2, 1)
    inbox: "queue.Queue[str | None]" = queue.Queue()
    threading.Thread(target=_read_stdin, args=(inbox,), daemon=True).start()
    code = _Child(Spool(args.spool), args.timeout, args.retry_interval, args.close_timeout, out).run(inbox)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)  # everything is stored and reported: skip the slow teardown of mlflow's modules
