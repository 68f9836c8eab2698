"""Export a run's videos as training shards: WebDataset tars, a Parquet index and a dataset card.

    OUTPUT/dataset/shards/shard-000000.tar   per sample: <key>.mp4, <key>.json (prompt, seed, stats, scores),
                                             with --with-embeddings <key>.t5.npy, with --with-latents
                                             <key>.latents.npy (latte_ray/record/sidecars.py)
    OUTPUT/dataset/index.parquet             one row per ok video: its key and shard, or `rejected_reason`
    OUTPUT/dataset/README.md                 the dataset card (latte_ray/datasets/card.py), written last

Only committed videos count: a sample is an id whose manifest has an ok row (its latest ok row), restricted
to the prompt table when one is given (so a dataset follows its recipe), filtered on the encode stage's
stats and on the quality scores (latte_ray/record/scores.py: one scorer at a time). A video that a filter
rejects is not silently left out: its index row names every reason, and the summary and the card count
rejections by reason. Every video's bytes are checked against the manifest's sha256 before they go into a
shard. Every object is read through the URI its manifest row records, taken relative to the output (so a
copied output exports from the copy).

Deterministic: samples go in id order, tar members carry fixed mtime, owner and mode, and nothing in a
sample depends on when or where the export ran, so exporting the same output with the same filters again
gives byte-identical shards. Shards are written to a local folder and then moved (local output) or uploaded
(object store) one by one, so local disk holds at most one shard. The driver holds the index (one small row
per video), not the videos.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from latte_ray.record.output import require_output
from latte_ray.record.scores import SCORE_COLUMNS, ScoreSelection, attach_scores
from latte_ray.record.sidecars import from_npy
from latte_ray.record.storage import OutputLayout, is_local, latest_rows, read_manifest, write_atomic
from latte_ray.errors import InputError
from latte_ray.spec import SpecError

log = logging.getLogger(__name__)

DATASET_DIR = "dataset"
SHARD_PATTERN = "shard-%06d.tar"
FETCH_BATCH = 32  # videos fetched concurrently, then written in order
STATS = ["mean_brightness", "motion_score", "blank_frames", "frozen_frames"]
SCORES = ["clip_score", "aesthetic_score"]
TAR_MTIME = 0  # fixed member metadata: the same samples give the same bytes
_MANIFEST_COLUMNS = ["id", "prompt", "negative_prompt", "seed", "status", "video_uri", "sha256", "bytes",
                     "num_frames", "height", "width", "fps", "spec_hash", "model", "finished_at", "prompt_tokens",
                     "prompt_truncated", *STATS, *SCORE_COLUMNS, "embeddings_uri", "latents_uri"]
UNREADABLE = "video unreadable or sha256 mismatch"


@dataclass(frozen=True)
class ExportFilters:
    """What a sample must pass; each rejection reason names the filter and its threshold."""

    min_motion: float | None = None
    drop_blank: bool = False
    min_clip_score: float | None = None
    min_aesthetic: float | None = None
    with_embeddings: bool = False  # a sample must have its T5 embeddings kept (spec sidecars.embeddings)
    with_latents: bool = False  # a sample must have its latents kept (spec sidecars.latents)

    def active(self) -> dict[str, object]:
        """The filters in use, for the summary and the card."""
        return {k: v for k, v in self.__dict__.items() if v not in (None, False)}


@dataclass
class ExportSummary:
    url: str
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rejected samples with that reason
    rejected: int = 0  # samples rejected for one or more reasons (each listed in the index)
    missing: int = 0  # prompt-table ids with no ok video yet
    spec_hashes: list[str] = field(default_factory=list)  # of the exported videos
    scores: ScoreSelection = field(default_factory=ScoreSelection)
    filters: ExportFilters = field(default_factory=ExportFilters)

    def lines(self) -> list[str]:
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n) or "none"
        return [
            f"export: {self.samples} samples in {len(self.shards)} shards ({self.bytes / 1e6:.1f} MB); "
            f"rejected {self.rejected}: {dropped}; not generated yet: {self.missing}",
            self.scores.line(),
            f"shards: {self.url}/shards/{_brace(self.shards)}",
            f"index:  {self.url}/index.parquet (rejected samples: rows with rejected_reason)",
            f"card:   {self.url}/README.md",
        ]


def _brace(shards: list[str]) -> str:
    if not shards:
        return "(none)"
    if len(shards) == 1:
        return shards[0]
    return f"shard-{{{shards[0][6:12]}..{shards[-1][6:12]}}}.tar"


def rejection_reasons(rows: pa.Table, filters: ExportFilters) -> list[list[str]]:
    """For each row, every filter it fails (a missing value fails its filter, named as missing)."""
    reasons: list[list[str]] = [[] for _ in range(rows.num_rows)]

    def check(column: str, threshold: float | None, label: str | None = None) -> None:
        if threshold is None:
            return
        values = rows[column].to_pylist() if column in rows.column_names else [None] * rows.num_rows
        for why, value in zip(reasons, values):
            if value is None:
                why.append(f"no {column}")
            elif value < threshold:
                why.append(label or f"{column} < {threshold}")

    if filters.drop_blank:
        blank = rows["blank_frames"].to_pylist()
        for why, value in zip(reasons, blank):
            if value is None or value > 0:
                why.append("with blank frames")
    check("motion_score", filters.min_motion)
    check("clip_score", filters.min_clip_score)
    check("aesthetic_score", filters.min_aesthetic)
    for wanted, column, label in ((filters.with_embeddings, "embeddings_uri", "no t5 embeddings kept"),
                                  (filters.with_latents, "latents_uri", "no latents kept")):
        if wanted:
            values = rows[column].to_pylist() if column in rows.column_names else [None] * rows.num_rows
            for why, value in zip(reasons, values):
                if not value:
                    why.append(label)
    return reasons


def select_samples(rows: pa.Table, min_motion: float | None = None, drop_blank: bool = False,
                   **filters) -> tuple[pa.Table, dict[str, int]]:
    """The rows that pass the filters, and how many rows each reason rejected."""
    reasons = rejection_reasons(rows, ExportFilters(min_motion=min_motion, drop_blank=drop_blank, **filters))
    counts: dict[str, int] = {}
    for why in reasons:
        for reason in why:
            counts[reason] = counts.get(reason, 0) + 1
    return rows.filter(pa.array([not why for why in reasons], pa.bool_())), counts


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
    min_clip_score: float | None = None,
    min_aesthetic: float | None = None,
    with_embeddings: bool = False,
    with_latents: bool = False,
    scoring_hash: str | None = None,
    name: str | None = None,
    license: str = "other",
) -> ExportSummary:
    """Write OUTPUT/dataset/: the committed videos (of the prompt table, when given) that pass the filters,
    an index of every video with its rejection reasons, and the dataset card."""
    import webdataset as wds

    from latte_ray.datasets.card import write_card

    filters = ExportFilters(min_motion=min_motion, drop_blank=drop_blank, min_clip_score=min_clip_score,
                            min_aesthetic=min_aesthetic, with_embeddings=with_embeddings, with_latents=with_latents)
    out, _record = require_output(output, storage_options)
    fs, layout = out.fs, out.layout
    dest = f"{layout.root}/{DATASET_DIR}"
    summary = ExportSummary(url=f"{layout.url}/{DATASET_DIR}", filters=filters)

    rows = latest_rows(read_manifest(fs, layout, columns=_MANIFEST_COLUMNS))
    rows = rows.filter(pc.equal(rows["status"], "ok")).drop_columns(["status", "finished_at"])
    rows, summary.scores = attach_scores(fs, layout, rows, scoring_hash)
    if scoring_hash and not summary.scores.scored and (min_clip_score is not None or min_aesthetic is not None):
        known = ", ".join(sorted(summary.scores.available)) or "none"
        raise InputError(f"export: no video of {output} has scores of scoring {scoring_hash} (scorers with "
                        f"scores: {known})")
    for wanted, column, flag, spec_field in ((with_embeddings, "embeddings_uri", "--with-embeddings", "embeddings"),
                                             (with_latents, "latents_uri", "--with-latents", "latents")):
        if wanted and rows.num_rows and pc.sum(pc.is_valid(rows[column])).as_py() == 0:
            raise InputError(f"export {flag}: no video of {output} has them; they are kept at generation time "
                            f"(pipeline spec sidecars.{spec_field}: true, or `latte-ray run --keep-{spec_field}`)")
    if prompts_url:
        prompts = _read_prompt_table(prompts_url, storage_options)
        extra = [c for c in prompts.column_names if c not in rows.column_names or c == "id"]
        wanted = prompts.select(extra)
        summary.missing = wanted.num_rows - (pc.sum(pc.is_in(wanted["id"], rows["id"])).as_py() or 0)
        rows = rows.join(wanted, keys="id", join_type="inner")
    rows = rows.sort_by("id")
    reasons = rejection_reasons(rows, filters)

    if is_local(fs):
        os.makedirs(dest, exist_ok=True)  # the shards are then renamed into place on the same filesystem
    tmp = tempfile.mkdtemp(prefix=".export-", dir=dest if is_local(fs) else None)
    index: list[dict] = []

    def publish(local: str) -> None:
        name_ = os.path.basename(local)
        target = f"{dest}/shards/{name_}"
        if is_local(fs):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(local, target)
        else:
            fs.put_file(local, target)
            os.remove(local)
        summary.shards.append(name_)

    def fetch(record: dict) -> dict | None:
        """The sample's members, or None when the video or a wanted sidecar cannot be read whole."""
        data = _fetch(fs, layout, record["video_uri"])
        if data is None or hashlib.sha256(data).hexdigest() != record["sha256"]:
            return None
        members = {"mp4": data}
        for wanted, column, member in ((with_embeddings, "embeddings_uri", "t5.npy"),
                                       (with_latents, "latents_uri", "latents.npy")):
            if wanted:
                blob = _fetch(fs, layout, record[column])
                if blob is None:
                    return None
                members[member] = blob
        return members

    try:
        writer = None
        with ThreadPoolExecutor(max_workers=8) as pool:
            for start in range(0, rows.num_rows, FETCH_BATCH):
                records = rows.slice(start, FETCH_BATCH).to_pylist()
                why = reasons[start:start + FETCH_BATCH]
                keep = [r for r, w in zip(records, why) if not w]
                fetched = dict(zip((r["id"] for r in keep), pool.map(fetch, keep)))
                for record, record_reasons in zip(records, why):
                    record_reasons = list(record_reasons)
                    members = fetched.get(record["id"]) if not record_reasons else None
                    if not record_reasons and members is None:
                        record_reasons.append(UNREADABLE)
                        log.warning("export: %s: %s", record["id"], UNREADABLE)
                    if record_reasons:
                        summary.rejected += 1
                        for reason in record_reasons:
                            summary.dropped[reason] = summary.dropped.get(reason, 0) + 1
                        index.append({"key": None, "shard": None, **_index_fields(record),
                                      "rejected_reason": "; ".join(record_reasons)})
                        continue
                    if writer is None:
                        writer = wds.ShardWriter(os.path.join(tmp, SHARD_PATTERN), maxcount=samples_per_shard,
                                                 maxsize=max_shard_bytes, post=publish, verbose=0,
                                                 mtime=TAR_MTIME, user="latte-ray", group="latte-ray")
                    key = sample_key(record["id"])
                    writer.write({"__key__": key, "json": _sample_json(record, members), **members})
                    index.append({"key": key, "shard": f"shards/{os.path.basename(writer.fname)}",
                                  **_index_fields(record), "rejected_reason": None})
                    summary.samples += 1
                    summary.bytes += len(members["mp4"])
                    if record["spec_hash"] not in summary.spec_hashes:
                        summary.spec_hashes.append(record["spec_hash"])
        if writer is not None:
            writer.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary.spec_hashes.sort()
    _remove_stale_shards(fs, dest, summary.shards)
    index_table = pa.Table.from_pylist(index, schema=INDEX_SCHEMA)
    _write_index(fs, f"{dest}/index.parquet", index_table)
    write_card(fs, layout, dest, summary, index_table, name=name, license=license)
    log.info("%s", summary.lines()[0])
    return summary


