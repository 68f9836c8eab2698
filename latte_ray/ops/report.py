"""`latte-ray report OUTPUT`: a static HTML report of a run, from its manifest and videos alone.

    DEST/index.html          a gallery of the videos (each plays inline), then counts, the output's spec,
                             its run history, stats, error table (every value HTML-escaped)
    DEST/gallery.js          the gallery's rows as JSON (`window.LATTE_GALLERY = {...}`: a script, not a
                             .json fetched at run time, because browsers refuse fetch() from file:// pages)
    DEST/throughput.png      videos finished per minute over time, and the cumulative count
    DEST/fleet.png           generation actors busy and alive over time (latte_ray/ops/fleet.py)
    DEST/contact_sheet.png   first, middle and last frame of an evenly spaced sample of ok videos and, when the
                             output has quality scores, of its lowest- and highest-scoring videos (labelled)
    DEST/scores.png          histograms of clip_score and aesthetic_score (when the output has scores)

The gallery: one card per video (its `<video>` plays the stored mp4; prompt, id, seed, status, scores,
stats, the error message of an error row), sortable by CLIP score, aesthetic score, motion, finish time
and generation time, filterable by status and by text, 48 cards a page. It holds at most MAX_GALLERY rows:
beyond that it samples (every error row up to MAX_GALLERY_ERRORS, the GALLERY_EXTREMES lowest and highest
by each score, the rest evenly spaced by id) and says so. Static files only: the page works from the local
folder (videos by relative path) with no server. For a remote output (`s3://`), cards link the objects:
`video_base_url` (an https endpoint or CDN that serves the output prefix) if given, else the object's https
URL on the storage endpoint (plays when the bucket is readable by the browser), or presigned URLs when
`presign_seconds` is given (they expire; the page says when). No credentials are ever written to the page:
a presigned URL carries the access key id and a signature, never the secret key.

DEST defaults to OUTPUT/report/. Works on a finished run or one in progress (the manifest is the truth).
A path that is not a latte-ray output is refused before anything is written (record/output.require_output).
"""

from __future__ import annotations

import html
import io
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latte_ray.ops.fleet import add_fleet_section
from latte_ray.record.output import list_runs, require_output, run_line
from latte_ray.record.scores import attach_scores, distribution
from latte_ray.record.storage import OutputLayout, filesystem, is_local, latest_rows, read_manifest, write_atomic
from latte_ray.errors import InputError

log = logging.getLogger(__name__)

THUMB = 128  # contact sheet cell (frames are scaled to fit, letterboxed)
LABEL = 16  # text strip above each row of the contact sheet
PAD = 6
MAX_ERRORS = 200
MAX_GALLERY = 5000  # cards the gallery holds; a larger output is sampled (the page says how)
MAX_GALLERY_ERRORS = 1000  # of those, error rows (the latest)
GALLERY_EXTREMES = 100  # lowest and highest by each score, kept in a sampled gallery (at most a quarter of it)
PAGE_SIZE = 48
_COLUMNS = ["id", "prompt", "seed", "status", "error", "bytes", "started_at", "finished_at", "generate_seconds",
            "mean_brightness", "motion_score", "blank_frames", "frozen_frames", "video_uri", "sha256",
            "clip_score", "aesthetic_score", "clip_prompt_truncated", "scoring_hash", "spec_hash"]
SCORES = ("clip_score", "aesthetic_score")
RUNS_SHOWN = 20


@dataclass
class Report:
    url: str  # of index.html
    counts: dict[str, object]
    sampled: list[str]  # ids on the contact sheet, top to bottom
    scores: object = None  # record.scores.ScoreSelection
    gallery: int = 0  # cards in the gallery
    gallery_of: int = 0  # prompts it was chosen from (more than `gallery`: sampled)


