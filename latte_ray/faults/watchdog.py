"""The driver's progress watchdog: a run never waits silently.

A million-prompt job runs unattended for days; a run that stops making progress (an operator whose
tasks can never be scheduled, a cluster that never grows, actors that keep dying while loading, a
pre-pass task stuck on storage) must say why and then fail, so that `ray job submit`, a RayJob's
`backoffLimit` or the next `backfill` retries and resumes it instead of holding GPUs for nothing.

The runner ticks a "last progress" clock on every committed manifest row and on every phase change
(pre-pass, round started, re-plan); a generation actor becoming ready ticks it too. A daemon thread
watches it:

1. after the stall timeout without progress it logs a diagnosis: each Ray Data operator's queued and
   active counts (and actor pool states), the cluster's pending resource demands (what `ray status`
   shows), and this job's actors that are dead, restarting or still being created;
2. after as long again it fails the run: it interrupts the driver's main thread, the runner raises
   RunStalled with a one-line reason, and the CLI exits with code 3. Should the main thread not react
   (stuck in native code) within GRACE_S, the process ends itself with exit code 3.

Progress again after the diagnosis cancels the failure. The timeout is the steady one (in the pre-pass,
and while a generation actor is working); at the start of a round until a generation actor is ready, and
whenever none is running (all being created or restarted, e.g. after a node was lost), the start-up
allowance (model load, compile warm-up) is added. Every diagnosis source fails soft: the diagnosis never
ends a run.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Callable

from latte_ray.errors import EXIT_STALLED, RunStalled  # noqa: F401 - re-exported
from latte_ray.faults.deadline import seconds_per_video
from latte_ray.faults.interrupt import interrupt
from latte_ray.raycompat import actor_table
from latte_ray.spec import NULL_SOURCE, SIM_SOURCE, TINY_SOURCE

log = logging.getLogger(__name__)

EXIT_CODE = EXIT_STALLED  # `latte-ray run` / jobs: no progress, so stopped (docs/resume-and-failures.md)
FLOOR_S = 600.0  # longer than the longest storage retry budget (faults/retry.py: 300 s)
STEADY_FACTOR = 10.0
LOAD_S = {"small": 120.0, "model": 1200.0}  # tiny/null vs a real checkpoint (download + load)
COMPILE_S = {"inductor": 900.0, "eager": 120.0, "aot_eager": 120.0}
GRACE_S = 60.0
GENERATION_OPS = ("DenoiseStage", "DenoiseClient")  # the pooled stage, or clients of kept servers


class _StallInterrupt(KeyboardInterrupt):
    """Raised in the driver's main thread to stop a stalled run (a BaseException, so that no
    `except Exception` on the way swallows it); the runner turns it into RunStalled."""


def stall_timeouts(spec) -> tuple[float, float] | None:
    """(start-up, steady) seconds without progress before a diagnosis (see ExecutionSpec.stall_timeout_s):
    steady is the spec's number, or derived from it; start-up adds the model load and compile warm-up.
    None when the watchdog is off."""
    value = spec.execution.stall_timeout_s
    if value is None:
        return None
    if value != "auto":
        steady = float(value)
    else:
        steady = max(FLOOR_S, STEADY_FACTOR * seconds_per_video(spec) * spec.execution.batch_size)
    load = LOAD_S["small"] if spec.model.source in (TINY_SOURCE, NULL_SOURCE) else LOAD_S["model"]
    compile_s = COMPILE_S[spec.model.compile.backend] if spec.model.compile.enabled else 0.0
    if spec.model.source == SIM_SOURCE:  # the simulated engine's own (scaled) start-up, with the same floor
        t = spec.model.sim_timing
        load = max(LOAD_S["small"], (t.load_s + (t.compile_s if spec.model.compile.enabled else 0.0)) * t.time_scale)
        compile_s = 0.0
    return steady + load + compile_s, steady


class Watchdog:
    """`with Watchdog(timeouts) as dog:` around a run; `dog.progress()` per committed row,
    `dog.phase(name)` at each phase change; `dog.reason` is set once it has stopped the run."""

    def __init__(self, timeouts: tuple[float, float] | None, grace_s: float = GRACE_S,
                 diagnose: Callable[[], list[str]] | None = None,
                 generation_idle: Callable[[], bool] | None = None):
        self.timeouts = timeouts
        self.grace_s = grace_s
        self.diagnose = diagnose or diagnosis
        self.generation_idle = generation_idle or generation_pool_idle
        self.reason: str | None = None
        self.phase_name = "starting"
        self._last = time.monotonic()
        self._starting = False  # a round began and no generation actor has been ready nor a row committed
        self._generation_idle = False
        self._warned_at: float | None = None
        self._warned_limit = 0.0
        self._last_diagnosis: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._run_thread: threading.Thread | None = None
        self._previous_handler = None
        self._handler_installed = False

    # ---- the run's side

    def __enter__(self) -> "Watchdog":
        if self.timeouts is None:
            return self
        self._run_thread = threading.current_thread()
        if self._run_thread is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
            self._handler_installed = True
        self._thread = threading.Thread(target=self._watch, name="latte-ray-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._handler_installed:
            signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)
            self._handler_installed = False

    def progress(self) -> None:
        """Rows were committed."""
        self._last = time.monotonic()
        self._starting = False

    def phase(self, name: str, loads_models: bool = False) -> None:
        """A new phase; `loads_models`: its actors load models before the first row (a round)."""
        self.phase_name = name
        self._last = time.monotonic()
        self._starting = loads_models
        self._warned_at = None

    # ---- the watching thread

    def _timeout(self) -> float:
        startup, steady = self.timeouts
        try:
            idle = self.generation_idle()
        except Exception:  # noqa: BLE001 - unknown: be patient rather than stop a working run
            idle = True
        if self._generation_idle and not idle:  # a generation actor is ready (again): that is progress
            self._last = time.monotonic()
            self._starting = False
        self._generation_idle = idle
        return startup if idle or self._starting else steady

    def _watch(self) -> None:
        poll = max(0.2, min(5.0, self.timeouts[1] / 20))
        while not self._stop.wait(poll):
            limit = self._timeout()
            now = time.monotonic()
            quiet = now - self._last
            if self._warned_at is not None and self._last > self._warned_at:
                log.info("progress again (phase: %s); the stall warning is withdrawn", self.phase_name)
                self._warned_at = None
            if self._warned_at is None:
                if quiet >= limit:
                    self._warned_at, self._warned_limit = now, limit
                    self._warn(quiet, limit)
            elif now - self._warned_at >= self._warned_limit:
                self._fire(quiet, self._warned_limit)
                return

    def _warn(self, quiet: float, limit: float) -> None:
        lines = _soft(self.diagnose) or ["(no diagnosis available)"]
        self._last_diagnosis = lines
        log.warning("no manifest row committed for %.0f s (stall timeout %.0f s, phase: %s); the run fails "
                    "if nothing is committed in the next %.0f s. Diagnosis:\n  %s", quiet, limit,
                    self.phase_name, limit, "\n  ".join(lines))

    def _fire(self, quiet: float, limit: float) -> None:
        first = next((line for line in self._last_diagnosis if line.startswith("waiting")), "")
        self.reason = (f"run stalled: no manifest row committed for {quiet:.0f} s in phase '{self.phase_name}' "
                       f"(execution.stall_timeout_s: {limit:.0f} s){'; ' + first if first else ''}; "
                       "the diagnosis is in the log above; resume with the same command")
        log.error(self.reason)
        self._interrupt()
        if self._stop.wait(self.grace_s):
            return  # the run reacted and is ending
        print(f"error: {self.reason} (the driver did not stop within {self.grace_s:.0f} s; exiting)",
              file=sys.stderr, flush=True)
        import os

        os._exit(EXIT_CODE)

    def _interrupt(self) -> None:
        thread = self._run_thread
        if thread is None:
            return
        interrupt(thread, _StallInterrupt, sigint=self._handler_installed)  # SIGINT: our handler raises it

    def _on_sigint(self, signum, frame) -> None:
        if self.reason is not None:
            raise _StallInterrupt(self.reason)
        previous = self._previous_handler
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


# ---- diagnosis sources (each fails soft)


def _soft(fn: Callable[[], list[str]]) -> list[str]:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return [f"(diagnosis failed: {type(e).__name__}: {e})"]


def diagnosis() -> list[str]:
    return [*_soft(operator_lines), *_soft(demand_lines), *_soft(actor_lines)]


def _executors() -> list:
    """Ray Data's running streaming executors in this process (each is a threading.Thread)."""
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    return [t for t in threading.enumerate() if isinstance(t, StreamingExecutor) and t.is_alive()]


