"""Prompt tables: find the files, check their schema up front, and turn rows into work items.

A table needs a `prompt` column (string); `id`, `seed` and `negative_prompt` are optional. Table-level
problems (no file, not Parquet, no prompt column, wrong column type) raise `InputError` before any model
loads. Row-level problems (empty prompt, bad id, out-of-range seed) become error rows; the run goes on.

Ids: the `id` column when present (1-128 chars of [A-Za-z0-9._-]), else a hash of (prompt, negative prompt,
seed or the run seed). Seeds: the `seed` column when present, else derived from the id and the run seed.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latte_ray.errors import InputError
from latte_ray.record.storage import filesystem, is_local

ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 20_000  # longer prompts are cut before tokenizing; the tokenizer keeps far fewer anyway

_STRING_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
_COLUMN_RULES = {
    "prompt": (_STRING_TYPES, "string"),
    "negative_prompt": (_STRING_TYPES, "string"),
    "id": (_STRING_TYPES + (pa.types.is_integer,), "string or integer"),
    "seed": ((pa.types.is_integer,), "integer"),
}
WORK_COLUMNS = ["id", "prompt", "negative_prompt", "seed", "status", "error"]


def resolve_prompt_files(urls: list[str], storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Expand files, folders and globs into Parquet file paths on one filesystem."""
    fs = None
    files: list[str] = []
    for url in urls:
        url_fs, path = filesystem(url, storage_options)
        if fs is not None and type(url_fs) is not type(fs):
            raise InputError(f"prompts: all tables must be on one filesystem ({url!r} differs)")
        fs = url_fs
        try:
            if any(ch in path for ch in "*?["):
                found = [p for p in fs.glob(path) if not fs.isdir(p)]
                found += [p for d in fs.glob(path) if fs.isdir(d) for p in _parquet_in(fs, d)]
            elif fs.isdir(path):
                found = _parquet_in(fs, path)
            elif fs.exists(path):
                found = [path]
            else:
                raise InputError(f"prompts: {url!r} does not exist")
        except InputError:
            raise
        except Exception as e:  # network and permission errors name the URL
            raise InputError(f"prompts: cannot list {url!r}: {type(e).__name__}: {e}") from e
        if not found:
            raise InputError(f"prompts: no Parquet files under {url!r}")
        files.extend(found)
    return fs, sorted(dict.fromkeys(files))


def _parquet_in(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    return sorted(
        p for p in fs.find(folder) if p.endswith((".parquet", ".pq")) and not p.rsplit("/", 1)[-1].startswith((".", "_"))
    )


def check_prompt_schema(fs: fsspec.AbstractFileSystem, files: list[str]) -> pa.Schema:
    """Read every file's footer; fail naming the file and field if any table is malformed. Returns the
    tables' unified schema."""
    return inspect_prompt_tables(fs, files)[0]


def inspect_prompt_tables(fs: fsspec.AbstractFileSystem, files: list[str]) -> tuple[pa.Schema, list[str]]:
    """check_prompt_schema, also returning the files that have no `id` column. Read together, such files
    get a null `id` in the unified schema; their rows take derived ids, as when each file is read alone."""

    def schema_of(path: str) -> pa.Schema:
        try:
            with fs.open(path, "rb") as f:
                schema = pq.read_schema(f)
        except Exception as e:
            raise InputError(f"prompts: {path!r} is not a readable Parquet file: {type(e).__name__}: {e}") from e
        if "prompt" not in schema.names:
            raise InputError(f"prompts: {path!r} has no 'prompt' column (columns: {schema.names})")
        for name, (checks, wanted) in _COLUMN_RULES.items():
            if name in schema.names:
                typ = schema.field(name).type
                if pa.types.is_dictionary(typ):  # e.g. pandas categoricals: judge the values
                    typ = typ.value_type
                if not (pa.types.is_null(typ) or any(check(typ) for check in checks)):
                    raise InputError(f"prompts: {path!r} column {name!r} has type {typ}; expected {wanted}")
        return schema

    with ThreadPoolExecutor(max_workers=8) as pool:
        schemas = list(pool.map(schema_of, files))
    try:  # Ray Data reads all tables as one dataset, cast to one schema: their columns must be compatible
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"prompts: the tables' schemas conflict: {e}") from e
    for path, schema in zip(files, schemas):
        for name in _COLUMN_RULES:
            if name in schema.names and _lossy(schema.field(name).type, unified.field(name).type):
                raise InputError(
                    f"prompts: {path!r} column {name!r} has type {schema.field(name).type} but other tables make "
                    f"it {unified.field(name).type}: values above 2**63-1 could not be read; use one type"
                )
    return unified, [path for path, schema in zip(files, schemas) if "id" not in schema.names]


