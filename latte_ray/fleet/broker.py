"""The run's server broker (a Ray actor owned by the driver): creates the generation servers, grows their
number as nodes join, replaces one Ray will not restart, and grants their slots to the clients' batches
(fleet/servers.py says why the models live in servers, and how slots, growth and replacement work)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

from latte_ray.fleet.servers import (ACQUIRE_WAIT_S, GROW_EVERY_S, SLOTS, WAIT_S, GenerationServer,
                                     _raised_in_constructor, actor_entry, actor_state)

log = logging.getLogger(__name__)


@dataclass
class _Server:
    handle: object
    ready: bool = False  # its model has loaded and it is alive, as far as the broker knows
    node: str | None = None
    holders: list = field(default_factory=list)  # client process tokens, one per slot in use
    granted: int = 0  # slots ever granted (the less used of two equal servers goes first)
    waiting: object = None  # the pending `ready` call while it loads (or restarts)


class ServerBroker:
    """Creates the run's generation servers, grows their number with the cluster, and grants their slots.

    `acquire` blocks until a loaded server has a free slot; `release` gives it back (and says whether the
    server failed the call). Every wait here is bounded by what the cluster does: a server that never loads
    is the progress watchdog's to diagnose (faults/watchdog.py)."""

    def __init__(self, spec_json: str, cache_dir: str | None, storage_options: dict | None, run_id: str,
                 options: dict, autoscaling: bool):
        from latte_ray.spec import PipelineSpec, pool_bounds

        self._args = (spec_json, cache_dir, storage_options, run_id)
        self._spec = PipelineSpec.model_validate_json(spec_json)
        _, self._most = pool_bounds(self._spec.execution.concurrency)
        self._options, self._autoscaling = options, autoscaling
        self._servers: dict[str, _Server] = {}  # server actor id -> its state
        self._clients: dict[str, str] = {}  # client actor id -> the token of its current process
        self._waiting: set[tuple[int, int]] = set()  # (round, ticket) of each batch waiting in line
        self._tickets = itertools.count()
        self._failed = None  # a server whose constructor raised: the run ends with its error
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._grown_at = 0.0
        self._grow()  # their models load while Ray Data starts the first round
        threading.Thread(target=self._watch, name="server-broker-watch", daemon=True).start()

    # ---- the clients' side

    def wait_ready(self, token: str):
        """A client process starts (`token`: "<actor id>:<process>"; a client Ray restarted after its node
        was lost keeps its actor id, and the slots its dead process held go back now). Returns (whether a
        server has loaded, the handle of a server whose constructor raised or None), after at most
        ACQUIRE_WAIT_S (the caller asks again; with a failed server's handle it asks that server, and gets
        Ray's error with the server's traceback)."""
        until = time.monotonic() + ACQUIRE_WAIT_S
        with self._lock:
            client = token.split(":")[0]
            if self._clients.get(client) != token:
                self._clients[client] = token
                self._drop_holders(lambda t: t.split(":")[0] == client and t != token)
            while self._failed is None and not any(s.ready for s in self._servers.values()):
                if time.monotonic() >= until:
                    return False, None
                self._lock.wait(timeout=WAIT_S)
            return self._failed is None, self._failed

    def acquire(self, token: str, prefer_node: str | None = None, order: int = 0):
        """(server id, handle, node) of the loaded server with the most free slots, once one has a free
        slot for this batch; ("failed", handle, None) when a server's constructor raised; None when no slot
        came free within ACQUIRE_WAIT_S (the client asks again: no broker thread waits without end, so a
        `release` always finds one).

        `order`: the batch's round. Free slots go to the waiting batches of the oldest round first (then
        first come, first served), so the round that started first runs at the fleet's full speed and the
        next one, already started beside it, only fills the slots it leaves: the rounds stay staggered and a
        round's tail is the next one's start (scheduler.round_events). `prefer_node`: a batch whose server
        died goes to a server on that node while one there is loaded (its crash ledger, faults/crashes.py,
        then counts a row that kills every worker); such a batch does not wait its turn."""
        until = time.monotonic() + ACQUIRE_WAIT_S
        with self._lock:
            key = (order, next(self._tickets))
            if prefer_node is None:
                self._waiting.add(key)
            try:
                while time.monotonic() < until:
                    if self._stop.is_set():
                        raise RuntimeError("the run's generation servers were ended")
                    if self._failed is not None:
                        return "failed", self._failed, None
                    sid = pick_slot(self._servers, self._waiting, key, prefer_node)
                    if sid is not None:
                        server = self._servers[sid]
                        server.holders.append(token)
                        server.granted += 1
                        return sid, server.handle, server.node
                    self._lock.wait(timeout=WAIT_S)
                return None
            finally:
                self._waiting.discard(key)
                self._lock.notify_all()  # the next in line may be able to take a slot now

    def release(self, server_id: str, token: str, failed: bool = False) -> None:
        """A slot back; `failed`: the server failed the call (died): it takes no slot until it has loaded
        again (Ray's restart) or is replaced."""
        with self._lock:
            server = self._servers.get(server_id)
            if server is not None:
                if token in server.holders:
                    server.holders.remove(token)
                if failed:
                    server.ready = False
            self._lock.notify_all()

    def loaded(self) -> int:
        """How many servers are loaded and alive, as far as the broker knows (the watchdog's question)."""
        with self._lock:
            return sum(1 for s in self._servers.values() if s.ready)

    # ---- the servers' lives

    def _new_server(self) -> None:
        import ray

        handle = ray.remote(GenerationServer).options(**self._options).remote(*self._args)
        self._servers[handle._actor_id.hex()] = _Server(handle)

    def _grow(self) -> None:
        """Start servers up to what the alive nodes hold (all `max` with an autoscaler) beside the plan's
        other stages, counting every server not dead for good (one restarting waits for a GPU itself)."""
        from latte_ray.plan.fit import Autoscaler, initial_pool_size

        self._grown_at = time.monotonic()
        scaler = Autoscaler(self._autoscaling, "the driver's finding")
        try:
            target = min(self._most, initial_pool_size(self._spec, scaler=scaler))
        except Exception as e:  # noqa: BLE001 - the GCS did not answer: try again next time
            log.warning("could not read the cluster's nodes (%s)", e)
            return
        with self._lock:
            new = max(0, target - len(self._servers))
            if new and self._servers:
                log.info("%d more generation server(s): the cluster holds %d", new, target)
            for _ in range(new):
                self._new_server()

    def _watch(self) -> None:
        """Notes each server's model load (and reload after a restart), forgets the servers that died for
        good, reclaims slots held by clients that died, and grows the fleet with the cluster."""
        import ray

        while not self._stop.is_set():
            with self._lock:
                for server in self._servers.values():
                    if not server.ready and server.waiting is None:
                        server.waiting = server.handle.ready.remote()
                waiting = {s.waiting: sid for sid, s in self._servers.items() if s.waiting is not None}
            done = ray.wait(list(waiting), num_returns=len(waiting), timeout=WAIT_S)[0] if waiting else []
            if not waiting:
                self._stop.wait(WAIT_S)
            for ref in done:
                self._loaded(waiting[ref], ref)
            if time.monotonic() - self._grown_at >= GROW_EVERY_S:
                self._reclaim()
                self._grow()

    def _loaded(self, sid: str, ref) -> None:
        import ray

        try:
            _, node = ray.get(ref)
            outcome = "ready"
        except ray.exceptions.RayActorError as e:
            state = actor_entry(self._servers[sid].handle).get("State")
            outcome = "failed" if _raised_in_constructor(e) else "dead" if state == "DEAD" else "again"
        with self._lock:
            server = self._servers.get(sid)
            if server is None:
                return
            server.waiting = None
            if outcome == "ready":
                server.ready, server.node = True, node
            elif outcome == "failed" and self._failed is None:
                self._failed = server.handle
            elif outcome == "dead":  # restarts spent: a new server takes its place at the next _grow
                del self._servers[sid]
                self._grown_at = 0.0
                log.warning("generation server %s died for good (execution.max_restarts spent); a new one "
                            "takes its place", sid[:8])
            self._lock.notify_all()

    def _reclaim(self) -> None:
        """Slots held by client processes that are gone go back: a client dead for good (its execution
        ended or was stopped mid-call), or an earlier process of a client that Ray restarted (a grant that
        reached it after the new process had started)."""
        with self._lock:
            clients = {t.split(":")[0] for s in self._servers.values() for t in s.holders}
        dead = {c for c in clients if actor_state(c) == "DEAD"}
        with self._lock:
            self._drop_holders(lambda t: t.split(":")[0] in dead or self._clients.get(t.split(":")[0]) != t)

    def _drop_holders(self, stale) -> None:
        """Under the lock: free the slots whose holder token is `stale`."""
        for server in self._servers.values():
            server.holders = [t for t in server.holders if not stale(t)]
        self._lock.notify_all()

    def close(self) -> None:
        import ray

        self._stop.set()
        with self._lock:
            for server in self._servers.values():
                ray.kill(server.handle, no_restart=True)
            self._servers.clear()
            self._lock.notify_all()


def pick_slot(servers: dict[str, _Server], waiting, key: tuple[int, int], prefer_node: str | None = None
              ) -> str | None:
    """The server whose free slot the batch `key` (round, ticket) takes now, or None (it waits): a loaded
    server with the most free slots (the less used first), once fewer batches of the `waiting` keys are
    ahead of it (older rounds, then earlier tickets) than slots are free. `prefer_node`: only servers on that
    node while one there is loaded, and no waiting in line."""
    loaded = [(sid, s) for sid, s in servers.items() if s.ready]
    if prefer_node is not None and any(s.node == prefer_node for _, s in loaded):
        loaded = [(sid, s) for sid, s in loaded if s.node == prefer_node]
    free = [(sid, s) for sid, s in loaded if len(s.holders) < SLOTS]
    ahead = 0 if prefer_node is not None else sum(1 for k in waiting if k < key)
    if sum(SLOTS - len(s.holders) for _, s in free) <= ahead:
        return None
    return min(free, key=lambda e: (len(e[1].holders), e[1].granted))[0]
