"""The Ray cluster a command runs on: joining it (or starting a private local one) and a line saying its size."""

from __future__ import annotations

import logging


def init_ray() -> None:
    """Join the cluster this runs in (RAY_ADDRESS, `ray job submit`), or start a private local Ray.

    Without RAY_ADDRESS the embedded default always starts its own Ray (`address="local"`), whatever else
    runs on the machine: another `ray start --head`, or a stale `ray_current_cluster` file left by one that
    died, would otherwise be joined (and `num_cpus` refused). It gets the machine's real CPUs, as Ray
    detects them: the plan fits a node with one CPU beyond a generation actor's share (plan/fit.py), so no
    extra logical CPUs are needed. It starts without Ray's dashboard: the command prints its own progress and
    the private Ray ends with it, so the dashboard's processes would only take CPU and start-up time from the
    run (a cluster started with `ray start --head` has its own).
    """
    import os

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        return
    ray.init(address="local", logging_level=logging.WARNING, include_dashboard=False)


def cluster_line() -> str:
    """`1 node, 2 CPUs, 0 GPUs`: what the connected Ray cluster has now (an autoscaling one may grow)."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    return f"{nodes} node{'s' if nodes != 1 else ''}, {cpus:g} CPUs, {gpus:g} GPUs"
