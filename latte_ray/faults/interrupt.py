"""Stopping the run's thread from another one, and SIGTERM as a graceful stop.

The progress watchdog, a lost lease and the round scheduler each stop a thread that is blocked somewhere in
Ray Data (an `iter_batches`, a `ray.get`). In the main thread a SIGINT does it (its handler raises there,
and the signal also breaks a blocking wait); in any other thread an exception is set asynchronously and
raised at its next bytecode. SIGTERM (what `ray job stop` and Kubernetes send) is made a Ctrl-C while a
run works: Ray's own driver handler calls sys.exit from inside whatever the driver was doing, which skips the
run's outcome and let the process abort at exit (134) with the run's threads still running.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from contextlib import contextmanager


def interrupt(thread: threading.Thread, error: type[BaseException], sigint: bool = True) -> None:
    """Raise `error` in `thread` now. `sigint`: the main thread gets a SIGINT instead (the caller has a
    SIGINT handler there that raises the right error), which also ends a blocking wait."""
    if thread.ident is None:
        return
    if sigint and thread is threading.main_thread():
        signal.pthread_kill(thread.ident, signal.SIGINT)
    else:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(error))


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a run worked: the run stops as it does on Ctrl-C (recorded `interrupted`, its
    lease released) and the command exits non-zero."""


@contextmanager
def sigterm_interrupts():
    """While inside, SIGTERM raises Terminated in the main thread (a no-op in any other thread, where no
    signal handler can be set); the previous handler (Ray's) is restored on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        raise Terminated(f"signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
