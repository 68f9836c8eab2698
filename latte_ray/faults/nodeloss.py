"""Node loss (a spot GPU preempted, a node that died without draining): which execution failures the
runner re-plans, and ending the failed execution's actors before it does.

Ray restarts the actors of a lost node elsewhere and retries their batches (max_restarts / max_task_retries
-1); most of the time Ray Data rides a node loss out by itself. What it cannot always ride out is a lost
object: a block whose only copy was on the dead node, needed by the next operator or by the driver's
iterator, ends the whole execution (ObjectLostError and its kin, or an actor that died while its batch
could not be retried). The runner then re-plans: it ends the failed execution's actors, reads
the manifest again (the pre-pass), skips every id committed so far and runs what is left, at most
MAX_REPLANS times per run. Commits are idempotent and a committed id is never generated again, so the
result is exactly once.
"""

from __future__ import annotations

import logging
import time

from latte_ray.raycompat import actor_table, kill_actor_by_id

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
    chain = list(_chain(error))
    # An actor whose constructor raised (a corrupt weight file, a bad model folder) fails the same way on
    # every node: Ray Data has already retried its start (actor_init_max_retries), and a re-plan would only
    # load the model again, three more times, before the same error.
    if any(getattr(e, "actor_init_failed", False) or "raised in its creation task" in str(e) for e in chain):
        return ""
    for e in chain:
        if isinstance(e, lost):
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return f"{type(e).__name__}: {first}"[:300]
    return ""


def _stage_actors() -> list[dict]:
    import ray

    job = ray.get_runtime_context().get_job_id()
    return [a for a in actor_table().values()
            if a.get("JobID") == job and a.get("State") != "DEAD" and "MapWorker" in a.get("ActorClassName", "")]


def end_stage_actors(timeout_s: float = 60.0) -> None:
    """End every Ray Data stage actor of this job and wait until they are gone, after a failed or stopped
    execution. Ray Data shuts a failed execution down with force=False: it only drops the actor handles,
    and an actor whose task is still running (a writer retrying storage, a hung call), or whose handle an
    exception's traceback still holds, outlives that. It would hold CPUs the next plan needs, and a writer
    could commit a batch after a re-plan has read the manifest (that batch would then be generated twice).
    The handles are gone, so the actors are killed by id."""
    import gc

    import ray

    gc.collect()
    if not ray.is_initialized():
        return
    deadline = time.monotonic() + timeout_s
    killed: set[str] = set()
    alive: list[dict] = []
    while time.monotonic() < deadline:
        try:
            alive = _stage_actors()
        except Exception as e:  # noqa: BLE001
            log.warning("cannot list this job's actors (%s); going on without waiting", e)
            return
        if not alive:
            return
        for actor in alive:
            if actor["ActorID"] not in killed:
                try:
                    kill_actor_by_id(actor["ActorID"])
                except Exception as e:  # noqa: BLE001
                    log.warning("could not kill actor %s: %s", actor["ActorID"], e)
                killed.add(actor["ActorID"])
        time.sleep(0.2)
    log.warning("%d stage actors of the failed execution are still alive after %.0f s; going on", len(alive),
                timeout_s)