def _fetch(fs, layout: OutputLayout, uri: str | None) -> bytes | None:
    """An object by the URI its manifest row records, under this output's root (None when it cannot be read)."""
    if not uri:
        return None
    try:
        return fs.cat_file(layout.video_path(uri))
    except (FileNotFoundError, OSError, ValueError) as e:
        log.warning("export: cannot read %s: %s", uri, e)
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


def _sample_json(record: dict, members: dict[str, bytes]) -> dict:
    meta = {k: record.get(k) for k in ("id", "prompt", "negative_prompt", "seed", "template", "variant",
                                          "num_frames", "height", "width", "fps", "sha256", "spec_hash", "model",
                                          "prompt_tokens", "prompt_truncated")}
    meta = {k: v for k, v in meta.items() if v is not None}
    if record.get("attributes") is not None:
        meta["attributes"] = json.loads(record["attributes"])
    meta["stats"] = {k: record.get(k) for k in STATS}
    meta["scores"] = {k: record.get(k) for k in SCORE_COLUMNS}
    if "t5.npy" in members:  # the tokens the transformer attended to: their count is the attention length
        embeds = from_npy(members["t5.npy"])
        meta["t5"] = {"attention_length": int(embeds.shape[0]), "dim": int(embeds.shape[1]),
                      "dtype": str(embeds.dtype)}
    if "latents.npy" in members:
        latents = from_npy(members["latents.npy"])
        meta["latents"] = {"shape": list(latents.shape), "dtype": str(latents.dtype),
                           "layout": "channels, frames, height, width (before the VAE's 1 / scaling_factor)"}
    return meta


