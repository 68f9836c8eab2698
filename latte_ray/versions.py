"""Which latte-ray is running: its version (pyproject.toml's, the one source) and, from a git checkout, the commit.

Run records carry both (runner.package_versions), so a video can be traced to the code that made it. An
installed wheel knows its version from its metadata and reports no commit (a wheel is identified by its
version; nothing is baked in at build time). A source tree reads the version from its own pyproject.toml,
because the installed metadata may belong to another copy (e.g. a checkout uploaded as a Ray working dir onto
nodes that have a released wheel installed). Nothing here ever fails a run: no git, no repository, or a
broken one gives a null commit.
"""

from __future__ import annotations

import functools
import re
import subprocess
from importlib import metadata
from pathlib import Path

from latte_ray.resources import source_tree

DISTRIBUTION = "latte-ray"
UNKNOWN = "0+unknown"


@functools.lru_cache(maxsize=None)
def version() -> str:
    """latte-ray's version: the source tree's pyproject.toml when run from one, else the installed metadata."""
    root = source_tree()
    if root is not None:
        found = _pyproject_version(root / "pyproject.toml")
        if found:
            return found
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def _pyproject_version(path: Path) -> str | None:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the `version = "..."` line of the [project] table
        match = re.search(r'(?ms)^\[project\]\s*$.*?^version\s*=\s*"([^"]+)"', path.read_text())
        return match.group(1) if match else None
    try:
        return tomllib.loads(path.read_text()).get("project", {}).get("version")
    except (OSError, tomllib.TOMLDecodeError):
        return None


def git_commit(root: Path | None = None, timeout: float = 10.0) -> str | None:
    """The commit of the source tree latte_ray runs from, with `-dirty` when tracked files differ from it;
    None for an installed wheel, a tree that is not the top of a git repository, or when git is missing."""
    root = root if root is not None else source_tree()
    if root is None:
        return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():  # not a repo, or the tree sits inside another one
        return None
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    changes = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}-dirty" if changes else commit


def provenance() -> dict[str, str | None]:
    """What a run record says about latte-ray itself."""
    return {DISTRIBUTION: version(), f"{DISTRIBUTION}-commit": git_commit()}
