"""Bounded waits for the tests: poll until something holds, fail loudly with the last answer."""

from __future__ import annotations

import time
import urllib.error
from typing import Any, Callable

import pytest


def wait_for(fetch: Callable[[], Any], ok: Callable[[Any], bool], what: str, timeout: float = 40.0) -> Any:
    """Poll ``fetch()`` until ``ok(result)`` and return that result; fail with the last answer
    after ``timeout`` s. A server that does not answer yet (URLError, HTTPError) or an answer
    without the expected entry yet (KeyError, StopIteration) counts as "not yet"."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            last = fetch()
            if ok(last):
                return last
        except (urllib.error.URLError, KeyError, StopIteration) as err:
            last = err
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last answer: {str(last)[:1500]}")
        time.sleep(0.2)  # poll interval


def open_run_id(sink: Any, timeout: float = 120.0) -> str:
    """The run id of an open MLflowSink. With process delivery ``sink.run_id`` waits only the
    sink's ``timeout`` (a few seconds) for the delivery process to create the run, and a first
    sqlite store on a loaded machine takes longer: this waits up to ``timeout`` s and fails loudly
    instead of returning None (after ``close()`` the id is always known: read it there when the
    test does not need it while the run is open)."""
    return wait_for(lambda: sink.run_id, lambda run_id: run_id is not None, "the MLflow run to be created", timeout)
