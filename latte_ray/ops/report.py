"""`latte-ray report OUTPUT`: a static HTML report of a run, from its manifest and videos alone.

    DEST/index.html          counts, the output's spec, its run history, stats, error table (every value
                             HTML-escaped)
    DEST/throughput.png      videos finished per minute over time, and the cumulative count
    DEST/contact_sheet.png   first, middle and last frame of an evenly spaced sample of ok videos and, when the
                             output has quality scores, of its lowest- and highest-scoring videos (labelled)
    DEST/scores.png          histograms of clip_score and aesthetic_score (when the output has scores)

DEST defaults to OUTPUT/report/. Works on a finished run or one in progress (the manifest is the truth).
A path that is not a latte-ray output is refused before anything is written (record/output.require_output).
"""

from __future__ import annotations

import html
import io
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latte_ray.record.output import list_runs, require_output, run_line
from latte_ray.record.scores import attach_scores, distribution
from latte_ray.record.storage import OutputLayout, filesystem, is_local, latest_rows, read_manifest, write_atomic
from latte_ray.spec import SpecError

log = logging.getLogger(__name__)

THUMB = 128  # contact sheet cell (frames are scaled to fit, letterboxed)
LABEL = 16  # text strip above each row of the contact sheet
PAD = 6
MAX_ERRORS = 200
_COLUMNS = ["id", "prompt", "status", "error", "bytes", "started_at", "finished_at", "generate_seconds",
            "mean_brightness", "motion_score", "blank_frames", "frozen_frames", "video_uri", "sha256",
            "clip_score", "aesthetic_score", "clip_prompt_truncated", "scoring_hash"]
SCORES = ("clip_score", "aesthetic_score")
RUNS_SHOWN = 20


@dataclass
class Report:
    url: str  # of index.html
    counts: dict[str, object]
    sampled: list[str]  # ids on the contact sheet, top to bottom
    scores: object = None  # record.scores.ScoreSelection


def write_report(output: str, storage_options: dict | None = None, dest: str | None = None,
                 samples: int = 12, extremes: int = 3, scoring_hash: str | None = None) -> Report:
    out, record = require_output(output, storage_options)
    fs, layout = out.fs, out.layout
    dest = (dest or f"{layout.url}/report").rstrip("/")
    dest_fs, dest_root = filesystem(dest, storage_options)
    dest_root = dest_root.rstrip("/")
    if is_local(dest_fs) and os.path.exists(dest_root) and not os.path.isdir(dest_root):
        raise SpecError(f"report --dest {dest!r} is an existing file; give a folder for index.html and its images")
    attempts = read_manifest(fs, layout, columns=_COLUMNS)
    latest = latest_rows(attempts)
    total_runs, runs = list_runs(out, last=RUNS_SHOWN)
    from latte_ray.ops.status import lease_holders, liveness

    held = lease_holders(out)
    for r in runs:  # a `running` record: live, or died (its lease, record/lease.py)
        r["liveness"] = liveness(r, held) if r.get("outcome") == "running" else None

    counts = count(attempts, latest)
    ok = latest.filter(pc.equal(latest["status"], "ok")).sort_by("id")
    ok, selection = attach_scores(fs, layout, ok, scoring_hash)
    sections = [("", _spread(ok["id"].to_pylist(), samples))] + score_extremes(ok, extremes)
    sampled = [video_id for _, ids in sections for video_id in ids]
    sheet = contact_sheet(fs, layout, ok, sections)
    chart = throughput_chart(attempts)
    distributions = {c: distribution(ok[c].to_pylist()) for c in SCORES}

    page = render_html(output, record, (total_runs, runs), counts, latest, sampled, selection, distributions,
                       sections)
    try:
        write_atomic(dest_fs, f"{dest_root}/contact_sheet.png", sheet)
        write_atomic(dest_fs, f"{dest_root}/throughput.png", chart)
        if selection.scored:
            write_atomic(dest_fs, f"{dest_root}/scores.png", score_histograms(ok))
        write_atomic(dest_fs, f"{dest_root}/index.html", page.encode())
    except Exception as e:  # noqa: BLE001 - a read-only or unreachable destination, named
        raise SpecError(f"report: cannot write to {dest}: {type(e).__name__}: {e}") from e
    return Report(url=f"{dest}/index.html", counts=counts, sampled=sampled, scores=selection)


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


def render_html(output: str, record: dict, runs: tuple[int, list[dict]], counts: dict, latest: pa.Table,
                sampled: list[str], selection=None, distributions: dict | None = None, sections=()) -> str:
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
        "created": record.get("created_at") or "(before latte-ray.json existed)",
        "runs recorded": total_runs,
        "versions (last run)": ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None),
    }
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>latte-ray report</title><style>"
        "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "td.err{font-family:monospace;white-space:pre-wrap;max-width:60em}</style></head><body>",
        f"<h1>latte-ray report: {e(output)}</h1>",
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
        "</table></body></html>",
    ]
    return "\n".join(parts)