def _index_fields(record: dict) -> dict:
    return {k: record.get(k) for k in ("id", "prompt", "negative_prompt", "seed", "template", "attributes",
                                          "variant", *STATS, "bytes", "sha256", "num_frames", "height", "width",
                                          "fps", *SCORE_COLUMNS)}


INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("id", pa.string()), ("prompt", pa.string()),
    ("negative_prompt", pa.string()), ("seed", pa.int64()), ("template", pa.string()),
    ("attributes", pa.string()), ("variant", pa.int32()), ("mean_brightness", pa.float64()),
    ("motion_score", pa.float64()), ("blank_frames", pa.int32()), ("frozen_frames", pa.int32()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("num_frames", pa.int32()), ("height", pa.int32()),
    ("width", pa.int32()), ("fps", pa.int32()), ("clip_score", pa.float64()), ("aesthetic_score", pa.float64()),
    ("clip_prompt_truncated", pa.bool_()), ("scoring_hash", pa.string()),
    ("rejected_reason", pa.string()),  # null for a sample in a shard; else every filter it failed
])


def _write_index(fs, path: str, index: pa.Table) -> None:
    import io

    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(index, sink, compression="zstd")
    write_atomic(fs, path, sink.getvalue())


_SHARD_NAME = re.compile(r"^shard-\d{6}\.tar$")  # what SHARD_PATTERN makes, and nothing else


def _remove_stale_shards(fs, dest: str, kept: list[str]) -> None:
    """Shards a previous, larger export left behind (the index written next never names them). Only names
    this export makes (shard-NNNNNN.tar) are removed: a file someone else put in the folder stays."""
    if not fs.exists(f"{dest}/shards"):
        return
    for path in fs.ls(f"{dest}/shards", detail=False):
        name = os.path.basename(path.rstrip("/"))
        if _SHARD_NAME.match(name) and name not in kept:
            fs.rm_file(path)

