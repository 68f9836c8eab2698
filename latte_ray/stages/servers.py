"""Generation actors that live for the whole run (`execution.keep_model_actors`): one model load per GPU, not
one per round.

Ray Data ends an execution's actor pools when the execution ends, and a run of more than
`execution.round_rows` rows is several executions (runner.rounds: they bound the driver's per-block
bookkeeping). With pooled generation actors every round loads and compiles the model again on every GPU:
minutes of a full fleet per round (benchmarks/fleet.py measured one load per GPU per round). Here the model
lives in a plain Ray actor, a GenerationServer (the DenoiseStage itself: the same crash ledger, deadlines and
busy-interval columns), which the run's ServerBroker creates and keeps until the run ends. Ray Data's
generation pool holds thin DenoiseClient actors (stages/denoise_client.py) that each take one server from the
broker and hand their batches to it; in the next round new clients take the same, already loaded servers.

- Servers hold the GPUs and CPUs a generation actor holds; clients hold none. Each round's client pool is
  fixed at the servers the cluster holds when it starts (runner.build_plan says why); a client that finds
  no free server has a new one made, up to the pool's maximum, and waits in its constructor until that
  server has loaded (Ray Data gives a client that has not started no work).
- A server that dies (a lost node, a deadline, a poison row) is restarted by Ray (`execution.max_restarts`);
  meanwhile its client sends its batches to a stand-in (stages/denoise_client.py), and the node-local crash
  ledger sees the earlier attempts.
- The broker is pinned to the driver's node and owned by the driver, and it owns the servers: when the
  driver ends, or the run ends (`ModelServers.close`), every server ends with it; nothing outlives its run.
"""

from __future__ import annotations

import logging
import threading
import time

from latte_ray.stages.denoise import DenoiseStage

log = logging.getLogger(__name__)

SERVER_CLASS = "GenerationServer"
BROKER_CLASS = "ServerBroker"


class GenerationServer(DenoiseStage):
    """A DenoiseStage as a plain Ray actor: `ready` returns once its model has loaded (its constructor
    ran), `generate` is the stage's call."""

    def ready(self) -> tuple[str | None, str | None]:
        return self.actor, self.node

    def generate(self, batch):
        return self(batch)


class ServerBroker:
    """Creates the run's generation servers and binds each to one client of the current round.

    A client asks with its actor id (a client that Ray Data restarts keeps its id, and gets its server
    back). `new_round` unbinds every server: the previous execution's clients are gone."""

    def __init__(self, spec_json: str, cache_dir: str | None, storage_options: dict | None, run_id: str,
                 most: int, options: dict, start: int = 0):
        self._args = (spec_json, cache_dir, storage_options, run_id)
        self._most, self._options = most, options
        self._servers: list = []
        self._bound: dict[str, int] = {}  # client actor id -> index in _servers
        self._stand_ins: dict[str, int] = {}  # server actor id -> calls it took on for other clients
        self._lock = threading.Condition()
        for _ in range(min(start, most)):  # their models load while Ray Data starts the first round
            self._new_server()

    def _new_server(self) -> int:
        import ray

        cls = ray.remote(GenerationServer).options(**self._options)
        self._servers.append(cls.remote(*self._args))
        return len(self._servers) - 1

    def acquire(self, client: str):
        """The server for this client: its own, a free one, a new one while fewer than the most exist, or
        (all bound) one whose client has died; else wait for `new_round`."""
        with self._lock:
            while True:
                if client in self._bound:
                    return self._servers[self._bound[client]]
                free = [i for i in range(len(self._servers)) if i not in self._bound.values()]
                if not free and len(self._servers) < self._most:
                    free = [self._new_server()]
                if not free:
                    free = self._orphaned()
                if free:
                    self._bound[client] = free[0]
                    return self._servers[free[0]]
                self._lock.wait(timeout=5.0)

    def _orphaned(self) -> list[int]:
        """Servers bound to a client that is dead for good (not restarting): Ray Data replaced it."""
        import ray

        dead = []
        for client, index in list(self._bound.items()):
            try:
                state = ray._private.state.state.actor_table(client).get("State")
            except Exception:  # noqa: BLE001 - unknown: leave it bound
                continue
            if state == "DEAD":
                del self._bound[client]
                dead.append(index)
        return dead

    def stand_in(self, server_id: str, node: str | None = None):
        """An alive server for a client whose own one is not alive (restarting: a model load, perhaps after
        a wait for a free GPU): one on `node` (the dead server's: its crash ledger) first, then the one
        the fewest stand-in calls went to; None when no other server is alive."""
        alive = []
        for server in self._servers:
            entry = actor_entry(server)
            if server._actor_id.hex() != server_id and entry.get("State") == "ALIVE":
                alive.append((server, (entry.get("Address") or {}).get("NodeID")))
        if not alive:
            return None
        counts = self._stand_ins
        best, _ = min(alive, key=lambda s: (s[1] != node, counts.get(s[0]._actor_id.hex(), 0)))
        counts[best._actor_id.hex()] = counts.get(best._actor_id.hex(), 0) + 1
        return best

    def new_round(self) -> int:
        with self._lock:
            self._bound.clear()
            self._lock.notify_all()
            return len(self._servers)

    def close(self) -> None:
        import ray

        with self._lock:
            for server in self._servers:
                ray.kill(server, no_restart=True)
            self._servers.clear()
            self._bound.clear()
            self._lock.notify_all()


def server_options(ex) -> dict:
    """Ray options of a server: a generation actor's resources and restarts (execution.max_restarts). Its
    calls are not retried by Ray: the client sends a failed batch again (stages/denoise_client.py), to a
    stand-in while its own server is not alive, else to its own once it has restarted."""
    return {"num_cpus": ex.num_cpus_per_actor, "num_gpus": ex.num_gpus_per_actor,
            "max_restarts": ex.max_restarts, "max_task_retries": 0, "max_concurrency": 1}


def actor_entry(handle) -> dict:
    """An actor's record in the GCS (state, address, restarts)."""
    import ray

    return ray._private.state.state.actor_table(handle._actor_id.hex()) or {}


def actor_info(handle) -> tuple[bool, int]:
    """(alive, how many times Ray has restarted it) of an actor, from the GCS."""
    entry = actor_entry(handle)
    return entry.get("State") == "ALIVE", int(entry.get("NumRestarts") or 0)


class ModelServers:
    """The driver's side: the run's broker, from the first round that generates to the end of the run
    (runner._generate closes it however the run ends)."""

    def __init__(self, spec, cache_dir: str | None, storage_options: dict | None, run_id: str):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from latte_ray.plan.fit import initial_pool_size
        from latte_ray.spec import pool_bounds

        ex = spec.execution
        _, most = pool_bounds(ex.concurrency)
        here = ray.get_runtime_context().get_node_id()
        broker = ray.remote(ServerBroker).options(
            num_cpus=0, max_concurrency=max(8, 2 * most + 4), max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False))
        self.broker = broker.remote(spec.model_dump_json(), cache_dir, storage_options, run_id, most,
                                    server_options(ex), initial_pool_size(spec))

    def new_round(self) -> None:
        import ray

        ray.get(self.broker.new_round.remote())

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
        alive = [a for a in ray._private.state.state.actor_table(None).values()
                 if a.get("JobID") == job and a.get("State") != "DEAD"
                 and a.get("ActorClassName", "").split(".")[-1] in (SERVER_CLASS, BROKER_CLASS)]
        if not alive:
            return
        time.sleep(0.2)
    log.warning("generation servers still alive %.0f s after the run ended", timeout_s)
