"""Prompt tables: ids, seeds and table-level checks (no Ray, no model)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from latte_ray.plan.prompts import (
    ID_RE, check_prompt_schema, derive_id, derive_seed, prepare_rows, resolve_prompt_files,
)
from latte_ray.errors import InputError
from tests.conftest import write_prompts


def test_ids_and_seeds_are_stable_and_valid():
    a = derive_id("a cat", "", None, run_seed=0)
    assert a == derive_id("a cat", "", None, run_seed=0)
    assert ID_RE.match(a)
    assert a != derive_id("a cat", "", None, run_seed=1)  # a new run seed means new seeds, so new ids
    assert a != derive_id("a cat", "blurry", None, run_seed=0)
    assert derive_id("a cat", "", 5, 0) == derive_id("a cat", "", 5, 99)  # an explicit seed ignores the run seed
    s = derive_seed(a, 0)
    assert s == derive_seed(a, 0) and 0 <= s < 2**63 and s != derive_seed(a, 1)


def test_prepare_rows_uses_columns_and_defaults():
    table = pa.table({
        "id": ["x1", None, "bad/id"],
        "prompt": ["a cat", "a dog", "a cow"],
        "seed": pa.array([3, None, 4], pa.int64()),
        "negative_prompt": [None, "ugly", None],
        "path": ["t.parquet"] * 3,
    })
    rows = prepare_rows(table, default_negative="default-neg", run_seed=0)
    assert list(rows["status"]) == ["pending", "error", "error"]
    assert rows["id"][0] == "x1" and rows["seed"][0] == 3 and rows["negative_prompt"][0] == "default-neg"
    assert rows["negative_prompt"][1] == "ugly"
    assert "id is null" in rows["error"][1] and "t.parquet" in rows["error"][1]
    assert "bad/id" in rows["error"][2] and "[A-Za-z0-9._-]" in rows["error"][2]


def test_schema_checks_fail_fast_naming_the_field(tmp_path):
    no_prompt = write_prompts(tmp_path / "a.parquet", {"text": ["x"]})
    fs, files = resolve_prompt_files([str(no_prompt)])
    with pytest.raises(InputError, match="no 'prompt' column"):
        check_prompt_schema(fs, files)
    int_prompt = write_prompts(tmp_path / "b.parquet", {"prompt": [1, 2]})
    with pytest.raises(InputError, match="column 'prompt' has type int64"):
        check_prompt_schema(*resolve_prompt_files([str(int_prompt)]))
    not_parquet = tmp_path / "c.parquet"
    not_parquet.write_text("id,prompt\n1,hello\n")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        check_prompt_schema(*resolve_prompt_files([str(not_parquet)]))


def test_folders_and_globs(tmp_path):
    for day in ("01", "02"):
        write_prompts(tmp_path / f"date=2026-11-{day}" / "part-0.parquet", {"prompt": [f"p{day}"]})
    (tmp_path / "date=2026-11-01" / "_SUCCESS").write_text("")
    _, files = resolve_prompt_files([str(tmp_path)])
    assert len(files) == 2
    _, files = resolve_prompt_files([str(tmp_path / "date=2026-11-0*")])
    assert len(files) == 2
    with pytest.raises(InputError, match="does not exist"):
        resolve_prompt_files([str(tmp_path / "missing.parquet")])
    with pytest.raises(InputError, match="no Parquet files"):
        resolve_prompt_files([str(tmp_path / "nothing-*.parquet")])