def _actor_info(op):
    get = getattr(op, "get_actor_info", None)
    if get is None or not hasattr(op, "_actor_pool"):
        return None
    return get()


def operator_lines() -> list[str]:
    """One line per operator of each running Ray Data execution: queued input blocks, active tasks,
    actor pool states."""
    lines = []
    for executor in _executors():
        for op, state in list((getattr(executor, "_topology", None) or {}).items()):
            parts = []
            try:
                parts.append(f"queued {state.total_enqueued_input_blocks()}")
                parts.append(f"active {op.num_active_tasks()}")
                parts.append(f"in {op.metrics.num_inputs_received}, out {op.metrics.num_task_outputs_generated}")
                if op.has_completed():
                    parts.append("completed")
                info = _actor_info(op)
                if info is not None:
                    parts.append(f"actors running {info.running}, pending {info.pending}, "
                                 f"restarting {info.restarting}")
            except Exception as e:  # noqa: BLE001
                parts.append(f"({type(e).__name__})")
            lines.append(f"operator {op.name}: {', '.join(parts)}")
    return lines or ["no Ray Data execution is running (pre-pass or between rounds)"]


def generation_pool_idle() -> bool:
    """True when a generation actor pool exists and none of its actors is running (all are being
    created or restarted: the wait includes a model load)."""
    for executor in _executors():
        for op in list((getattr(executor, "_topology", None) or {})):
            if any(name in op.name for name in GENERATION_OPS):
                info = _actor_info(op)
                if info is not None and info.running == 0:
                    return True
    return False


