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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

from latte_ray.faults import retry
from latte_ray.record.storage import (
    COMPACT_PREFIX, MANIFEST_SCHEMA, REPLACES_KEY, OutputLayout, filesystem, is_local, live_parts,
    manifest_listing, manifest_part_bytes, part_name, read_parts, write_atomic,
)

log = logging.getLogger(__name__)


@dataclass
class CompactResult:
    parts_before: int  # live parts before
    parts_after: int  # live parts after
    rows: int  # rows moved into compacted parts
    deleted: int  # part files deleted (replaced now, or left over from a stopped compaction)
    swept: int = 0  # temp files of killed writers deleted (local disk)

    def line(self) -> str:
        return (f"manifest: {self.parts_before} parts -> {self.parts_after} ({self.rows} rows compacted, "
                f"{self.deleted} files deleted); {self.swept} stale temp files swept")


def compact(output: str, storage_options: dict | None = None, min_age_s: float = 3600.0,
            parts_per_file: int = 10_000) -> CompactResult:
    """Merge the output's manifest parts older than `min_age_s` (compacted ones excepted) into compacted
    parts of up to `parts_per_file` parts each, then delete what they replace."""
    fs, root = filesystem(output, storage_options)
    layout = OutputLayout(url=output.rstrip("/"), root=root.rstrip("/"))
    listing = retry.call(lambda: manifest_listing(fs, layout), f"list {layout.manifest_dir}", retry.READ)
    live, replaced = live_parts(fs, listing)
    leftovers = [e["name"] for e in listing if part_name(e["name"]) in replaced]
    cutoff = time.time() - min_age_s
    modified = {e["name"]: _mtime(e) for e in listing}
    todo = [p for p in live if not part_name(p).startswith(COMPACT_PREFIX) and modified[p] <= cutoff]
    groups = [todo[i:i + parts_per_file] for i in range(0, len(todo), parts_per_file)] if len(todo) > 1 else []
    rows = 0
    for group in groups:
        rows += _compact_group(fs, layout, group)
        _delete(fs, group)
    _delete(fs, leftovers)
    swept = _sweep_temp_files(layout, cutoff) if is_local(fs) else 0
    result = CompactResult(parts_before=len(live), parts_after=len(live) - sum(len(g) - 1 for g in groups),
                           rows=rows, deleted=sum(map(len, groups)) + len(leftovers), swept=swept)
    log.info(result.line())
    return result


def _compact_group(fs, layout: OutputLayout, group: list[str]) -> int:
    names = [part_name(p) for p in group]
    merged = read_parts(fs, group, MANIFEST_SCHEMA.names)
    digest = hashlib.sha256("\0".join(names).encode()).hexdigest()[:32]
    path = f"{layout.manifest_dir}/{COMPACT_PREFIX}{digest}.parquet"
    data = manifest_part_bytes(merged, {REPLACES_KEY: json.dumps(names).encode()})
    retry.call(lambda: write_atomic(fs, path, data), f"write {path}", retry.MANIFEST)
    return merged.num_rows


def _sweep_temp_files(layout: OutputLayout, cutoff: float) -> int:
    """Delete storage.write_atomic temp files (`<name>.tmp-<uuid>`) last modified before `cutoff`."""
    swept = 0
    for folder in (layout.manifest_dir, f"{layout.root}/videos"):
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
