"""Fault injection for tests: production code calls `point(name, key)` at the places where a crash or a
storage failure matters; with no rules configured each call is one environment lookup and returns.

Rules come from LATTE_RAY_FAULTS, either inline or as `@/path/to/file` (re-read when the file changes, so
a test can change the rules of an already running Ray). Rules are separated by `;` or new lines; each is
space-separated `key=value` pairs:

    point=after_video match=id-7 action=kill-run
    point=write match=*/videos/* action=oserror times=3 p=0.5

- point:  where (see POINTS).
- match:  fnmatch pattern against the point's key (an id, a path, or any id of a batch); default `*`.
- action: exit (os._exit this process), kill-run (SIGKILL every process of this run's session: only with
          LATTE_RAY_FAULTS_KILL_RUN=1 and when the session leader is a latte-ray driver started in its own
          session), oserror (raise OSError, a transient storage failure), error (raise RuntimeError),
          perturb (at `frames` only: `point` returns True and the caller changes one pixel of the id's
          frames, a stand-in for a nondeterministic GPU kernel that gives other bytes on a retry),
          hang (sleep forever: a hung kernel or a deadlocked library).
- times:  fire at most this many times across all processes (counted with marker files in the state
          folder: LATTE_RAY_FAULTS_STATE, or `<file>.state` next to a rules file).
- p:      probability of firing at each matching call (default 1).
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Iterable

ENV = "LATTE_RAY_FAULTS"
STATE_ENV = "LATTE_RAY_FAULTS_STATE"
KILL_ENV = "LATTE_RAY_FAULTS_KILL_RUN"
EXIT_CODE = 113

POINTS = {
    "denoise": "start of a denoise batch; key: the batch's ids",
    "generate": "each generation call (a batch, or one row when retried row by row); key: its ids",
    "after_video": "a video object is stored, its manifest row not yet written; key: the id",
    "write": "before an atomic write; key: the path",
    "mid_write": "half of a local atomic write is in its temp file; key: the final path",
    "frames": "a row's frames are generated, not yet encoded; key: the id (action perturb)",
    "scan": "a work-plan scan task starts (the pre-pass); key: the input file paths of the task",
}
ACTIONS = ("exit", "kill-run", "oserror", "error", "perturb", "hang")


class InjectedFault(RuntimeError):
    """A failure raised on purpose by a fault rule."""


@dataclass(frozen=True)
class Rule:
    index: int
    point: str
    match: str = "*"
    action: str = "error"
    times: int | None = None
    p: float = 1.0

    def matches(self, keys: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(k, self.match) for k in keys)


def parse(text: str) -> list[Rule]:
    rules = []
    for raw in text.replace("\n", ";").split(";"):
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        fields = dict(part.split("=", 1) for part in raw.split())
        unknown = set(fields) - {"point", "match", "action", "times", "p"}
        if unknown or fields.get("point") not in POINTS or fields.get("action", "error") not in ACTIONS:
            raise ValueError(f"{ENV}: bad rule {raw!r} (points: {sorted(POINTS)}, actions: {ACTIONS})")
        if (fields.get("action") == "perturb") != (fields["point"] == "frames"):
            raise ValueError(f"{ENV}: bad rule {raw!r} (action perturb goes with point frames, and only it)")
        rules.append(Rule(
            index=len(rules), point=fields["point"], match=fields.get("match", "*"),
            action=fields.get("action", "error"),
            times=int(fields["times"]) if "times" in fields else None, p=float(fields.get("p", 1.0)),
        ))
    return rules


_cache: dict[str, tuple[object, list[Rule]]] = {}


def _rules(spec: str) -> tuple[list[Rule], str | None]:
    """The configured rules and their state folder."""
    if spec.startswith("@"):
        path = spec[1:]
        try:
            stamp = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return [], None
        cached = _cache.get(spec)
        if cached is None or cached[0] != stamp:
            with open(path) as f:
                cached = (stamp, parse(f.read()))
            _cache[spec] = cached
        return cached[1], os.environ.get(STATE_ENV) or path + ".state"
    cached = _cache.get(spec)
    if cached is None:
        cached = (None, parse(spec))
        _cache[spec] = cached
    return cached[1], os.environ.get(STATE_ENV)


def point(name: str, key: str | Iterable[str] = "") -> bool:
    """A named place where a configured fault may fire. A no-op unless LATTE_RAY_FAULTS is set. Returns True
    when a `perturb` rule fired (the caller changes its data)."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    rules, state = _rules(spec)
    keys = [key] if isinstance(key, str) else [str(k) for k in key]
    perturbed = False
    for rule in rules:
        if rule.point != name or not rule.matches(keys):
            continue
        if rule.p < 1.0 and random.random() >= rule.p:
            continue
        if rule.times is not None and not _take_turn(rule, state, keys):
            continue
        if rule.action == "perturb":
            perturbed = True
            continue
        _fire(rule, name, keys)
    return perturbed