def demand_lines() -> list[str]:
    """The cluster's resource demands that cannot be met now (what `ray status` lists as pending)."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=10)
    demands = status.resource_demands
    lines = [f"waiting for resources: {dict(request.bundle)} x{request.count}"
             for demand in demands.ray_task_actor_demand for request in demand.bundles_by_count]
    lines += [f"waiting for a placement group: {demand}" for demand in demands.placement_group_demand]
    total = status.total_resources()
    available = status.available_resources()
    lines.append("cluster: " + ", ".join(f"{name} {available.get(name, 0):g}/{total[name]:g} free"
                                         for name in ("CPU", "GPU") if name in total))
    return lines


def actor_lines() -> list[str]:
    """This job's actors that are not simply alive: restarting, being created, or restarted before."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    lines = []
    dead = 0
    for actor in actor_table().values():
        if actor.get("JobID") != job:
            continue
        name, state, restarts = actor.get("ActorClassName", "?"), actor.get("State"), actor.get("NumRestarts", 0)
        if state == "DEAD":
            dead += 1
        elif state != "ALIVE" or restarts:
            lines.append(f"actor {name} pid {actor.get('Pid')}: {state}, restarted {restarts} times")
    if dead:
        lines.append(f"{dead} actors of this job have ended (earlier rounds, or dead)")
    return lines or ["every actor of this job is alive and was never restarted"]
