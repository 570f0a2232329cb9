"""Process delivery for :class:`~labeltrack_log.sinks.mlflow.MLflowSink`: MLflow stays out of the
training process.

Importing mlflow and opening its store costs a training process seconds of CPU (a fresh sqlite
store runs MLflow's schema migrations) and leaves ~200k objects that every later full garbage
collection walks. With ``delivery="process"`` the sink never imports mlflow: every batch is appended
to the sink's spool file (the JSON-lines format of :mod:`._spool`; here the journal of every batch,
not only the undelivered ones) and a child Python process follows the file and delivers the batches
in order through an ``MlflowClient``, recording its progress in the spool's cursor. The import and
the store's start-up then overlap with training, at a lower CPU priority (nice +10), and the training
process's garbage collections do not walk MLflow's objects.

**One delivery process per Python process.** The child is started by the first sink that needs it
and serves every sink of the process (each with its own spool file and run; :class:`Channel` is one
sink's handle) for the life of the process, so a second tracker, a second ``fit()`` in a notebook or
a sweep pays for ``import mlflow`` and the store's start-up only once. A forked child process gets
its own delivery process (the parent's is never written to from a fork, see :func:`DeliveryProcess.shared`).

Parent -> child, on the child's stdin, one JSON object a line:

* ``{"op": "open", "id": N, "spool": path, "timeout": S, "retry_interval": S, "close_timeout": S,
  "run_id": ...}``: follow this spool (the child takes its lock, ``<spool>.lock``, so a replay never
  races it);
* ``{"op": "nudge"}``: new batches were appended (to any spool);
* ``{"op": "next", "id": N, "spool": path}``: the spool, fully delivered (the parent checked the
  cursor), has grown past ``ROTATE_BYTES``; later batches go to ``path``: remove the old file and
  follow the new one;
* ``{"op": "close", "id": N}``: the sink is closing: deliver the rest of its spool (within its
  ``close_timeout``), report ``done`` and forget it; ``{"op": "drop", "id": N}``: forget it now;
* end of file: the training process is gone (killed, crashed, or it exited without closing its
  sinks): deliver the rest of every open spool (within its ``close_timeout``), mark each run a sink
  created ``KILLED`` and exit.

The child delivers in slices (at most ``SLICE`` seconds of one spool before it looks at its inbox
and the other spools), so a large backlog neither delays a ``close`` nor starves another sink.

Child -> parent, JSON lines on the child's original stdout (MLflow's own prints go to stderr), each
with the channel ``id``: ``{"run_id": ...}`` once the run exists, ``{"level": N, "msg": ...}`` for
the parent's logger and ``{"done": true, "left": N}`` at the end. When the parent is gone, the child
logs to its stderr.

A delivered spool (and its cursor and lock) is removed; one with batches left is kept for
``labeltrack-log replay``. POSIX only (``fcntl``, non-blocking pipes); elsewhere the sink delivers inline.
"""

from __future__ import annotations

import atexit
import itertools
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

from ._spool import Spool, deliver, find_or_create_run, http_limits, is_transient, open_client, short_error

__all__ = ["Channel", "DeliveryProcess", "SUPPORTED", "main"]

logger = logging.getLogger("labeltrack_log.sinks.mlflow")

SUPPORTED = os.name == "posix" and bool(sys.executable)  # a Python to start the child with
MIN_RETRY = 0.05  # seconds between two probes of a server that is down, at least
LOCK_HANDOVER = 1.0  # seconds a new spool waits for its lock from the parent before delivering without it
SLICE = 0.25  # seconds of delivery from one spool before the child looks at its inbox and the other spools
CLOSE_MARGIN = 5.0  # seconds close() may wait past close_timeout for the child's last answer
NICE = 10  # the child yields the CPU to training (measured: a fresh fit 0.96 -> 0.93 of FE's time)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_CHILD_CODE = ("import sys; sys.path.insert(0, sys.argv[1]); "
               "from labeltrack_log.sinks._delivery import main; sys.exit(main(sys.argv[2:]))")


