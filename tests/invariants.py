"""Helpers shared by the resume, lease, node-loss, bad-input and chaos tests: specs (one per model family for
the contract tests), CLI runs in their own session, the exactly-once invariants of an output prefix, and the
failures run that test_resume.py and test_wan.py share."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import yaml

from latte_ray import runner
from latte_ray.faults import injection as faults
from latte_ray.spec import RunSpec, load_pipeline_spec, parse_pipeline_spec
from latte_ray.record.storage import OutputLayout, filesystem, read_manifest

from tests.conftest import write_prompts

REPO = Path(__file__).resolve().parents[1]


def fast_spec(batch_size: int = 2, concurrency: int = 1, **sampling):
    """tiny-cpu at 2 steps and 64x64 (the tiny Latte recomputes its sin-cos position embedding for the size):
    ~0.1 s per video on one CPU thread."""
    raw = yaml.safe_load(load_pipeline_spec("tiny-cpu").model_dump_json())
    raw["sampling"].update({"num_inference_steps": 2, "height": 64, "width": 64, **sampling})
    raw["execution"].update(batch_size=batch_size, concurrency=concurrency)
    return parse_pipeline_spec(raw)


def wan_spec(batch_size: int = 3, concurrency: int = 1, **sampling):
    """tiny-cpu-wan at 6 steps with a lossless codec (libx264rgb, crf 0: the decoded frames are the generated
    ones, so tests compare a run's videos with diffusers' own WanPipeline.__call__): ~0.2 s per video on one
    CPU thread, most of it the 3D VAE."""
    raw = yaml.safe_load(load_pipeline_spec("tiny-cpu-wan").model_dump_json())
    raw["sampling"].update({"num_inference_steps": 6, **sampling})
    raw["video"].update(codec="libx264rgb", crf=0)
    raw["execution"].update(batch_size=batch_size, concurrency=concurrency)
    return parse_pipeline_spec(raw)


# The model families the contract tests (resume, exactly once, error rows, the lease, node loss) run for: the
# same test body for each, its spec from family_spec.
FAMILIES = ("latte", "wan")


def family_spec(family: str, batch_size: int = 2, concurrency: int = 1, **sampling):
    """The fast CPU spec of a model family (fast_spec for Latte, wan_spec for Wan)."""
    make = {"latte": fast_spec, "wan": wan_spec}[family]
    return make(batch_size=batch_size, concurrency=concurrency, **sampling)


def assert_made_by(out, family: str, spec, storage_options: dict | None = None) -> dict:
    """The output's record (latte-ray.json) names `family` as the family that made it, in its spec and in the
    model's identity, with the spec's hash; every ok row has the spec's frame count (Latte's tiny model makes
    16, Wan's 4k + 1). `out`: a folder or an s3:// URL. Returns the record."""
    fs, root = filesystem(str(out), storage_options)
    layout = OutputLayout(str(out), root)
    record = json.loads(fs.cat_file(layout.record_json))
    assert record["pipeline"]["model"]["family"] == family, record["pipeline"]["model"]
    assert (record["model_identity"] or {}).get("family", "latte") == family, record["model_identity"]
    assert record["spec_hash"] == spec.spec_hash()
    frames = {r["num_frames"] for r in read_manifest(fs, layout).to_pylist() if r["status"] == "ok"}
    assert frames == {spec.sampling.video_length}, frames
    return record


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


# ------------------------------------------------------------------ the failures run, one per model family
#
# test_resume.py's failure tests read it for every family in FAMILIES; test_wan.py reads the Wan one's videos
# (diffusers' own WanPipeline as the reference, a regeneration byte for byte). Made once per test process, by
# whichever module asks first, so the two share one execution.

FAILURE_RULES = """
point=denoise match=die-once action=exit times=1
point=generate match=poison action=error
point=generate match=pill action=exit
point=write match=*/videos/*/flaky-* action=oserror times=2
point=write match=*/manifest/* action=oserror times=2
"""
FAILURE_IDS = [f"row-{i}" for i in range(6)] + ["die-once", "poison", "pill", "flaky-1", "flaky-2"]
FAILING = {"poison", "pill"}
# What else a table row may hold: a negative prompt, a prompt outside ASCII, a seed of its own; the other rows
# take the spec's negative prompt and a seed derived from their id.
FAILURE_ROWS = {"row-1": {"negative_prompt": "blurry"},
                "row-2": {"prompt": "ein Hund läuft 🐕 im Park", "seed": 2**40}}
# Latte's run at batch 2 (a failing row's batch is split and retried row by row). Wan's at batch 1: each of
# its recorded videos is then a function of its row alone (whatever Ray batches it with), so test_wan.py
# regenerates it byte for byte; batch 1 against batch 3 is test_wan.py's engine test.
FAILURES_BATCH = {"latte": 2, "wan": 1}

_FAILURE_RUNS: dict[str, SimpleNamespace] = {}


def failures_run(family: str, tmp_path_factory, faults_file: Path) -> SimpleNamespace:
    """One run of `family`'s fast spec in which an actor dies mid-batch, a prompt always raises, a prompt
    always kills its worker, and storage fails transiently; with the production spec's generation servers
    kept for the run (execution.keep_model_actors: Ray restarts a dead server and retries the call, the
    ledger counts it). Needs the session's Ray (conftest.ray_local)."""
    if family not in _FAILURE_RUNS:
        _FAILURE_RUNS[family] = _failures_run(family, tmp_path_factory, faults_file)
    return _FAILURE_RUNS[family]


def _failures_run(family: str, tmp_path_factory, faults_file: Path) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp(f"failures-{family}")
    rows = [{"id": i, "prompt": f"a scene {i}", "negative_prompt": None, "seed": None, **FAILURE_ROWS.get(i, {})}
            for i in FAILURE_IDS]
    table = write_prompts(tmp / "prompts" / "date=2026-11-01" / "part-0.parquet",
                          {name: [r[name] for r in rows] for name in rows[0]})
    base = family_spec(family, batch_size=FAILURES_BATCH[family])
    spec = base.with_overrides(keep_model_actors=True)
    state = Path(f"{faults_file}.state")
    shutil.rmtree(state, ignore_errors=True)
    faults_file.write_text(FAILURE_RULES)
    try:
        summary = runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=str(tmp / "out")))
    finally:
        faults_file.write_text("")
    fired = faults.fired(str(state))
    died = faults.firings(str(state), 0)
    shutil.rmtree(state, ignore_errors=True)
    return SimpleNamespace(family=family, out=tmp / "out", table=table, base=base, spec=spec, summary=summary,
                           fired=fired, died=died, tmp=tmp)
