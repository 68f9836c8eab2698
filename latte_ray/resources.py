"""Where the files shipped with latte-ray are: the built-in pipeline specs and recipes, and the example prompts.

`pipelines/` and `examples/` at the top of the repository are the source. Packaging maps them to the
subpackages `latte_ray.pipelines` and `latte_ray.examples` (pyproject.toml: `package-dir`, `package-data`), so
an installed wheel carries them inside the package and `importlib.resources` finds them there; an editable
install's finder maps the same names to the repository's folders.

A source tree that is imported without being installed (a checkout on PYTHONPATH, or one that `ray job submit
--working-dir .` uploaded, which shadows whatever latte-ray the nodes have installed) has no such
subpackages on its path: there the files are the folders next to the package. Whenever latte_ray itself is
imported from a source tree, its own folders are used, so the code and the specs that run always come from
the same tree.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def source_tree() -> Path | None:
    """The repository root when latte_ray is imported from a source tree (checkout, editable install, uploaded
    working dir), else None (an installed wheel: the package sits in site-packages)."""
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "pipelines").is_dir():
        return root
    return None


def _shipped_dir(name: str) -> Path:
    root = source_tree()
    if root is not None:
        return root / name
    files = importlib.resources.files(f"latte_ray.{name}")
    if not isinstance(files, Path):  # e.g. a zip import: specs are read as files, so they must be on disk
        raise RuntimeError(f"latte_ray.{name} is not on a file system ({files!r}); install latte-ray unpacked")
    return files


def pipelines_dir() -> Path:
    """The folder of the built-in pipeline specs and synth recipes (`pipelines/*.yaml` in the repository)."""
    return _shipped_dir("pipelines")


def examples_dir() -> Path:
    """The folder of the example prompt table (`examples/prompts.parquet` in the repository)."""
    return _shipped_dir("examples")
