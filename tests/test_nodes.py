"""Node loss on a real multi-node Ray: a head that runs no work and two 1-CPU worker nodes (this machine's 2
cores), each its own raylet (`ray.cluster_utils.Cluster`), shared by the tests of this module.

The node holding the generation actor is killed mid-run without draining, as a spot GPU preemption does,
and a replacement node joins (for each model family: the tiny Latte and the tiny Wan): the run must finish by itself, every id exactly once, every video matching
its sha256. The run keeps its generation actor for the whole run, as the production spec does
(execution.keep_model_actors): the actor killed is the generation server that holds the model; Ray
restarts it on the replacement node, and the lost batch takes a slot of a loaded server (fleet/servers.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from datetime import timezone
from pathlib import Path

import psutil
import pytest
import yaml

from latte_ray.spec import load_pipeline_spec, parse_pipeline_spec
from tests.conftest import free_port, write_prompts
from tests.invariants import (
    FAMILIES, assert_exactly_once, assert_made_by, cli_env, family_spec, kill_run, manifest, start_cli, write_spec,
)

GENERATION_ACTOR = "ray::GenerationServer"  # fleet/servers.py (the pooled stage: ray::MapWorker(MapBatches(DenoiseStage)))


# The GCS declares a node dead after this many failed health checks this far apart (Ray's defaults: 5 every
# 3 s). A killed raylet refuses the check at once, so its node is declared dead ~3 s after the kill rather than
# ~15 s (its actors are restarted only then); a live one has each check's timeout (Ray's default, 10 s) to answer.
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster(model_cache):
    """Head (0 CPUs) + two 1-CPU workers. Ray's files (and the ray_current_cluster address file that
    Cluster writes and deletes) live in a private RAY_TMPDIR, so no other Ray on the machine is touched."""
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="lrn", dir=os.environ.get("TMPDIR", "/tmp")))  # short: unix sockets
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(tmp)
    nodes = None
    try:
        nodes = Cluster(initialize_head=True, connect=False,
                        head_node_args={"num_cpus": 0, "include_dashboard": False, "dashboard_port": free_port(),
                                        "_system_config": HEALTH_CHECKS})
        for _ in range(2):
            nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        if nodes is not None:
            nodes.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(tmp, ignore_errors=True)


def _generation_node(cluster):
    """(pid, node) of the generation actor among this cluster's worker nodes (Ray workers are children of
    their node's raylet; other Rays on the machine have their own)."""
    from ray._private import ray_constants

    found = []
    for node in cluster.worker_nodes:
        raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
        for child in raylet.children(recursive=True):
            try:
                if (child.cmdline() or [""])[0].startswith(GENERATION_ACTOR):
                    found.append((child.pid, node))
            except psutil.NoSuchProcess:
                continue
    assert len(found) == 1, found
    return found[0]


def _ok_rows(out: Path) -> int:
    if not (out / "manifest").exists():
        return 0
    return sum(1 for r in manifest(out) if r["status"] == "ok")


@pytest.mark.parametrize("family", FAMILIES)
def test_losing_the_generation_node_mid_run_is_ridden_out(cluster, model_cache, tmp_path, family):
    spec = family_spec(family, batch_size=2, num_inference_steps=10)  # 0.2-0.3 s per video: the kill lands mid-run
    spec = spec.with_overrides(keep_model_actors=True)
    ids = [f"node-{i:02d}" for i in range(24)]
    table = write_prompts(tmp_path / "p.parquet", {"id": ids, "prompt": [f"a ship at sea {i}" for i in ids]})
    out = tmp_path / "out"
    args = ["run", "--pipeline", str(write_spec(tmp_path / "spec.yaml", spec)), "--prompts", str(table),
            "--output", str(out), "--no-report"]  # the report after a run: tests/test_wheel.py, test_jobs.py
    log = tmp_path / "run.log"
    proc = start_cli(args, cli_env(model_cache, RAY_ADDRESS=cluster.address), log)
    try:
        deadline = time.monotonic() + 600
        while _ok_rows(out) == 0:  # some rows committed: the run is under way
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no row was committed"
            time.sleep(0.2)
        pid, node = _generation_node(cluster)
        cluster.remove_node(node, allow_graceful=False)  # raylet, workers, object store: gone at once
        killed = time.monotonic()
        before = _ok_rows(out)
        cluster.add_node(num_cpus=1)  # the replacement a spot fleet brings
        code = proc.wait(timeout=600)
        print(f"node lost after {before} of {len(ids)} rows; the run finished {time.monotonic() - killed:.0f} s later")
    finally:
        kill_run(proc)
    assert code == 0, log.read_text()[-4000:]
    assert before < len(ids), "the node was killed after the run had finished"
    assert f"{len(ids)} ok, 0 error" in log.read_text()
    assert not psutil.pid_exists(pid)
    assert_exactly_once(out, set(ids))
    assert_made_by(out, family, spec)


