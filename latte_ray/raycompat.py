"""Every use of Ray's private APIs, in one place: what Ray offers no public call for (the GCS actor table with
restart counts, killing an actor by id when its handle is gone, the autoscaler's configured limits and
status). A Ray upgrade that moves one of these breaks here, in one small module, and nowhere else.
"""

from __future__ import annotations


def actor_table(actor_id: str | None = None) -> dict:
    """The GCS record of one actor (by hex id: State, NumRestarts, Address, ...; {} when unknown), or with no
    id every actor of the cluster by id. Ray's public state API (ray.util.state) goes through the dashboard,
    which a minimal install lacks."""
    import ray

    table = ray._private.state.state.actor_table(actor_id)
    return table or {}


def kill_actor_by_id(actor_id: str) -> None:
    """End an actor whose handle is gone (ray.kill needs a handle), without restarting it."""
    import ray

    ray._private.worker.global_worker.core_worker.kill_actor(ray.ActorID.from_hex(actor_id), True)


def autoscaler_max_resources() -> dict | None:
    """The most resources the autoscaler's cluster config allows (autoscaler v2), or None."""
    import ray

    return ray._private.state.state.get_max_resources_from_cluster_config()


def autoscaler_status_key() -> str:
    """The internal-KV key under which autoscaler v1 publishes its status report."""
    from ray._private import ray_constants

    return ray_constants.DEBUG_AUTOSCALING_STATUS
