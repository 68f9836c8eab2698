"""What a person sees while a command runs: one line saying what will run, one live progress line, the summary.

Everything else a run prints goes to its log file, not the console: Ray Data's operator progress blocks (it
logs them every 10 s when stdout is not a terminal), Ray's own notices (the token-authentication warning at
`ray.init`), the C++ core worker's lines, library warnings, and what the stage actors print (Ray forwards
their stdout/stderr to the driver). The capture works on file descriptors 1 and 2 of the driver process, so
it catches writers that know nothing of Python's logging (C++, tqdm, child processes); the console keeps
copies of the original descriptors and writes to those. `--verbose` turns the capture off: everything is
printed as before, and the progress line becomes a plain line every PROGRESS_INTERVAL_S.

Where the log goes: a temporary local file until the run's checks have passed and the output is bound
(so a refused run leaves nothing in a folder that is not an output), then OUTPUT/runs/<run_id>.log. A local
output's log is written in place from then on (`tail -f` works); an `s3://` output's log stays local during
the run and is uploaded when the command ends. Errors keep their one-line `error: ...` form: they are printed
after the capture has ended.

Inside a process whose stdout is not a real file descriptor (typer's CliRunner in tests), nothing is
captured; the lines are written to sys.stdout as they are.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 30.0  # on a non-terminal (a file, a pipe, a job log): at most one progress line this often
REFRESH_S = 0.5  # on a terminal: the live line is redrawn this often (elapsed time and ETA move while a batch runs)


def _fd_backed(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.StringIO, CliRunner's buffers
        return False


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """The live progress line: `12/600 videos (2%) · 0.31/s · ETA 31:40 · 1 error · 0:39 elapsed`.

    On a terminal it is redrawn in place (carriage return, erase line); elsewhere it is printed as a plain
    line at most every `interval` seconds, and only when the count moved. The rate is over the videos done
    since the first one finished (model loading is not in it), so the ETA settles after a few batches."""

    def __init__(self, stream, total: int, unit: str = "videos", tty: bool | None = None,
                 interval: float = PROGRESS_INTERVAL_S, clock=time.monotonic):
        self.stream = stream
        self.total = total
        self.unit = unit
        self.tty = _isatty(stream) if tty is None else tty
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.errors = 0
        self._first_done: tuple[float, int] | None = None  # (time, count) when the first video came out
        self._last_print: float | None = None
        self._printed_done = -1
        self._shown = False  # a live line is on the terminal
        self._drawn = ""
        self.lock = threading.RLock()

    def line(self) -> str:
        now = self.clock()
        pct = f" ({100 * self.done // self.total}%)" if self.total else ""
        parts = [f"{self.done}/{self.total} {self.unit}{pct}"]
        rate = self.rate(now)
        if rate:
            parts.append(f"{rate:.2f}/s" if rate >= 0.1 else f"{rate * 60:.1f}/min")
            left = max(self.total - self.done, 0)
            parts.append(f"ETA {_clock(left / rate)}")
        else:
            parts.append("ETA -")
        parts.append(f"{self.errors} error{'s' if self.errors != 1 else ''}")
        parts.append(f"{_clock(now - self.started)} elapsed")
        return " · ".join(parts)

    def rate(self, now: float) -> float:
        if self._first_done is None:
            return 0.0
        t0, n0 = self._first_done
        if self.done > n0 and now > t0:
            return (self.done - n0) / (now - t0)
        return 0.0

    def update(self, done: int, errors: int) -> None:
        with self.lock:
            if done > 0 and self._first_done is None:
                self._first_done = (self.clock(), done)
            self.done, self.errors = done, errors
            self.render()

    def render(self, force: bool = False) -> None:
        """Draw the line now (terminal), or print it when `interval` has passed and the count moved."""
        with self.lock:
            if self.tty:
                line = self.line()
                if self._shown and line == self._drawn:
                    return
                self.stream.write("\r\x1b[K" + line)
                self.stream.flush()
                self._shown, self._drawn = True, line
                return
            now = self.clock()
            due = self._last_print is None or now - self._last_print >= self.interval
            if force or (due and self.done != self._printed_done):
                self.stream.write(self.line() + "\n")
                self.stream.flush()
                self._last_print, self._printed_done = now, self.done

    def clear(self) -> None:
        """Take the live line off the terminal (before another line is printed)."""
        with self.lock:
            if self.tty and self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = False

    def close(self) -> None:
        """Leave the last state on the terminal as a finished line."""
        with self.lock:
            if self.tty and self._shown:
                self.stream.write("\r\x1b[K" + self.line() + "\n")
                self.stream.flush()
                self._shown = False


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _EchoHandler(logging.Handler):
    def __init__(self, console: "Console"):
        super().__init__(logging.WARNING)
        self.console = console
        self.setFormatter(logging.Formatter("warning: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.echo(self.format(record))
        except Exception:  # noqa: BLE001 - logging must not fail the run
            self.handleError(record)


class Console:
    """The console of one command: `capture()` around the work, `echo` for the lines a person reads,
    `progress` for the live line. The runner calls `attach_log` once the output is bound."""

    def __init__(self, verbose: bool = False, name: str = "run"):
        self.verbose = verbose
        self.name = name
        self.stream = sys.stdout
        self.progress: Progress | None = None
        self.log_local: str | None = None  # the file fds 1 and 2 write to now
        self.log_url: str | None = None  # where the log ends up (OUTPUT/runs/<run_id>.log)
        self._upload = None  # (fs, path): a remote output's log, uploaded when the capture ends
        self._saved: tuple[int, int] | None = None
        self._warnings: logging.Handler | None = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def tty(self) -> bool:
        return _isatty(self.stream) and not self.verbose

    # ------------------------------------------------------------------ lines

    def echo(self, line: str = "") -> None:
        if self.progress is not None:
            with self.progress.lock:
                self.progress.clear()
                self.stream.write(line + "\n")
                self.stream.flush()
                if self.progress.tty:
                    self.progress.render()
            return
        self.stream.write(line + "\n")
        self.stream.flush()

    def start_progress(self, total: int, unit: str = "videos") -> Progress:
        self.progress = Progress(self.stream, total, unit, tty=self.tty)
        if self.progress.tty:
            self.progress.render()
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, name="latte-ray-progress", daemon=True)
            self._ticker.start()
        return self.progress

    def _tick(self) -> None:
        while not self._stop.wait(REFRESH_S):
            if self.progress is not None:
                self.progress.render()

    def end_progress(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
            self._ticker = None
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    # ------------------------------------------------------------------ the capture

    @contextmanager
    def capture(self):
        """Send everything written to fds 1 and 2 to a log file for the duration (see the module docstring)."""
        if self.verbose or not (_fd_backed(sys.stdout, 1) and _fd_backed(sys.stderr, 2)):
            try:
                yield self
            finally:
                self.end_progress()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        fd, path = tempfile.mkstemp(prefix=f"latte-ray-{self.name}-", suffix=".log")
        self._saved = (os.dup(1), os.dup(2))
        self.stream = os.fdopen(os.dup(self._saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.log_local = path
        logging.captureWarnings(True)  # warnings.warn(...) of libraries: into the log, through logging
        self._warnings = _EchoHandler(self)  # latte-ray's own warnings (a re-plan, ...) stay on the console too
        logging.getLogger("latte_ray").addHandler(self._warnings)
        try:
            yield self
        finally:
            self.end_progress()
            self._restore()

    def _restore(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.getLogger("latte_ray").removeHandler(self._warnings)
        out, err = self._saved
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        self._saved = None
        self.stream.close()
        self.stream = sys.stdout
        logging.captureWarnings(False)
        if self.log_url is None and self.log_local is not None:
            # Never attached: the command stopped before its output was bound (a refused run, exit 2, whose
            # one-line error says why); what Ray and the libraries printed until then is not kept.
            os.unlink(self.log_local)
            self.log_local = None
        if self._upload is not None:
            fs, target = self._upload
            try:
                fs.put_file(self.log_local, target)
                os.unlink(self.log_local)
                self.log_local = None
            except Exception as e:  # noqa: BLE001 - the log stays where it is, named in the summary
                log.warning("could not upload the log to %s (%s: %s); it is at %s", self.log_url,
                            type(e).__name__, e, self.log_local)
                self.log_url = None
            self._upload = None

    def attach_log(self, fs, path: str, url: str) -> None:
        """The output is bound: the log's place is OUTPUT/runs/<run_id>.log (`path` on `fs`; `url` as users
        see it). Local: what was captured so far is copied there and the capture goes on in that file.
        Remote: the capture stays in the local file and is uploaded when it ends."""
        if self._saved is None:
            return
        from latte_ray.record.storage import is_local

        self.log_url = url
        if not is_local(fs):
            self._upload = (fs, path)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        with open(self.log_local, "rb") as early, os.fdopen(os.dup(fd), "wb") as dest:
            shutil.copyfileobj(early, dest)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.unlink(self.log_local)
        self.log_local = path

    @property
    def log_now(self) -> str | None:
        """The log as the line saying what will run names it: a remote output's log is still local then."""
        if self._upload is not None:
            return f"{self.log_local} (uploaded to {self.log_url} when the command ends)"
        return self.log_location

    @property
    def log_location(self) -> str | None:
        """Where the log is for a person to read: OUTPUT/runs/<run_id>.log, or the local file."""
        return self.log_url or self.log_local
