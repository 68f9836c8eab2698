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


# Ray Data's Parquet reader (datasource v2) reads every input file's footer on a pool of FooterReader actors,
# 32 of them unless RAY_DATA_PARQUET_FOOTER_NUM_ACTORS says otherwise, each a new worker process, each with 128
# concurrent reads. The pool is made for every read: for a prompt table of a few files that is several worker
# processes started (and most killed before they read anything) on every run and resume, seconds of CPU on a
# small head node. One actor per FILES_PER_FOOTER_READER files keeps a large table's footers read in parallel.
FOOTER_READERS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FILES_PER_FOOTER_READER = 1024
MAX_FOOTER_READERS = 32


def footer_readers(num_files: int) -> int:
    """How many FooterReader actors a read of `num_files` Parquet files gets (1 to 32)."""
    return max(1, min(MAX_FOOTER_READERS, -(-num_files // FILES_PER_FOOTER_READER)))


def read_parquet_sized(paths: list[str], **read_args):
    """ray.data.read_parquet of `paths` with its footer-reader pool sized to their number. Ray reads the setting
    from the environment when the read is planned, here in this process; a value the user set is kept."""
    import os

    import ray

    ours = not os.environ.get(FOOTER_READERS_ENV)
    if ours:
        os.environ[FOOTER_READERS_ENV] = str(footer_readers(len(paths)))
    try:
        return ray.data.read_parquet(paths, **read_args)
    finally:
        if ours:
            os.environ.pop(FOOTER_READERS_ENV, None)
