"""Build the Ray Data plan for a RunSpec and run it.

    read Parquet -> prepare (CPU) -> [text_encode (actors)] -> denoise (GPU actor pool) -> encode (CPU)
    -> write (CPU) -> the driver iterates manifest rows to count them (it never holds the table)

Everything that can fail on bad input (specs, table schemas, output location and binding, model configs,
video settings) is checked in the driver before Ray starts (`preflight`), so a malformed run costs no GPU
time. An error that only an actor can hit ends the run with its root cause in one line (RunFailed).
Every run leaves its own record, OUTPUT/runs/<run_id>.json (latte_ray/record/output.py).
"""

from __future__ import annotations

import ctypes
import logging
import platform
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from latte_ray.faults.rootcause import RunFailed, damage_in, describe, no_space_in
from latte_ray.faults.watchdog import RunStalled
from latte_ray.plan.prompts import inspect_prompt_tables, resolve_prompt_files
from latte_ray.record import lease as leases
from latte_ray.record import output as outputs
from latte_ray.record.storage import is_local
from latte_ray.spec import RunSpec, SpecError, pool_bounds
from latte_ray.versions import provenance

log = logging.getLogger(__name__)

_VERSIONED = ["torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec", "s3fs", "av", "pydantic"]


@dataclass
class RunSummary:
    output: str
    ok: int = 0
    error: int = 0
    skipped_done: int = 0
    regenerated: int = 0  # ok ids made again because their recorded video was missing or damaged
    duplicates: int = 0  # extra copies of identical input rows, generated once
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    run_id: str = ""  # its record: OUTPUT/runs/<run_id>.json
    videos: list[str] = field(default_factory=list)  # the first few videos this run wrote (their URIs)
    log: str | None = None  # the run's log file (OUTPUT/runs/<run_id>.log) when a Console captured it

    @property
    def videos_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (
            f"latte-ray: {self.ok} ok, {self.error} error, {self.skipped_done} already done"
            f"{f' ({self.regenerated} recorded videos missing or damaged were made again)' if self.regenerated else ''}"
            f"{f', {self.duplicates} duplicate rows skipped' if self.duplicates else ''}; "
            f"{self.seconds:.1f}s ({self.videos_per_second:.2f} videos/s) -> {self.output}"
        )


def package_versions() -> dict[str, str | None]:
    versions = provenance()  # latte-ray's version, and its git commit when run from a checkout (else None)
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def run_record(run: RunSpec, files: list[str], started: datetime) -> dict:
    """What OUTPUT/runs/<run_id>.json holds: enough to reproduce the run, and no credentials (the storage
    options' keys only). record/output.RunLog adds the run id, the outcome and the end."""
    return {
        "started_at": started.isoformat(),
        "pipeline": run.pipeline.model_dump(mode="json"),
        "spec_hash": run.pipeline.spec_hash(),
        "prompts": run.prompts,
        "prompt_files": len(files),
        "output": run.output,
        "seed": run.seed,
        "resume": run.resume,
        "retry_errors": run.retry_errors,
        "limit": run.limit,
        "storage_option_keys": sorted(run.storage_options),
        # Scores are not in spec_hash (they never change a video): the scorer is recorded on its own.
        "scoring_hash": run.pipeline.scoring.scoring_hash() if run.pipeline.scoring.enabled else None,
        "versions": package_versions(),
        "host": platform.node(),
    }


def init_ray() -> None:
    """Join the cluster this runs in (RAY_ADDRESS, `ray job submit`), or start a private local Ray.

    Without RAY_ADDRESS the embedded default always starts its own Ray (`address="local"`), whatever else
    runs on the machine: another `ray start --head`, or a stale `ray_current_cluster` file left by one that
    died, would otherwise be joined (and `num_cpus` refused). It gets the machine's real CPUs, as Ray
    detects them: the plan fits a node with one CPU beyond a generation actor's share (plan/fit.py), so no
    extra logical CPUs are needed.
    """
    import os

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        return
    ray.init(address="local", logging_level=logging.WARNING)


