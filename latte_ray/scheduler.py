"""The round scheduler: the work of a run, as Ray Data executions.

A run is split into rounds of at most `execution.round_rows` rows (`rounds`), each a fresh execution of the
run's graph (stages/graph.build_plan) over the ids whose key falls in it; with the models kept for the run
(execution.keep_model_actors) two rounds overlap (`round_events`). Under the progress watchdog, an
execution that lost a node, an actor or an object is re-planned from the manifest (at most MAX_REPLANS
times). The caller's thread alone counts committed rows, checks the lease and is interrupted.
"""

from __future__ import annotations

import logging
import threading

from latte_ray.cluster import cluster_line
from latte_ray.faults.interrupt import interrupt
from latte_ray.faults.watchdog import RunStalled
from latte_ray.plan.prompts import read_input
from latte_ray.record import lease as leases
from latte_ray.spec import RunSpec
from latte_ray.stages.graph import build_plan

log = logging.getLogger(__name__)

SHOWN_VIDEOS = 3  # videos a summary names


def rounds(run: RunSpec, todo: int) -> int:
    """How many Ray Data executions a run of `todo` rows is split into.

    For the whole of one execution, Ray Data's driver keeps per-block bookkeeping (a BlockStats per block
    per operator, task records): measured at about 10 KB per block, so 1.3 GB for a million prompts at
    batch 8 (benchmarks/README.md). Rounds of at most `execution.round_rows` rows, each a fresh execution
    taking the ids whose key falls in it, bound that. With `execution.keep_model_actors` the rounds share
    the run's generation servers (fleet/servers.py) and two of them overlap (`round_events`); without,
    each round loads the model again. A `--limit` run is one round (the limit is a total)."""
    if run.limit:
        return 1
    return max(1, -(-todo // run.pipeline.execution.round_rows))


def generate(run: RunSpec, in_fs, files: list[str], without_id: list[str], run_id: str,
              summary, held: leases.Lease | None = None, console=None) -> None:
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
                    execute(run, in_fs, files, without_id, run_id, summary, dog, baseline, held, console,
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


def execute(run: RunSpec, in_fs, files: list[str], without_id: list[str], run_id: str, summary,
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
        if work.videos_wrong_size:
            from latte_ray.record.verify import quarantine_videos

            quarantine_videos(run.output, run.storage_options, work.videos_wrong_size)
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
            from latte_ray.fleet.servers import ModelServers

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

    events = round_events(build, n_rounds, at_once, work.todo // n_rounds)
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


def one_round(build, k: int):
    """The manifest rows of round k as its execution commits them (its own thread's generator)."""
    ds = build(k)
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0))
    try:
        yield from batches
    finally:
        batches.close()  # shuts the execution's actors down now, also when the run is stopped or failed
        del ds, batches  # frees the execution's per-block bookkeeping before the next round


def round_events(build, n_rounds: int, at_once: int, rows_per_round: int = 0):
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
            for batch in one_round(build, k):
                yield "batch", batch
            yield "done", k
        return
    import queue

    events: queue.Queue = queue.Queue()

    def work(k: int) -> None:
        try:
            for batch in one_round(build, k):
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
                interrupt(thread, _RoundStopped, sigint=False)
        for thread in running.values():
            if thread.ident is not None:  # started
                thread.join(timeout=120)


class _RoundStopped(BaseException):
    """Raised in a round's thread when the run stops (another round failed, the watchdog, a lost lease)."""


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
