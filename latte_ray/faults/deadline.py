"""Batch deadlines in the generation actors, and the expected times both they and the driver's progress
watchdog (watchdog.py) are derived from.

A generation call that runs far past its expected time (a hung CUDA kernel, a deadlocked library, a
stuck NCCL or file lock) cannot be interrupted from Python: the thread is inside native code. The only
way out that leaves the node usable is to end the worker process. `deadline` arms a timer around
each call; when it fires it notes the reason in the crash ledger, logs one line and `os._exit`s. Ray
restarts the actor and retries its batch; the crash ledger (crashes.py) then runs the batch row by row
and turns a row that keeps doing this into an error row that names the deadline.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger(__name__)

FALLBACK_SECONDS_PER_VIDEO = 60.0  # when the spec does not say (execution.seconds_per_video: null)
DEADLINE_FACTOR = 10.0  # a call may take 10x its expected time before it is called hung
DEADLINE_FLOOR_S = 120.0
EXIT_CODE = 114  # the exit status of a worker that ended itself on a deadline (see injection.EXIT_CODE)


def seconds_per_video(spec) -> float:
    return spec.execution.seconds_per_video or FALLBACK_SECONDS_PER_VIDEO


def batch_deadline(spec, rows: int) -> float | None:
    """Seconds a generation call over `rows` rows may take (execution.batch_deadline_s), None: no deadline."""
    value = spec.execution.batch_deadline_s
    if value is None:
        return None
    if value != "auto":
        return float(value)
    return max(DEADLINE_FLOOR_S, DEADLINE_FACTOR * seconds_per_video(spec) * rows)


@contextmanager
def deadline(seconds: float | None, what: str, on_expiry: Callable[[], None] | None = None) -> Iterator[None]:
    """Around one generation call: if it is still running after `seconds`, `on_expiry()` runs (in a timer
    thread), one line is logged and the process ends with EXIT_CODE. `seconds` None: no deadline."""
    if seconds is None:
        yield
        return
    timer = threading.Timer(seconds, _expire, args=(seconds, what, on_expiry))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _expire(seconds: float, what: str, on_expiry: Callable[[], None] | None) -> None:
    try:
        if on_expiry is not None:
            on_expiry()
        log.error("%s ran past its %.0f s deadline (execution.batch_deadline_s); ending this worker process "
                  "so that Ray restarts it and retries the batch", what, seconds)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
    finally:
        os._exit(EXIT_CODE)
