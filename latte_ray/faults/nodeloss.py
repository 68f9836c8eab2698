"""Node loss (a spot GPU preempted, a node that died without draining): which execution failures the
runner re-plans, and waiting for the failed execution's actors to be gone before it does.

Ray restarts the actors of a lost node elsewhere and retries their batches (max_restarts / max_task_retries
-1); most of the time Ray Data rides a node loss out by itself. What it cannot always ride out is a lost
object: a block whose only copy was on the dead node, needed by the next operator or by the driver's
iterator, ends the whole execution (ObjectLostError and its kin, or an actor that died while its batch
could not be retried). The runner then re-plans: it waits for the failed execution's actors to end, reads
the manifest again (the pre-pass), skips every id committed so far and runs what is left, at most
MAX_REPLANS times per run. Commits are idempotent and a committed id is never generated again, so the
result is exactly once.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

MAX_REPLANS = 3


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        cause = getattr(error, "cause", None)  # RayTaskError / UserCodeException keep the original here
        error = error.__cause__ or (cause if isinstance(cause, BaseException) else None) or error.__context__


def replannable(error: BaseException) -> str:
    """A short reason when `error` comes from lost infrastructure (a node, an actor, an object), else ""."""
    from ray import exceptions as rex

    lost = (rex.ObjectLostError, rex.NodeDiedError, rex.RayActorError, rex.WorkerCrashedError,
            rex.LocalRayletDiedError, rex.ObjectFetchTimedOutError)
    for e in _chain(error):
        if isinstance(e, lost):
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return f"{type(e).__name__}: {first}"[:300]
    return ""


def _stage_actors() -> list[dict]:
    import ray

    job = ray.get_runtime_context().get_job_id()
    return [a for a in ray._private.state.state.actor_table(None).values()
            if a.get("JobID") == job and a.get("State") != "DEAD" and "MapWorker" in a.get("ActorClassName", "")]


def wait_for_stage_actors(grace_s: float = 10.0, timeout_s: float = 60.0) -> None:
    """Make sure no Ray Data stage actor of this job is alive before re-planning. A failed execution only
    drops its actor handles (Ray Data shuts it down with force=False), and an actor whose task is still
    running (a writer retrying storage, a hung call) outlives that: it would hold CPUs the new plan needs,
    and a writer could commit a batch after the re-plan read the manifest, which would then be generated
    twice. Actors still alive after `grace_s` are killed (by id: their handles are gone)."""
    import gc

    import ray

    gc.collect()  # tracebacks of the failed execution hold its actor handles in reference cycles
    if not ray.is_initialized():
        return
    deadline = time.monotonic() + timeout_s
    killed = False
    while time.monotonic() < deadline:
        try:
            alive = _stage_actors()
        except Exception as e:  # noqa: BLE001
            log.warning("cannot list this job's actors (%s); re-planning without waiting", e)
            return
        if not alive:
            return
        if not killed and time.monotonic() >= deadline - timeout_s + grace_s:
            log.warning("killing %d stage actors of the failed execution", len(alive))
            worker = ray._private.worker.global_worker
            for actor in alive:
                try:
                    worker.core_worker.kill_actor(ray.ActorID.from_hex(actor["ActorID"]), True)
                except Exception as e:  # noqa: BLE001
                    log.warning("could not kill actor %s: %s", actor["ActorID"], e)
            killed = True
        time.sleep(0.5)
    log.warning("%d stage actors of the failed execution are still alive after %.0f s; re-planning anyway",
                len(alive), timeout_s)
