"""Resume, exactly-once commit, failures, backfills and status.

Crashes are real: fault rules (latte_ray/faults/injection.py) make a Ray worker os._exit, or SIGKILL a whole
`latte-ray` run (driver, Ray daemons and workers) at a chosen instant; the test itself SIGKILLs a driver.
Each crash is followed by a resume and a check of the exactly-once invariants (tests/invariants.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from latte_ray import raycompat, runner, scheduler
from latte_ray.faults import injection as faults
from latte_ray.faults import retry
from latte_ray.cli import app
from latte_ray.faults.crashes import MAX_CRASHES, CrashLedger
from latte_ray.plan.keys import id_keys, key_set
from latte_ray.spec import RunSpec
from latte_ray.stages.encode import EncodeStage
from latte_ray.stages.write import WriteStage
from latte_ray.plan.workplan import reduce_keys
from tests.conftest import own_output, write_prompts
from tests.invariants import (
    FAILING, FAILURE_IDS, FAMILIES, assert_exactly_once, assert_made_by, assert_ok_rows_match_their_objects, cli_env,
    fast_spec, kill_run, manifest, start_cli, write_spec,
)
from tests.invariants import failures_run as failures_run_of

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
        retry.call(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "always", retry.Policy(budget_s=0))
    assert "gave up after 3 attempts" in info.value.__notes__[0]  # the budget is spent: the minimum attempts


def test_a_video_that_cannot_be_stored_becomes_an_error_row(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, "point=write match=*/doomed.*.mp4 action=oserror")
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
    assert "gave up after" in by_id["doomed"]["error"] and "retry budget" in by_id["doomed"]["error"]
    assert by_id["fine"]["status"] == "ok"
    assert_exactly_once(out, {"fine"}, errors={"doomed"})


def test_crash_ledger_counts_attempts_that_never_finished(tmp_path):
    ledger = CrashLedger("spec", root=tmp_path)
    assert ledger.begin(["a", "b"]) == 0  # first attempt
    assert ledger.begin(["a", "b"]) == 1  # the first never ended: its process died
    ledger.end(["a", "b"])
    assert ledger.begin(["a", "b"]) == 0 and ledger.begin(["a"]) == 0  # a finished batch starts afresh
    assert CrashLedger("other-spec", root=tmp_path).begin(["a", "b"]) == 0


# ------------------------------------------------------------------ failures inside one real run

@pytest.fixture(scope="module", params=FAMILIES)
def failures_run(request, tmp_path_factory, ray_local, faults_file):
    """For each model family: one run in which an actor dies mid-batch, a prompt always raises, a prompt
    always kills its worker, and storage fails transiently (tests/invariants.py failures_run). Every test
    reading it reads that family's output: its record names the family."""
    run = failures_run_of(request.param, tmp_path_factory, faults_file)
    assert_made_by(run.out, request.param, run.spec)
    return run


def test_an_actor_that_dies_mid_batch_is_restarted_and_its_batch_retried(failures_run):
    assert failures_run.fired.get(0) == 1  # the denoise actor holding die-once called os._exit
    ((pid, keys),) = failures_run.died
    assert "die-once" in keys
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # that process is gone ...
    rows = [r for r in manifest(failures_run.out) if r["id"] == "die-once"]
    assert [r["status"] for r in rows] == ["ok"]  # ... and its batch was generated again, once


def test_transient_storage_errors_are_retried_with_backoff(failures_run):
    assert failures_run.fired.get(3) == 2 and failures_run.fired.get(4) == 2
    rows = manifest(failures_run.out)
    assert {r["id"]: r["status"] for r in rows if r["id"].startswith("flaky")} == {"flaky-1": "ok", "flaky-2": "ok"}
    assert not [r for r in rows if r["error"] and "storage" in r["error"]]


def test_a_failing_row_is_retried_alone_and_becomes_an_error_row(failures_run):
    (row,) = [r for r in manifest(failures_run.out) if r["id"] == "poison"]
    assert row["status"] == "error"
    # the last attempt was "poison" alone: its batch was split and retried row by row
    assert "generation failed: InjectedFault: injected fault at generate (poison)" in row["error"]
    assert failures_run.summary.ok == len(FAILURE_IDS) - 2 and failures_run.summary.error == 2


def test_a_row_that_kills_its_worker_every_time_becomes_an_error_row(failures_run):
    """Ray would retry it forever; the crash ledger isolates it and gives up after MAX_CRASHES deaths."""
    (row,) = [r for r in manifest(failures_run.out) if r["id"] == "pill"]
    assert row["status"] == "error"
    assert f"generation killed its worker process {MAX_CRASHES} times" in row["error"]