def _arrow_filesystem(fs):
    if is_local(fs):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def read_input(run: RunSpec, in_fs, files: list[str]):
    """The input tables as a Ray Data dataset, with each row's file and a deterministic row hash (the
    pre-pass and the main pass read through this one function so that their row hashes agree)."""
    import ray

    return ray.data.read_parquet(
        files, filesystem=_arrow_filesystem(in_fs), include_paths=True, include_row_hash=True,
        num_cpus=run.pipeline.execution.num_cpus_per_cpu_task,
    )


def build_plan(run: RunSpec, in_fs, files: list[str], work=None, run_id: str = "",
               round_of: tuple[int, int] | None = None, fence: dict | None = None, servers=None,
               executions: int = 1):
    """The Ray Data dataset whose rows are the manifest rows of this run (`work`: a workplan.WorkPlan;
    when none of its rows needs a model, only error rows are written and no generation actor starts;
    `round_of`: (k, rounds) to take on only the ids of round k, see `rounds`; `servers`: the run's
    stages/servers.ModelServers when the models live for the whole run, execution.keep_model_actors;
    `executions`: how many of the run's executions are under way at once, which share the CPU stages' most
    actors)."""
    import ray
    import pyarrow.parquet as pq  # noqa: F401  (pyarrow must be importable on workers)

    from latte_ray.plan.fit import initial_pool_size
    from latte_ray.stages import DenoiseStage, EncodeStage, WriteStage
    from latte_ray.stages.prepare import prepare_batch

    spec = run.pipeline
    ex = spec.execution
    spec_json = spec.model_dump_json()
    # Encode and write are small autoscaling actor pools (encoders and writers keep their state between
    # batches); the prepare stage runs inside the read tasks (stages/prepare.py says why). Two executions
    # under way (overlapping rounds) share cpu_stage_max_actors: one whose pools had grown onto every spare
    # CPU left the next none to start on (its reads and first actors waited for the last one's end).
    cpu_pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, ex.cpu_stage_max_actors // executions))
    ds = read_input(run, in_fs, files)
    ds = ds.map_batches(
        prepare_batch,
        fn_kwargs={
            "default_negative": spec.sampling.negative_prompt, "run_seed": run.seed,
            **(work.refs if work is not None else {}), "round_of": round_of,
            "without_id": work.without_id if work is not None else None,
        },
        batch_format="pyarrow",
        num_cpus=ex.num_cpus_per_cpu_task,
    )
    if run.limit:
        ds = ds.limit(run.limit)
    if work is not None and not work.generate:
        return ds.map_batches(
            WriteStage,
            fn_constructor_kwargs={"output_url": run.output, "spec_json": spec_json,
                                   "storage_options": run.storage_options, "run_id": run_id, "fence": fence},
            batch_format="numpy", compute=cpu_pool, num_cpus=ex.num_cpus_per_cpu_task,
        )
    # Small blocks, one generation batch each, so every actor in the pool gets work.
    ds = ds.repartition(target_num_rows_per_block=ex.batch_size)
    if ex.text_encode_stage:
        from latte_ray.stages.text_encode import TextEncodeStage

        ds = ds.map_batches(
            TextEncodeStage,
            fn_constructor_kwargs={"spec_json": spec_json, "cache_dir": run.cache_dir,
                                   "storage_options": run.storage_options},
            batch_size=ex.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=ex.num_cpus_per_actor, num_gpus=ex.num_gpus_per_actor,
            **restart_args(ex),
        )
    lo, hi = pool_bounds(ex.concurrency)
    if servers is not None:  # thin clients of the run's generation servers, which hold the GPUs and models
        from latte_ray.stages.denoise_client import DenoiseClient
        from latte_ray.stages.servers import client_pool

        # A fixed pool of a few clients, each running several batches at once (one thread each), with room
        # for two batches per server the pool may reach: a batch takes a free slot of whichever server
        # has one (stages/servers.py), so servers that join mid-round are fed without a new client.
        clients, in_flight = client_pool(spec)
        pool = ray.data.ActorPoolStrategy(size=clients, max_tasks_in_flight_per_actor=in_flight,
                                          max_concurrent_calls_per_actor=in_flight, enable_true_multi_threading=True)
        ds = ds.map_batches(DenoiseClient, fn_constructor_kwargs={"broker": servers.broker,
                                                                  "order": round_of[0] if round_of else 0},
                            batch_size=ex.batch_size, batch_format="numpy", compute=pool, num_cpus=0)
    else:
        ds = ds.map_batches(
            DenoiseStage,
            fn_constructor_kwargs={"spec_json": spec_json, "cache_dir": run.cache_dir,
                                   "storage_options": run.storage_options, "run_id": run_id},
            batch_size=ex.batch_size,
            batch_format="numpy",
            # Every actor the cluster can hold starts at once (plan/fit.initial_pool_size says why).
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, initial_size=initial_pool_size(spec)),
            num_cpus=ex.num_cpus_per_actor,
            num_gpus=ex.num_gpus_per_actor,
            **restart_args(ex),
        )
    ds = ds.map_batches(
        EncodeStage, fn_constructor_kwargs={"video_spec_json": spec.video.model_dump_json()},
        batch_format="numpy", compute=cpu_pool, num_cpus=ex.num_cpus_per_cpu_task,
    )
    if spec.scoring.enabled:  # scores go into the manifest rows this run commits (latte_ray/record/scores.py)
        from latte_ray.stages.score import add_scoring_stages

        ds = add_scoring_stages(ds, spec.scoring, cpu_pool, ex.num_cpus_per_cpu_task, run.cache_dir,
                                run.storage_options)
    ds = ds.map_batches(
        WriteStage,
        fn_constructor_kwargs={"output_url": run.output, "spec_json": spec_json,
                               "storage_options": run.storage_options, "run_id": run_id, "fence": fence},
        batch_format="numpy", compute=cpu_pool, num_cpus=ex.num_cpus_per_cpu_task,
    )
    return ds


