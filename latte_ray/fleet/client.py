"""Denoise stage, with the models kept for the whole run (`execution.keep_model_actors`): a thin Ray Data actor
that hands each batch to a generation server (fleet/servers.py says why the models live there).

A client holds no GPU and no CPU, and a few of them feed a whole fleet: each runs up to SLOTS batches per
server it stands for at once, one thread each (servers.client_pool). A batch asks the run's broker for a
*slot* of a loaded server, the one with the most free slots, and waits in the client until one is free; so
the first server to finish a call takes the next batch, and a server that joins mid-round (a node added) or
comes back (restarted) takes batches as soon as its model has loaded.

The constructor waits until a server has loaded, so Ray Data gives the client work only then; when a
server's model cannot load (a corrupt weight file) it raises that server's own error, which ends the run
with its root cause as the pooled stage does. A batch goes to the server as it is and comes back as the
DenoiseStage returns it.

Ray does not retry a server's calls; the client does. A call whose server died (a lost node, a deadline, a
poison row) gives its slot back as failed and the batch takes another slot: on the dead server's node first,
whose node-local crash ledger saw the attempt, so a row that kills every worker still becomes an error row
after MAX_CRASHES (faults/crashes.py). A result is the batch's whichever server made it (a video is a
function of prompt, seed and spec alone).
"""

from __future__ import annotations

import logging
import uuid

import numpy as np

from latte_ray.stages.declare import Context, Stage
from latte_ray.stages.denoise import DROPS, reads, writes

log = logging.getLogger(__name__)

CHECK_S = 10.0  # how often a batch waiting on a call looks at its server's state


class DenoiseClient:
    def __init__(self, broker, order: int = 0):
        import ray

        self.broker = broker
        self.order = order  # this execution's round: the broker serves the oldest round's batches first
        # This process's slots: a client that Ray restarts (its node lost) keeps its actor id, and the
        # broker frees what the dead process held when the new one says hello with a new token.
        self.me = f"{ray.get_runtime_context().get_actor_id()}:{uuid.uuid4().hex[:12]}"
        self.failing: set[str] = set()  # servers whose failed call was logged (no line per retry)
        while True:
            ready, failed = ray.get(broker.wait_ready.remote(self.me))
            if failed is not None:
                # Raises Ray's error carrying the server's traceback: its root cause is what
                # faults/rootcause.py reports, and "raised in its creation task" is not re-planned.
                ray.get(failed.ready.remote())
            if ready:
                return

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        from latte_ray.fleet.servers import actor_info

        prefer = None  # the node of a server that died with this batch
        while True:
            slot = ray.get(self.broker.acquire.remote(self.me, prefer, self.order))
            if slot is None:
                continue  # no slot came free yet: ask again
            sid, server, node = slot
            if sid == "failed":
                ray.get(server.ready.remote())  # raises the server's own error (see the constructor)
            failed = True
            try:
                ref = server.generate.remote(batch)
                while not ray.wait([ref], timeout=CHECK_S)[0]:
                    if not actor_info(server)[0]:
                        break  # the server died while the call waited (its node lost): another slot
                else:
                    result = ray.get(ref)
                    failed = False
                    self.failing.discard(sid)
                    return result
            except ray.exceptions.RayActorError as e:
                if sid not in self.failing:  # once per server until it makes a batch again
                    self.failing.add(sid)
                    log.warning("generation server %s failed a call (%s); the batch takes another slot",
                                sid[:8], str(e).strip().splitlines()[0][:200])
            except BaseException:
                failed = False  # the call's own error (not the server's death): the slot is fine
                raise
            finally:
                self.broker.release.remote(sid, self.me, failed)
            prefer = node


def _map_args(ctx: Context) -> dict:
    """A fixed pool of a few clients, each running several batches at once (one thread each), with room for
    two batches per server the pool may reach: a batch takes a free slot of whichever server has one
    (fleet/servers.py), so servers that join mid-round are fed without a new client."""
    import ray

    from latte_ray.fleet.servers import client_pool

    clients, in_flight = client_pool(ctx.spec)
    pool = ray.data.ActorPoolStrategy(size=clients, max_tasks_in_flight_per_actor=in_flight,
                                      max_concurrent_calls_per_actor=in_flight, enable_true_multi_threading=True)
    round_of = ctx.extra.get("round_of")
    return {"fn": DenoiseClient,
            "fn_constructor_kwargs": {"broker": ctx.extra["servers"].broker, "order": round_of[0] if round_of else 0},
            "batch_size": ctx.spec.execution.batch_size, "batch_format": "numpy", "compute": pool, "num_cpus": 0}


# The generation stage's columns: the servers run the DenoiseStage itself.
STAGE = Stage(name="DenoiseClient", label="generation actor", reads=reads, writes=writes, drops=DROPS,
              map_args=_map_args)
