"""Export a run's videos as training shards: WebDataset tars plus a Parquet index.

    OUTPUT/dataset/shards/shard-000000.tar   <key>.mp4 + <key>.json per sample (webdataset's ShardWriter)
    OUTPUT/dataset/index.parquet             key, shard, id, prompt, attributes, stats, ...  (written last)

Only committed videos count: a sample is an id whose manifest has an ok row (its latest ok row), restricted
to the prompt table when one is given (so a dataset follows its recipe), filtered on the encode stage's
stats. Each video is read from the object its row's video_uri names (relative to the output, so a copied
output exports from the copy), and its bytes are checked against the row's sha256 before they go into a shard. Shards are
written to a local folder and then moved (local output) or uploaded (object store) one by one, so local
disk holds at most one shard. The driver holds the index (one small row per sample), not the videos.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from latte_ray.record.output import require_output
from latte_ray.record.storage import is_local, latest_rows, read_manifest, write_atomic

log = logging.getLogger(__name__)

DATASET_DIR = "dataset"
SHARD_PATTERN = "shard-%06d.tar"
FETCH_BATCH = 32  # videos fetched concurrently, then written in order
STATS = ["mean_brightness", "motion_score", "blank_frames", "frozen_frames"]
_MANIFEST_COLUMNS = ["id", "prompt", "negative_prompt", "seed", "status", "video_uri", "sha256", "bytes", "num_frames",
                     "height", "width", "fps", "spec_hash", "model", "finished_at", *STATS]


@dataclass
class ExportSummary:
    url: str
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    missing: int = 0  # prompt-table ids with no ok video yet

    def lines(self) -> list[str]:
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n) or "none"
        return [
            f"export: {self.samples} samples in {len(self.shards)} shards ({self.bytes / 1e6:.1f} MB); "
            f"dropped: {dropped}; not generated yet: {self.missing}",
            f"shards: {self.url}/shards/{_brace(self.shards)}",
            f"index:  {self.url}/index.parquet",
        ]


def _brace(shards: list[str]) -> str:
    if not shards:
        return "(none)"
    if len(shards) == 1:
        return shards[0]
    return f"shard-{{{shards[0][6:12]}..{shards[-1][6:12]}}}.tar"


def select_samples(rows: pa.Table, min_motion: float | None = None, drop_blank: bool = False) -> tuple[pa.Table, dict[str, int]]:
    """The rows that pass the stats filters, and how many each filter dropped."""
    dropped = {}
    if min_motion is not None:
        keep = pc.fill_null(pc.greater_equal(rows["motion_score"], min_motion), False)
        dropped[f"motion_score < {min_motion}"] = rows.num_rows - pc.sum(keep).as_py() if rows.num_rows else 0
        rows = rows.filter(keep)
    if drop_blank:
        keep = pc.fill_null(pc.equal(rows["blank_frames"], 0), False)
        dropped["with blank frames"] = rows.num_rows - pc.sum(keep).as_py() if rows.num_rows else 0
        rows = rows.filter(keep)
    return rows, dropped


def sample_key(video_id: str) -> str:
    """WebDataset splits a file name at its first dot, so ids with dots get a hashed key."""
    return video_id if "." not in video_id else "k" + hashlib.sha256(video_id.encode()).hexdigest()[:24]


def export_dataset(
    output: str,
    storage_options: dict | None = None,
    prompts_url: str | None = None,
    min_motion: float | None = None,
    drop_blank: bool = False,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 1_000_000_000,
) -> ExportSummary:
    """Write OUTPUT/dataset/: the committed videos (of the prompt table, when given) that pass the filters."""
    import webdataset as wds

    out, _record = require_output(output, storage_options)
    fs, layout = out.fs, out.layout
    dest = f"{layout.root}/{DATASET_DIR}"
    summary = ExportSummary(url=f"{layout.url}/{DATASET_DIR}")

    rows = latest_rows(read_manifest(fs, layout, columns=_MANIFEST_COLUMNS))
    rows = rows.filter(pc.equal(rows["status"], "ok")).drop_columns(["status", "finished_at"])
    if prompts_url:
        prompts = _read_prompt_table(prompts_url, storage_options)
        extra = [c for c in prompts.column_names if c not in rows.column_names or c == "id"]
        wanted = prompts.select(extra)
        summary.missing = wanted.num_rows - (pc.sum(pc.is_in(wanted["id"], rows["id"])).as_py() or 0)
        rows = rows.join(wanted, keys="id", join_type="inner")
    rows, summary.dropped = select_samples(rows, min_motion, drop_blank)
    rows = rows.sort_by("id")

    if is_local(fs):
        os.makedirs(dest, exist_ok=True)  # the shards are then renamed into place on the same filesystem
    tmp = tempfile.mkdtemp(prefix=".export-", dir=dest if is_local(fs) else None)
    index: list[dict] = []

    def publish(local: str) -> None:
        name = os.path.basename(local)
        target = f"{dest}/shards/{name}"
        if is_local(fs):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(local, target)
        else:
            fs.put_file(local, target)
            os.remove(local)
        summary.shards.append(name)

    try:
        if rows.num_rows:
            with wds.ShardWriter(os.path.join(tmp, SHARD_PATTERN), maxcount=samples_per_shard,
                                 maxsize=max_shard_bytes, post=publish, verbose=0) as writer, \
                    ThreadPoolExecutor(max_workers=8) as pool:
                for batch in rows.to_batches(max_chunksize=FETCH_BATCH):
                    records = batch.to_pylist()
                    paths = [layout.video_path(r["video_uri"]) for r in records]
                    for record, data in zip(records, pool.map(lambda p: _fetch(fs, p), paths)):
                        if data is None or hashlib.sha256(data).hexdigest() != record["sha256"]:
                            reason = "unreadable or sha256 mismatch"
                            summary.dropped[reason] = summary.dropped.get(reason, 0) + 1
                            log.warning("export: %s: %s", record["id"], reason)
                            continue
                        key = sample_key(record["id"])
                        writer.write({"__key__": key, "mp4": data, "json": _sample_json(record)})
                        index.append({"key": key, "shard": f"shards/{os.path.basename(writer.fname)}",
                                      **_index_fields(record)})
                        summary.samples += 1
                        summary.bytes += len(data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale_shards(fs, dest, summary.shards)
    _write_index(fs, f"{dest}/index.parquet", index)
    log.info("%s", summary.lines()[0])
    return summary


def _fetch(fs, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, OSError) as e:
        log.warning("export: cannot read %s: %s", path, e)
        return None


def _read_prompt_table(url: str, storage_options: dict | None) -> pa.Table:
    import pyarrow.parquet as pq

    from latte_ray.plan.prompts import resolve_prompt_files

    fs, files = resolve_prompt_files([url], storage_options)
    tables = []
    for path in files:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    table = pa.concat_tables(tables, promote_options="default")
    keep = [c for c in ("id", "template", "attributes", "variant") if c in table.column_names]
    return table.select(keep)


def _sample_json(record: dict) -> dict:
    meta = {k: record.get(k) for k in ("id", "prompt", "negative_prompt", "seed", "template", "variant",
                                          "num_frames", "height", "width", "fps", "sha256", "spec_hash", "model")}
    meta = {k: v for k, v in meta.items() if v is not None}
    if record.get("attributes") is not None:
        meta["attributes"] = json.loads(record["attributes"])
    meta["stats"] = {k: record.get(k) for k in STATS}
    return meta


def _index_fields(record: dict) -> dict:
    return {k: record.get(k) for k in ("id", "prompt", "negative_prompt", "seed", "template", "attributes",
                                          "variant", *STATS, "bytes", "sha256", "num_frames", "height", "width",
                                          "fps")}


INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("id", pa.string()), ("prompt", pa.string()),
    ("negative_prompt", pa.string()), ("seed", pa.int64()), ("template", pa.string()),
    ("attributes", pa.string()), ("variant", pa.int32()), ("mean_brightness", pa.float64()),
    ("motion_score", pa.float64()), ("blank_frames", pa.int32()), ("frozen_frames", pa.int32()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("num_frames", pa.int32()), ("height", pa.int32()),
    ("width", pa.int32()), ("fps", pa.int32()),
])


def _write_index(fs, path: str, index: list[dict]) -> None:
    import io

    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(index, schema=INDEX_SCHEMA), sink, compression="zstd")
    write_atomic(fs, path, sink.getvalue())


def _remove_stale_shards(fs, dest: str, kept: list[str]) -> None:
    """Shards a previous, larger export left behind (the index written next never names them)."""
    if not fs.exists(f"{dest}/shards"):
        return
    for path in fs.ls(f"{dest}/shards", detail=False):
        if os.path.basename(path) not in kept:
            fs.rm_file(path)

