"""Resume, exactly-once commit, failures, backfills and status.

Crashes are real: fault rules (latte_ray/faults.py) make a Ray worker os._exit, or SIGKILL a whole
`latte-ray` run (driver, Ray daemons and workers) at a chosen instant; the test itself SIGKILLs a driver.
Each crash is followed by a resume and a check of the exactly-once invariants (tests/invariants.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from latte_ray import faults, retry, runner
from latte_ray.cli import app
from latte_ray.keys import id_keys, key_set
from latte_ray.spec import RunSpec
from latte_ray.stages.encode import EncodeStage
from latte_ray.stages.write import WriteStage
from latte_ray.storage import OutputLayout
from latte_ray.workplan import reduce_keys
from tests.conftest import write_prompts
from tests.invariants import assert_exactly_once, cli_env, fast_spec, kill_run, manifest, start_cli, write_spec

# ---------------------------------------------------------------------------------------- units


def test_work_plan_dedupes_and_resumes():
    ids = ["a", "b", "b", "c", "c", "d", "e"]
    keys = id_keys(ids)
    rows = {
        "hi": keys["hi"], "lo": keys["lo"],
        "content": np.array([1, 2, 2, 3, 4, 5, 6], np.uint64),  # b: identical copies; c: different prompts
        "file": np.array([0, 0, 1, 0, 1, 1, 1], np.uint32),
        "valid": np.array([True, True, True, True, True, True, False]),  # e: an invalid row
    }
    arrays, counts = reduce_keys(rows, key_set(id_keys(["d", "not-in-input"])))
    assert counts == {"rows": 7, "done": 1, "duplicates": 1, "conflicts": 2, "todo": 5, "generate": 2}
    assert arrays["skip"].tolist() == id_keys(["d"]).tolist()
    assert arrays["conflicts"]["keys"].tolist() == id_keys(["c"]).tolist()
    assert arrays["conflicts"]["copies"].tolist() == [2]
    assert arrays["dups"].tolist() == id_keys(["b"]).tolist() and arrays["dup_files"] == [0, 1]


def test_fault_rules(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, "point=write match=*/videos/* action=oserror times=2\n"
                                   "point=generate match=x action=error")
    monkeypatch.setenv(faults.STATE_ENV, str(tmp_path / "state"))
    for _ in range(2):
        with pytest.raises(OSError, match="transient storage failure"):
            faults.point("write", "/out/videos/ab/x.mp4")
    faults.point("write", "/out/videos/ab/x.mp4")  # its two turns are used up
    faults.point("write", "/out/manifest/part-1.parquet")  # no match
    with pytest.raises(faults.InjectedFault, match=r"generate \(y, x\)"):
        faults.point("generate", ["y", "x"])
    assert faults.fired(str(tmp_path / "state")) == {0: 2}
    monkeypatch.setenv(faults.ENV, "point=after_video action=kill-run")
    with pytest.raises(faults.InjectedFault, match="refused"):  # pytest is not a latte-ray driver session
        faults.point("after_video", "x")
    monkeypatch.setenv(faults.ENV, "point=nowhere action=exit")
    with pytest.raises(ValueError, match="bad rule"):
        faults.point("write", "x")


def test_retry_backs_off_on_transient_errors_only(monkeypatch):
    monkeypatch.setenv(retry.SCALE_ENV, "0.001")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return 7

    assert retry.call(flaky, "flaky") == 7 and len(calls) == 3
    denied = []
    with pytest.raises(PermissionError):
        retry.call(lambda: denied.append(1) or (_ for _ in ()).throw(PermissionError("403")), "denied")
    assert len(denied) == 1  # not transient: no retry
    with pytest.raises(OSError) as info:
        retry.call(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "always", retry.Policy(attempts=4))
    assert "gave up after 4 attempts" in info.value.__notes__[0]


def test_a_video_that_cannot_be_stored_becomes_an_error_row(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, "point=write match=*/doomed.mp4 action=oserror")
    monkeypatch.setenv(retry.SCALE_ENV, "0.001")
    spec = fast_spec()
    frames = np.random.default_rng(0).integers(0, 255, (2, 16, 64, 64, 3), dtype=np.uint8)
    batch = {
        "id": np.array(["doomed", "fine"], object), "prompt": np.array(["a", "b"], object),
        "negative_prompt": np.array(["", ""], object), "seed": np.array([1, 2]),
        "status": np.array(["generated"] * 2, object), "error": np.array(["", ""], object),
        "frames": np.array([f.tobytes() for f in frames], object),
        "num_frames": np.full(2, 16), "height": np.full(2, 64), "width": np.full(2, 64),
    }
    out = tmp_path / "out"
    rows = WriteStage(str(out), spec.model_dump_json(), run_id="r1")(EncodeStage(spec.video.model_dump_json())(batch))
    by_id = {r["id"]: r for r in rows.to_pylist()}
    assert by_id["doomed"]["status"] == "error" and "storing the video failed" in by_id["doomed"]["error"]
    assert f"gave up after {retry.VIDEO.attempts} attempts" in by_id["doomed"]["error"]
    assert by_id["fine"]["status"] == "ok"
    assert_exactly_once(out, {"fine"}, errors={"doomed"})


# ------------------------------------------------------------------ failures inside one real run

FAILURE_RULES = """
point=denoise match=die-once action=exit times=1
point=generate match=poison action=error
point=write match=*/videos/*/flaky-* action=oserror times=2
point=write match=*/manifest/* action=oserror times=2
"""
FAILURE_IDS = [f"row-{i}" for i in range(6)] + ["die-once", "poison", "flaky-1", "flaky-2"]


@pytest.fixture(scope="module")
def failures_run(tmp_path_factory, ray_local, faults_file):
    """One run in which an actor dies mid-batch, a prompt always fails, and storage fails transiently."""
    tmp = tmp_path_factory.mktemp("failures")
    table = write_prompts(tmp / "prompts.parquet", {"id": FAILURE_IDS, "prompt": [f"a scene {i}" for i in FAILURE_IDS]})
    state = Path(f"{faults_file}.state")
    shutil.rmtree(state, ignore_errors=True)
    faults_file.write_text(FAILURE_RULES)
    try:
        summary = runner.run(RunSpec(pipeline=fast_spec(), prompts=[str(table)], output=str(tmp / "out")))
    finally:
        faults_file.write_text("")
    fired = faults.fired(str(state))
    markers = {p.name: int(p.read_text()) for p in state.iterdir()}
    shutil.rmtree(state, ignore_errors=True)
    return SimpleNamespace(out=tmp / "out", table=table, summary=summary, fired=fired, markers=markers, tmp=tmp)


def test_an_actor_that_dies_mid_batch_is_restarted_and_its_batch_retried(failures_run):
    assert failures_run.fired.get(0) == 1  # the denoise actor holding die-once called os._exit
    (pid,) = [pid for name, pid in failures_run.markers.items() if name.startswith("rule0-")]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # that process is gone ...
    rows = [r for r in manifest(failures_run.out) if r["id"] == "die-once"]
    assert [r["status"] for r in rows] == ["ok"]  # ... and its batch was generated again, once


def test_transient_storage_errors_are_retried_with_backoff(failures_run):
    assert failures_run.fired.get(2) == 2 and failures_run.fired.get(3) == 2
    rows = manifest(failures_run.out)
    assert {r["id"]: r["status"] for r in rows if r["id"].startswith("flaky")} == {"flaky-1": "ok", "flaky-2": "ok"}
    assert not [r for r in rows if r["error"] and "storage" in r["error"]]


def test_a_failing_row_is_retried_alone_and_becomes_an_error_row(failures_run):
    (row,) = [r for r in manifest(failures_run.out) if r["id"] == "poison"]
    assert row["status"] == "error"
    # the last attempt was "poison" alone: its batch was split and retried row by row
    assert "generation failed: InjectedFault: injected fault at generate (poison)" in row["error"]
    assert failures_run.summary.ok == len(FAILURE_IDS) - 1 and failures_run.summary.error == 1


def test_exactly_once_after_failures(failures_run):
    assert_exactly_once(failures_run.out, set(FAILURE_IDS) - {"poison"}, errors={"poison"})


def test_status_counts_per_id_against_the_input(failures_run):
    later = write_prompts(failures_run.tmp / "later.parquet", {"id": ["new-1", "new-2"], "prompt": ["x", "y"]})
    result = CliRunner().invoke(app, ["status", str(failures_run.out), "--prompts", str(failures_run.table),
                                      "--prompts", str(later), "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert (status["ok"], status["error"], status["pending"], status["input_ids"]) == (9, 1, 2, 12)
    assert status["top_errors"][0][1] == 1 and "injected fault at generate (<id>)" in status["top_errors"][0][0]
    assert status["videos_per_second"] > 0 and status["busy_seconds"] > 0 and status["eta_seconds"] > 0
    text = CliRunner().invoke(app, ["status", str(failures_run.out)])
    assert text.exit_code == 0 and "9 ok, 1 error;" in text.output and "throughput:" in text.output


def test_resume_skips_done_ids_and_retries_errors(failures_run):
    """Runs last on this output: re-running does nothing without --retry-errors, then retries only poison."""
    out, table = failures_run.out, failures_run.table
    parts = sorted(p.name for p in (out / "manifest").glob("*.parquet"))
    summary = runner.run(RunSpec(pipeline=fast_spec(), prompts=[str(table)], output=str(out), retry_errors=False))
    assert (summary.ok, summary.error, summary.skipped_done) == (0, 0, len(FAILURE_IDS))
    assert sorted(p.name for p in (out / "manifest").glob("*.parquet")) == parts  # nothing was written
    summary = runner.run(RunSpec(pipeline=fast_spec(), prompts=[str(table)], output=str(out)))
    assert (summary.ok, summary.error, summary.skipped_done) == (1, 0, len(FAILURE_IDS) - 1)
    assert_exactly_once(out, set(FAILURE_IDS))


# --------------------------------------------------------------- commit protocol: crash, resume


@pytest.fixture
def crash_setup(tmp_path, model_cache):
    spec = fast_spec()
    ids = [f"c-{i}" for i in range(9)] + ["crash-here"]
    table = write_prompts(tmp_path / "prompts.parquet", {"id": ids, "prompt": [f"a boat {i}" for i in ids]})
    args = ["run", "--pipeline", str(write_spec(tmp_path / "spec.yaml", spec)), "--prompts", str(table),
            "--output", str(tmp_path / "out")]
    return SimpleNamespace(spec=spec, ids=set(ids), table=table, args=args, out=tmp_path / "out", tmp=tmp_path,
                           model_cache=model_cache)


def _crash(setup, rules: str, name: str) -> None:
    """A CLI run that a kill-run fault SIGKILLs (driver, Ray and workers at once) at the given point."""
    env = cli_env(setup.model_cache, **{faults.ENV: rules, faults.KILL_ENV: "1"})
    proc = start_cli(setup.args, env, setup.tmp / f"{name}.log")
    try:
        code = proc.wait(timeout=400)
    finally:
        kill_run(proc)
    assert code == -signal.SIGKILL, (setup.tmp / f"{name}.log").read_text()[-3000:]


def test_crashes_between_video_and_row_and_inside_a_manifest_write_then_resume(crash_setup, ray_local):
    s = crash_setup
    layout = OutputLayout(str(s.out), str(s.out))
    # (a) the run dies right after crash-here's video is stored, before the manifest part that records it
    _crash(s, "point=after_video match=crash-here action=kill-run", "after-video")
    video = s.out / layout.video_key("crash-here")
    assert video.exists() and video.stat().st_size > 0
    rows_a = manifest(s.out)
    assert "crash-here" not in {r["id"] for r in rows_a}  # stored but not committed: it does not count

    # (b) the resumed run dies half-way through writing its first manifest part
    _crash(s, "point=mid_write match=*/manifest/part-* action=kill-run", "mid-manifest")
    temps = [p for p in (s.out / "manifest").iterdir() if ".tmp-" in p.name]
    assert temps and all(0 < p.stat().st_size for p in temps)  # the partial part exists, under a temp name
    assert manifest(s.out) == rows_a  # and is invisible: readers only see whole parts

    summary = runner.run(RunSpec(pipeline=s.spec, prompts=[str(s.table)], output=str(s.out)))
    assert summary.ok + summary.skipped_done == len(s.ids) and summary.skipped_done == len(rows_a)
    rows = assert_exactly_once(s.out, s.ids)
    (redone,) = [r for r in rows if r["id"] == "crash-here"]
    assert video.read_bytes() and Path(redone["video_uri"]) == video


