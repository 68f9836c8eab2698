"""Chaos: over a hundred prompts on the tiny model while stage actors are SIGKILLed at random, storage
fails transiently (injected), and the driver is SIGKILLed once; then a resume (storage still flaky).
Afterwards every id has exactly one ok row whose video exists with the recorded size and sha256."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

from latte_ray import runner
from latte_ray.faults import injection as faults
from latte_ray.spec import RunSpec
from tests.conftest import write_prompts
from tests.invariants import assert_exactly_once, cli_env, fast_spec, kill_run, manifest, start_cli, write_spec

PROMPTS = 120
ACTOR_KILLS = 3
STORAGE_FAULTS = (  # transient: each write is retried with backoff (latte_ray/faults/retry.py)
    "point=write match=*/videos/* action=oserror times=3\n"  # the first three video writes fail
    "point=write match=*/videos/* action=oserror p=0.05 times=15\n"  # then one in twenty, at random
    "point=write match=*/manifest/* action=oserror p=0.2 times=6\n"
)


def _stage_actors(session: int) -> list[int]:
    """Ray Data's stage actors (prepare, denoise, encode, write) of one run's session."""
    pids = []
    for pid in faults.session_pids(session):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::MapWorker("):
                    pids.append(pid)
        except OSError:
            continue
    return pids


def _committed_parts(out: Path) -> int:
    return len(list((out / "manifest").glob("*.parquet"))) if (out / "manifest").exists() else 0


def test_chaos_then_resume_is_exactly_once(tmp_path, model_cache, ray_local, faults_file):
    seed = int(os.environ.get("LATTE_RAY_CHAOS_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    spec = fast_spec(batch_size=4, concurrency=2)
    ids = [f"ch-{i:03d}" for i in range(PROMPTS)]
    table = write_prompts(tmp_path / "prompts.parquet", {"id": ids, "prompt": [f"chaos scene {i}" for i in ids]})
    out = tmp_path / "out"
    args = ["run", "--pipeline", str(write_spec(tmp_path / "spec.yaml", spec)), "--prompts", str(table),
            "--output", str(out)]
    state = tmp_path / "faults-state"
    log = tmp_path / "chaos.log"
    proc = start_cli(args, cli_env(model_cache, **{faults.ENV: STORAGE_FAULTS, faults.STATE_ENV: str(state)}), log)
    killed: list[int] = []
    context = f"(LATTE_RAY_CHAOS_SEED={seed}; log {log})"
    try:
        deadline = time.monotonic() + 300
        progress = 0
        while True:
            assert proc.poll() is None, f"the run ended before the driver was killed {context}"
            assert time.monotonic() < deadline, f"the run stopped making progress {context}"
            parts = _committed_parts(out)
            done = sum(1 for r in manifest(out) if r["status"] == "ok") if parts else 0
            if len(killed) == ACTOR_KILLS or done >= PROMPTS // 2:
                break
            # The pipeline is moving (again): a part was committed since the last kill. Kill one stage actor at
            # random, at once: parts come in bursts (a write retried with backoff, then the queue behind it),
            # and half the run can be committed within one second.
            if parts > progress:
                actors = _stage_actors(proc.pid)
                if actors:
                    victim = rng.choice(actors)
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
                    progress = parts
            time.sleep(rng.uniform(0.1, 0.5))
        os.kill(proc.pid, signal.SIGKILL)  # the driver, once
    finally:
        kill_run(proc)
    assert len(killed) >= 2, f"too few actor kills before half the run was done {context}"
    committed = {r["id"] for r in manifest(out) if r["status"] == "ok"}
    assert committed and len(committed) < PROMPTS, context
    first_faults = sum(faults.fired(str(state)).values())

    resume_state = Path(f"{faults_file}.state")
    shutil.rmtree(resume_state, ignore_errors=True)
    faults_file.write_text(STORAGE_FAULTS)
    try:
        summary = runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=str(out)))
    finally:
        faults_file.write_text("")
    resume_faults = sum(faults.fired(str(resume_state)).values())
    shutil.rmtree(resume_state, ignore_errors=True)

    assert summary.skipped_done == len(committed) and summary.ok == PROMPTS - len(committed), context
    assert summary.error == 0, summary.errors
    assert first_faults > 0 and resume_faults > 0, (first_faults, resume_faults)
    assert_exactly_once(out, set(ids))
    # Videos stored by attempts that died before their rows are orphans (never overwritten: keys hold the
    # video's hash); compaction deletes every one, and nothing recorded.
    from latte_ray.record.compact import compact

    compact(str(out), min_age_s=0)
    assert_exactly_once(out, set(ids), orphans=False)