def write_report(output: str, storage_options: dict | None = None, dest: str | None = None,
                 samples: int = 12, extremes: int = 3, scoring_hash: str | None = None,
                 video_base_url: str | None = None, presign_seconds: int | None = None,
                 max_gallery: int = MAX_GALLERY) -> Report:
    out, record = require_output(output, storage_options)
    fs, layout = out.fs, out.layout
    dest = (dest or f"{layout.url}/report").rstrip("/")
    dest_fs, dest_root = filesystem(dest, storage_options)
    dest_root = dest_root.rstrip("/")
    if is_local(dest_fs) and os.path.exists(dest_root) and not os.path.isdir(dest_root):
        raise InputError(f"report --dest {dest!r} is an existing file; give a folder for index.html and its images")
    attempts = read_manifest(fs, layout, columns=_COLUMNS)
    latest = latest_rows(attempts)
    total_runs, runs = list_runs(out, last=RUNS_SHOWN)
    from latte_ray.ops.status import lease_holders, liveness

    held = lease_holders(out)
    for r in runs:  # a `running` record: live, or died (its lease, record/lease.py)
        r["liveness"] = liveness(r, held) if r.get("outcome") == "running" else None

    counts = count(attempts, latest)
    from latte_ray.ops.status import damage

    found = damage(fs, layout, latest, attempts, record)  # shown in the counts, and by the command's line
    counts.update({k.replace("_", " "): v for k, v in found.items() if v and k != "damaged_ids"})
    ok = latest.filter(pc.equal(latest["status"], "ok")).sort_by("id")
    ok, selection = attach_scores(fs, layout, ok, scoring_hash)
    sections = [("", _spread(ok["id"].to_pylist(), samples))] + score_extremes(ok, extremes)
    sampled = [video_id for _, ids in sections for video_id in ids]
    sheet = contact_sheet(fs, layout, ok, sections)
    chart = throughput_chart(attempts)
    distributions = {c: distribution(ok[c].to_pylist()) for c in SCORES}

    links = VideoLinks(out, dest_fs, dest_root, video_base_url, presign_seconds)
    scored_latest = _with_scores(latest, ok)
    cards, note = gallery_rows(scored_latest, max_gallery)
    data = {"rows": [card_of(r, links) for r in cards], "total": latest.num_rows, "sampled": note,
            "links": links.describe(), "page_size": PAGE_SIZE, "scored": bool(selection.scored),
            "unplayable": unplayable(record)}
    page = render_html(output, record, (total_runs, runs), counts, latest, sampled, selection, distributions,
                       sections, gallery=data)
    fleet_png, page = add_fleet_section(fs, layout, page)  # latte_ray/ops/fleet.py: the GPUs' busy intervals
    try:
        write_atomic(dest_fs, f"{dest_root}/gallery.js", gallery_js(data))
        write_atomic(dest_fs, f"{dest_root}/contact_sheet.png", sheet)
        write_atomic(dest_fs, f"{dest_root}/throughput.png", chart)
        write_atomic(dest_fs, f"{dest_root}/fleet.png", fleet_png)
        if selection.scored:
            write_atomic(dest_fs, f"{dest_root}/scores.png", score_histograms(ok))
        write_atomic(dest_fs, f"{dest_root}/index.html", page.encode())
    except Exception as e:  # noqa: BLE001 - a read-only or unreachable destination, named
        raise InputError(f"report: cannot write to {dest}: {type(e).__name__}: {e}") from e
    return Report(url=f"{dest}/index.html", counts=counts, sampled=sampled, scores=selection,
                  gallery=len(data["rows"]), gallery_of=latest.num_rows)


# ------------------------------------------------------------------ the gallery


