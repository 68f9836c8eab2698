"""Storage: filesystems from URLs, the output layout, atomic writes and the manifest.

Output layout under a prefix:
    run.json                    spec snapshot and versions (no secrets)
    videos/<shard>/<id>.mp4     shard = first 2 hex chars of sha256(id)
    manifest/part-*.parquet     one row per finished attempt: the commit record

Commit protocol: a video object is written first (one PUT; on local disk temp file + rename), then the
manifest part that records it. A video without a manifest row does not count and is rewritten on resume.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from dataclasses import dataclass
from typing import Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("video_uri", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("num_frames", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("fps", pa.int32()),
        ("steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("spec_hash", pa.string()),
        ("model", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("prompt_truncated", pa.bool_()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("generate_seconds", pa.float64()),
        ("mean_brightness", pa.float64()),
        ("motion_score", pa.float64()),
        ("blank_frames", pa.int32()),
        ("frozen_frames", pa.int32()),
    ]
)

_SECRET_OPTION_KEYS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key"}


def storage_options_for(url: str, options: dict | None = None) -> dict:
    """fsspec options for a URL: explicit options win, then the standard AWS environment for s3://."""
    opts = dict(options or {})
    if url.startswith(("s3://", "s3a://")):
        endpoint = opts.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )
        if endpoint:
            opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "endpoint_url": endpoint}
    return opts


def redact_options(options: dict | None) -> dict:
    """Options with credential values replaced, for records and logs."""
    return {k: ("***" if k.lower() in _SECRET_OPTION_KEYS else v) for k, v in (options or {}).items()}


def filesystem(url: str, options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, options))
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def shard_of(video_id: str) -> str:
    return hashlib.sha256(video_id.encode()).hexdigest()[:2]


@dataclass(frozen=True)
class OutputLayout:
    """Paths under an output prefix; `root` is the filesystem path, `url` what users see."""

    url: str
    root: str

    @classmethod
    def at(cls, url: str, fs: fsspec.AbstractFileSystem, root: str) -> "OutputLayout":
        return cls(url=url.rstrip("/"), root=root.rstrip("/"))

    @property
    def run_json(self) -> str:
        return f"{self.root}/run.json"

    @property
    def manifest_dir(self) -> str:
        return f"{self.root}/manifest"

    def video_key(self, video_id: str) -> str:
        return f"videos/{shard_of(video_id)}/{video_id}.mp4"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def uri(self, key: str) -> str:
        return f"{self.url}/{key}"


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `data` appear at `path` whole or not at all.

    Object stores publish an object only when its PUT (or multipart upload) completes. On local disk
    the bytes go to a temp name in the same folder, are fsynced, and are renamed into place.
    """
    parent = path.rsplit("/", 1)[0]
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs.pipe_file(path, data)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)


def manifest_part_bytes(rows: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(rows.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA), sink, compression="zstd")
    return sink.getvalue()


def write_manifest_part(fs: fsspec.AbstractFileSystem, layout: OutputLayout, rows: pa.Table) -> str:
    path = f"{layout.manifest_dir}/part-{uuid.uuid4().hex}.parquet"
    write_atomic(fs, path, manifest_part_bytes(rows))
    return path


def manifest_files(fs: fsspec.AbstractFileSystem, layout: OutputLayout) -> list[str]:
    if not fs.exists(layout.manifest_dir):
        return []
    return sorted(p for p in fs.ls(layout.manifest_dir, detail=False) if p.endswith(".parquet"))


def read_manifest(
    fs: fsspec.AbstractFileSystem, layout: OutputLayout, columns: Iterable[str] | None = None
) -> pa.Table:
    """All manifest rows (every attempt). Use `latest_rows` for one row per id."""
    cols = list(columns) if columns else MANIFEST_SCHEMA.names
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in cols])
    tables = []
    for path in manifest_files(fs, layout):
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=cols).cast(schema))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def latest_rows(manifest: pa.Table) -> pa.Table:
    """One row per id: its ok row if it has one, else its latest attempt."""
    if manifest.num_rows == 0:
        return manifest
    import pyarrow.compute as pc

    is_ok = pc.equal(manifest["status"], "ok").cast(pa.int8())
    order = manifest.append_column("_ok", is_ok).append_column(
        "_i", pa.array(range(manifest.num_rows), pa.int64())
    )
    order = order.sort_by([("id", "ascending"), ("_ok", "descending"), ("finished_at", "descending")])
    ids = order["id"].to_pylist()
    keep = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    return order.take(pa.array(keep, pa.int64())).drop_columns(["_ok", "_i"])