def _lossy(source: pa.DataType, target: pa.DataType) -> bool:
    """Would reading `source` values as `target` fail for some values (uint64 read as int64)?"""
    return pa.types.is_unsigned_integer(source) and source.bit_width == 64 and source != target


def derive_id(prompt: str, negative_prompt: str, seed: int | None, run_seed: int) -> str:
    key = json.dumps([prompt, negative_prompt, seed if seed is not None else f"run:{run_seed}"], ensure_ascii=False)
    return "p" + hashlib.sha256(key.encode()).hexdigest()[:24]


def derive_seed(video_id: str, run_seed: int) -> int:
    digest = hashlib.sha256(f"{run_seed}:{video_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & MAX_SEED


def _as_text(value: object) -> tuple[str | None, str | None]:
    """(text, error) for one cell of a string or binary column."""
    if value is None:
        return None, "null"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "not valid UTF-8"
    if not isinstance(value, str):
        return None, f"not a string ({type(value).__name__})"
    return value, None


def _clean_prompt(value: object) -> tuple[str, str | None]:
    text, err = _as_text(value)
    if err:
        return "", f"prompt is {err}"
    if "\x00" in text:
        return text.replace("\x00", ""), "prompt contains a NUL character"
    if not text.strip():
        return text, "prompt is empty"
    return text[:MAX_PROMPT_CHARS], None


def prepare_rows(batch: pa.Table, default_negative: str, run_seed: int,
                 without_id: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Validate a batch of table rows and give each an id and a seed, or an error naming the row.
    `without_id`: files (the batch's `path` column) that have no `id` column, read here with others that do."""
    n = batch.num_rows
    paths = batch["path"].to_pylist() if "path" in batch.column_names else [""] * n
    cols = {name: (batch[name].to_pylist() if name in batch.column_names else [None] * n) for name in _COLUMN_RULES}
    out: dict[str, list] = {c: [] for c in WORK_COLUMNS}
    for i in range(n):
        errors = []
        prompt, err = _clean_prompt(cols["prompt"][i])
        if err:
            errors.append(err)
        negative, nerr = _as_text(cols["negative_prompt"][i])
        if nerr == "null":
            negative = default_negative
        elif nerr:
            errors.append(f"negative_prompt is {nerr}")
            negative = default_negative
        seed = cols["seed"][i]
        if seed is not None and not 0 <= seed <= MAX_SEED:
            errors.append(f"seed {seed} out of range [0, 2**63-1]")
            seed = None
        raw_id = cols["id"][i]
        video_id = derive_id(prompt, negative, seed, run_seed)
        if raw_id is not None:
            raw_text, id_err = _as_text(raw_id) if not isinstance(raw_id, int) else (str(raw_id), None)
            if id_err or not ID_RE.match(raw_text or "") or raw_text in (".", ".."):
                errors.append(f"id {raw_id!r:.80} is invalid: need 1-128 characters of [A-Za-z0-9._-]")
            else:
                video_id = raw_text
        elif "id" in batch.column_names and paths[i] not in without_id:
            errors.append("id is null")
        if seed is None:
            seed = derive_seed(video_id, run_seed)
        out["id"].append(video_id)
        out["prompt"].append(prompt)
        out["negative_prompt"].append(negative)
        out["seed"].append(seed)
        out["status"].append("error" if errors else "pending")
        out["error"].append(f"{paths[i]}: row id={video_id}: " + "; ".join(errors) if errors else "")
    return {
        "id": np.array(out["id"], dtype=object),
        "prompt": np.array(out["prompt"], dtype=object),
        "negative_prompt": np.array(out["negative_prompt"], dtype=object),
        "seed": np.array(out["seed"], dtype=np.int64),
        "status": np.array(out["status"], dtype=object),
        "error": np.array(out["error"], dtype=object),
    }


def _arrow_filesystem(fs):
    if is_local(fs):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def read_input(run, in_fs, files: list[str]):
    """The input tables as a Ray Data dataset, with each row's file and a deterministic row hash (the
    pre-pass and the main pass read through this one function so that their row hashes agree)."""
    from latte_ray.raycompat import read_parquet_sized

    return read_parquet_sized(
        files, filesystem=_arrow_filesystem(in_fs), include_paths=True, include_row_hash=True,
        num_cpus=run.pipeline.execution.num_cpus_per_cpu_task,
    )