class VideoLinks:
    """What a card's `<video src>` is for a manifest row's video_uri (see the module docstring)."""

    def __init__(self, out, dest_fs, dest_root: str, base_url: str | None, presign_seconds: int | None):
        self.out, self.layout = out, out.layout
        self.base_url = base_url.rstrip("/") if base_url else None
        self.presign_seconds = presign_seconds
        self.local = is_local(out.fs)
        self.relative = self.local and is_local(dest_fs)
        self.dest_root = dest_root
        self.expires = (datetime.now(timezone.utc) + timedelta(seconds=presign_seconds)).isoformat(timespec="seconds") \
            if presign_seconds and not self.local else None
        self.endpoint = self._endpoint()

    def _endpoint(self) -> str | None:
        """The https (or configured) endpoint objects are served from, for a remote output: the S3 client's
        endpoint (AWS_ENDPOINT_URL / endpoint_url for an S3-compatible store), else the public AWS or GCS
        host. Only the URL: never a credential."""
        if self.local:
            return None
        protocols = self.out.fs.protocol if isinstance(self.out.fs.protocol, (tuple, list)) else (self.out.fs.protocol,)
        if "s3" in protocols or "s3a" in protocols:
            url = getattr(getattr(getattr(self.out.fs, "s3", None), "meta", None), "endpoint_url", None)
            if not url:
                kwargs = getattr(self.out.fs, "client_kwargs", {}) or {}
                url = kwargs.get("endpoint_url") or getattr(self.out.fs, "endpoint_url", None)
            return (url or "https://s3.amazonaws.com").rstrip("/")
        if "gs" in protocols or "gcs" in protocols:
            return "https://storage.googleapis.com"
        return None

    def src(self, video_uri: str | None) -> str | None:
        if not video_uri:
            return None
        key = self.layout.key_of(video_uri)
        if key is None:
            return None
        path = self.layout.path(key)
        if self.relative:
            return os.path.relpath(path, self.dest_root)
        if self.local:
            return "file://" + os.path.abspath(path)
        if self.presign_seconds:
            try:
                return self.out.fs.sign(path, expiration=self.presign_seconds)
            except Exception as e:  # noqa: BLE001 - a store without presigning: say so on the card
                log.warning("cannot presign %s: %s", path, e)
                return None
        if self.base_url:
            return f"{self.base_url}/{key}"
        if self.endpoint:
            return f"{self.endpoint}/{path.lstrip('/')}"  # path-style: bucket/key
        return None

    def describe(self) -> str:
        if self.relative:
            return "videos play from the output folder by relative path (keep report/ inside the output)"
        if self.local:
            return "videos play from the output folder by absolute file:// path"
        if self.presign_seconds:
            return f"presigned URLs, valid until {self.expires} UTC ({self.presign_seconds} s after the report was written)"
        if self.base_url:
            return f"videos are read from {self.base_url}/videos/..."
        if self.endpoint:
            return (f"videos are read from {self.endpoint}/<bucket>/<key>: they play when the bucket is readable "
                    f"from this browser (else write the report with --presign-expiry SECONDS or --video-base-url)")
        return "videos are linked by their URIs (this storage has no https endpoint latte-ray knows)"


def unplayable(record: dict) -> str | None:
    """Why the output's videos will not play in a browser (its spec's video settings), or None."""
    from latte_ray.spec import VideoSpec
    from latte_ray.stages.encode import browser_unplayable

    pipeline = record.get("pipeline") or {}
    sampling = pipeline.get("sampling") or {}
    try:
        video = VideoSpec.model_validate(pipeline.get("video") or {})
    except Exception:  # noqa: BLE001 - a record of another version: no claim either way
        return None
    return browser_unplayable(video, int(sampling.get("height") or 2), int(sampling.get("width") or 2))


def _with_scores(latest: pa.Table, ok_scored: pa.Table) -> pa.Table:
    """The latest row of every id, ok rows carrying the selected scorer's scores (from attach_scores)."""
    errors = latest.filter(pc.not_equal(latest["status"], "ok"))
    columns = [c for c in ok_scored.column_names if c in errors.column_names]
    if not errors.num_rows:
        return ok_scored.select(columns)
    return pa.concat_tables([ok_scored.select(columns), errors.select(columns)], promote_options="permissive")


