"""Where a video's quality scores live, and how every reader (export, report, status) finds them.

    manifest/part-*.parquet    clip_score, aesthetic_score, clip_prompt_truncated, scoring_hash: written by a
                               run that scores (spec `scoring.enabled`), in the row that commits the video
    scores/part-*.parquet      scores made later by `latte-ray score` (latte_ray/datasets/scoring.py): one row
                               per (id, sha256 of the video scored, scoring_hash), or an error row
    scores/specs/<hash>.json   the scoring spec of every scorer that wrote scores, by its scoring_hash

Why later scores do not go into the manifest: manifest parts are the commit record and never change, and an
id has exactly one ok row; a second ok row or a rewritten part would break both. A score part names the
video it scored by its sha256, so a score never attaches to a different (regenerated) video.

Reading (`attach_scores`): scores from different scorers are not comparable, so readers use one scoring
hash at a time: the one asked for, else the one that scored the most of the ok videos. A row takes its
manifest scores when they are of that hash, else a score part's for the same (id, sha256, hash), else null.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from latte_ray.record.storage import OutputLayout, read_parts, write_atomic

SCORE_COLUMNS = ["clip_score", "aesthetic_score", "clip_prompt_truncated", "scoring_hash"]
SCORES_DIR = "scores"
SCORE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("sha256", pa.string()),  # of the video object that was scored
    ("scoring_hash", pa.string()),
    ("clip_score", pa.float64()),
    ("aesthetic_score", pa.float64()),
    ("clip_prompt_truncated", pa.bool_()),
    ("error", pa.string()),  # why this video could not be scored (null when scored)
    ("scored_at", pa.timestamp("us", tz="UTC")),
])


QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def distribution(values: list) -> dict | None:
    """min, quantiles, max and mean of the non-null values (None when there are none): for cards and reports."""
    import numpy as np

    data = np.array([v for v in values if v is not None], dtype=np.float64)
    if not len(data):
        return None
    q = [round(float(x), 4) for x in np.quantile(data, QUANTILES)]
    return {"count": int(len(data)), "min": q[0], "p10": q[1], "p25": q[2], "median": q[3], "p75": q[4],
            "p90": q[5], "max": q[6], "mean": round(float(data.mean()), 4)}


def manifest_score_columns(batch: dict, ok) -> dict:
    """The manifest's score columns for a batch from the score stage (stages/score.py): null wherever the
    row is not ok or was not scored; {} when the run does not score (the columns stay null)."""
    import numpy as np

    if "clip_score" not in batch:
        return {}
    scored = np.asarray(ok, bool) & ~np.isnan(np.asarray(batch["clip_score"], np.float64))
    return {column: np.where(scored, np.asarray(batch[column], dtype=object), None) for column in SCORE_COLUMNS}


def scores_dir(layout: OutputLayout) -> str:
    return f"{layout.root}/{SCORES_DIR}"


def score_part_files(fs, layout: OutputLayout) -> list[str]:
    folder = scores_dir(layout)
    if not fs.exists(folder):
        return []
    return sorted(p for p in fs.ls(folder, detail=False) if p.rsplit("/", 1)[-1].startswith("part-")
                  and p.endswith(".parquet"))


def write_score_part(fs, layout: OutputLayout, rows: pa.Table, name: str | None = None) -> str:
    """One part of scores; a retried batch passes the same name and replaces its own part."""
    sink = io.BytesIO()
    pq.write_table(rows.select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA), sink, compression="zstd")
    path = f"{scores_dir(layout)}/part-{name or uuid.uuid4().hex}.parquet"
    write_atomic(fs, path, sink.getvalue())
    return path


def read_scores(fs, layout: OutputLayout) -> pa.Table:
    """Every row of every score part (errors included)."""
    return read_parts(fs, score_part_files(fs, layout), SCORE_SCHEMA.names, SCORE_SCHEMA)


def write_scoring_record(fs, layout: OutputLayout, scoring) -> str:
    """scores/specs/<scoring_hash>.json: what made scores of this hash (written once; same hash, same models)."""
    digest = scoring.scoring_hash()
    path = f"{scores_dir(layout)}/specs/{digest}.json"
    if not fs.exists(path):
        record = {"scoring_hash": digest, "scoring": scoring.model_dump(mode="json")}
        write_atomic(fs, path, json.dumps(record, indent=2, sort_keys=True).encode())
    return digest


def read_scoring_records(fs, layout: OutputLayout) -> dict[str, dict]:
    folder = f"{scores_dir(layout)}/specs"
    if not fs.exists(folder):
        return {}
    out = {}
    for path in sorted(fs.ls(folder, detail=False)):
        if path.endswith(".json"):
            record = json.loads(fs.cat_file(path))
            out[record["scoring_hash"]] = record["scoring"]
    return out


@dataclass
class ScoreSelection:
    """Which scorer a reader used, and how many ok videos each scorer has scored."""

    scoring_hash: str | None = None
    available: dict[str, int] = field(default_factory=dict)  # scoring_hash -> ok videos it scored
    scored: int = 0  # ok videos with scores of the chosen hash

    def line(self) -> str:
        if not self.scoring_hash:
            return "scores: none"
        others = {h: n for h, n in self.available.items() if h != self.scoring_hash}
        extra = f"; other scorers: {', '.join(f'{h} ({n})' for h, n in sorted(others.items()))}" if others else ""
        return f"scores: scoring {self.scoring_hash}, {self.scored} videos scored{extra}"


def attach_scores(fs, layout: OutputLayout, rows: pa.Table, scoring_hash: str | None = None,
                  parts: pa.Table | None = None) -> tuple[pa.Table, ScoreSelection]:
    """`rows` (ok rows with id, sha256 and the manifest's SCORE_COLUMNS) with SCORE_COLUMNS set from one
    scorer: `scoring_hash`, or the one that scored the most rows (ties: the smallest hash). Row order kept."""
    parts = read_scores(fs, layout) if parts is None else parts
    parts = parts.filter(pc.and_(pc.is_null(parts["error"]), pc.is_valid(parts["clip_score"])))
    # Only scores of the video each row records count (a regenerated video has another sha256).
    matched = parts.join(rows.select(["id", "sha256"]), keys=["id", "sha256"], join_type="inner")
    available: dict[str, set] = {}
    in_manifest = rows.filter(pc.and_(pc.is_valid(rows["scoring_hash"]), pc.is_valid(rows["clip_score"])))
    for digest, video_id in zip(in_manifest["scoring_hash"].to_pylist(), in_manifest["id"].to_pylist()):
        available.setdefault(digest, set()).add(video_id)
    for digest, video_id in zip(matched["scoring_hash"].to_pylist(), matched["id"].to_pylist()):
        available.setdefault(digest, set()).add(video_id)
    counts = {h: len(ids) for h, ids in available.items()}
    chosen = scoring_hash or (min(counts, key=lambda h: (-counts[h], h)) if counts else None)
    selection = ScoreSelection(scoring_hash=chosen, available=counts, scored=counts.get(chosen, 0))

    n = rows.num_rows
    order = pa.array(range(n), pa.int64())
    base = rows.append_column("_row", order)
    mine = matched.filter(pc.equal(matched["scoring_hash"], chosen)) if chosen else matched.slice(0, 0)
    mine = mine.sort_by([("id", "ascending"), ("sha256", "ascending"), ("scored_at", "descending")])
    ids, shas = mine["id"].to_pylist(), mine["sha256"].to_pylist()
    first = [i for i in range(len(ids)) if i == 0 or (ids[i], shas[i]) != (ids[i - 1], shas[i - 1])]
    mine = mine.take(pa.array(first, pa.int64())).select(["id", "sha256", "clip_score", "aesthetic_score",
                                                            "clip_prompt_truncated"])
    mine = mine.rename_columns(["id", "sha256", "_clip", "_aesthetic", "_truncated"])
    joined = base.join(mine, keys=["id", "sha256"], join_type="left outer").sort_by("_row")
    from_manifest = pc.fill_null(pc.and_(pc.equal(joined["scoring_hash"], chosen or ""),
                                         pc.is_valid(joined["clip_score"])), False)
    from_part = pc.and_(pc.invert(from_manifest), pc.is_valid(joined["_clip"]))
    scored = pc.or_(from_manifest, from_part)
    out = rows
    for column, part_column in (("clip_score", "_clip"), ("aesthetic_score", "_aesthetic"),
                                ("clip_prompt_truncated", "_truncated")):
        value = pc.if_else(from_manifest, joined[column], pc.if_else(from_part, joined[part_column], None))
        out = out.set_column(out.schema.get_field_index(column), column, value.cast(rows.schema.field(column).type))
    digest = pc.if_else(scored, pa.scalar(chosen or "", pa.string()), pa.scalar(None, pa.string()))
    out = out.set_column(out.schema.get_field_index("scoring_hash"), "scoring_hash", digest)
    return out, selection