def test_exactly_once_after_failures(failures_run):
    assert_exactly_once(failures_run.out, set(FAILURE_IDS) - FAILING, errors=FAILING)


def test_status_counts_per_id_against_the_input(failures_run):
    later = write_prompts(failures_run.tmp / "later.parquet", {"id": ["new-1", "new-2"], "prompt": ["x", "y"]})
    result = CliRunner().invoke(app, ["status", str(failures_run.out), "--prompts", str(failures_run.table),
                                      "--prompts", str(later), "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(own_output(result))
    assert (status["ok"], status["error"], status["pending"], status["input_ids"]) == (9, 2, 2, 13)
    kinds = dict(status["top_errors"])
    assert kinds["generation failed: InjectedFault: injected fault at generate (<id>)"] == 1
    pill = "generation killed its worker process N times (a crash or out of memory); not tried again in this run"
    assert kinds[pill] == 1
    assert status["videos_per_second"] > 0 and status["busy_seconds"] > 0 and status["eta_seconds"] > 0
    text = CliRunner().invoke(app, ["status", str(failures_run.out)])
    assert text.exit_code == 0 and "9 ok, 2 error;" in text.output and "throughput:" in text.output


def test_rerun_without_retrying_errors_does_nothing(failures_run):
    parts = sorted(p.name for p in (failures_run.out / "manifest").glob("*.parquet"))
    summary = runner.run(RunSpec(pipeline=failures_run.base, prompts=[str(failures_run.table)],
                                 output=str(failures_run.out), retry_errors=False))
    assert (summary.ok, summary.error, summary.skipped_done) == (0, 0, len(FAILURE_IDS))
    assert sorted(p.name for p in (failures_run.out / "manifest").glob("*.parquet")) == parts


def test_backfill_generates_only_what_lacks_an_ok_row_and_then_nothing(failures_run):
    """Over the date partitions so far: the error row is retried, a new partition is generated except for
    a row it repeats from an old one, and a second backfill does nothing (no model is loaded)."""
    tmp, out = failures_run.tmp, failures_run.out
    write_prompts(tmp / "prompts" / "date=2026-11-02" / "part-0.parquet",
                  {"id": ["new-1", "row-0", "new-2"], "prompt": ["a new day", "a scene row-0", "a new night"]})
    args = ["backfill", "--pipeline", str(write_spec(tmp / "spec.yaml", failures_run.base)),
            "--prompts", f"{tmp}/prompts/date=2026-11-*/", "--output", str(out), "--no-report"]
    readers = _footer_readers()
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "4 ok, 0 error, 10 already done" in first.output  # poison and pill (retried), new-1, new-2
    # The run read its two input files once, with one FooterReader actor (Ray Data's default pool is 32).
    assert _footer_readers() - readers == raycompat.footer_readers(2) == 1
    parts = sorted(p.name for p in (out / "manifest").glob("*.parquet"))
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "nothing to do (14 rows already done)" in second.output
    assert sorted(p.name for p in (out / "manifest").glob("*.parquet")) == parts
    assert_exactly_once(out, set(FAILURE_IDS) | {"new-1", "new-2"})
    assert_made_by(out, failures_run.family, failures_run.base)


def _footer_readers() -> int:
    """How many of Ray Data's FooterReader actors this cluster has made so far."""
    return sum(a["ActorClassName"] == "FooterReader" for a in raycompat.actor_table().values())


def test_the_footer_reader_pool_grows_with_the_files_read():
    assert [raycompat.footer_readers(n) for n in (1, 1024, 1025, 10_000, 10**6)] == [1, 1, 2, 10, 32]


# --------------------------------------------------------------- commit protocol: crash, resume


def _crash(args: list[str], env: dict, log: Path) -> None:
    """A CLI run that a kill-run fault SIGKILLs (driver, Ray daemons and workers at once)."""
    proc = start_cli(args, {**env, faults.KILL_ENV: "1"}, log)
    try:
        code = proc.wait(timeout=400)
    finally:
        kill_run(proc)
    assert code == -signal.SIGKILL, log.read_text()[-3000:]


def _parts(out: Path) -> set[str]:
    return {p.name for p in (out / "manifest").glob("*.parquet")} if (out / "manifest").exists() else set()


def test_crash_at_each_commit_point_then_resume(tmp_path, model_cache, ray_local):
    """Two crashed runs on one output, then one resume:
    (a) run 1 dies (all its processes, SIGKILL) after a video is stored and before the manifest part that
        records it;
    (b) in run 2 a writer process dies (os._exit) half-way through writing a manifest part; Ray restarts
        it and retries the batch;
    (c) then run 2's driver is SIGKILLed mid-run, and the Ray it started;
    the resume leaves every id with exactly one ok row and a whole, matching video."""
    spec = fast_spec()
    ids = [f"k-{i:02d}" for i in range(30)]
    ids.insert(3, "crash-here")
    table = write_prompts(tmp_path / "prompts.parquet", {"id": ids, "prompt": [f"a kite {i}" for i in ids]})
    out = tmp_path / "out"
    args = ["run", "--pipeline", str(write_spec(tmp_path / "spec.yaml", spec)), "--prompts", str(table),
            "--output", str(out)]
    env = cli_env(model_cache)

    # (a)
    _crash(args, {**env, faults.ENV: "point=after_video match=crash-here action=kill-run"}, tmp_path / "a.log")
    (video,) = (out / "videos").rglob("crash-here.*.mp4")  # content-addressed: <id>.<sha256[:32]>.mp4
    assert video.stat().st_size > 0
    rows_a = manifest(out)
    assert "crash-here" not in {r["id"] for r in rows_a}  # stored but not committed: it does not count

    # (b) and (c)
    before = _parts(out)
    state = tmp_path / "faults-state"
    rules = "point=mid_write match=*/manifest/part-* action=exit times=1"
    proc = start_cli(args, {**env, faults.ENV: rules, faults.STATE_ENV: str(state)}, tmp_path / "bc.log")
    try:
        deadline = time.monotonic() + 400
        while len(_parts(out) - before) < 3:
            assert proc.poll() is None, (tmp_path / "bc.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no manifest parts appeared"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone ...
    finally:
        kill_run(proc)  # ... then every process of the Ray it started (asserts that none survives)
    assert faults.fired(str(state)) == {0: 1}
    ((_, (part,)),) = faults.firings(str(state), 0)  # the manifest part the writer died half-way through
    # The SIGKILL of (c) may leave another writer's temp too; the one (b) left is half of its part ...
    (temp,) = [p for p in (out / "manifest").iterdir() if p.name.startswith(Path(part).name + ".tmp-")]
    assert temp.stat().st_size > 0
    with pytest.raises(Exception):
        pq.read_table(temp)  # ... partial; readers only list whole parts (assert_exactly_once)
    committed = {r["id"] for r in manifest(out) if r["status"] == "ok"}
    assert len(rows_a) + 2 <= len(committed) < len(ids)

    summary = runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=str(out)))
    assert summary.skipped_done == len(committed) and summary.ok == len(ids) - len(committed)
    rows = assert_exactly_once(out, set(ids))
    (resumed,) = [Path(r["video_uri"]) for r in rows if r["id"] == "crash-here"]
    assert resumed.name.startswith("crash-here.")  # the crashed run's object, or (other bytes) a new key ...
    compacted = CliRunner().invoke(app, ["compact", str(out), "--min-age-minutes", "0"])
    assert compacted.exit_code == 0, compacted.output
    assert_exactly_once(out, set(ids), orphans=False)  # ... and compaction deleted the orphan, if any
    assert video.exists() == (video == resumed)


def test_regenerating_an_id_never_changes_a_recorded_video(tmp_path, model_cache, ray_local):
    """`--no-resume` generates every id again. A nondeterministic kernel gives an id other bytes (here: one
    pixel perturbed, `point=frames action=perturb`); the run is SIGKILLed (all its processes) after that new
    video is stored and before its row. Every ok row, the first run's included, must still name an object
    with the bytes it recorded: the new bytes went to a new key. A run that completes then names
    objects whose bytes match their rows (the same key for the same bytes, a new key for other bytes: a batch
    of other rows can move pixels by one level), and compaction deletes the orphans, the perturbed one first."""
    spec = fast_spec()
    ids = [f"n-{i}" for i in range(5)] + ["victim"]
    table = write_prompts(tmp_path / "prompts.parquet", {"id": ids, "prompt": [f"a lantern {i}" for i in ids]})
    out = tmp_path / "out"
    first = runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=str(out)))
    assert (first.ok, first.error) == (len(ids), 0)
    original = {r["id"]: r for r in manifest(out)}

    args = ["run", "--pipeline", str(write_spec(tmp_path / "spec.yaml", spec)), "--prompts", str(table),
            "--output", str(out), "--no-resume"]
    rules = "point=frames match=victim action=perturb; point=after_video match=victim action=kill-run"
    _crash(args, {**cli_env(model_cache), faults.ENV: rules}, tmp_path / "crash.log")
    recorded = Path(original["victim"]["video_uri"])
    (perturbed,) = set((out / "videos").rglob("victim.*.mp4")) - {recorded}
    assert hashlib.sha256(perturbed.read_bytes()).hexdigest() != original["victim"]["sha256"]
    rows = assert_ok_rows_match_their_objects(out)  # the crash changed no recorded video, the first run's included
    assert [r["video_uri"] for r in rows if r["id"] == "victim"] == [str(recorded)]  # the new one: not recorded
    assert {r["video_uri"] for r in original.values()} <= {r["video_uri"] for r in rows}

    again = runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=str(out), resume=False))
    assert (again.ok, again.error) == (len(ids), 0)
    rows = assert_ok_rows_match_their_objects(out)
    assert len(rows) >= 2 * len(ids) and {r["id"] for r in rows} == set(ids)
    compacted = CliRunner().invoke(app, ["compact", str(out), "--min-age-minutes", "0"])
    assert compacted.exit_code == 0 and "0 unreferenced" not in compacted.output, compacted.output
    assert not perturbed.exists() and recorded.exists()
    assert set((out / "videos").rglob("*.mp4")) == {Path(r["video_uri"]) for r in assert_ok_rows_match_their_objects(out)}


