"""Manifest compaction (latte_ray/record/compact.py): rows are kept exactly, readers never see a row twice even when
compaction stops between writing a compacted part and deleting what it replaces, young parts are left
alone; video objects no ok row names are deleted once old enough, and nothing else; on local disk and on
the loopback S3 server."""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
from typer.testing import CliRunner

from latte_ray.cli import app
from latte_ray.record.compact import compact, is_video_key
from latte_ray.record.output import bind, open_output
from latte_ray.record.storage import (
    COMPACT_PREFIX, MANIFEST_SCHEMA, OutputLayout, filesystem, latest_rows, manifest_files, read_manifest,
    shard_of, write_manifest_part,
)
from latte_ray.spec import load_pipeline_spec


def _rows(ids: list[str], status: str = "ok") -> pa.Table:
    now = datetime.now(timezone.utc)
    rows = [{"id": i, "prompt": f"prompt {i}", "negative_prompt": "", "seed": n, "status": status,
             "error": None if status == "ok" else "boom", "video_uri": f"videos/{i}.mp4" if status == "ok" else None,
             "sha256": "0" * 64 if status == "ok" else None, "bytes": 100 + n, "finished_at": now}
            for n, i in enumerate(ids)]
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _write_parts(output: str, options: dict, n_parts: int, per_part: int = 3) -> tuple:
    """An output (its record, as a first run binds it) with `n_parts` manifest parts."""
    fs, root = filesystem(output, options)
    layout = OutputLayout(url=output, root=root)
    bind(open_output(output, options), load_pipeline_spec("tiny-cpu"), 0, "test")
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


# ------------------------------------------------------------------ video garbage collection


def _committed(out, ids: list[str], shade: int = 0, options: dict | None = None) -> list[dict]:
    """Videos stored and committed through the real encode and write stages (a run's last two steps)."""
    import numpy as np

    from latte_ray.stages.encode import EncodeStage
    from latte_ray.stages.write import WriteStage
    from tests.invariants import fast_spec

    spec = fast_spec()
    n = len(ids)
    frames = np.full((n, 2, 16, 16, 3), shade, np.uint8)
    frames[:, :, :, :, 0] = np.arange(n, dtype=np.uint8)[:, None, None, None] * 20
    batch = {"id": np.array(ids, object), "prompt": np.array(ids, object), "negative_prompt": np.array([""] * n, object),
             "seed": np.arange(n), "status": np.array(["generated"] * n, object), "error": np.array([""] * n, object),
             "frames": np.array([f.tobytes() for f in frames], object),
             "num_frames": np.full(n, 2), "height": np.full(n, 16), "width": np.full(n, 16)}
    write = WriteStage(str(out), spec.model_dump_json(), storage_options=options, run_id=f"r{shade}")
    rows = write(EncodeStage(spec.video.model_dump_json())(batch))
    return rows.to_pylist()


def test_video_keys_are_content_addressed():
    """The same bytes go to the same key, other bytes to another: a recorded object never changes."""
    layout = OutputLayout(url="s3://b/out", root="b/out")
    a, b = "ab" * 32, "cd" * 32
    assert layout.video_key("v.1", a) == f"videos/{shard_of('v.1')}/v.1.{a[:32]}.mp4"
    assert layout.video_key("v.1", a) != layout.video_key("v.1", b)
    uri = layout.uri(layout.video_key("v.1", a))
    assert layout.key_of(uri) == layout.video_key("v.1", a)
    assert layout.video_path("/elsewhere/copy/" + layout.video_key("v.1", a)) == "b/out/" + layout.video_key("v.1", a)
    assert is_video_key(layout.video_key("v.1", a)) and is_video_key(f"videos/{shard_of('old')}/old.mp4")
    assert not is_video_key(f"videos/{shard_of('v.1')}/notes.txt")
    assert not is_video_key(f"videos/zz/v.1.{a[:32]}.mp4")  # not the id's shard: not named by latte-ray


def test_compaction_deletes_only_old_videos_no_ok_row_names(tmp_path):
    """A crash between storing a video and committing its row, or an id written again with other bytes,
    leaves objects no ok row names: compaction deletes them once they are older than the margin, and keeps
    every object an ok row names (however old), young ones (a running job's), and files it did not name."""
    out = tmp_path / "out"
    bind(open_output(str(out)), load_pipeline_spec("tiny-cpu"), 0, "test")
    first = _committed(out, ["a", "b", "c"])
    second = _committed(out, ["a"], shade=99)  # "a" again, other bytes: a new object, the first one kept
    assert second[0]["video_uri"] != first[0]["video_uri"]
    assert all(Path(r["video_uri"]).exists() for r in first + second)
    orphan_old = out / OutputLayout.key_of(first[1]["video_uri"]).replace(".mp4", "").rsplit(".", 1)[0]
    orphan_old = Path(f"{orphan_old}.{'e' * 32}.mp4")  # "b", stored and never committed, long ago
    orphan_young = orphan_old.with_name(f"b.{'f' * 32}.mp4")  # ... and just now, by a running job
    stranger = out / "videos" / shard_of("b") / "notes.txt"
    legacy_orphan = out / "videos" / shard_of("d") / "d.mp4"  # an older version's key, never committed
    for path in (orphan_old, orphan_young, stranger, legacy_orphan):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"bytes")
    old = time.time() - 2 * 3600
    for path in [*(Path(r["video_uri"]) for r in first + second), orphan_old, stranger, legacy_orphan]:
        os.utime(path, (old, old))
    result = compact(str(out), min_age_s=3600)
    assert result.videos_deleted == 2 and "2 unreferenced videos deleted" in result.line()
    assert not orphan_old.exists() and not legacy_orphan.exists()
    assert orphan_young.exists() and stranger.exists()
    from tests.invariants import assert_ok_rows_match_their_objects

    assert len(assert_ok_rows_match_their_objects(out)) == 4


def test_compaction_of_videos_on_s3(s3_server):
    bucket = s3_server.make_bucket("gc-" + uuid.uuid4().hex[:8])
    out, options = f"s3://{bucket}/run", s3_server.storage_options()
    bind(open_output(out, options), load_pipeline_spec("tiny-cpu"), 0, "test")
    kept = _committed(out, ["y", "z"], options=options)
    fs, root = filesystem(out, options)
    orphan = f"{root}/videos/{shard_of('z')}/z.{'1' * 32}.mp4"
    fs.pipe_file(orphan, b"never committed")
    young = CliRunner().invoke(app, ["compact", out, *(f"-s{k}={v}" for k, v in options.items())])
    assert young.exit_code == 0 and "0 unreferenced videos deleted" in young.output, young.output
    assert fs.exists(orphan)
    done = CliRunner().invoke(app, ["compact", out, "--min-age-minutes", "0", *(f"-s{k}={v}" for k, v in options.items())])
    assert done.exit_code == 0 and "1 unreferenced videos deleted" in done.output, done.output
    fs.invalidate_cache()
    assert not fs.exists(orphan)
    for row in kept:
        assert fs.cat_file(row["video_uri"].removeprefix("s3://")), row["id"]
