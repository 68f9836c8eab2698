"""Manifest compaction (latte_ray/record/compact.py): rows are kept exactly, readers never see a row twice even when
compaction stops between writing a compacted part and deleting what it replaces, young parts are left
alone; on local disk and on the loopback S3 server."""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timezone

import pyarrow as pa
from typer.testing import CliRunner

from latte_ray.cli import app
from latte_ray.record.compact import compact
from latte_ray.record.storage import (
    COMPACT_PREFIX, MANIFEST_SCHEMA, OutputLayout, filesystem, latest_rows, manifest_files, read_manifest,
    write_manifest_part,
)


def _rows(ids: list[str], status: str = "ok") -> pa.Table:
    now = datetime.now(timezone.utc)
    rows = [{"id": i, "prompt": f"prompt {i}", "negative_prompt": "", "seed": n, "status": status,
             "error": None if status == "ok" else "boom", "video_uri": f"videos/{i}.mp4" if status == "ok" else None,
             "sha256": "0" * 64 if status == "ok" else None, "bytes": 100 + n, "finished_at": now}
            for n, i in enumerate(ids)]
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _write_parts(output: str, options: dict, n_parts: int, per_part: int = 3) -> tuple:
    fs, root = filesystem(output, options)
    layout = OutputLayout(url=output, root=root)
    for p in range(n_parts):
        ids = [f"id-{p:02d}-{r}" for r in range(per_part)]
        write_manifest_part(fs, layout, _rows(ids, "error" if p % 7 == 3 else "ok"), name=f"batch{p:02d}")
    return fs, layout


def _sorted(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: (r["id"], r["status"]))


def test_compaction_keeps_every_row_once_and_merges_the_parts(tmp_path):
    out = str(tmp_path / "out")
    fs, layout = _write_parts(out, {}, 25)
    before = _sorted(read_manifest(fs, layout))
    result = compact(out, min_age_s=0, parts_per_file=10)
    assert (result.parts_before, result.parts_after, result.rows, result.deleted) == (25, 3, 75, 25)
    files = manifest_files(fs, layout)
    assert len(files) == 3 and all(f.rsplit("/", 1)[-1].startswith(COMPACT_PREFIX) for f in files)
    assert sorted(p.name for p in (tmp_path / "out" / "manifest").iterdir()) == sorted(f.rsplit("/", 1)[-1] for f in files)
    assert _sorted(read_manifest(fs, layout)) == before
    again = compact(out, min_age_s=0, parts_per_file=10)  # compacted parts are not compacted again
    assert (again.parts_before, again.parts_after, again.rows, again.deleted) == (3, 3, 0, 0)


def test_a_stopped_compaction_leaves_each_row_readable_once_and_the_next_one_cleans_up(tmp_path):
    """Stopped after writing the compacted part and before deleting the parts it replaces: put one of them
    back, as a compaction killed at that instant would have left it."""
    out = str(tmp_path / "out")
    fs, layout = _write_parts(out, {}, 6)
    before = _sorted(read_manifest(fs, layout))
    kept = {p.name: p.read_bytes() for p in (tmp_path / "out" / "manifest").iterdir()}
    compact(out, min_age_s=0)
    for name in ("part-batch01.parquet", "part-batch04.parquet"):
        (tmp_path / "out" / "manifest" / name).write_bytes(kept[name])
    assert _sorted(read_manifest(fs, layout)) == before  # the leftovers are not read twice
    assert latest_rows(read_manifest(fs, layout, columns=["id", "status", "finished_at"])).num_rows == 18
    result = compact(out, min_age_s=0)
    assert result.deleted == 2 and result.rows == 0
    assert not (tmp_path / "out" / "manifest" / "part-batch01.parquet").exists()
    assert _sorted(read_manifest(fs, layout)) == before


def test_young_parts_are_left_alone(tmp_path):
    out = str(tmp_path / "out")
    fs, layout = _write_parts(out, {}, 5)
    old = time.time() - 2 * 3600
    for name in ("part-batch00.parquet", "part-batch01.parquet", "part-batch02.parquet"):
        os.utime(tmp_path / "out" / "manifest" / name, (old, old))
    result = compact(out, min_age_s=3600)
    assert (result.parts_before, result.parts_after, result.rows) == (5, 3, 9)
    names = sorted(p.name for p in (tmp_path / "out" / "manifest").iterdir())
    assert "part-batch03.parquet" in names and "part-batch04.parquet" in names
    assert "part-batch00.parquet" not in names


def test_stale_temp_files_of_killed_writers_are_swept_young_ones_kept(tmp_path):
    out = tmp_path / "out"
    _write_parts(str(out), {}, 2)
    old = time.time() - 2 * 3600
    stale = [out / "manifest" / "part-x.parquet.tmp-0a1b", out / "videos" / "3f" / "v1.mp4.tmp-2c3d"]
    young = out / "videos" / "3f" / "v2.mp4.tmp-4e5f"  # may belong to a writer still running
    video = out / "videos" / "3f" / "v0.mp4"
    for path in (*stale, young, video):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    for path in (*stale, video):
        os.utime(path, (old, old))
    result = compact(str(out), min_age_s=3600)
    assert result.swept == 2 and "2 stale temp files swept" in result.line()
    assert not any(p.exists() for p in stale) and young.exists() and video.exists()


def test_compaction_on_s3_through_the_cli(s3_server):
    bucket = s3_server.make_bucket("compact-" + uuid.uuid4().hex[:8])
    out, options = f"s3://{bucket}/run", s3_server.storage_options()
    fs, layout = _write_parts(out, options, 12)
    before = _sorted(read_manifest(fs, layout))
    flags = [f"-s{k}={v}" for k, v in options.items()]
    young = CliRunner().invoke(app, ["compact", out, *flags])  # parts just written: younger than an hour
    assert young.exit_code == 0, young.output
    assert "12 parts -> 12 (0 rows compacted, 0 files deleted)" in young.output
    done = CliRunner().invoke(app, ["compact", out, *flags, "--min-age-minutes", "0", "--parts-per-file", "5"])
    assert done.exit_code == 0, done.output
    assert "12 parts -> 3 (36 rows compacted, 12 files deleted)" in done.output
    fs.invalidate_cache()
    assert len(fs.ls(layout.manifest_dir)) == 3
    assert _sorted(read_manifest(fs, layout)) == before