# ============================================================================ parent side
class DeliveryProcess:
    """The training process's one delivery child, shared by every MLflowSink of the process (see
    the module docstring). Get it with :meth:`shared`; a sink talks to it through its :class:`Channel`."""

    _shared: "DeliveryProcess | None" = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.pid = os.getpid()  # the process whose child this is
        self.restarts = 0  # children that exited unexpectedly
        self.channels: dict[int, Channel] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._buffer = b""

    @classmethod
    def shared(cls) -> "DeliveryProcess":
        """This process's delivery child (not started yet when no sink needed it). A forked child
        never uses its parent's: it gets a fresh one."""
        with cls._shared_lock:
            if cls._shared is None or cls._shared.pid != os.getpid():
                cls._shared = cls()
            return cls._shared

    # ------------------------------------------------------------------ lifetime
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the child (again, after one exited) and hand it every open channel's spool.
        Raises OSError when it cannot be started."""
        with self._lock:
            if self.proc is not None:
                self.restarts += 1
                self._close_pipes()
            self.proc, self._buffer = None, b""
            proc = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, _PACKAGE_ROOT], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, close_fds=True,
                                    start_new_session=True)  # a Ctrl-C meant for training does not cut delivery short
            os.set_blocking(proc.stdout.fileno(), False)
            os.set_blocking(proc.stdin.fileno(), False)
            self.proc = proc
            for channel in self.channels.values():
                self._open(channel)
            atexit.register(self._at_exit, proc)

    def _at_exit(self, proc: subprocess.Popen) -> None:
        """At interpreter exit: end of file on the child's stdin; the child delivers what is left of
        sinks nobody closed (their runs are marked KILLED) and exits by itself."""
        if proc is self.proc and self.pid == os.getpid():
            self._close_pipes(stdout=False)

    def _close_pipes(self, stdout: bool = True) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout if stdout else None):
            try:
                if pipe is not None:
                    pipe.close()
            except (OSError, ValueError):
                pass

    # ------------------------------------------------------------------ channels
    def attach(self, spool: Spool, *, timeout: float, retry_interval: float, close_timeout: float,
               on_report: Callable[[dict[str, Any]], None], run_id: str | None = None,
               lock_fd: int | None = None) -> "Channel":
        """A new channel for ``spool``, served by the running child (start it first). ``lock_fd``:
        the spool's lock, held here until the child reports that it is ready to take it over."""
        with self._lock:
            channel = Channel(self, next(self._ids), spool, timeout=timeout, retry_interval=retry_interval,
                              close_timeout=close_timeout, on_report=on_report, run_id=run_id)
            channel.lock_fd = lock_fd
            self.channels[channel.id] = channel
            self._open(channel)
            return channel

    def _open(self, channel: "Channel") -> None:
        self.send({"op": "open", "id": channel.id, "spool": str(channel.spool.path), "timeout": channel.timeout,
                   "retry_interval": channel.retry_interval, "close_timeout": channel.close_timeout,
                   "run_id": channel.run_id})

    def detach(self, channel: "Channel") -> None:
        with self._lock:
            channel.release()
            if self.channels.pop(channel.id, None) is not None and channel.done is None:
                self.send({"op": "drop", "id": channel.id})

    def send(self, message: dict[str, Any]) -> bool:
        with self._lock:
            if not self.alive():
                return False
            try:
                self.proc.stdin.write(json.dumps(message).encode() + b"\n")
                self.proc.stdin.flush()
            except BlockingIOError:  # the pipe is full: nudges pile up (lose one), others must get through
                if message.get("op") == "nudge":
                    return True
                os.set_blocking(self.proc.stdin.fileno(), True)
                try:
                    self.proc.stdin.flush()
                except (OSError, ValueError):
                    return False
                finally:
                    os.set_blocking(self.proc.stdin.fileno(), False)
            except (OSError, ValueError):  # the child is gone
                return False
            return True

    # ------------------------------------------------------------------- reports
    def poll(self) -> None:
        """Hand every report the child has sent so far to its channel (never blocks)."""
        with self._lock:
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
                    channel = self.channels.get(report.get("id"))
                    if channel is None:
                        if "msg" in report:
                            logger.log(int(report.get("level", logging.WARNING)), "%s", report["msg"])
                        continue
                    if report.get("opened") or report.get("done"):
                        channel.release()  # the child takes the spool's lock over now
                    if report.get("opened"):
                        continue
                    if report.get("done"):
                        channel.done = report
                        self.channels.pop(channel.id, None)
                    channel.on_report(report)

    def wait_for(self, ready: Callable[[], bool], seconds: float) -> bool:
        """Poll reports until ``ready()`` or ``seconds`` pass or the child exits; returns ``ready()``."""
        deadline = time.monotonic() + seconds
        while not ready() and self.alive():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                select.select([self.proc.stdout], [], [], min(left, 0.5))
            except (OSError, ValueError):
                break
            self.poll()
        self.poll()
        return ready()


