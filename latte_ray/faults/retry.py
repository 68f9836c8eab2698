"""Retries with exponential backoff and jitter for transient storage failures.

Object stores fail transiently (throttling, resets, timeouts, a minute of unavailability); one failed PUT
must not cost a video or a run. Errors that retrying cannot fix (permission denied, a missing bucket,
bad arguments) are raised at once.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
SCALE_ENV = "LATTE_RAY_RETRY_DELAY_SCALE"

PERMANENT = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
# Transient errors of HTTP/S3 clients that are not OSError subclasses, by class name (no import needed).
TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
    "ResponseStreamingError", "IncompleteReadError",
}
TRANSIENT_CODES = ("SlowDown", "Throttl", "RequestTimeout", "ServiceUnavailable", "InternalError", "503", "500")


@dataclass(frozen=True)
class Policy:
    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 20.0

    def delay(self, attempt: int) -> float:
        """Jittered exponential backoff: uniform in [cap/10, cap], cap = min(max, base * 2**attempt), all
        scaled by LATTE_RAY_RETRY_DELAY_SCALE (default 1; tests make it small)."""
        cap = min(self.max_delay, self.base_delay * 2**attempt) * float(os.environ.get(SCALE_ENV, "1"))
        return random.uniform(cap / 10, cap)


VIDEO = Policy(attempts=6, base_delay=0.5, max_delay=20.0)  # ~40 s worst case, then the row is an error row
MANIFEST = Policy(attempts=12, base_delay=0.5, max_delay=60.0)  # ~8 min: an unwritten manifest loses the batch
READ = Policy(attempts=6, base_delay=0.5, max_delay=20.0)


def is_transient(error: BaseException) -> bool:
    if isinstance(error, PERMANENT):
        return False
    if isinstance(error, (OSError, TimeoutError, ConnectionError)):
        return True
    if type(error).__name__ in TRANSIENT_NAMES:
        return True
    text = str(error)
    return any(code in text for code in TRANSIENT_CODES)


def call(fn: Callable[[], T], what: str, policy: Policy = VIDEO) -> T:
    """fn(), retried on transient errors; the last error is raised with how many attempts were made."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient(e) or attempt == policy.attempts - 1:
                if attempt:
                    e.add_note(f"{what}: gave up after {attempt + 1} attempts")
                raise
            pause = policy.delay(attempt)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e, attempt + 1,
                        policy.attempts - 1, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")