def test_driver_killed_mid_run_then_resume(crash_setup, ray_local):
    s = crash_setup
    ids = {f"k-{i}" for i in range(60)}  # enough work that the run is still going when it is killed
    table = write_prompts(s.tmp / "many.parquet", {"id": sorted(ids), "prompt": [f"a kite {i}" for i in sorted(ids)]})
    args = [table if a == str(s.table) else a for a in s.args]
    proc = start_cli([str(a) for a in args], cli_env(s.model_cache), s.tmp / "driver.log")

    def parts() -> list[Path]:
        return list((s.out / "manifest").glob("*.parquet")) if (s.out / "manifest").exists() else []

    try:
        deadline = time.monotonic() + 400
        while len(parts()) < 2:
            assert proc.poll() is None, (s.tmp / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no manifest parts appeared"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone; then the Ray it started
    finally:
        kill_run(proc)
    committed = {r["id"] for r in manifest(s.out) if r["status"] == "ok"}
    assert 2 <= len(committed) < len(ids)
    summary = runner.run(RunSpec(pipeline=s.spec, prompts=[str(table)], output=str(s.out)))
    assert summary.skipped_done == len(committed) and summary.ok == len(ids) - len(committed)
    assert_exactly_once(s.out, ids)


# ------------------------------------------------------------------------------------- backfill


def test_backfill_generates_only_what_lacks_an_ok_row_and_then_nothing(tmp_path, ray_local):
    spec = write_spec(tmp_path / "spec.yaml", fast_spec())
    prompts = tmp_path / "prompts"
    write_prompts(prompts / "date=2026-11-01" / "part-0.parquet", {"id": ["d1-a", "d1-b", "d1-c"], "prompt": ["a", "b", "c"]})
    write_prompts(prompts / "date=2026-11-02" / "part-0.parquet", {"id": ["d2-a", "d2-b"], "prompt": ["d", "e"]})
    out = tmp_path / "out"
    args = ["backfill", "--pipeline", str(spec), "--prompts", f"{prompts}/date=2026-11-*/", "--output", str(out)]

    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "5 ok, 0 error, 0 already done" in first.output

    # a new partition arrives, repeating one row of an old one
    write_prompts(prompts / "date=2026-11-03" / "part-0.parquet",
                  {"id": ["d3-a", "d1-a", "d3-b"], "prompt": ["f", "a", "g"]})
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "2 ok, 0 error, 6 already done" in second.output
    parts = sorted(p.name for p in (out / "manifest").glob("*.parquet"))

    third = CliRunner().invoke(app, args)
    assert third.exit_code == 0, third.output
    assert "nothing to do (8 rows already done)" in third.output
    assert sorted(p.name for p in (out / "manifest").glob("*.parquet")) == parts
    assert_exactly_once(out, {"d1-a", "d1-b", "d1-c", "d2-a", "d2-b", "d3-a", "d3-b"})
