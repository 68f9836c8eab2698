"""Helpers shared by the resume, bad-input and chaos tests: specs, CLI runs in their own session, and the
exactly-once invariants of an output prefix."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from latte_ray.faults import injection as faults
from latte_ray.spec import load_pipeline_spec, parse_pipeline_spec
from latte_ray.record.storage import OutputLayout, filesystem, read_manifest

REPO = Path(__file__).resolve().parents[1]


def fast_spec(batch_size: int = 2, concurrency: int = 1, **sampling):
    """tiny-cpu at 2 steps and 64x64 (the tiny Latte recomputes its sin-cos position embedding for the size):
    ~0.1 s per video on one CPU thread."""
    raw = yaml.safe_load(load_pipeline_spec("tiny-cpu").model_dump_json())
    raw["sampling"].update({"num_inference_steps": 2, "height": 64, "width": 64, **sampling})
    raw["execution"].update(batch_size=batch_size, concurrency=concurrency)
    return parse_pipeline_spec(raw)


def write_spec(path: Path, spec) -> Path:
    path.write_text(yaml.safe_dump(yaml.safe_load(spec.model_dump_json())))
    return path


def manifest(out: Path) -> list[dict]:
    fs, root = filesystem(str(out))
    return read_manifest(fs, OutputLayout(str(out), root)).to_pylist()


def assert_exactly_once(out: Path, ids: set[str], errors: set[str] = frozenset(), orphans: bool = True) -> list[dict]:
    """Every id in `ids` has exactly one ok row whose video exists with the recorded size and sha256; ids
    in `errors` have error rows only and no video; no other id appears; every file under a final name is
    whole (parts readable, videos recorded with their hash).

    Video keys hold the video's hash, so an object is never overwritten: an attempt that stored its video
    and died before its row leaves that object behind when the retry's bytes differ (another batch
    composition moves pixels by one level). Such orphans never count; `latte-ray compact` deletes them.
    `orphans=True` allows them (for ids of the run only); `orphans=False` (after a compaction) allows none."""
    rows = manifest(out)
    ok = Counter(r["id"] for r in rows if r["status"] == "ok")
    assert {i for i, n in ok.items() if n > 1} == set(), f"ids with more than one ok row: {ok.most_common(5)}"
    assert set(ok) == ids, f"missing ok: {sorted(ids - set(ok))[:10]}, unexpected ok: {sorted(set(ok) - ids)[:10]}"
    assert {r["id"] for r in rows} <= ids | set(errors)
    assert {r["id"] for r in rows if r["status"] == "error"} >= set(errors)
    recorded = set()
    for r in rows:
        if r["status"] != "ok":
            assert not r["video_uri"] and r["error"], r
            continue
        path = Path(r["video_uri"])
        data = path.read_bytes()
        assert len(data) == r["bytes"] and hashlib.sha256(data).hexdigest() == r["sha256"], r["id"]
        assert path.resolve().is_relative_to(out.resolve() / "videos")
        recorded.add(path.resolve())
    final_videos = {p.resolve() for p in (out / "videos").rglob("*.mp4")}
    assert recorded <= final_videos
    unrecorded = final_videos - recorded
    if not orphans:
        assert not unrecorded, f"unrecorded videos under final names: {sorted(unrecorded)[:5]}"
    assert {p.name.split(".", 1)[0] for p in unrecorded} <= {i.split(".", 1)[0] for i in ids | set(errors)}, unrecorded
    for part in (out / "manifest").glob("*.parquet"):
        pq.read_table(part)  # whole: a partial part under a final name would not parse
    leftovers = [p.name for p in (out / "manifest").iterdir() if not p.name.endswith(".parquet")]
    assert all(".tmp-" in name for name in leftovers), leftovers
    return rows


def assert_ok_rows_match_their_objects(out: Path) -> list[dict]:
    """Every ok row (of every attempt, not only the latest) names an object under OUT/videos whose bytes have
    the row's size and sha256: a recorded video never changed. Returns the ok rows."""
    rows = [r for r in manifest(out) if r["status"] == "ok"]
    for r in rows:
        data = Path(r["video_uri"]).read_bytes()
        assert len(data) == r["bytes"] and hashlib.sha256(data).hexdigest() == r["sha256"], (r["id"], r["video_uri"])
        assert Path(r["video_uri"]).resolve().is_relative_to(out.resolve() / "videos")
    return rows


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, tuple[int, int, str]]:
    """Every file under `folder` (but `skip` and what is under it) with its size, mtime and a hash of its
    bytes, and every folder by name: compare before and after to show that nothing outside an output was
    touched (a folder's own mtime is left out: a probe created and deleted in it changes that)."""
    state = {}
    for p in sorted(folder.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_file():
            state[str(p.relative_to(folder))] = (p.stat().st_size, p.stat().st_mtime_ns,
                                                 hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            state[str(p.relative_to(folder))] = (0, 0, "dir")
    return state


def cli_env(model_cache: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "LATTE_RAY_CACHE": str(model_cache), "PYTHONPATH": str(REPO), **extra}
    for name in ("RAY_ADDRESS", faults.ENV, faults.STATE_ENV):
        if name not in extra:
            env.pop(name, None)
    return env


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`latte-ray ARGS` as the leader of its own session, so that it and the Ray it starts can be killed
    together (and kill-run faults are allowed)."""
    return subprocess.Popen([sys.executable, "-m", "latte_ray.cli", *args], env=env, cwd=log.parent,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_run(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGKILL the driver's whole session (its Ray daemons and workers) and wait until none is left."""
    faults.kill_session(proc.pid)
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while faults.session_pids(proc.pid):
        assert time.monotonic() < deadline, f"processes of the killed run survive: {faults.session_pids(proc.pid)}"
        faults.kill_session(proc.pid)
        time.sleep(0.2)