def perturb(frames) -> None:
    """Invert the first pixel of the first frame of a (F, H, W, 3) uint8 array, in place."""
    frames[0, 0, 0] = 255 - frames[0, 0, 0]


def _take_turn(rule: Rule, state: str | None, keys: list[str]) -> bool:
    """Claim one of the rule's `times` firings; a marker file per firing makes this safe across processes. It
    holds the firing process's pid and the point's keys, as JSON (`firings` reads them)."""
    if state is None:
        raise ValueError(f"{ENV}: rules with times= need {STATE_ENV} (or a rules file)")
    os.makedirs(state, exist_ok=True)
    for n in range(rule.times):
        try:
            marker = os.path.join(state, f"rule{rule.index}-{rule.point}.{n}")
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, json.dumps({"pid": os.getpid(), "keys": keys}).encode())
        os.close(fd)
        return True
    return False


def fired(state: str) -> dict[int, int]:
    """How many times each counted rule (by its index in the rules) has fired so far."""
    counts: dict[int, int] = {}
    if os.path.isdir(state):
        for name in os.listdir(state):
            index = int(name.split("-", 1)[0].removeprefix("rule"))
            counts[index] = counts.get(index, 0) + 1
    return counts


def firings(state: str, index: int) -> list[tuple[int, list[str]]]:
    """Each firing of counted rule `index` so far: the pid of the process it fired in, and the point's keys (which
    row, which file): what a test needs to find the one thing a fault hit among others of its kind."""
    found = []
    if os.path.isdir(state):
        for name in sorted(os.listdir(state)):
            if name.startswith(f"rule{index}-"):
                with open(os.path.join(state, name)) as f:
                    marker = json.load(f)
                found.append((marker["pid"], marker["keys"]))
    return found


def _fire(rule: Rule, name: str, keys: list[str]) -> None:
    what = f"injected fault at {name} ({', '.join(keys)[:200]})"
    if rule.action == "oserror":
        raise OSError(f"{what}: transient storage failure")
    if rule.action == "error":
        raise InjectedFault(what)
    if rule.action == "exit":
        os._exit(EXIT_CODE)
    if rule.action == "hang":
        while True:
            time.sleep(3600)
    kill_run()


def kill_run() -> None:
    """SIGKILL every process in this session: the driver, Ray's daemons and workers, all at one instant."""
    session = os.getsid(0)
    if os.environ.get(KILL_ENV) != "1" or not _is_driver_session(session):
        raise InjectedFault(f"kill-run refused: needs {KILL_ENV}=1 and a latte-ray driver leading its own session")
    kill_session(session)


def _is_driver_session(session: int) -> bool:
    try:
        with open(f"/proc/{session}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    return is_driver_argv(argv)


def is_driver_argv(argv: list[str]) -> bool:
    """`python -m latte_ray.cli`, `python -m latte_ray` (jobs that ship the wheel) or the `latte-ray` script."""
    return bool({"latte_ray.cli", "latte_ray"} & set(argv[:3])) or any(
        a.endswith("/latte-ray") or a == "latte-ray" for a in argv[:2])


def session_pids(session: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == session:
                pids.append(int(entry))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def kill_session(session: int) -> None:
    me = os.getpid()
    for pid in session_pids(session):
        if pid != me:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if os.getsid(0) == session:
        os.kill(me, signal.SIGKILL)