class Channel:
    """One sink's spool, served by the process's :class:`DeliveryProcess`.

    Args:
        process: The shared delivery process.
        id: Its number within the process.
        spool: The sink's spool (journal) file.
        timeout: Longest wait of one request in the child.
        retry_interval: Pause of the child between probes of a server that does not answer.
        close_timeout: Time the child may spend delivering after ``close`` (or after the parent died).
        on_report: Called in the parent with each report dict the child sends for this spool.
        run_id: The run's id, when the sink knows it already.
    """

    def __init__(self, process: DeliveryProcess, id: int, spool: Spool, *, timeout: float, retry_interval: float,
                 close_timeout: float, on_report: Callable[[dict[str, Any]], None], run_id: str | None) -> None:
        self.process, self.id, self.spool = process, id, spool
        self.timeout, self.retry_interval, self.close_timeout = timeout, retry_interval, close_timeout
        self.on_report, self.run_id = on_report, run_id
        self.done: dict[str, Any] | None = None  # the child's final report
        self.lock_fd: int | None = None  # the spool's lock, until the child has opened the spool

    def release(self) -> None:
        if self.lock_fd is not None:
            try:
                os.close(self.lock_fd)
            except OSError:
                pass
            self.lock_fd = None

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.process.proc

    @property
    def restarts(self) -> int:
        return self.process.restarts

    def alive(self) -> bool:
        return self.process.alive() and self.id in self.process.channels

    def nudge(self) -> bool:
        """Tell the child that batches were appended; False if it is not running."""
        self.process.poll()
        return self.alive() and self.process.send({"op": "nudge"})

    def rotate(self, path: Path) -> bool:
        """Tell the child that later batches go to ``path`` (see the module docstring)."""
        if self.alive() and self.process.send({"op": "next", "id": self.id, "spool": str(path)}):
            self.spool = Spool(path)
            return True
        return False

    def poll(self) -> None:
        self.process.poll()

    def wait_for(self, ready: Callable[[], bool], seconds: float) -> bool:
        return self.process.wait_for(ready, seconds)

    def detach(self) -> None:
        self.process.detach(self)

    def finish(self) -> bool:
        """Send ``close`` and wait until the child reports that this spool is done (it stops
        delivering at ``close_timeout``; this waits at most ``CLOSE_MARGIN`` longer); returns whether
        it finished in time. The child keeps serving the other sinks."""
        if not self.process.send({"op": "close", "id": self.id}):
            return False
        finished = self.process.wait_for(lambda: self.done is not None, self.close_timeout + CLOSE_MARGIN)
        if not finished:
            self.detach()
        return finished


def _forget_parent_process() -> None:
    """After a fork, in the child: close the inherited pipes to the parent's delivery process (so it
    still sees end of file when the parent ends); the child starts its own when a sink needs one."""
    old = DeliveryProcess._shared
    DeliveryProcess._shared_lock = threading.Lock()  # it may have been held by another thread at the fork
    if old is not None and old.pid != os.getpid():
        for channel in old.channels.values():
            channel.release()  # an inherited lock would keep the parent's delivery process from its spool
    if old is not None and old.proc is not None and old.pid != os.getpid():
        for pipe in (old.proc.stdin, old.proc.stdout):
            try:
                pipe.close()
            except (OSError, ValueError):
                pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_process)