# ------------------------------------------------------------------------------------- rounds


def test_rounds_bound_the_rows_of_one_execution():
    spec = fast_spec().with_overrides(round_rows=7)
    def rounds(todo, **run):
        return scheduler.rounds(RunSpec(pipeline=spec, prompts=["x"], output="y", **run), todo)
    assert [rounds(n) for n in (0, 1, 7, 8, 14, 15)] == [1, 1, 1, 2, 2, 3]
    assert rounds(100, limit=50) == 1  # --limit is a total, so one execution


def test_a_run_split_into_rounds_is_exactly_once_resumes_and_compacts(tmp_path, ray_local, caplog):
    """With execution.round_rows below the rows to do, the run is several Ray Data executions, each taking
    the ids whose key falls in it: duplicates, conflicts and bad rows land in exactly one round, and a
    resume over rounds skips what is done. With execution.keep_model_actors (the production spec's) the
    rounds share one generation actor: its model is loaded once per run, not once per round; and two
    rounds run at once (scheduler.round_events)."""
    ids = [f"r-{i:02d}" for i in range(10)]
    table = {"id": ids + ["r-01", "cx", "cx", "bad"],
             "prompt": [f"a round scene {i}" for i in ids] + ["a round scene r-01", "one", "other", ""]}
    write_prompts(tmp_path / "in" / "a.parquet", table)
    spec = fast_spec(batch_size=2).with_overrides(round_rows=7, keep_model_actors=True)
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"source": "null"})})  # no model load
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="latte_ray.scheduler"):  # the round scheduler says what it starts
        summary = runner.run(RunSpec(pipeline=spec, prompts=[str(tmp_path / "in")], output=str(out)))
    assert "round 2 of 2" in caplog.text  # 10 ids + 2 conflicting rows + 1 bad row = 13 rows to do
    # With the models kept, the rounds' executions overlap: the second starts before the first has ended.
    assert caplog.text.index("round 2 of 2 (") < caplog.text.index("round 1 of 2 committed"), caplog.text[-3000:]
    assert (summary.ok, summary.error, summary.duplicates) == (10, 3, 1)
    assert_exactly_once(out, set(ids), errors={"cx", *(r["id"] for r in manifest(out) if "empty" in (r["error"] or ""))})
    lives = {(r["actor"], r["actor_started_at"]) for r in manifest(out) if r["status"] == "ok"}
    assert len(lives) == 1 and None not in next(iter(lives)), lives  # both rounds: one actor, one model load

    write_prompts(tmp_path / "in" / "b.parquet", {"id": ["r-10", "r-11"], "prompt": ["new one", "new two"]})
    again = runner.run(RunSpec(pipeline=spec, prompts=[str(tmp_path / "in")], output=str(out),
                               retry_errors=False))
    assert (again.ok, again.error) == (2, 0) and again.skipped_done >= 13
    errors = {"cx", *(r["id"] for r in manifest(out) if "empty" in (r["error"] or ""))}
    assert_exactly_once(out, set(ids) | {"r-10", "r-11"}, errors=errors)

    # Compacted, the manifest is one part and still the record: a third run has nothing to do.
    compacted = CliRunner().invoke(app, ["compact", str(out), "--min-age-minutes", "0"])
    assert compacted.exit_code == 0, compacted.output
    assert [p.name.startswith("part-compact-") for p in (out / "manifest").iterdir()] == [True]
    assert_exactly_once(out, set(ids) | {"r-10", "r-11"}, errors=errors)
    third = runner.run(RunSpec(pipeline=spec, prompts=[str(tmp_path / "in")], output=str(out), retry_errors=False))
    assert (third.ok, third.error) == (0, 0)
