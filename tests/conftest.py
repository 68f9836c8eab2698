"""Shared fixtures: one tiny model cache and one local Ray per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A session-wide cache folder holding the tiny model; Ray workers inherit it through the env."""
    cache = Path(os.environ.get("LATTE_RAY_TEST_CACHE") or tmp_path_factory.mktemp("latte-cache"))
    os.environ["LATTE_RAY_CACHE"] = str(cache)
    from latte_ray.model.tiny import ensure_tiny_model

    ensure_tiny_model(cache)
    return cache


@pytest.fixture(scope="session")
def ray_local(model_cache):
    """A real local Ray, started once (after LATTE_RAY_CACHE is set) and shut down at the end."""
    import ray

    from latte_ray.runner import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray()
    yield ray
    ray.shutdown()


def write_prompts(path: Path, columns: dict, schema: pa.Schema | None = None) -> Path:
    """Write a prompt table (dict of column -> list) as Parquet and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return path
