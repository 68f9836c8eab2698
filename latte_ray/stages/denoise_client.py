"""Denoise stage, with the model kept for the whole run (`execution.keep_model_actors`): a thin Ray Data actor
that hands each batch to its generation server (stages/servers.py says why the model lives there).

The client holds no GPU and no CPU. Its constructor takes a server from the run's broker and waits until that
server's model has loaded, so Ray Data gives it work only then; a server whose model cannot load (a corrupt
weight file) fails the client's start with the server's own error, which ends the run with its root cause
as the pooled stage does. A batch goes to the server as it is and comes back as the DenoiseStage returns it.
"""

from __future__ import annotations

import numpy as np


class DenoiseClient:
    def __init__(self, broker):
        import ray

        self.server = ray.get(broker.acquire.remote(ray.get_runtime_context().get_actor_id()))
        # Raises, when the server's constructor raised, Ray's error carrying the server's traceback (its
        # root cause is what faults/rootcause.py reports, and "raised in its creation task" is not re-planned).
        ray.get(self.server.ready.remote())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        return ray.get(self.server.generate.remote(batch))
