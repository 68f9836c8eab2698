"""Poison rows: a prompt whose generation kills the worker process (a segfault, the kernel's OOM killer).

Ray restarts a dead actor and retries its batch without limit (max_task_retries=-1), which is right for a
preempted node and wrong for a row that kills every process that touches it: the run would never end.
The denoise stage therefore records each attempt in a node-local ledger before it starts and clears it when
the attempt finishes. An attempt that finds earlier unfinished attempts of its batch knows they died: it
runs the batch one row at a time, recording each row the same way, and a row that has killed its worker
MAX_CRASHES times becomes an error row instead of being tried again.
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

    def end(self, ids: Iterable[str]) -> None:
        self._path(ids).unlink(missing_ok=True)

    def _path(self, ids: Iterable[str]) -> Path:
        return self.folder / hashlib.sha256("\0".join(map(str, ids)).encode()).hexdigest()[:32]
