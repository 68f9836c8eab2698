"""A run's lifecycle: checks, the output's lease and binding, the run's record, and its outcome.

The work itself is the round scheduler's (latte_ray/scheduler.py: rounds of Ray Data executions of the
declared stages, stages/graph.py); this module holds what is around it: preflight, then the lease, then the
record that says how the run ended (ok, failed, stalled, interrupted, lost-lease).

Everything that can fail on bad input (specs, table schemas, output location and binding, model configs,
video settings) is checked in the driver before Ray starts (`preflight`), so a malformed run costs no GPU
time. An error that only an actor can hit ends the run with its root cause in one line (RunFailed).
Every run leaves its own record, OUTPUT/runs/<run_id>.json (latte_ray/record/output.py).
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from latte_ray.cluster import cluster_line, init_ray  # noqa: F401 - re-exported (jobs, benchmarks, tests)
from latte_ray.faults.interrupt import interrupt, sigterm_interrupts
from latte_ray.faults.rootcause import RunFailed, damage_in, describe, no_space_in
from latte_ray.faults.watchdog import RunStalled
from latte_ray.plan.preflight import Preflight, preflight
from latte_ray.record import lease as leases
from latte_ray.record import output as outputs
from latte_ray.scheduler import generate
from latte_ray.errors import EXIT_BAD_INPUT, LatteRayError
from latte_ray.spec import RunSpec
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
        with _console_without_ray_data_tracebacks(), sigterm_interrupts(), stopper:
            generate(run, in_fs, files, checked.without_id, run_id, summary, held, console)
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
        if isinstance(e, LatteRayError) and e.exit_code == EXIT_BAD_INPUT:  # found by a check in the run
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
        from latte_ray.stages.declare import labels

        reason = describe(e, labels())  # Ray's errors carry whole tracebacks: keep the root cause
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
            interrupt(self._thread, _LeaseInterrupt)


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


def summary_dict(summary: RunSummary) -> dict:
    return asdict(summary)