# ============================================================================= child side
class _Follower:
    """Follow one spool file and deliver its batches in order (one sink, in the delivery process)."""

    def __init__(self, server: "_Server", id: int, spool: Spool, timeout: float, retry_interval: float,
                 close_timeout: float, run_id: str | None = None) -> None:
        self.server, self.id = server, id
        self.spool, self.timeout, self.close_timeout = spool, timeout, close_timeout
        self.retry_interval = max(retry_interval, MIN_RETRY)
        self.lock_fd: int | None = None
        self.lock_warned = False
        self.opened_at = time.monotonic()
        state = spool.state()
        self.run_id: str | None = state.get("run_id") or run_id
        self.delivered = state["delivered_seq"]
        self.check = self.delivered >= 0  # an earlier deliverer may have sent the next batch unrecorded
        self.offset, self.pending = 0, deque()
        self.uri: str | None = None
        self.owned = False  # the spool creates the run: ours to end (KILLED when the parent vanished)
        self.next_paths: deque[str] = deque()  # spool files announced by "next", in order
        self.outage = False
        self.broken: str | None = None
        self.retry_at = 0.0
        self.ending: str | None = None  # "close" or "gone"
        self.deadline = math.inf

    def take_lock(self) -> bool:
        """Take the spool's lock (held until this spool is finished, or this process exits); False
        while someone else holds it (the parent, until it has seen our ``opened``; or a replay)."""
        if self.lock_fd is not None:
            return True
        try:
            self.lock_fd = self.spool.lock()
        except BlockingIOError:
            if time.monotonic() - self.opened_at < LOCK_HANDOVER:
                return False
            self.lock_warned = True  # the parent did not look at our reports yet (or a replay holds it)
            return True
        except OSError as err:
            if not self.lock_warned:
                self.lock_warned = True
                self.say(logging.WARNING, f"could not take the delivery lock {self.spool.lock_path} ({err}); "
                                          "delivering anyway")
            return True
        state = self.spool.state()  # a replay may have delivered some meanwhile
        if state["delivered_seq"] > self.delivered:
            self.delivered, self.check = state["delivered_seq"], True
            self.run_id = self.run_id or state.get("run_id")
            while self.pending and self.pending[0]["seq"] <= self.delivered:
                self.pending.popleft()
        return True

    def _unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    # ------------------------------------------------------------------ reports
    def report(self, **fields: Any) -> None:
        self.server.report(id=self.id, **fields)

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
                if op["seq"] > max(self.delivered, self.pending[-1]["seq"] if self.pending else -1):
                    self.pending.append(op)  # (a line written again after a full disk cut it short: once)

    # ----------------------------------------------------------------- delivery
    def step(self) -> bool:
        """Deliver for at most ``SLICE`` seconds; True when there is more to do right away."""
        now = time.monotonic()
        if self.broken or now < self.retry_at or not self.take_lock():
            return False
        self.read_new()
        idle = self.deliver_pending(min(self.deadline, now + SLICE), self.deadline)
        while idle and self.next_paths:  # the old file is delivered: follow the next one
            self.switch(self.next_paths.popleft())
            idle = self.deliver_pending(min(self.deadline, time.monotonic() + SLICE), self.deadline)
        return not idle and not self.broken and time.monotonic() >= self.retry_at

    def finished(self) -> bool:
        """Whether a closing spool is done: delivered, broken or out of time."""
        if not self.ending:
            return False
        if self.broken is not None or time.monotonic() >= self.deadline:
            return True
        if self.lock_fd is None and not self.lock_warned:
            return False  # not even started: the parent is handing the lock over
        self.read_new()
        return not self.pending and not self.next_paths

    def deliver_pending(self, until: float, deadline: float) -> bool:
        """Deliver queued batches in order until ``until``; each request may last until ``deadline``
        (at most ``timeout``). True when none is left."""
        while self.pending and not self.broken:
            op = self.pending[0]
            now = time.monotonic()
            left = deadline - now
            if left <= 0 or now >= until:
                return False
            try:
                client = self.server.client(self.uri)
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

    def failed(self, op: dict[str, Any], err: BaseException) -> None:
        self.check = True  # the batch may be stored although its answer was lost
        what = f"{type(err).__name__}: {short_error(err)}"
        if is_transient(err):
            self.retry_at = time.monotonic() + self.retry_interval
            if not self.outage:
                self.outage = True
                self.say(logging.WARNING, f"MLflow server at {self.uri or op['tracking_uri']} did not take a batch "
                                          f"({what}); batches wait in {self.spool.path} and are retried in order")
        else:
            self.broken = what
            self.say(logging.ERROR, f"MLflow at {self.uri or op['tracking_uri']} rejected a {op['kind']} batch "
                                    f"({what}); this and every later batch stay in {self.spool.path}; fix the cause, "
                                    f"then run: labeltrack-log replay {self.spool.path}")

    def end(self, ending: str) -> None:
        if self.ending is None:
            self.ending = ending
            self.deadline = time.monotonic() + self.close_timeout
            self.retry_at = 0.0  # one more try now

    def switch(self, path: str) -> None:
        """Remove the delivered spool file and follow ``path`` from its start."""
        self.spool.remove()
        self._unlock()
        self.spool, self.offset = Spool(path), 0
        self.take_lock()
        self.read_new()

    def finish(self) -> None:
        self.read_new()
        left = len(self.pending) + sum(1 for _ in self.next_paths)
        if self.ending == "gone" and not left and not self.broken and self.owned and self.run_id and self.uri:
            try:
                with http_limits(self.uri, self.timeout):
                    self.server.client(self.uri).set_terminated(self.run_id, status="KILLED")
                self.say(logging.WARNING, f"the training process ended without closing its MLflowSink: every batch "
                                          f"was delivered and run {self.run_id} is marked KILLED")
            except Exception as err:
                self.say(logging.WARNING, f"could not mark run {self.run_id} KILLED: {short_error(err)}")
        if left == 0 and not self.broken:
            self.spool.remove()
        else:
            self.spool.lock_path.unlink(missing_ok=True)
            self.say(logging.WARNING,
                     f"MLflowSink: {len(self.pending)} batch(es) for run {self.run_id or '(not created yet)'} could "
                     f"not be delivered to {self.uri} within close_timeout={self.close_timeout:g}s and are kept in "
                     f"{self.spool.path}. Replay them when the server is back with: labeltrack-log replay "
                     f"{self.spool.path}")
        self._unlock()
        self.report(done=True, left=len(self.pending), run_id=self.run_id, spool=str(self.spool.path))


