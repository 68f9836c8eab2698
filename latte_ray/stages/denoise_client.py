"""Denoise stage, with the model kept for the whole run (`execution.keep_model_actors`): a thin Ray Data actor
that hands each batch to its generation server (stages/servers.py says why the model lives there).

The client holds no GPU and no CPU. Its constructor takes a server from the run's broker and waits until that
server's model has loaded, so Ray Data gives it work only then; a server whose model cannot load (a corrupt
weight file) fails the client's start with the server's own error, which ends the run with its root cause
as the pooled stage does. A batch goes to the server as it is and comes back as the DenoiseStage returns it.

Ray does not retry a server's calls; the client does, so that a dead server does not hold its batches for
the minutes its restart takes (a model load, after waiting for a free GPU when its node was lost): while
its own server is not alive, the client's batches go to a *stand-in*, an alive server the broker picks
(on the dead server's node first, the fewest stand-in calls first), where they queue behind that server's
own. A result is the batch's whichever server made it (a video is a function of prompt, seed and spec
alone). A row that kills its worker kills the stand-in too: the crash ledger is node-local and shared by
the node's servers, so it still counts that row's deaths and makes it an error row after MAX_CRASHES
(faults/crashes.py). With no alive server the batch waits for its own server's restart.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)

CHECK_S = 10.0  # how often a client waiting on a call looks at its server's state
RESEND_PAUSE_S = 1.0


class DenoiseClient:
    def __init__(self, broker):
        import ray

        from latte_ray.stages.servers import actor_info

        self.broker = broker
        self.server = ray.get(broker.acquire.remote(ray.get_runtime_context().get_actor_id()))
        self.server_node = None  # where the server runs (its stand-ins are looked for there first)
        self.failing: set[str] = set()  # servers whose failed call was logged (no line per retry)
        # Raises, when the server's constructor raised, Ray's error carrying the server's traceback (its
        # root cause is what faults/rootcause.py reports, and "raised in its creation task" is not re-planned).
        # A client restarted by Ray whose server is being restarted too does not wait for it (stand-ins
        # meanwhile); a first start waits for the server's first load.
        ready = self.server.ready.remote()
        while not ray.wait([ready], timeout=CHECK_S)[0]:
            alive, restarts = actor_info(self.server)
            if restarts and not alive:
                return
        _, self.server_node = ray.get(ready)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        from latte_ray.stages.servers import actor_info

        while True:
            target = self._target()
            ref = target.generate.remote(batch)
            while not (done := ray.wait([ref], timeout=CHECK_S)[0]):
                if not actor_info(target)[0]:
                    break  # the server died while the call waited: look again (its own, or a stand-in)
            if done:
                try:
                    result = ray.get(ref)
                    self.failing.discard(target._actor_id.hex())
                    return result
                except ray.exceptions.RayActorError as e:
                    server = target._actor_id.hex()
                    if server not in self.failing:  # once per server until it makes a batch again
                        self.failing.add(server)
                        log.warning("generation server %s failed a call (%s); sending the batch again",
                                    server[:8], str(e).strip().splitlines()[0][:200])
            time.sleep(RESEND_PAUSE_S)

    def _target(self):
        """The client's own server while it is alive, else a stand-in, else (none alive) its own again."""
        from latte_ray.stages.servers import actor_info

        if actor_info(self.server)[0]:
            return self.server
        stand_in = self._stand_in()
        return stand_in if stand_in is not None else self.server

    def _stand_in(self):
        import ray

        return ray.get(self.broker.stand_in.remote(self.server._actor_id.hex(), self.server_node))