def _sim_spec(**sim):
    """The production spec with the simulated engine (model.source sim: sleeps, no CPU spent, no torch) at a
    small frame size, one logical GPU and a quarter CPU per server, so a node of 1 CPU holds a server and
    the CPU stages."""
    raw = yaml.safe_load(load_pipeline_spec("latte-1-t2v-512").model_dump_json())
    raw["model"].update(source="sim", sim=sim)
    raw["model"]["compile"]["enabled"] = False
    raw["sampling"].update(height=16, width=16, video_length=4)
    raw["video"]["preset"] = "ultrafast"
    raw["execution"].update(concurrency=[1, 2], num_cpus_per_actor=0.25, num_cpus_per_cpu_task=0.25,
                            cpu_stage_max_actors=1)
    return parse_pipeline_spec(raw)


def _actors_after(out: Path, t: float) -> set[str]:
    return {r["actor"] for r in manifest(out)
            if r["status"] == "ok" and r["busy_start"].replace(tzinfo=timezone.utc).timestamp() > t}


def _wait(proc, log: Path, what: str, until) -> None:
    deadline = time.monotonic() + 300
    while not until():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_gpu_node_that_joins_works_in_the_same_round_and_a_lost_one_is_ridden_out(cluster, model_cache, tmp_path):
    """GPU nodes coming and going under one round of a run whose models are kept for the run
    (execution.keep_model_actors), with no autoscaler: the machine's 2 CPUs as two 1-CPU nodes with one
    (logical) GPU each, the simulated engine (1 s per call).

    The run starts on node A alone. Node B joins mid-round: the broker starts a server there, and once its
    model has loaded it takes batches in the same round (fleet/servers.py: slots, not a client per server).
    Then A is lost and no node with a free GPU ever joins, so Ray cannot restart A's server: the batches it
    held take B's slots and the run finishes by itself, every id exactly once. (The pooled stage would wait
    for the restart until the watchdog ended the run.)"""
    cpu_nodes = list(cluster.worker_nodes)
    for node in cpu_nodes:  # the module's two 1-CPU nodes make way: two 1-CPU GPU nodes at most, 2 CPUs
        cluster.remove_node(node)
    node_a = cluster.add_node(num_cpus=1, num_gpus=1)
    node_b = None
    cluster.wait_for_nodes()
    spec = _sim_spec(load_s=3.0, compile_s=0.0, batch_s_fixed=0.0, batch_s_per_video=0.5, time_scale=1.0)
    ids = [f"gpu-{i:02d}" for i in range(60)]  # 30 calls of 1 s: ~30 s on A alone
    table = write_prompts(tmp_path / "p.parquet", {"id": ids, "prompt": [f"a lighthouse {i}" for i in ids]})
    out = tmp_path / "out"
    args = ["run", "--pipeline", str(write_spec(tmp_path / "spec.yaml", spec)), "--prompts", str(table),
            "--output", str(out), "--no-report"]
    log = tmp_path / "run.log"
    proc = start_cli(args, cli_env(model_cache, RAY_ADDRESS=cluster.address, LATTE_RAY_AUTOSCALER="0"), log)
    try:
        _wait(proc, log, "no row was committed", lambda: _ok_rows(out) >= 2)
        node_b = cluster.add_node(num_cpus=1, num_gpus=1)
        joined_at = time.time()
        _wait(proc, log, "the joined node's server made no batch",
              lambda: len(_actors_after(out, joined_at)) == 2)
        cluster.remove_node(node_a, allow_graceful=False)  # its GPU never comes back
        lost_at = time.time()
        before = _ok_rows(out)
        code = proc.wait(timeout=600)
    finally:
        kill_run(proc)
        for node in [n for n in (node_b,) if n is not None]:
            cluster.remove_node(node)
        for _ in cpu_nodes:  # the module's cluster as it was
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    assert code == 0, log.read_text()[-4000:]
    assert before < len(ids), "the node was lost after the run had finished"
    text = log.read_text()
    assert f"{len(ids)} ok, 0 error" in text
    rows = assert_exactly_once(out, set(ids))
    assert len({r["actor"] for r in rows}) == 2  # A's server and B's: B's was started mid-round
    late = _actors_after(out, lost_at + 1)
    assert len(late) == 1, late  # after the loss, B's server made every batch: its own and A's
