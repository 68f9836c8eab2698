"""Generation actors that live for the whole run (`execution.keep_model_actors`): one model load per GPU, not
one per round, and a fleet that grows, shrinks and balances within a round.

Ray Data ends an execution's actor pools when the execution ends, and a run of more than
`execution.round_rows` rows is several executions (scheduler.rounds: they bound the driver's per-block
bookkeeping). With pooled generation actors every round loads and compiles the model again on every GPU:
minutes of a full fleet per round (benchmarks/fleet.py measured one load per GPU per round). Here the model
lives in a plain Ray actor, a GenerationServer (the DenoiseStage itself: the same crash ledger, deadlines and
busy-interval columns), which the run's ServerBroker creates and keeps until the run ends. Ray Data's
generation pool holds a few thin DenoiseClient actors (fleet/client.py) that hand each batch to
whichever loaded server has a free *slot*, as the broker grants them.

- A server has SLOTS slots: one call running and the next one already queued behind it, so no data-plane
  latency falls between two of its calls. A batch waits in its client, not at a server, until a slot is
  free: the first server to finish takes the next batch (no batch waits behind a busy server while another
  is idle, and the end of a round is one batch long), and a server that joins mid-round takes batches as
  soon as its model has loaded.
- The broker starts as many servers as the cluster holds (plan/fit.initial_pool_size: all `max` when an
  autoscaler can add nodes, their pending placements being its demand) and, every GROW_EVERY_S, starts more
  when nodes have joined, up to the pool's maximum; a joined node's GPUs work from their first load on, in
  the round under way.
- A server that dies (a lost node, a deadline, a poison row) fails its calls: their clients take other slots
  (on the dead server's node first, whose crash ledger has seen the attempt), and Ray restarts it
  (`execution.max_restarts`); it takes slots again once its model has loaded. One that Ray will not restart
  (restarts spent) is replaced by a new server. A server whose constructor raised (corrupt weights) ends the
  run with its own error (the clients raise it).
- Servers hold the GPUs and CPUs a generation actor holds; clients and the broker hold none. The broker is
  pinned to the driver's node and owned by the driver, and it owns the servers: when the driver ends, or the
  run ends (`ModelServers.close`), every server ends with it; nothing outlives its run.
"""

from __future__ import annotations

import logging
import time

from latte_ray.raycompat import actor_table
from latte_ray.stages.denoise import DenoiseStage

log = logging.getLogger(__name__)

SERVER_CLASS = "GenerationServer"
BROKER_CLASS = "ServerBroker"
SLOTS = 2  # calls a server holds at once: the one it runs and the next, queued behind it
SERVERS_PER_CLIENT = 8  # one client process hands on the batches of up to this many servers
GROW_EVERY_S = 5.0  # how often the broker looks for joined nodes (and for slots of clients that died)
WAIT_S = 1.0  # the watch loop's wait for servers that are loading
ACQUIRE_WAIT_S = 10.0  # the longest one `acquire` call waits for a slot (the client then asks again)


class GenerationServer(DenoiseStage):
    """A DenoiseStage as a plain Ray actor: `ready` returns once its model has loaded (its constructor
    ran), `generate` is the stage's call."""

    def ready(self) -> tuple[str | None, str | None]:
        return self.actor, self.node

    def generate(self, batch):
        return self(batch)


def _raised_in_constructor(error) -> bool:
    """Whether an actor died because its constructor raised (a model that cannot load), not with its process."""
    return "creation task" in str(error)


def server_options(ex) -> dict:
    """Ray options of a server: a generation actor's resources and restarts (execution.max_restarts). Its
    calls are not retried by Ray: the client sends a failed batch again (fleet/client.py), to
    another server's slot."""
    return {"num_cpus": ex.num_cpus_per_actor, "num_gpus": ex.num_gpus_per_actor,
            "max_restarts": ex.max_restarts, "max_task_retries": 0, "max_concurrency": 1}


def client_pool(spec) -> tuple[int, int]:
    """(clients, batches in flight per client) of a round's fixed pool of DenoiseClients: room for SLOTS
    batches for every server the pool may reach (its maximum), SERVERS_PER_CLIENT servers per client. The
    batches beyond the free slots wait in the clients: a client holds no resources, and a few of them keep
    a whole fleet fed."""
    from latte_ray.spec import pool_bounds

    _, most = pool_bounds(spec.execution.concurrency)
    clients = -(-most // SERVERS_PER_CLIENT)
    return clients, SLOTS * -(-most // clients)


def actor_entry(handle) -> dict:
    """An actor's record in the GCS (state, address, restarts)."""
    return actor_table(handle._actor_id.hex())


def actor_state(actor_id: str) -> str | None:
    try:
        return actor_table(actor_id).get("State")
    except Exception:  # noqa: BLE001 - unknown: treated as alive
        return None


def actor_info(handle) -> tuple[bool, int]:
    """(alive, how many times Ray has restarted it) of an actor, from the GCS."""
    entry = actor_entry(handle)
    return entry.get("State") == "ALIVE", int(entry.get("NumRestarts") or 0)


class ModelServers:
    """The driver's side: the run's broker, from the first round that generates to the end of the run
    (scheduler.generate closes it however the run ends)."""

    def __init__(self, spec, cache_dir: str | None, storage_options: dict | None, run_id: str):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from latte_ray.fleet.broker import ServerBroker
        from latte_ray.plan.fit import autoscaler

        clients, in_flight = client_pool(spec)
        here = ray.get_runtime_context().get_node_id()
        broker = ray.remote(ServerBroker).options(
            num_cpus=0, max_concurrency=2 * clients * in_flight + 16, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False))
        # Whether an autoscaler is there is the driver's finding (LATTE_RAY_AUTOSCALER is the driver's env).
        self.broker = broker.remote(spec.model_dump_json(), cache_dir, storage_options, run_id,
                                    server_options(spec.execution), autoscaler().present)

    def idle(self) -> bool:
        """No server is loaded (all loading, restarting or waiting for a GPU): the watchdog's start-up
        allowance applies."""
        import ray

        return ray.get(self.broker.loaded.remote(), timeout=30) == 0

    def close(self) -> None:
        import ray

        try:
            ray.get(self.broker.close.remote(), timeout=60)
        except Exception as e:  # noqa: BLE001 - killing the broker below ends the servers it owns anyway
            log.warning("could not end the generation servers in order (%s); ending their broker", e)
        ray.kill(self.broker, no_restart=True)
        _wait_gone(60.0)


def _wait_gone(timeout_s: float) -> None:
    """Until this job's servers and broker are dead (their CPUs and GPUs free for what runs next)."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [a for a in actor_table().values()
                 if a.get("JobID") == job and a.get("State") != "DEAD"
                 and a.get("ActorClassName", "").split(".")[-1] in (SERVER_CLASS, BROKER_CLASS)]
        if not alive:
            return
        time.sleep(0.2)
    log.warning("generation servers still alive %.0f s after the run ended", timeout_s)