class _Server:
    """The delivery process's loop: every open spool of the training process, delivered in slices."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out: IO[bytes] | None = out
        self.followers: dict[int, _Follower] = {}
        self.clients: dict[str, Any] = {}
        self.gone = False

    def client(self, uri: str) -> Any:
        if uri not in self.clients:
            self.clients[uri] = open_client(uri)
        return self.clients[uri]

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

    def handle(self, message: str | None) -> None:
        if message is None:  # end of file: the training process is gone (or exited)
            self.gone = True
            for follower in self.followers.values():
                follower.end("gone")
            return
        if not message:
            return
        try:
            m = json.loads(message)
            op = m["op"]
        except (ValueError, KeyError, TypeError):
            self.report(level=logging.ERROR, msg=f"delivery process: ignoring a malformed message {message[:80]!r}")
            return
        follower = self.followers.get(m.get("id"))
        if op == "open":
            self.followers[m["id"]] = _Follower(self, m["id"], Spool(m["spool"]), m["timeout"], m["retry_interval"],
                                                m["close_timeout"], m.get("run_id"))
            self.report(id=m["id"], opened=True)  # the parent lets go of the spool's lock: we take it
        elif op == "next" and follower is not None:
            follower.next_paths.append(m["spool"])
        elif op == "close" and follower is not None:
            follower.end("close")
        elif op == "drop" and follower is not None:
            follower._unlock()
            del self.followers[m["id"]]

    def run(self, inbox: "queue.Queue[str | None]") -> int:
        while True:
            busy = False
            for id_, follower in list(self.followers.items()):
                busy = follower.step() or busy
                if follower.finished():
                    follower.finish()
                    del self.followers[id_]
            if self.gone and not self.followers:
                return 0
            now = time.monotonic()
            wait: float | None = 0.0 if busy else None
            for follower in self.followers.values():
                if follower.pending and not follower.broken:
                    wait = min(math.inf if wait is None else wait, max(0.0, follower.retry_at - now))
                if follower.ending:
                    wait = min(math.inf if wait is None else wait, max(0.0, follower.deadline - now))
                if follower.lock_fd is None and not follower.lock_warned:
                    wait = min(math.inf if wait is None else wait, 0.02)  # the parent lets go of the lock soon
            try:
                message = inbox.get(timeout=wait) if wait != 0.0 else inbox.get_nowait()
            except queue.Empty:
                continue
            while True:  # take every message that is already there
                self.handle(message)
                try:
                    message = inbox.get_nowait()
                except queue.Empty:
                    break


def _read_stdin(inbox: "queue.Queue[str | None]") -> None:
    for line in sys.stdin.buffer:
        inbox.put(line.decode(errors="replace").strip())
    inbox.put(None)  # end of file


def main(argv: list[str]) -> int:
    """Entry point of the delivery process (no arguments: spools arrive as ``open`` messages)."""
    logging.basicConfig(level=logging.INFO, format="labeltrack-log MLflow delivery: %(levelname)s %(message)s")
    try:
        os.nice(NICE)  # delivery waits for idle CPU; close() leaves it the whole machine
    except OSError:  # pragma: no cover - not permitted: run at normal priority
        pass
    out = os.fdopen(os.dup(1), "wb")  # reports go to the parent; MLflow's own prints go to stderr
    os.dup2(2, 1)
    inbox: "queue.Queue[str | None]" = queue.Queue()
    threading.Thread(target=_read_stdin, args=(inbox,), daemon=True).start()
    code = _Server(out).run(inbox)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)  # everything is stored and reported: skip the slow teardown of mlflow's modules