def rounds(run: RunSpec, todo: int) -> int:
    """How many Ray Data executions a run of `todo` rows is split into.

    For the whole of one execution, Ray Data's driver keeps per-block bookkeeping (a BlockStats per block
    per operator, task records): measured at about 10 KB per block, so 1.3 GB for a million prompts at
    batch 8 (benchmarks/README.md). Rounds of at most `execution.round_rows` rows, each a fresh execution
    taking the ids whose key falls in it, bound that. With `execution.keep_model_actors` the rounds share
    the run's generation servers (stages/servers.py) and two of them overlap (`_round_events`); without,
    each round loads the model again. A `--limit` run is one round (the limit is a total)."""
    if run.limit:
        return 1
    return max(1, -(-todo // run.pipeline.execution.round_rows))


def restart_args(ex) -> dict:
    """Actor restart options for the model stages. Ray Data's own default for actor pools is what we want
    (restart without limit, retry the batch; a row that keeps killing its actor is stopped by
    crashes.CrashLedger), and passing it through `**ray_remote_args` is deprecated, so only a
    non-default `execution.max_restarts` is passed on."""
    if ex.max_restarts == -1:
        return {}
    return {"max_restarts": ex.max_restarts, "max_task_retries": -1 if ex.max_restarts else 0}


@dataclass
class Preflight:
    """What the driver-side checks found: the output (checked, not yet bound) and the input tables."""

    output: outputs.Output
    in_fs: object
    files: list[str]
    without_id: list[str]
    model: str  # a line describing the model source
    model_identity: dict | None = None  # what the source resolved to (model/configs.py ModelConfigs.identity)


def preflight(run: RunSpec, tables: bool = True) -> Preflight:
    """Every check that needs neither Ray nor model weights, in the driver, cheapest first; SpecError (one
    line, exit 2) names the option, field, path or URL. Writes nothing but a probe it deletes again.
    `tables=False` leaves out the prompt tables (synth checks the rest before it writes its table)."""
    from latte_ray.model.configs import check_model
    from latte_ray.plan.preflight import check_output_location, check_urls
    from latte_ray.stages.encode import check_video_settings

    check_urls(run)
    check_output_location(run)
    in_fs, files, without_id = None, [], []
    if tables:
        in_fs, files = resolve_prompt_files(run.prompts, run.storage_options)
        _, without_id = inspect_prompt_tables(in_fs, files)
    sampling = run.pipeline.sampling
    check_video_settings(run.pipeline.video, sampling.height, sampling.width)
    out = outputs.open_output(run.output, run.storage_options)
    outputs.check_binding(out, run.pipeline, run.seed)
    outputs.probe_writable(out)
    if run.pipeline.model.quantization is not None:
        from latte_ray.model.quantize import check_before_run

        check_before_run(run.pipeline.model)  # float8 on a machine without float8 GPUs: refused here
    model, identity = check_model(run.pipeline, run.storage_options)
    outputs.check_model_identity(out, identity)  # the same source resolving to other weights: refused
    if run.pipeline.scoring.enabled:
        from latte_ray.model.clip import check_sources

        check_sources(run.pipeline.scoring, run.storage_options)
    return Preflight(output=out, in_fs=in_fs, files=files, without_id=without_id, model=model,
                     model_identity=identity)


SHOWN_VIDEOS = 3  # videos a summary names


def run(run: RunSpec, lease: leases.Policy | leases.Lease | None = None, command: str = "run",
        run_id: str | None = None, console=None) -> RunSummary:
    """Check, take the output's lease (`lease`: a Policy, default take it and refuse if held; or a Lease the
    caller already holds, as synth does), then generate. `command` names the CLI command in the lease.
    `console` (latte_ray.console.Console, the CLI's): what will run, the progress line and the run's log
    file; without one (library use) nothing is printed but the log records."""
    started_wall = datetime.now(timezone.utc)
    started = time.perf_counter()
    checked = preflight(run)
    in_fs, files, out = checked.in_fs, checked.files, checked.output
    log.info("checked: %s", checked.model)
    run_id = run_id or outputs.new_run_id(started_wall)
    if isinstance(lease, leases.Lease):
        return _run_holding(run, checked, run_id, started_wall, started, lease, console)
    # Before Ray or any model starts: a second writer is refused here, in one line (record/lease.py).
    terms = leases.Terms.of(run.pipeline.execution)
    with leases.hold_output(out, run_id, command, terms, lease or leases.Policy()) as held:
        return _run_holding(run, checked, run_id, started_wall, started, held, console)


def _run_holding(run: RunSpec, checked: Preflight, run_id: str, started_wall: datetime, started: float,
                 held: leases.Lease | None, console=None) -> RunSummary:
    in_fs, files, out = checked.in_fs, checked.files, checked.output
    init_ray()
    from latte_ray.plan.fit import check_fit, use_task_cpu_cap

    use_task_cpu_cap(run.pipeline.execution.num_cpus_per_cpu_task)
    check_fit(run.pipeline)  # before any actor starts: refuse a plan this cluster can never schedule
    if held is not None:
        held.check()
    # Every check has passed: bind the output to this spec (first run only) and open this run's record.
    outputs.bind(out, run.pipeline, run.seed, package_versions().get("latte-ray", "unknown"),
                 model_identity=checked.model_identity)
    record = {**run_record(run, files, started_wall), "model_identity": checked.model_identity}
    record["lease"] = held.generation if held is not None else None
    if console is not None and console.log_local is not None:
        log_path, log_url = f"{out.layout.runs_dir}/{run_id}.log", f"{out.layout.url}/runs/{run_id}.log"
        console.attach_log(out.fs, log_path, log_url)
        record["log"] = log_url
    history = outputs.RunLog(out, run_id, record)
    history.start()
    if run.pipeline.scoring.enabled:  # what made this output's scores (latte_ray/record/scores.py)
        from latte_ray.record.scores import write_scoring_record

        write_scoring_record(out.fs, out.layout, run.pipeline.scoring)
    summary = RunSummary(output=run.output, run_id=run_id, log=console.log_location if console else None)
    stopper = _StopOnLoss(held)
    try:
        with _console_without_ray_data_tracebacks(), stopper:
            _generate(run, in_fs, files, checked.without_id, run_id, summary, held, console)
    except BaseException as e:
        lost = held.verify() if held is not None else None
        if lost:  # whatever stopped the execution (a write actor refusing to commit, most likely): the lease
            history.finish("lost-lease", lost, **_counts(summary))
            raise leases.LeaseLost(lost) from None
        if isinstance(e, RunStalled):
            history.finish("stalled", str(e), **_counts(summary))
            raise
        if isinstance(e, KeyboardInterrupt):
            history.finish("interrupted", **_counts(summary))
            raise
        if isinstance(e, SpecError):
            history.finish("failed", str(e), **_counts(summary))
            raise
        full = no_space_in(e, run.output) if isinstance(e, Exception) else None
        if full is not None:  # stop here; the same command resumes once there is space
            history.finish("failed", str(full), **_counts(summary))
            raise full from None
        damage = damage_in(e) if isinstance(e, Exception) else None
        if damage is not None:  # a record file the run cannot read (its pre-pass, a stage): exit 2, one line
            history.finish("failed", str(damage), **_counts(summary))
            raise damage from None
        if not isinstance(e, Exception):
            raise
        reason = describe(e)  # Ray's errors carry whole tracebacks: keep the root cause
        log.debug("run %s failed", run_id, exc_info=e)
        history.finish("failed", reason, **_counts(summary))
        raise RunFailed(reason) from None
    summary.seconds = time.perf_counter() - started
    history.finish("ok", **_counts(summary))
    log.info(summary.line())
    return summary


class _LeaseInterrupt(KeyboardInterrupt):
    """Raised in the run's thread when its lease was lost (a BaseException, so no `except Exception` on the
    way swallows it); the runner turns it into LeaseLost."""


class _StopOnLoss:
    """While the run generates, a lost lease stops it at once (the renewal thread interrupts the run's
    thread, as the progress watchdog does), rather than at the next batch a write actor would refuse to
    commit: the GPUs are not kept busy for a run whose videos another run now makes."""

    def __init__(self, held: leases.Lease | None):
        self.held = held
        self._armed = False
        self._lock = threading.Lock()
        self._thread = threading.current_thread()

    def __enter__(self) -> "_StopOnLoss":
        if self.held is not None:
            self._armed = True
            self.held.on_lost = self._interrupt
            self.held.check()  # lost before it was armed
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._armed = False

    def _interrupt(self, reason: str) -> None:
        with self._lock:
            if not self._armed:
                return
            self._armed = False
            if self._thread is threading.main_thread():
                signal.pthread_kill(self._thread.ident, signal.SIGINT)  # also breaks blocking waits (ray.get)
            else:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread.ident),
                                                           ctypes.py_object(_LeaseInterrupt))


