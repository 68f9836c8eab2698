"""Manifest compaction: the many small parts of a long run (one per batch, ~500,000 for a million prompts
at batch 2) merged into a few large ones, so that resume, status, report and export list and read a few
files instead of hundreds of thousands.

A compacted part is written whole (storage.write_atomic) under a name derived from the parts it replaces,
and lists them in its footer; only then are they deleted. Readers (storage.manifest_files) ignore every
part that a compacted part lists, so compaction stopped at any instant leaves each row readable exactly
once, and a second compaction deletes what the first left behind. Parts younger than `min_age_s` are left
alone: a batch that Ray retries rewrites its part under the same name, which must not happen to a part
already compacted away (readers would ignore the rewrite).

On local disk it also sweeps the temp files (`*.tmp-*`, never read) that killed writers left behind under
manifest/ and videos/, again only those older than `min_age_s`. Object stores have none: a PUT appears whole.

Then it deletes video objects that no `ok` row names: a crash between storing a video and committing its
row leaves one, and so does an id written again with other bytes (a nondeterministic kernel) whose run
died before its row. It deletes only objects named as latte-ray names videos (videos/<shard>/<id>.<sha>.mp4,
or <id>.mp4 from older versions, in their id's shard), older than `min_age_s`, and listed before the
manifest is read, so a row committed meanwhile is seen. An object a running job has just written (or
written again: the same bytes under the same key) is younger than the margin; its age is checked once
more just before it is deleted. Every path of an `ok` row's object is kept, whatever its age.

Compaction refuses a path that is not a latte-ray output (record/output.require_output).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from latte_ray.errors import ForeignFile
from latte_ray.faults import retry
from latte_ray.record.lease import Lease, Policy, hold_output, output_terms
from latte_ray.record.output import new_run_id, require_output
from latte_ray.record.storage import (
    COMPACT_PREFIX, MANIFEST_SCHEMA, OWN_PART, REPLACES_KEY, VIDEO_DIGEST_CHARS, OutputLayout, is_local, live_parts,
    manifest_listing, manifest_part_bytes, part_name, read_part, shard_of, write_atomic,
)

log = logging.getLogger(__name__)


@dataclass
class CompactResult:
    parts_before: int  # live parts before
    parts_after: int  # live parts after
    rows: int  # rows moved into compacted parts
    deleted: int  # part files deleted (replaced now, or left over from a stopped compaction)
    swept: int = 0  # temp files of killed writers deleted (local disk)
    videos_deleted: int = 0  # video objects no ok row names, older than the margin

    def line(self) -> str:
        return (f"manifest: {self.parts_before} parts -> {self.parts_after} ({self.rows} rows compacted, "
                f"{self.deleted} files deleted); {self.swept} stale temp files swept; "
                f"{self.videos_deleted} unreferenced videos deleted")


def compact(output: str, storage_options: dict | None = None, min_age_s: float = 3600.0,
            parts_per_file: int = 10_000, collect_videos: bool = True, lease: Policy | None = None) -> CompactResult:
    """Merge the output's manifest parts older than `min_age_s` (compacted ones excepted) into compacted
    parts of up to `parts_per_file` parts each, then delete what they replace; then (`collect_videos`)
    delete video objects older than `min_age_s` that no ok row names. Holds the output's lease throughout
    (record/lease.py; `lease`: default take it, refuse if another run holds it)."""
    out, record = require_output(output, storage_options)
    with hold_output(out, new_run_id(), "compact", output_terms(record), lease or Policy()) as held:
        return _compact(out, min_age_s, parts_per_file, collect_videos, held)


def _compact(out, min_age_s: float, parts_per_file: int, collect_videos: bool, held: Lease | None) -> CompactResult:
    fs, layout = out.fs, out.layout
    listing = retry.call(lambda: manifest_listing(fs, layout), f"list {layout.manifest_dir}", retry.READ)
    listing = _own_parts(fs, layout, listing)
    live, replaced = live_parts(fs, listing)
    leftovers = [e["name"] for e in listing if part_name(e["name"]) in replaced]
    cutoff = time.time() - min_age_s
    modified = {e["name"]: _mtime(e) for e in listing}
    todo = [p for p in live if not part_name(p).startswith(COMPACT_PREFIX) and modified[p] <= cutoff]
    groups = [todo[i:i + parts_per_file] for i in range(0, len(todo), parts_per_file)] if len(todo) > 1 else []
    rows = 0
    merged_parts = 0
    for group in groups:
        if held is not None:
            held.check()  # another run took the output over: commit no more
        merged, group = _compact_group(fs, layout, group)
        rows += merged
        merged_parts += len(group)
        _delete(fs, group)
    _delete(fs, leftovers)
    swept = _sweep_temp_files(layout, cutoff) if is_local(fs) else 0
    videos = collect_unreferenced_videos(fs, layout, cutoff) if collect_videos else 0
    result = CompactResult(parts_before=len(live), parts_after=len(live) - merged_parts + len(groups),
                           rows=rows, deleted=merged_parts + len(leftovers), swept=swept,
                           videos_deleted=videos)
    log.info(result.line())
    return result


def _compact_group(fs, layout: OutputLayout, group: list[str]) -> tuple[int, list[str]]:
    """(rows merged, the parts merged): a part of another schema is left where it is, named in a warning (a
    file latte-ray did not make is never merged, and so never deleted); an unreadable one stops compaction
    (OutputDamaged: `latte-ray verify --repair` moves it aside)."""
    tables, merged_parts = [], []

    def read(path: str):
        try:
            return retry.call(lambda: read_part(fs, path, MANIFEST_SCHEMA.names), f"read {path}", retry.READ)
        except ForeignFile as e:
            log.warning("compact leaves %s alone: %s", path, e)
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        for path, table in zip(group, pool.map(read, group)):
            if table is not None:
                tables.append(table)
                merged_parts.append(path)
    if len(merged_parts) < 2:
        return 0, []
    names = [part_name(p) for p in merged_parts]
    merged = pa.concat_tables(tables)
    digest = hashlib.sha256("\0".join(names).encode()).hexdigest()[:32]
    path = f"{layout.manifest_dir}/{COMPACT_PREFIX}{digest}.parquet"
    data = manifest_part_bytes(merged, {REPLACES_KEY: json.dumps(names).encode()})
    retry.call(lambda: write_atomic(fs, path, data), f"write {path}", retry.MANIFEST)
    return merged.num_rows, merged_parts


def _own_parts(fs, layout: OutputLayout, listing: list[dict]) -> list[dict]:
    """The entries of `listing` named as latte-ray names manifest parts; every other file under manifest/
    (but a killed writer's temp) is named in a warning and left where it is."""
    own = [e for e in listing if OWN_PART.fullmatch(part_name(e["name"]))]
    names = {e["name"] for e in own}
    others = [p for p in fs.ls(layout.manifest_dir, detail=False) if p not in names and ".tmp-" not in p]
    if others:
        log.warning("compact leaves %d files it did not make in %s where they are: %s", len(others),
                    layout.manifest_dir, ", ".join(part_name(p) for p in others[:20]))
    return own


def _sweep_temp_files(layout: OutputLayout, cutoff: float) -> int:
    """Delete storage.write_atomic temp files (`<name>.tmp-<uuid>`: a killed video, part or lease heartbeat
    write) last modified before `cutoff`."""
    swept = 0
    for folder in (layout.manifest_dir, f"{layout.root}/videos", f"{layout.root}/lease"):
        for dirpath, _dirs, names in os.walk(folder):
            for name in names:
                path = os.path.join(dirpath, name)
                if ".tmp-" in name and os.path.getmtime(path) <= cutoff:
                    try:
                        os.unlink(path)
                        swept += 1
                    except FileNotFoundError:
                        pass
    return swept


_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_DIGEST = re.compile(f"[0-9a-f]{{{VIDEO_DIGEST_CHARS}}}")


_SIDECAR = re.compile(r"(?P<id>[A-Za-z0-9._-]{1,128})\.(t5|latents)\.[0-9a-f]{16}\.npy")  # record/sidecars.py


def is_video_key(key: str) -> bool:
    """Is `key` (videos/<shard>/<name>) named as latte-ray names a video object: <id>.<digest>.mp4, or
    <id>.mp4 from versions before content-addressed keys, or a video's sidecar <id>.<kind>.<digest>.npy,
    with <shard> the shard of <id>?"""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "videos":
        return False
    sidecar = _SIDECAR.fullmatch(parts[2])
    if sidecar:
        return shard_of(sidecar["id"]) == parts[1]
    if not parts[2].endswith(".mp4"):
        return False
    stem = parts[2][: -len(".mp4")]
    head, dot, digest = stem.rpartition(".")
    ids = ([head] if dot and _DIGEST.fullmatch(digest) else []) + [stem]
    return any(_ID.fullmatch(i) and shard_of(i) == parts[1] for i in ids)


def collect_unreferenced_videos(fs, layout: OutputLayout, cutoff: float) -> int:
    """Delete video objects and their sidecars (ours by name) last modified before `cutoff` that no ok row
    names."""
    if not fs.exists(layout.videos_dir):
        return 0
    listing = retry.call(lambda: fs.find(layout.videos_dir, detail=True), f"list {layout.videos_dir}", retry.READ)
    prefix = len(layout.root) + 1
    candidates = [path for path, info in listing.items()
                  if info.get("type") != "directory" and ".tmp-" not in path
                  and is_video_key(path[prefix:]) and _mtime(info) <= cutoff]
    if not candidates:
        return 0
    # Read after listing: a row committed before this read is seen, so its object is kept.
    uri_columns = ["video_uri", "embeddings_uri", "latents_uri"]
    rows = _own_rows(fs, layout, ["status", *uri_columns])
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    referenced = set()
    for uri in (u for column in uri_columns for u in ok[column].to_pylist() if u or column == "video_uri"):
        key = layout.key_of(uri or "")
        if key is None:
            log.warning("an ok row names %r, not a latte-ray video key; no video is deleted", uri)
            return 0
        referenced.add(key)
    deleted = 0
    for path in candidates:
        if path[prefix:] in referenced:
            continue
        fs.invalidate_cache(path)
        try:
            fresh = fs.info(path)
        except FileNotFoundError:
            continue
        if _mtime(fresh) > cutoff:  # written again since the listing: a running job's, keep it
            continue
        _delete(fs, [path])
        deleted += 1
    if deleted:
        log.info("deleted %d video objects that no ok row names", deleted)
    return deleted


def _own_rows(fs, layout: OutputLayout, columns: list[str]):
    """The live parts' rows, less those of files of another schema (left alone and named by _compact_group)."""
    def read(path: str):
        try:
            return retry.call(lambda: read_part(fs, path, columns), f"read {path}", retry.READ)
        except ForeignFile:
            return None

    own = [e for e in manifest_listing(fs, layout) if OWN_PART.fullmatch(part_name(e["name"]))]
    with ThreadPoolExecutor(max_workers=16) as pool:
        tables = [t for t in pool.map(read, live_parts(fs, own)[0]) if t is not None]
    return pa.concat_tables(tables) if tables else pa.schema([MANIFEST_SCHEMA.field(c) for c in columns]).empty_table()


def _delete(fs, paths: list[str]) -> None:
    for path in paths:
        try:
            retry.call(lambda: fs.rm_file(path), f"delete {path}", retry.READ)
        except FileNotFoundError:
            pass


def _mtime(entry: dict) -> float:
    """Modification time (epoch seconds) from an fsspec `ls` entry: local `mtime`, s3fs `LastModified`."""
    if "mtime" in entry:
        return float(entry["mtime"])
    stamp = entry.get("LastModified") or entry.get("last_modified") or entry.get("updated")
    if stamp is None:
        raise ValueError(f"no modification time for {entry.get('name')!r} in {sorted(entry)}")
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
