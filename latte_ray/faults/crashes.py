"""Poison rows: a prompt whose generation kills the worker process (a segfault, the kernel's OOM killer,
or a call that ran past its batch deadline, latte_ray/faults/deadline.py).

Ray restarts a dead actor and retries its batch without limit (max_task_retries=-1), which is right for a
preempted node and wrong for a row that kills every process that touches it: the run would never end.
The denoise stage therefore records each attempt in a node-local ledger before it starts and clears it when
the attempt finishes. An attempt that finds earlier unfinished attempts of its batch knows they died: it
runs the batch one row at a time, recording each row the same way, and a row that has killed its worker
MAX_CRASHES times becomes an error row instead of being tried again. A process that ends itself on
purpose (a deadline) notes why first, and the error row says so.

The ledger is scoped to one run (its run id): counts left behind by a killed earlier run, or by another
run on the same node, are not this run's crashes. (It used to be keyed by the spec hash alone, so a
row that a killed run had been generating counted as a crash of the next run's first attempt.)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import Iterable

MAX_CRASHES = 2


class CrashLedger:
    def __init__(self, scope: str, root: str | os.PathLike | None = None):
        """`scope`: the run id (every attempt of one run, on any actor of a node, shares its ledger)."""
        self.folder = Path(root or tempfile.gettempdir()) / "latte-ray-attempts" / scope

    def begin(self, ids: Iterable[str]) -> int:
        """Record an attempt on these ids; return how many earlier attempts never finished."""
        path = self._path(ids)
        try:
            earlier = int(path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            earlier = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_text(str(earlier + 1))
        os.replace(tmp, path)
        return earlier

    def note(self, ids: Iterable[str], reason: str) -> None:
        """Say why the attempt in progress is about to end its process (one line per death)."""
        with open(self._path(ids).with_suffix(".why"), "a") as f:
            f.write(reason.replace("\n", " ") + "\n")

    def reasons(self, ids: Iterable[str]) -> list[str]:
        """The reasons noted for earlier deaths of attempts on these ids (deaths without one are not listed)."""
        try:
            return self._path(ids).with_suffix(".why").read_text().splitlines()
        except FileNotFoundError:
            return []

    def end(self, ids: Iterable[str]) -> None:
        path = self._path(ids)
        path.unlink(missing_ok=True)
        path.with_suffix(".why").unlink(missing_ok=True)

    def _path(self, ids: Iterable[str]) -> Path:
        return self.folder / hashlib.sha256("\0".join(map(str, ids)).encode()).hexdigest()[:32]


def crash_message(died: int, reasons: list[str]) -> str:
    """The error row of a row that killed its worker `died` times; `reasons`: those noted (deadlines)."""
    if reasons and len(reasons) >= died and len(set(reasons)) == 1:
        return f"generation {reasons[0]} {died} times; not tried again in this run"
    detail = f" ({len(reasons)} of them: {reasons[-1]})" if reasons else " (a crash or out of memory)"
    return f"generation killed its worker process {died} times{detail}; not tried again in this run"