class _HideOnConsole(logging.Filter):
    """Marks a record `hide`, which Ray Data's console handler drops (ray.data._internal.logging.
    HiddenRecordFilter) and its log file keeps."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.hide = True
        return True


@contextmanager
def _console_without_ray_data_tracebacks():
    """When an execution fails, Ray Data logs the whole stack on the console (an actor that died in its
    constructor counts as a 'Ray internal' error, so it prints every frame): the failure's root cause would
    sit under a hundred lines of Ray's frames. While a run executes, those records go to Ray Data's log
    file only; the runner reports the root cause itself, in one line (faults/rootcause.py)."""
    logger = logging.getLogger("ray.data.exceptions")
    hide = _HideOnConsole()
    logger.addFilter(hide)
    try:
        yield
    finally:
        logger.removeFilter(hide)


def _counts(summary: RunSummary) -> dict:
    return {"ok": summary.ok, "error": summary.error, "already_done": summary.skipped_done,
            "duplicates": summary.duplicates}


def _generate(run: RunSpec, in_fs, files: list[str], without_id: list[str], run_id: str,
              summary: RunSummary, held: leases.Lease | None = None, console=None) -> None:
    """The work of a run under its progress watchdog: executions re-planned from the manifest (at most
    MAX_REPLANS times) when a node, actor or object was lost; RunStalled when the watchdog stopped it."""
    from latte_ray.faults.nodeloss import MAX_REPLANS, end_stage_actors, replannable
    from latte_ray.faults.watchdog import Watchdog, stall_timeouts

    baseline: dict = {}  # the first work plan's done count: what was done before this run
    servers: dict = {}  # "servers": the run's ModelServers, from the first round that generates to the end
    with Watchdog(stall_timeouts(run.pipeline)) as dog:
        try:
            for attempt in range(MAX_REPLANS + 1):
                try:
                    _execute(run, in_fs, files, without_id, run_id, summary, dog, baseline, held, console,
                             servers)
                    break
                except Exception as e:  # noqa: BLE001 - classified: only a lost node or actor is re-planned
                    if attempt == MAX_REPLANS or not replannable(e) or (held is not None and held.verify()):
                        raise
                    log.warning("the execution failed (%s); re-planning from the manifest (%d of at most %d): "
                                "committed ids are skipped", replannable(e), attempt + 1, MAX_REPLANS)
                # Out of the except block: the failed execution's traceback (and its actor handles) is gone.
                dog.phase("re-planning after a lost node or actor")
                end_stage_actors()
        except BaseException:
            # A failed or stopped run leaves no stage actor behind: Ray Data only drops their handles, and
            # the exception's traceback keeps those alive (holding CPUs; a writer could still commit).
            end_stage_actors()
            if dog.reason is not None:
                raise RunStalled(dog.reason) from None
            raise
        finally:
            if "servers" in servers:  # the run's generation servers end with the run, however it ends
                servers.pop("servers").close()


def _execute(run: RunSpec, in_fs, files: list[str], without_id: list[str], run_id: str, summary: RunSummary,
             dog, baseline: dict, held: leases.Lease | None = None, console=None, servers: dict | None = None
             ) -> None:
    """The pre-pass and the rounds of one execution attempt, counting committed rows into `summary`; a
    re-planned attempt reads the manifest again, so ids committed before it are skipped. `servers`: where
    the run's generation servers are kept across rounds and attempts (execution.keep_model_actors)."""
    from latte_ray.plan.workplan import plan_work

    dog.phase("pre-pass (work plan)")
    # Pre-pass: global dedupe and resume, decided before any actor starts (see workplan.py).
    work = plan_work(run, in_fs, files, lambda subset: read_input(run, in_fs, subset), without_id)
    if not baseline:
        baseline["done"] = summary.skipped_done = work.done
        summary.duplicates = work.duplicates
        summary.regenerated = work.videos_regenerated
        _move_damaged_videos(run, work.videos_wrong_size)
        if console is not None:
            console.echo(plan_line(run, work, console.log_now))
            if work.todo:
                console.start_progress(min(work.todo, run.limit) if run.limit else work.todo)
    else:  # re-planned: what this run committed so far is now in the done set (delivered to us or not)
        committed = work.done - summary.skipped_done
        if run.retry_errors:  # errored ids are tried again, and counted again
            summary.ok, summary.error, summary.errors = committed, 0, []
        else:
            summary.ok = committed - summary.error
    if work.todo == 0:
        log.info("nothing to do: %s", work.line())
        return
    n_rounds = rounds(run, work.todo)
    kept = None
    if servers is not None and work.generate and run.pipeline.execution.keep_model_actors:
        if "servers" not in servers:
            from latte_ray.stages.servers import ModelServers

            servers["servers"] = ModelServers(run.pipeline, run.cache_dir, run.storage_options, run_id)
        kept = servers["servers"]
        dog.generation_idle = kept.idle  # the servers, not the clients, load the models
    # With kept servers two rounds overlap: the next execution starts (its processes, its reads) while this
    # one works, and each round's tail is filled by the other's batches, so a round change costs the fleet
    # nothing (the servers' slots go to whichever round's batch asks first). Pooled, the rounds run one
    # after another: each round's actors hold the GPUs. So does a text-encode stage's actor (a GPU of its
    # own, per execution): with one, the rounds do not overlap either.
    overlap = kept is not None and not run.pipeline.execution.text_encode_stage
    at_once = min(n_rounds, ROUNDS_AT_ONCE if overlap else 1)

    def build(k: int):
        return build_plan(run, in_fs, files, work, run_id, (k, n_rounds) if n_rounds > 1 else None,
                          fence=held.fence if held is not None else None, servers=kept, executions=at_once)

    events = _round_events(build, n_rounds, at_once, work.todo // n_rounds)
    try:
        for kind, value in events:
            if kind == "round":
                if n_rounds > 1:
                    log.info("round %d of %d (about %d rows each)", value + 1, n_rounds, work.todo // n_rounds)
                # With kept servers only the first round (and servers added later) loads a model.
                dog.phase(f"round {value + 1} of {n_rounds}",
                          loads_models=work.generate > 0 and (kept is None or value == 0))
                if held is not None:
                    held.check()
                continue
            if kind == "done":
                if n_rounds > 1:
                    log.info("round %d of %d committed", value + 1, n_rounds)
                continue
            dog.progress()
            if held is not None:
                held.check()
            uris = value["video_uri"].to_pylist()
            for status, error, uri in zip(value["status"].to_pylist(), value["error"].to_pylist(), uris):
                if status == "ok":
                    summary.ok += 1
                    if len(summary.videos) < SHOWN_VIDEOS and uri:
                        summary.videos.append(uri)
                else:
                    summary.error += 1
                    if len(summary.errors) < 20:
                        summary.errors.append(error)
            if console is not None and console.progress is not None:
                console.progress.update(summary.ok + summary.error, summary.error)
    finally:
        events.close()  # ends the executions under way, also when the run is stopped or failed


ROUNDS_AT_ONCE = 2  # executions under way at once when the models are kept for the run


def _one_round(build, k: int):
    """The manifest rows of round k as its execution commits them (its own thread's generator)."""
    ds = build(k)
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0))
    try:
        yield from batches
    finally:
        batches.close()  # shuts the execution's actors down now, also when the run is stopped or failed
        del ds, batches  # frees the execution's per-block bookkeeping before the next round


