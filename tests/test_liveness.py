"""A run never hangs silently: plans fit the cluster or are refused in one line, a progress watchdog stops
a stalled run (exit 3), a hung generation call ends its own worker and its row becomes an error row, an
execution lost to a dead actor is re-planned. (The embedded default starting its own Ray beside another
one: tests/test_wheel.py's demo test.)

Everything runs on this machine's real size: the session's local Ray has the machine's CPUs (2 here).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from latte_ray import runner
from latte_ray.cli import app
from latte_ray.faults import injection as faults
from latte_ray.faults.crashes import MAX_CRASHES, CrashLedger, crash_message
from latte_ray.faults.deadline import batch_deadline
from latte_ray.faults.watchdog import RunStalled, Watchdog, stall_timeouts
from latte_ray.plan import fit
from latte_ray.errors import PlanDoesNotFit
from latte_ray.spec import RunSpec, load_pipeline_spec
from tests.conftest import write_prompts
from tests.invariants import assert_exactly_once, fast_spec, manifest, write_spec

def _with(spec, model: dict | None = None, **execution):
    """A copy of `spec` with model and execution fields replaced (None allowed, unlike with_overrides)."""
    if model:
        spec = spec.model_copy(update={"model": spec.model.model_copy(update=model)})
    return spec.model_copy(update={"execution": spec.execution.model_copy(update=execution)})


def null_spec(**execution):
    """fast_spec with the null engine (frames returned at once, no model load): the control plane alone."""
    return _with(fast_spec(batch_size=2), {"source": "null"}, **execution)


@contextmanager
def fault_rules(faults_file: Path, rules: str):
    """Rules for every Ray worker of the session (conftest.faults_file); their firing state is fresh."""
    state = Path(f"{faults_file}.state")
    shutil.rmtree(state, ignore_errors=True)
    faults_file.write_text(rules)
    try:
        yield state
    finally:
        faults_file.write_text("")


def _table(tmp: Path, ids: list[str]) -> Path:
    return write_prompts(tmp / "prompts.parquet", {"id": ids, "prompt": [f"a scene {i}" for i in ids]})


# ----------------------------------------------------------------------------- defaults and plan sizes


def test_default_stall_timeouts_and_batch_deadlines():
    tiny, prod = load_pipeline_spec("tiny-cpu"), load_pipeline_spec("latte-1-t2v-512")
    # (start-up, steady): steady = max(600, 10 x seconds_per_video x batch); start-up adds load (+ compile)
    assert stall_timeouts(tiny) == (720.0, 600.0)
    assert stall_timeouts(prod) == (2700.0, 600.0)  # 600 + 1200 model load + 900 compile warm-up
    assert batch_deadline(tiny, 2) == 120.0 and batch_deadline(prod, 2) == pytest.approx(292.0)
    assert stall_timeouts(_with(tiny, stall_timeout_s=None)) is None
    assert stall_timeouts(_with(tiny, stall_timeout_s=30.0)) == (150.0, 30.0)  # + the tiny model load
    assert batch_deadline(_with(prod, batch_deadline_s=None), 2) is None
    with pytest.raises(Exception, match="positive number of seconds"):
        tiny.with_overrides(stall_timeout_s=-1)


@pytest.mark.parametrize("name", ["tiny-cpu", "tiny-cpu-lossless", "latte-1-t2v-512"])
def test_the_plan_fits_a_node_with_one_cpu_beyond_a_generation_actors_share(name):
    spec = load_pipeline_spec(name)
    ex = spec.execution
    node = {"CPU": ex.num_cpus_per_actor + 1, "GPU": ex.num_gpus_per_actor}
    assert fit.pack(fit.plan_minimum(spec), [node]) == []
    fit.check_fit(spec, nodes=[node], scaler=fit.Autoscaler(False, "none"))
    if not ex.num_gpus_per_actor:  # a head that runs no work and two 1-CPU workers (tests/test_nodes.py)
        assert fit.pack(fit.plan_minimum(spec), [{"CPU": 0}, {"CPU": 1}, {"CPU": 1}]) == []


def test_a_refusal_names_the_numbers_and_the_fix():
    gpu_pool = _with(load_pipeline_spec("latte-1-t2v-512"), concurrency=(4, 8))
    none = fit.Autoscaler(False, "no autoscaler found")
    with pytest.raises(PlanDoesNotFit) as one_gpu:
        fit.check_fit(gpu_pool, nodes=[{"CPU": 16, "GPU": 1}], scaler=none)
    message = str(one_gpu.value)
    assert "needs at least 8.75 CPU and 4 GPU" in message and "16 CPU and 1 GPU" in message
    assert "3 generation actors x (2 CPU, 1 GPU)" in message  # what does not fit
    assert "--concurrency 1,8" in message and "\n" not in message
    # An autoscaler that can reach the GPUs: logged, not refused; one whose limit is too low: refused.
    fit.check_fit(gpu_pool, nodes=[{"CPU": 16, "GPU": 1}], scaler=fit.Autoscaler(True, "test", {"GPU": 16}))
    with pytest.raises(PlanDoesNotFit, match="the autoscaler's limit is GPU 2"):
        fit.check_fit(gpu_pool, nodes=[{"CPU": 16, "GPU": 1}], scaler=fit.Autoscaler(True, "test", {"GPU": 2}))
    cpu_hungry = _with(fast_spec(), num_cpus_per_actor=4.0)
    with pytest.raises(PlanDoesNotFit, match="lower execution.num_cpus_per_actor"):
        fit.check_fit(cpu_hungry, nodes=[{"CPU": 2}], scaler=none)


# ------------------------------------------------------------------ the real cluster of this machine


def test_no_autoscaler_is_found_on_a_plain_local_ray(ray_local, monkeypatch):
    monkeypatch.delenv(fit.AUTOSCALER_ENV, raising=False)
    assert fit.autoscaler().present is False
    monkeypatch.setenv(fit.AUTOSCALER_ENV, "1")
    assert fit.autoscaler().present is True


@pytest.mark.parametrize("pipeline, expected", [
    ("cuda", "run it on a cluster with GPU nodes"),  # latte-1-t2v-512's device and placement, the tiny model
    ("gpu-pool", "4 generation actors x (0.5 CPU, 1 GPU)"),  # concurrency [4, 8], 1 GPU each
])
def test_a_plan_this_cluster_cannot_run_is_refused_in_one_line(ray_local, tmp_path, monkeypatch, caplog,
                                                                 pipeline, expected):
    monkeypatch.delenv(fit.AUTOSCALER_ENV, raising=False)
    if pipeline == "gpu-pool":
        pipeline = str(write_spec(tmp_path / "gpu.yaml", _with(fast_spec(), concurrency=(4, 8),
                                                                 num_gpus_per_actor=1.0)))
    else:  # the production spec's device and execution section; the tiny model (no hub here)
        production = load_pipeline_spec("latte-1-t2v-512")
        spec = _with(fast_spec(), {"device": "cuda"}, **production.execution.model_dump())
        pipeline = str(write_spec(tmp_path / "cuda.yaml", spec))
    table = _table(tmp_path, ["a", "b"])
    args = ["run", "--pipeline", pipeline, "--prompts", str(table), "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: the plan cannot run on this cluster:") and expected in line
    assert "0 GPU in all" in line and "no autoscaler found" in line
    assert not (tmp_path / "out" / "manifest").exists()  # refused before any actor started
    # With an autoscaler that can add GPU nodes it would wait for them instead (and the watchdog covers it).
    monkeypatch.setenv(fit.AUTOSCALER_ENV, "1")
    with caplog.at_level("WARNING", logger="latte_ray.plan.fit"):
        fit.check_fit(load_pipeline_spec("latte-1-t2v-512"))
    assert "An autoscaler can add nodes" in caplog.text


def test_task_operators_fit_beside_actors_that_hold_all_but_a_quarter_cpu(ray_local, tmp_path):
    """Ray Data's file listing and streaming repartition ask for a whole CPU unless capped (plan/fit.py);
    with the actor pools holding all but a quarter of the CPUs they would never be scheduled."""
    import ray
    from ray.data import DataContext

    cpus = ray.cluster_resources()["CPU"]
    hold = ray.remote(num_cpus=cpus - 0.25)(type("Holder", (), {"ready": lambda self: True})).remote()
    ray.get(hold.ready.remote(), timeout=300)
    ctx = DataContext.get_current()
    saved = ctx.execution_no_progress_timeout_s
    ctx.execution_no_progress_timeout_s = 120  # a hang fails the test instead of blocking it
    try:
        fit.use_task_cpu_cap(0.25)
        table = _table(tmp_path, [f"t{i}" for i in range(6)])
        ds = ray.data.read_parquet(str(table), num_cpus=0.25).repartition(target_num_rows_per_block=2)
        assert sorted(r["id"] for r in ds.take_all()) == [f"t{i}" for i in range(6)]
    finally:
        ctx.execution_no_progress_timeout_s = saved
        ray.kill(hold)


# ----------------------------------------------------------------------------------- the watchdog


def test_the_watchdog_diagnoses_then_interrupts_a_run_that_makes_no_progress(caplog):
    blocked = threading.Event()
    handler = signal.getsignal(signal.SIGINT)
    with caplog.at_level("WARNING", logger="latte_ray.faults.watchdog"):
        with pytest.raises(KeyboardInterrupt):
            with Watchdog((1.0, 1.0), diagnose=lambda: ["operator Stuck: queued 3, active 0",
                                                        "waiting for resources: {'CPU': 1.0} x1"]) as dog:
                dog.phase("round 1 of 1")
                blocked.wait(60)  # a blocking wait, like the driver waiting on Ray
    assert "no manifest row committed for" in caplog.text and "operator Stuck: queued 3" in caplog.text
    assert dog.reason.startswith("run stalled: no manifest row committed for")
    assert "phase 'round 1 of 1'" in dog.reason and "waiting for resources: {'CPU': 1.0} x1" in dog.reason
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_a_run_stalled_in_generation_fails_with_exit_3_and_a_diagnosis(ray_local, faults_file, tmp_path, caplog):
    spec = null_spec(stall_timeout_s=5.0, batch_deadline_s=None)
    table = _table(tmp_path, ["s-0", "s-1", "stuck", "s-3"])
    args = ["run", "--pipeline", str(write_spec(tmp_path / "spec.yaml", spec)), "--prompts", str(table),
            "--output", str(tmp_path / "out")]
    started = time.monotonic()
    with fault_rules(faults_file, "point=generate match=stuck action=hang"), \
            caplog.at_level("WARNING", logger="latte_ray.faults.watchdog"):
        result = CliRunner().invoke(app, args)
    print(f"stall noticed and the run stopped after {time.monotonic() - started:.0f} s")
    assert result.exit_code == 3, result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert "run stalled: no manifest row committed for" in line and "resume with the same command" in line
    assert "operator MapBatches(DenoiseStage): queued" in caplog.text  # the diagnosis names the operators
    assert "actors running 1" in caplog.text
    # The stopped execution's actors are gone, the hung one included (what a retry needs).
    import ray

    job = ray.get_runtime_context().get_job_id()
    deadline = time.monotonic() + 120
    while [a for a in ray._private.state.state.actor_table(None).values()
           if a["JobID"] == job and "MapWorker" in a["ActorClassName"] and a["State"] != "DEAD"]:
        assert time.monotonic() < deadline, "the stalled execution's actors are still alive"
        time.sleep(0.5)


def test_a_stalled_pre_pass_is_stopped_too(ray_local, faults_file, tmp_path):
    spec = null_spec(stall_timeout_s=5.0)
    table = _table(tmp_path, ["p-0", "p-1"])
    with fault_rules(faults_file, "point=scan action=hang times=1") as state:
        with pytest.raises(RunStalled, match="phase 'pre-pass"):
            runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=str(tmp_path / "out")))
        ((pid, _),) = faults.firings(str(state), 0)
        os.kill(pid, signal.SIGKILL)  # the hung scan task's worker: free its CPU


# ----------------------------------------------------------------- batch deadlines and lost actors


def test_the_crash_ledger_is_the_runs_own_and_says_why_a_row_was_given_up(tmp_path):
    row = ["x", "#row"]
    ledger = CrashLedger("run-1", root=tmp_path)
    for _ in range(MAX_CRASHES):
        ledger.begin(row)
        ledger.note(row, "ran past its 30 s deadline")  # then the process ends itself
    died = ledger.begin(row)
    assert crash_message(died, ledger.reasons(row)) == (
        "generation ran past its 30 s deadline 2 times; not tried again in this run")
    assert crash_message(2, []).startswith("generation killed its worker process 2 times (a crash or out of memory)")
    assert CrashLedger("run-2", root=tmp_path).begin(row) == 0  # a killed earlier run's counts are not ours
    ledger.end(row)
    assert ledger.begin(row) == 0 and ledger.reasons(row) == []


def test_a_batch_of_one_whose_worker_died_once_is_tried_again():
    """A batch of one and its row have separate ledger entries: one death is one death, not two."""
    from latte_ray.stages.denoise import DenoiseStage

    run_id = f"test-{uuid.uuid4().hex}"
    stage = DenoiseStage(null_spec(batch_size=1).model_dump_json(), run_id=run_id)
    batch = {"id": np.array(["solo"], object), "prompt": np.array(["a"], object),
             "negative_prompt": np.array([""], object), "seed": np.array([1]),
             "status": np.array(["pending"], object), "error": np.array([""], object)}
    CrashLedger(run_id).begin(["solo"])  # an earlier attempt at this batch died with its process
    out = stage(batch)
    assert list(out["status"]) == ["generated"], out["error"]


def test_a_hung_generation_call_ends_its_worker_and_its_row_becomes_an_error_row(ray_local, faults_file, tmp_path):
    spec = null_spec(batch_deadline_s=3.0)
    ids = ["d-0", "d-1", "hangs", "d-3", "d-4"]
    started = time.monotonic()
    with fault_rules(faults_file, "point=generate match=hangs action=hang"):
        summary = runner.run(RunSpec(pipeline=spec, prompts=[str(_table(tmp_path, ids))],
                                     output=str(tmp_path / "out")))
    print(f"a hung row handled (3 deadlines, 3 restarts) in {time.monotonic() - started:.0f} s")
    assert (summary.ok, summary.error) == (4, 1)
    (row,) = [r for r in manifest(tmp_path / "out") if r["id"] == "hangs"]
    assert row["error"] == f"generation ran past its 3 s deadline {MAX_CRASHES} times; not tried again in this run"
    assert_exactly_once(tmp_path / "out", set(ids) - {"hangs"}, errors={"hangs"})


@pytest.mark.parametrize("kept", [False, True], ids=["pooled", "kept-servers"])
def test_an_actor_that_ray_will_not_restart_is_replaced(ray_local, faults_file, tmp_path, caplog, kept):
    """With execution.max_restarts 0 Ray does not restart a dead actor. Pooled: the execution fails and the
    runner re-plans from the manifest (committed ids skipped) and finishes by itself, exactly once. `kept`:
    the actor that dies is a generation server kept for the run (execution.keep_model_actors); the broker
    starts a new server in its place, the lost batch takes the new server's slot, and the execution goes
    on (no re-plan): two servers made the run's videos, each exactly once."""
    spec = null_spec(max_restarts=0, keep_model_actors=kept)
    ids = [f"r-{i}" for i in range(8)]
    started = time.time()
    with fault_rules(faults_file, "point=denoise match=r-5 action=exit times=1") as state, \
            caplog.at_level("WARNING", logger="latte_ray.scheduler"):
        summary = runner.run(RunSpec(pipeline=spec, prompts=[str(_table(tmp_path, ids))],
                                     output=str(tmp_path / "out")))
        assert faults.fired(str(state)) == {0: 1}
    assert (summary.ok, summary.error) == (8, 0)
    rows = assert_exactly_once(tmp_path / "out", set(ids))
    if kept:
        import ray

        assert "re-planning" not in caplog.text, caplog.text[-3000:]
        servers = {a["ActorID"] for a in ray._private.state.state.actor_table(None).values()
                   if a["ActorClassName"].endswith("GenerationServer") and a["StartTime"] / 1000 >= started}
        assert len(servers) == 2 and {r["actor"] for r in rows} <= servers  # the one that died; its replacement
    else:
        assert "re-planning from the manifest (1 of at most 3)" in caplog.text, caplog.text[-3000:]
