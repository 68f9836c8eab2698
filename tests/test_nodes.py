"""Node loss on a real multi-node Ray: a head that runs no work and two 1-CPU worker nodes (this machine's 2
cores), each its own raylet (`ray.cluster_utils.Cluster`), shared by the tests of this module.

The node holding the generation actor is killed mid-run without draining, as a spot GPU preemption does,
and a replacement node joins: the run must finish by itself, every id exactly once, every video matching
its sha256. The run keeps its generation actor for the whole run, as the production spec does
(execution.keep_model_actors): the actor killed is the generation server that holds the model; Ray
restarts it on the replacement node, and its Ray Data client sends the lost batch again.
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

from tests.conftest import free_port, write_prompts
from tests.invariants import assert_exactly_once, cli_env, fast_spec, kill_run, manifest, start_cli, write_spec

GENERATION_ACTOR = "ray::GenerationServer"  # stages/servers.py (the pooled stage: ray::MapWorker(MapBatches(DenoiseStage)))


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
                        head_node_args={"num_cpus": 0, "include_dashboard": False, "dashboard_port": free_port()})
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


def test_losing_the_generation_node_mid_run_is_ridden_out(cluster, model_cache, tmp_path):
    spec = fast_spec(batch_size=2, num_inference_steps=10)  # ~0.3 s per video: the kill lands mid-run
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


def test_a_lost_server_whose_node_never_comes_back_has_its_batches_made_by_a_stand_in(cluster, model_cache, tmp_path):
    """Two nodes with one (logical) GPU each, one generation server on each; one node is lost and no node
    with a free GPU ever joins, so Ray cannot restart its server. Its client's batches go to the other
    server (a stand-in, stages/denoise_client.py) and the run finishes by itself, every id exactly once;
    the pooled stage would wait for the restart until the watchdog ended the run."""
    gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    spec = fast_spec(batch_size=2, num_inference_steps=10, concurrency=2)
    spec = spec.with_overrides(keep_model_actors=True, num_gpus_per_actor=1.0)
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"device": "cpu"})})  # logical GPUs
    ids = [f"gpu-{i:02d}" for i in range(24)]
    table = write_prompts(tmp_path / "p.parquet", {"id": ids, "prompt": [f"a lighthouse {i}" for i in ids]})
    out = tmp_path / "out"
    args = ["run", "--pipeline", str(write_spec(tmp_path / "spec.yaml", spec)), "--prompts", str(table),
            "--output", str(out), "--no-report"]
    log = tmp_path / "run.log"
    proc = start_cli(args, cli_env(model_cache, RAY_ADDRESS=cluster.address), log)
    try:
        deadline = time.monotonic() + 600
        while _ok_rows(out) < 2:  # both servers are under way
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no row was committed"
            time.sleep(0.2)
        cluster.remove_node(gpu_nodes[0], allow_graceful=False)  # its GPU never comes back
        lost_at = time.time()
        before = _ok_rows(out)
        code = proc.wait(timeout=600)
    finally:
        kill_run(proc)
        for node in gpu_nodes[1:]:
            cluster.remove_node(node)
    assert code == 0, log.read_text()[-4000:]
    assert before < len(ids), "the node was lost after the run had finished"
    assert f"{len(ids)} ok, 0 error" in log.read_text()
    rows = assert_exactly_once(out, set(ids))
    late = {r["actor"] for r in rows if r["busy_start"].replace(tzinfo=timezone.utc).timestamp() > lost_at + 1}
    assert len(late) == 1, late  # after the loss, one server made every batch: its own and the stand-in's