def _round_events(build, n_rounds: int, at_once: int, rows_per_round: int = 0):
    """("round", k) as round k starts, ("batch", rows) as it commits and ("done", k) when it has ended, over
    every round. One at a time (`at_once` 1) the rounds run in the caller's thread.

    Several at once, each round runs in a thread of its own, and the next one starts when the youngest
    under way has committed half its rows (about `rows_per_round`; the ids split evenly by their hash):
    rounds staggered by half a round, so that whenever a new execution starts (its processes, its reads)
    and whenever a round ends (its tail), another round still has half its work to hand the servers, and
    at most `at_once` executions' bookkeeping is held in the driver. (Started together, two rounds would
    end together, and the third would start into an idle fleet.) Their events reach the caller's thread,
    which alone counts, checks the lease and is interrupted by the watchdog. Closing the generator stops
    them (an exception raised in each thread, which closes its execution) and waits for them."""
    if at_once <= 1:
        for k in range(n_rounds):
            yield "round", k
            for batch in _one_round(build, k):
                yield "batch", batch
            yield "done", k
        return
    import queue

    events: queue.Queue = queue.Queue()

    def work(k: int) -> None:
        try:
            for batch in _one_round(build, k):
                events.put(("batch", (k, batch)))
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            events.put(("error", e))
        finally:
            events.put(("end", k))

    running: dict[int, threading.Thread] = {}
    committed: dict[int, int] = {}
    next_k = 0
    try:
        while running or next_k < n_rounds:
            youngest = max(running, default=None)
            if next_k < n_rounds and (youngest is None or len(running) < at_once
                                      and 2 * committed[youngest] >= rows_per_round):
                running[next_k] = threading.Thread(target=work, args=(next_k,), daemon=True,
                                                   name=f"latte-ray-round-{next_k + 1}")
                committed[next_k] = 0
                yield "round", next_k
                running[next_k].start()
                next_k += 1
                continue
            try:
                kind, value = events.get(timeout=0.5)  # a timeout: the watchdog's SIGINT gets through
            except queue.Empty:
                continue
            if kind == "error":
                raise value
            if kind == "end":
                running.pop(value).join()
                yield "done", value
                continue
            k, batch = value
            committed[k] += batch.num_rows
            yield "batch", batch
    finally:
        for thread in running.values():
            if thread.is_alive():
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                           ctypes.py_object(_RoundStopped))
        for thread in running.values():
            if thread.ident is not None:  # started
                thread.join(timeout=120)