def gallery_rows(rows: pa.Table, limit: int) -> tuple[list[dict], str | None]:
    """The rows the gallery holds: all of them up to `limit`; beyond that a sample (and a line saying which):
    the latest error rows, the extremes by each score, the rest evenly spaced by id."""
    rows = rows.sort_by("id")
    if rows.num_rows <= limit:
        return rows.to_pylist(), None
    chosen: dict[str, None] = {}
    errors = rows.filter(pc.not_equal(rows["status"], "ok")).sort_by([("finished_at", "descending")])
    for video_id in errors["id"].to_pylist()[:min(MAX_GALLERY_ERRORS, limit // 4)]:
        chosen[video_id] = None
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    k = min(GALLERY_EXTREMES, limit // (4 * 2 * len(SCORES)))  # extremes: at most a quarter of the gallery
    for column in SCORES:
        if column not in ok.column_names or not k:
            continue
        scored = ok.filter(pc.is_valid(ok[column])).sort_by([(column, "ascending"), ("id", "ascending")])
        ids = scored["id"].to_pylist()
        for video_id in ids[:k] + ids[::-1][:k]:
            chosen[video_id] = None
    rest = [i for i in ok["id"].to_pylist() if i not in chosen]
    for video_id in _spread(rest, max(limit - len(chosen), 0)):
        chosen[video_id] = None
    keep = rows.filter(pc.is_in(rows["id"], pa.array(list(chosen)[:limit])))
    n_err = sum(1 for r in keep["status"].to_pylist() if r != "ok")
    note = (f"a sample of {keep.num_rows} of {rows.num_rows} prompts: the latest {n_err} error rows, the "
            f"{k} lowest and highest by each score, the rest evenly spaced by id "
            f"(`latte-ray report --max-gallery N` holds more)")
    return keep.to_pylist(), note


def _num(value, digits: int):
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if value != value else round(value, digits)  # NaN -> None


def card_of(row: dict, links: VideoLinks) -> dict:
    """One gallery card's data (JSON-ready): what it shows and what it sorts by."""
    finished = row.get("finished_at")
    return {
        "id": row.get("id"), "prompt": row.get("prompt") or "",
        "seed": None if row.get("seed") is None else str(row["seed"]),  # uint64: past what a JS number holds exactly
        "status": row.get("status"), "error": (row.get("error") or "")[:2000] or None,
        "clip": _num(row.get("clip_score"), 3), "aesthetic": _num(row.get("aesthetic_score"), 3),
        "motion": _num(row.get("motion_score"), 4), "brightness": _num(row.get("mean_brightness"), 4),
        "blank": row.get("blank_frames"), "frozen": row.get("frozen_frames"),
        "gen_s": _num(row.get("generate_seconds"), 3), "bytes": row.get("bytes"),
        "finished": finished.isoformat(timespec="seconds") if finished is not None else None,
        "uri": row.get("video_uri"), "src": links.src(row.get("video_uri")) if row.get("status") == "ok" else None,
    }


def gallery_js(data: dict) -> bytes:
    """gallery.js: the rows as a JSON literal assigned to window.LATTE_GALLERY (`<` escaped, so no text in
    it can end a script element even if the file is inlined)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return f"window.LATTE_GALLERY = {text};\n".encode()


def score_extremes(ok: pa.Table, k: int) -> list[tuple[str, list[str]]]:
    """Contact-sheet sections: the k lowest and k highest videos by each score (none without scores)."""
    sections = []
    for column in SCORES:
        scored = ok.filter(pc.is_valid(ok[column]))
        if not scored.num_rows or not k:
            continue
        ranked = scored.sort_by([(column, "ascending"), ("id", "ascending")])["id"].to_pylist()
        sections.append((f"lowest {column}", ranked[:k]))
        sections.append((f"highest {column}", ranked[::-1][:k]))
    return sections


def score_histograms(ok: pa.Table) -> bytes:
    """PNG: one histogram per score over the scored ok videos."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCORES), figsize=(8, 3), dpi=100)
    for ax, column in zip(axes, SCORES):
        values = [v for v in ok[column].to_pylist() if v is not None]
        ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="#4c78a8", edgecolor="white")
        ax.set_title(f"{column} ({len(values)} videos)")
        ax.set_xlabel(column)
    axes[0].set_ylabel("videos")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def count(attempts: pa.Table, latest: pa.Table) -> dict[str, object]:
    status = latest["status"]
    ok_rows = latest.filter(pc.equal(status, "ok"))
    ok_attempts = attempts.filter(pc.equal(attempts["status"], "ok"))
    span = 0.0
    if attempts.num_rows:
        start = pc.min(pc.fill_null(attempts["started_at"], pc.min(attempts["finished_at"]))).as_py()
        span = (pc.max(attempts["finished_at"]).as_py() - start).total_seconds()
    gen = ok_attempts["generate_seconds"]
    return {
        "prompts": latest.num_rows,
        "ok": ok_rows.num_rows,
        "error": latest.num_rows - ok_rows.num_rows,
        "attempts": attempts.num_rows,
        "retried ids": int(pc.sum(pc.greater(pc.value_counts(attempts["id"]).field("counts"), 1)).as_py() or 0)
        if attempts.num_rows else 0,
        "video bytes": int(pc.sum(ok_rows["bytes"]).as_py() or 0),
        "wall seconds (first start to last finish)": round(span, 1),
        "videos per minute": round(ok_rows.num_rows / span * 60, 2) if span else 0.0,
        "mean generation seconds per video": round(pc.mean(gen).as_py() or 0.0, 3) if len(gen) else 0.0,
        "mean brightness (0-1)": round(pc.mean(ok_rows["mean_brightness"]).as_py() or 0.0, 4) if ok_rows.num_rows else 0.0,
        "median motion score (0-1)": round(float(np.median(ok_rows["motion_score"].to_numpy(zero_copy_only=False)
                                                          .astype(float))), 4) if ok_rows.num_rows else 0.0,
        "videos with blank frames": int(pc.sum(pc.greater(ok_rows["blank_frames"], 0)).as_py() or 0),
        "videos with frozen frames": int(pc.sum(pc.greater(ok_rows["frozen_frames"], 0)).as_py() or 0),
    }


def _spread(ids: list[str], k: int) -> list[str]:
    if len(ids) <= k:
        return ids
    return [ids[i] for i in sorted(set(np.linspace(0, len(ids) - 1, k).round().astype(int).tolist()))]


def sheet_size(rows: int, headings: int = 0) -> tuple[int, int]:
    return PAD + 3 * (THUMB + PAD), PAD + max(rows, 1) * (LABEL + THUMB + PAD) + headings * (LABEL + PAD)


def contact_sheet(fs, layout: OutputLayout, ok: pa.Table, sections) -> bytes:
    """PNG: one row per video (first, middle, last frame), labelled with its id, motion score and scores;
    `sections`: [(heading, ids)], a heading ("lowest clip_score", ...) drawn above its rows when not empty."""
    from PIL import Image, ImageDraw

    if isinstance(sections, list) and sections and isinstance(sections[0], str):
        sections = [("", sections)]  # a plain list of ids
    rows = sum(len(ids) for _, ids in sections)
    headings = sum(1 for heading, ids in sections if heading and ids)
    sheet = Image.new("RGB", sheet_size(rows, headings), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    by_id = {r["id"]: r for r in ok.select([c for c in ("id", "motion_score", "video_uri", *SCORES)
                                             if c in ok.column_names]).to_pylist()}
    if not rows:
        draw.text((PAD, PAD), "no finished videos", fill=(220, 220, 220))
    y = PAD
    for heading, ids in sections:
        if heading and ids:
            draw.text((PAD, y), heading, fill=(255, 210, 120))
            y += LABEL + PAD
        for video_id in ids:
            row = by_id.get(video_id, {})
            _draw_video(sheet, draw, fs, layout, row, video_id, y)
            y += LABEL + THUMB + PAD
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def _draw_video(sheet, draw, fs, layout, row: dict, video_id: str, y: int) -> None:
    """One contact-sheet row: the label, then the first, middle and last frame (read by the row's video_uri)."""
    from PIL import Image, ImageOps

    from latte_ray.stages.encode import decode_mp4

    label = f"{video_id[:32]}  motion {row.get('motion_score') or 0:.3f}"
    if row.get("clip_score") is not None:
        label += f"  clip {row['clip_score']:.1f}  aes {row['aesthetic_score']:.2f}"
    try:
        frames = decode_mp4(fs.cat_file(layout.video_path(row["video_uri"])))
    except Exception as e:  # noqa: BLE001 - one unreadable video must not sink the report
        draw.text((PAD, y), f"{label}: unreadable ({type(e).__name__})", fill=(255, 120, 120))
        return
    draw.text((PAD, y), label, fill=(220, 220, 220))
    for col, index in enumerate((0, len(frames) // 2, len(frames) - 1)):
        thumb = ImageOps.pad(Image.fromarray(frames[index]), (THUMB, THUMB), color=(0, 0, 0))
        sheet.paste(thumb, (PAD + col * (THUMB + PAD), y + LABEL))


_BIN_SECONDS = [1, 5, 10, 30, 60, 300, 600, 1800, 3600, 6 * 3600, 86400]


def throughput_chart(attempts: pa.Table) -> bytes:
    """PNG: ok videos finished per minute (bars, per time bin) and cumulative ok videos (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = attempts.filter(pc.equal(attempts["status"], "ok"))
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    if ok.num_rows:
        start = pc.min(pc.fill_null(attempts["started_at"], pc.min(attempts["finished_at"]))).as_py()
        t = np.sort(np.array([(f - start).total_seconds() for f in ok["finished_at"].to_pylist()]))
        width = next((b for b in _BIN_SECONDS if t[-1] / b <= 60), _BIN_SECONDS[-1])
        edges = np.arange(0, t[-1] + width, width)
        if len(edges) < 2:
            edges = np.array([0, width])
        per_bin, _ = np.histogram(t, bins=edges)
        unit, scale = ("min", 60) if t[-1] >= 120 else ("s", 1)
        ax.bar(edges[:-1] / scale, per_bin * 60 / width, width=width / scale, align="edge", color="#4c78a8", edgecolor="white",
               label=f"videos/min ({width}s bins)")
        ax.set_xlabel(f"time since start ({unit})")
        ax.set_ylabel("videos per minute")
        cumulative = ax.twinx()
        cumulative.step(t / scale, np.arange(1, len(t) + 1), where="post", color="#f58518")
        cumulative.set_ylabel("videos finished")
        ax.set_title(f"{ok.num_rows} videos in {t[-1]:.0f} s")
    else:
        ax.set_title("no finished videos yet")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _scores_html(selection, distributions: dict) -> list[str]:
    e = html.escape
    if selection is None or not selection.scored:
        return ["<h2>Scores</h2><p>No quality scores (run with scoring on, or `latte-ray score`).</p>"]
    stats = ("count", "min", "p10", "p25", "median", "p75", "p90", "max", "mean")
    return [
        f"<h2>Scores</h2><p>{e(selection.line())}.</p><table id='scores'><tr><th></th>"
        + "".join(f"<th>{s}</th>" for s in stats) + "</tr>",
        *(f"<tr><th>{e(c)}</th>" + "".join(f"<td>{d[s]}</td>" for s in stats) + "</tr>"
          for c, d in distributions.items() if d),
        "</table><img src='scores.png' alt='score histograms'>",
    ]


def _model_rows(model: dict) -> dict:
    """The model family (when not the default Latte) and each fused LoRA with its scale."""
    rows = {}
    if model.get("family") not in (None, "latte"):
        rows["model family"] = model["family"]
    for i, lora in enumerate(model.get("lora") or ()):
        name = f"{lora.get('source')}{'/' + lora['weight_name'] if lora.get('weight_name') else ''}"
        at = f" @ {lora['revision']}" if lora.get("revision") else ""
        into = f" into {lora['component']}" if lora.get("component") else ""
        rows[f"LoRA {i + 1}"] = f"{name}{at}{into} x{lora.get('scale', 1.0):g}"
    return rows


def render_html(output: str, record: dict, runs: tuple[int, list[dict]], counts: dict, latest: pa.Table,
                sampled: list[str], selection=None, distributions: dict | None = None, sections=(),
                gallery: dict | None = None) -> str:
    """`record`: the output's latte-ray.json; `runs`: (how many runs are recorded, the last ones)."""
    e = html.escape
    errors = latest.filter(pc.not_equal(latest["status"], "ok")).sort_by([("finished_at", "descending")])
    shown = errors.slice(0, MAX_ERRORS).to_pylist()
    total_runs, last_runs = runs
    pipeline = record.get("pipeline") or {}
    versions = (last_runs[-1].get("versions") if last_runs else None) or {}
    run_rows = {
        "output": output,
        "pipeline": pipeline.get("name", ""),
        "spec hash": record.get("spec_hash", ""),
        "run seed": record.get("run_seed", ""),
        "model": (pipeline.get("model") or {}).get("source", ""),
        **_model_rows(pipeline.get("model") or {}),
        "created": record.get("created_at") or "(before latte-ray.json existed)",
        "runs recorded": total_runs,
        "versions (last run)": ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None),
    }
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>latte-ray report</title><style>"
        "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "td.err{font-family:monospace;white-space:pre-wrap;max-width:60em}" + GALLERY_CSS + "</style></head><body>",
        f"<h1>latte-ray report: {e(output)}</h1>",
        f"<p class='lead'>{counts['ok']} ok, {counts['error']} error of {counts['prompts']} prompts.</p>",
        *(_gallery_html(gallery) if gallery is not None else []),
        "<h2>Counts</h2><table id='counts'>",
        *(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in counts.items()),
        "</table><h2>Run</h2><table id='run'>",
        *(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in run_rows.items()),
        f"</table><h2>Runs</h2><p>The last {len(last_runs)} of {total_runs} runs (OUTPUT/runs/).</p>"
        "<table id='runs'><tr><th>run</th><th>started</th><th>ended</th><th>outcome</th></tr>",
        *(f"<tr><td>{e(str(r.get('run_id', '')))}</td><td>{e(str(r.get('started_at') or ''))}</td>"
          f"<td>{e(str(r.get('ended_at') or ''))}</td><td>{e(run_line(r, r.get('liveness')).split('  ', 1)[-1])}</td></tr>"
          for r in reversed(last_runs)),
        "</table><h2>Throughput</h2><img src='throughput.png' alt='throughput over time'>",
        *_scores_html(selection, distributions or {}),
        f"<h2>Contact sheet</h2><p>First, middle and last frame of {len(sampled)} videos: evenly spaced by id"
        + "".join(f"; the {e(h)} ({len(ids)})" for h, ids in sections if h and ids) + ".</p>"
        "<img src='contact_sheet.png' alt='contact sheet'>",
        f"<h2>Errors</h2><p>{errors.num_rows} prompts whose latest attempt failed"
        + (f" (showing the latest {MAX_ERRORS})" if errors.num_rows > MAX_ERRORS else "") + ".</p>",
        "<table id='errors'><tr><th>id</th><th>finished</th><th>prompt</th><th>error</th></tr>",
        *(f"<tr><td>{e(str(r['id']))}</td><td>{e(str(r['finished_at']))}</td>"
          f"<td>{e((r['prompt'] or '')[:200])}</td><td class='err'>{e((r['error'] or '')[:2000])}</td></tr>"
          for r in shown),
        "</table>",
        *(["<script src='gallery.js'></script><script>" + GALLERY_JS + "</script>"] if gallery else []),
        "</body></html>",
    ]
    return "\n".join(parts)


def _gallery_html(gallery: dict) -> list[str]:
    e = html.escape
    held = len(gallery["rows"])
    note = gallery["sampled"] or f"all {held} prompts"
    sorts = [("id", "id"), ("clip-desc", "CLIP score, highest first"), ("clip-asc", "CLIP score, lowest first"),
             ("aesthetic-desc", "aesthetic score, highest first"), ("aesthetic-asc", "aesthetic score, lowest first"),
             ("motion-desc", "motion, most first"), ("motion-asc", "motion, least first"),
             ("finished-desc", "finished, latest first"), ("finished-asc", "finished, earliest first"),
             ("gen-desc", "generation time, longest first")]
    return [
        "<h2>Gallery</h2>",
        f"<p id='gallery-note'>{e(note)}; {e(gallery['links'])}.</p>",
        *([f"<p id='unplayable'><b>These videos will not play here</b>: {e(gallery['unplayable'])}; the contact "
           "sheet below shows their frames.</p>"] if gallery.get("unplayable") else []),
        "<div id='controls'><label>sort <select id='sort'>",
        *(f"<option value='{v}'>{e(t)}</option>" for v, t in sorts),
        "</select></label> <label>status <select id='status'><option value='all'>all</option>"
        "<option value='ok'>ok</option><option value='error'>error</option></select></label> "
        "<label>search <input id='search' type='search' placeholder='prompt or id'></label> "
        "<span id='pager'><button id='prev' type='button'>&lsaquo; prev</button> <span id='page'></span> "
        "<button id='next' type='button'>next &rsaquo;</button></span></div>",
        "<div id='cards'><noscript>The gallery needs JavaScript; the tables below do not.</noscript></div>",
    ]


GALLERY_CSS = (
    ".lead{font-size:1.1em}#controls{margin:0.5em 0 1em}#controls label{margin-right:1em}"
    "#cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}"
    ".card{border:1px solid #ccc;border-radius:6px;padding:8px;background:#fafafa;overflow:hidden}"
    ".card.error{border-color:#d33;background:#fff4f4}.card video{width:100%;background:#000;display:block}"
    ".card .prompt{margin:6px 0;font-size:0.95em}.card .meta{font-size:0.8em;color:#555;word-break:break-all}"
    ".card .stats{font-size:0.8em;font-family:monospace;margin-top:4px}"
    ".card .message{font-family:monospace;font-size:0.8em;white-space:pre-wrap;color:#a00;margin-top:6px}"
    ".card a{color:#35c}"
)

# The gallery's code: vanilla JS over window.LATTE_GALLERY (gallery.js); it builds cards with textContent
# (never innerHTML), so no prompt or error text is ever parsed as markup.
GALLERY_JS = r"""
(function () {
  var data = window.LATTE_GALLERY || {rows: [], page_size: 48};
  var rows = data.rows, size = data.page_size || 48, page = 0, view = rows;
  var $ = function (id) { return document.getElementById(id); };
  var keys = {id: "id", clip: "clip", aesthetic: "aesthetic", motion: "motion", finished: "finished", gen: "gen_s"};
  function cmp(key, dir) {
    return function (a, b) {
      var x = a[key], y = b[key];
      if (x === null || x === undefined) return (y === null || y === undefined) ? (a.id < b.id ? -1 : 1) : 1;
      if (y === null || y === undefined) return -1;
      if (x === y) return a.id < b.id ? -1 : 1;
      return (x < y ? -1 : 1) * dir;
    };
  }
  function el(tag, cls, text) {
    var n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined && text !== null) n.textContent = text;
    return n;
  }
  function fmt(v, d) { return (v === null || v === undefined) ? "-" : Number(v).toFixed(d); }
  function card(r) {
    var c = el("div", "card " + (r.status === "ok" ? "ok" : "error"));
    c.dataset.id = r.id;
    if (r.src) {
      var v = el("video");
      v.src = r.src; v.controls = true; v.muted = true; v.loop = true; v.preload = "metadata";
      v.setAttribute("playsinline", "");
      v.addEventListener("mouseenter", function () { v.play().catch(function () {}); });
      v.addEventListener("mouseleave", function () { v.pause(); });
      c.appendChild(v);
    }
    c.appendChild(el("div", "prompt", r.prompt));
    c.appendChild(el("div", "meta", "id " + r.id + " · seed " + r.seed + " · " + r.status +
                     (r.finished ? " · " + r.finished : "")));
    c.appendChild(el("div", "stats", "clip " + fmt(r.clip, 2) + " · aes " + fmt(r.aesthetic, 2) +
                     " · motion " + fmt(r.motion, 4) + " · bright " + fmt(r.brightness, 3) +
                     " · blank " + (r.blank === null ? "-" : r.blank) + " · frozen " + (r.frozen === null ? "-" : r.frozen) +
                     " · gen " + fmt(r.gen_s, 2) + "s" + (r.bytes ? " · " + Math.round(r.bytes / 1024) + " KiB" : "")));
    if (r.error) c.appendChild(el("div", "message", r.error));
    if (r.uri && !(r.src && r.src.indexOf(r.uri) >= 0)) {
      var a = el("a", "meta", r.uri);
      a.href = r.src || r.uri;
      c.appendChild(a);
    }
    return c;
  }
  function apply() {
    var s = $("sort").value.split("-"), st = $("status").value, q = $("search").value.toLowerCase();
    view = rows.filter(function (r) {
      if (st === "ok" && r.status !== "ok") return false;
      if (st === "error" && r.status === "ok") return false;
      return !q || (r.prompt || "").toLowerCase().indexOf(q) >= 0 || String(r.id).toLowerCase().indexOf(q) >= 0;
    });
    view.sort(cmp(keys[s[0]], s[1] === "desc" ? -1 : 1));
    page = 0;
    draw();
  }
  function draw() {
    var box = $("cards"), pages = Math.max(1, Math.ceil(view.length / size));
    page = Math.min(Math.max(page, 0), pages - 1);
    box.textContent = "";
    view.slice(page * size, (page + 1) * size).forEach(function (r) { box.appendChild(card(r)); });
    $("page").textContent = "page " + (page + 1) + " of " + pages + " (" + view.length + " cards)";
    $("prev").disabled = page === 0; $("next").disabled = page >= pages - 1;
  }
  ["sort", "status"].forEach(function (id) { $(id).addEventListener("change", apply); });
  $("search").addEventListener("input", apply);
  $("prev").addEventListener("click", function () { page -= 1; draw(); });
  $("next").addEventListener("click", function () { page += 1; draw(); });
  apply();
})();
"""