class _RoundStopped(BaseException):
    """Raised in a round's thread when the run stops (another round failed, the watchdog, a lost lease)."""


def _move_damaged_videos(run: RunSpec, keys: list[str]) -> None:
    """Recorded videos of another size than their row says are made again under the same key: their bytes
    (not latte-ray's) go to OUTPUT/quarantine/<time>/ first, so that nothing this run did not make is
    overwritten (record/verify.py)."""
    if not keys:
        return
    from latte_ray.record.storage import OutputLayout, filesystem
    from latte_ray.record.verify import move_aside, stamp_now

    fs, root = filesystem(run.output, run.storage_options)
    layout, stamp = OutputLayout(url=run.output.rstrip("/"), root=root.rstrip("/")), stamp_now()
    for key in keys:
        move_aside(fs, layout, key, stamp)
    log.warning("%d recorded videos had another size than their manifest row says: moved to %s/quarantine/%s/ "
                "and made again", len(keys), layout.url, stamp)


def cluster_line() -> str:
    """`1 node, 2 CPUs, 0 GPUs`: what the connected Ray cluster has now (an autoscaling one may grow)."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    return f"{nodes} node{'s' if nodes != 1 else ''}, {cpus:g} CPUs, {gpus:g} GPUs"


def plan_line(run: RunSpec, work, log_location: str | None = None) -> str:
    """The one line saying what will run: spec, prompts to do and already done, cluster size, log file."""
    spec = run.pipeline
    extra = f", {work.duplicates} duplicate rows skipped" if work.duplicates else ""
    todo = f"{min(work.todo, run.limit)} to do (--limit {run.limit})" if run.limit and run.limit < work.todo \
        else f"{work.todo} to do"
    again = (f" ({work.videos_regenerated} of them ok ids whose recorded video is missing or damaged: made again)"
             if getattr(work, "videos_regenerated", 0) else "")
    line = (f"run: {spec.name} (spec {spec.spec_hash()}) over {work.rows} prompts: {todo}{again}, "
            f"{work.done} already done{extra}; cluster: {cluster_line()}")
    return line + (f"; log: {log_location}" if log_location else "")


def summary_dict(summary: RunSummary) -> dict:
    return asdict(summary)
