"""fleet: does a simulated 64-GPU fleet ever wait? A real multi-node Ray on this machine, the sim engine.

`ray.cluster_utils.Cluster` starts a head (no CPUs: the driver) and N worker nodes, each its own raylet,
declaring G logical GPUs. The run uses the production spec's execution settings (pipelines/latte-1-t2v-512.yaml:
batch 2, one GPU per actor, the autoscaling pool bounds, rounds) with `model.source: sim`: each actor sleeps
Latte-1's load + compile and 14.6 s per video, all times multiplied by --time-scale, and makes null frames
at a small size so the encode and write stages do their real work. Scaled down to fit 2 cores:
  - time: every simulated second takes --time-scale real seconds (stated in the output);
  - CPUs (--node-shape scaled, the default): a node declares 1 logical CPU (Ray wants whole numbers) and every
    CPU share of the spec is divided by the CPUs a production 8-GPU node has (8 actors x 2 + 1 = 17), so a
    node's actors and CPU stages fit in it as they fit in the real node. --node-shape real: a node declares
    the real node's 17 logical CPUs and the spec's shares are kept (the same actors fit; Ray's and Ray Data's
    accounting see the real numbers: Ray Data's resource coordinator splits a node's leftover CPUs between
    concurrent executions in whole CPUs, which gives a second execution none on a 1-CPU node). Either way the
    CPU-stage work runs on this machine's two vCPUs, bounded by execution.cpu_stage_max_actors;
  - rounds: execution.round_rows is scaled to --batches-per-round batches per GPU (production's 100,000
    rows are ~781 batches per GPU on 64 GPUs), so the per-round costs show within minutes.
Measured from the manifest's busy intervals (latte_ray/ops/fleet.py), as ratios:
  fleet utilization (GPU-busy s / GPU-s available), also after the first load; time to a full fleet against
  one load time; idle GPU-seconds in the ramp-up against GPUs x one load; per round: actor lives (model
  loads), tail and reload; the end tail in batch times. Scenarios: all nodes from the start (steady), nodes
  that join late (autoscaling), a node lost mid-run (and its replacement joining).

    .venv/bin/python benchmarks/fleet.py [--scenario steady|late|loss] [--nodes 8] [--gpus-per-node 8]
                                         [--time-scale 0.1] [--rounds 3] [--batches-per-round 4]
                                         [--pooled] [--late-fixed] [--node-shape scaled|real]
                                         [--cpu-stage-actors N] [--dump LIVES.json]
The 64-GPU figures in benchmarks/README.md: --nodes 8 --gpus-per-node 8 --time-scale 0.25 --rounds 3
--batches-per-round 16 (one scenario per run; a run takes 8-11 minutes and up to 15 GiB here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from _common import machine, write_prompt_table

AUTOSCALER_ENV = "LATTE_RAY_AUTOSCALER"  # plan/fit.py: whether an autoscaler can add nodes
NODE_CPUS_REAL = 17  # a production 8-GPU node: 8 actors x 2 CPUs + 1 for the CPU stages (latte-1-t2v-512.yaml)


def fleet_spec(time_scale: float, round_rows: int, concurrency=None, keep: bool = True, cpu_stage_actors=None,
               real_cpus: bool = False):
    from latte_ray.spec import load_pipeline_spec, parse_pipeline_spec

    raw = json.loads(load_pipeline_spec("latte-1-t2v-512").model_dump_json())
    raw["model"]["source"] = "sim"
    raw["model"]["sim"] = {"time_scale": time_scale}  # the defaults: Latte-1's times
    raw["sampling"].update(height=32, width=32, video_length=16)  # null frames, encoded and written for real
    raw["video"]["preset"] = "ultrafast"
    ex = raw["execution"]
    cpu = 1.0 if real_cpus else 1.0 / NODE_CPUS_REAL
    ex.update(num_cpus_per_actor=round(ex["num_cpus_per_actor"] * cpu, 4),
              num_cpus_per_cpu_task=round(ex["num_cpus_per_cpu_task"] * cpu, 4), round_rows=round_rows,
              keep_model_actors=keep)
    if cpu_stage_actors is not None:  # each CPU-stage pool's most actors (this machine's memory, not its CPUs)
        ex["cpu_stage_max_actors"] = cpu_stage_actors
    if concurrency is not None:  # the production spec's [1, 64]: at most as many as the fleet will have
        ex["concurrency"] = concurrency
    return parse_pipeline_spec(raw)


class Fleet:
    """The cluster, and the GPUs it offered over time (node joins and losses) for the utilization."""

    def __init__(self, gpus_per_node: int, tmp: Path, node_cpus: int = 1):
        from ray.cluster_utils import Cluster

        os.environ["RAY_TMPDIR"] = str(tmp)
        self.gpus_per_node, self.node_cpus = gpus_per_node, node_cpus
        self.cluster = _retry(lambda: Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "object_store_memory": 200 * 2**20}))
        self.events: list[tuple[float, int]] = []  # (time.time(), +/- GPUs)
        self.lost: set[str] = set()  # ids of the nodes removed
        self.nodes = []

    def add(self, n: int = 1) -> None:
        for _ in range(n):
            self.nodes.append(_retry(lambda: self.cluster.add_node(
                num_cpus=self.node_cpus, num_gpus=self.gpus_per_node, object_store_memory=100 * 2**20)))
        self.cluster.wait_for_nodes()
        self.events.append((time.time(), n * self.gpus_per_node))

    def lose(self) -> None:
        node = self.nodes.pop(0)
        self.lost.add(node.node_id)
        self.cluster.remove_node(node, allow_graceful=False)  # raylet, workers, object store: gone at once
        self.events.append((time.time(), -self.gpus_per_node))

    def slots_at(self, t: float) -> int:
        return sum(d for at, d in self.events if at <= t)

    def available(self, t0: float, t1: float) -> float:
        """GPU-seconds the cluster offered in [t0, t1]."""
        marks = sorted({t0, t1, *(at for at, _ in self.events if t0 < at < t1)})
        return sum(self.slots_at(a) * (b - a) for a, b in zip(marks, marks[1:]))

    def shutdown(self) -> None:
        self.cluster.shutdown()


class Peak:
    """The machine's peak memory in use and 1-minute load average while the run goes (a 64-GPU fleet is
    64 server processes on this one machine)."""

    def __init__(self, every_s: float = 2.0):
        import psutil

        self._mem, self._load = 0, 0.0
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(every_s):
                self._mem = max(self._mem, psutil.virtual_memory().used)
                self._load = max(self._load, os.getloadavg()[0])

        threading.Thread(target=sample, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def result(self) -> dict:
        return {"peak_memory_gib": self._mem / 2**30, "peak_load_average": self._load}


def _retry(start, tries: int = 3):
    """A node start, again when it timed out: Ray gives a raylet 30 s to register, which a machine shared
    with other tenants at load average 20+ does not always meet."""
    for attempt in range(tries):
        try:
            return start()
        except Exception as e:  # noqa: BLE001
            if attempt == tries - 1 or "timed out during startup" not in str(e):
                raise
            print(f"(a node start timed out, trying again: {e})")


def by_round(rows, n_rounds: int):
    """The actor lives of each round, each with only that round's calls: a row's round is the one the runner
    gave it (its id key modulo the rounds, stages/prepare.py), so the per-round figures are the same
    whether the rounds share their actors (execution.keep_model_actors) or each has its own."""
    import numpy as np
    import pyarrow as pa

    from latte_ray.ops.fleet import lives
    from latte_ray.plan.keys import id_keys

    if n_rounds <= 1:
        return [lives(rows)]
    k = id_keys(np.array(rows["id"].to_pylist(), dtype=object))["lo"] % np.uint64(n_rounds)
    return [found for r in range(n_rounds)
            if (found := lives(rows.filter(pa.array(k == np.uint64(r)))))]


def first_full(found, fleet: Fleet, after: float) -> float | None:
    """The first time at or after `after` when every GPU offered is busy."""
    from latte_ray.ops.fleet import busy_calls, step_curve

    times, counts = step_curve(busy_calls(found))
    for t, c in zip(times, counts):
        if t >= after and c >= fleet.slots_at(t) > 0:
            return float(t)
    return None


def measure(found, rounds, fleet: Fleet, t_run0: float, t_run1: float, load: float, batch: float,
            pooled: bool = False) -> dict:
    """`found`: every actor life of the run; `rounds`: each round's lives with that round's calls only.
    `pooled`: each round had its own actors (keep_model_actors off), so a life's work ends with its round."""
    from latte_ray.ops.fleet import busy_between

    gpus = max(fleet.slots_at(t) for t, _ in fleet.events)
    busy = sum(l.busy_s for l in found)
    t_first = min(l.started for l in found)
    r = {"GPUs": gpus, "actor lives": len(found), "rounds": len(rounds), "wall_s": t_run1 - t_run0,
         "busy_gpu_s": busy, "utilization": busy / fleet.available(t_run0, t_run1)}
    after_load = t_first + load
    r["utilization_after_first_load"] = (busy_between(found, after_load, t_run1)
                                         / fleet.available(after_load, t_run1))
    # Each actor from its own first call to the last call of the run: every GPU's load (and its process's
    # start, which here queues on two shared vCPUs) left out, round changes, tails and data-plane gaps in.
    # Pooled, each life is counted to its own round's last call (its pool ends there; the next round's
    # lives are other actors on the same GPUs).
    t_last = max(l.last_end for l in found)
    spans = ([max(x.last_end for x in pool) - l.first_busy for pool in rounds for l in pool] if pooled
             else [t_last - l.first_busy for l in found])
    r["utilization_from_each_first_call"] = busy / sum(spans)
    full = first_full(found, fleet, t_first)
    r["full_fleet_after_first_start_in_loads"] = (full - t_first) / load if full else None
    r["actor_starts_spread_s"] = max(l.started for l in rounds[0]) - t_first
    window_end = full or max(l.first_busy for l in rounds[0])
    idle = fleet.available(t_first, window_end) - busy_between(found, t_first, window_end)
    r["ramp_idle_gpu_s_in_gpu_loads"] = idle / (gpus * load)
    per_round = []
    for k, lives in enumerate(rounds):
        end = max(l.last_end for l in lives)
        # The tail starts when the first GPU that could still work ran out of it: not a lost node's.
        tail_start = min(l.last_end for l in lives if l.node not in fleet.lost or len(lives) == 1)
        entry = {"lives": len(lives), "tail_s_in_batches": (end - tail_start) / batch}
        if k:
            # From the first GPU out of the previous round's work to the fleet full again (with any round's
            # work: with the models kept, two rounds run at once and the next fills the last one's tail).
            prev_tail = min(l.last_end for l in rounds[k - 1])
            back = first_full(found, fleet, prev_tail) or max(l.first_busy for l in lives)
            gap = fleet.available(prev_tail, back) - busy_between(found, prev_tail, back)
            entry["reload_idle_gpu_s_in_gpu_loads"] = gap / (gpus * load)
            entry["reload_s_in_loads"] = (back - max(l.last_end for l in rounds[k - 1])) / load
            # Real seconds from the previous round's last call to this round's first: the execution's start
            # (negative: this round had begun before the last one ended).
            entry["gap_s"] = min(l.first_busy for l in lives) - max(l.last_end for l in rounds[k - 1])
        per_round.append(entry)
    r["per_round"] = per_round
    # The end tail over every round's calls (two rounds may run at once): from the first GPU that ran out of
    # work for good (not a lost node's) to the last call's end.
    # Pooled: the last round's actors are the ones that can be out of work at the end.
    last_lives = {l.actor: l for l in (rounds[-1] if pooled else found)}  # an actor's last life (sorted by start)
    survivors = [l for l in last_lives.values() if l.node not in fleet.lost] or found
    r["end_tail_in_batches"] = (t_last - min(l.last_end for l in survivors)) / batch
    gaps = sorted(b[0] - a[1] for l in found for a, b in zip(l.calls, l.calls[1:]))
    r["median_gap_between_calls_ms"] = 1000 * gaps[len(gaps) // 2] if gaps else None
    # Where the idle time is: GPU-seconds between one actor's consecutive calls (the data plane or the
    # slots not keeping it fed), and the fleet's utilization in ten equal windows from the first start.
    r["idle_between_calls_gpu_s_in_gpu_loads"] = sum(gaps) / (gpus * load)
    r["gaps_over_1s"] = sum(1 for g in gaps if g > 1.0)
    edges = [t_first + (t_last - t_first) * i / 10 for i in range(11)]
    r["utilization_by_tenth"] = [round(busy_between(found, a, b) / fleet.available(a, b), 3)
                                 for a, b in zip(edges, edges[1:])]
    return r


def run_scenario(name: str, args, work: Path) -> dict:
    import ray

    from latte_ray import runner, scheduler
    from latte_ray.ops.fleet import lives
    from latte_ray.record.storage import OutputLayout, filesystem, read_manifest
    from latte_ray.spec import RunSpec

    gpus = args.nodes * args.gpus_per_node
    round_rows = gpus * 2 * args.batches_per_round
    prompts = round_rows * args.rounds
    real = args.node_shape == "real"
    spec = fleet_spec(args.time_scale, round_rows, concurrency=[1, gpus], keep=not args.pooled,
                      cpu_stage_actors=args.cpu_stage_actors, real_cpus=real)
    sim = spec.model.sim_timing
    load = (sim.load_s + (sim.compile_s if spec.model.compile.enabled else 0)) * sim.time_scale
    batch = sim.batch_seconds(spec.execution.batch_size) * sim.time_scale
    table = write_prompt_table(work / f"{name}.parquet", prompts)
    out = work / f"out-{name}"
    tmp = Path(tempfile.mkdtemp(prefix="lrf", dir="/tmp"))  # short: unix socket paths
    fleet = Fleet(args.gpus_per_node, tmp, node_cpus=NODE_CPUS_REAL if real else 1)
    try:
        fleet.add(args.nodes if name != "late" else args.late_start)
        ray.init(address=fleet.cluster.address, logging_level="WARNING")
        # The script adds the late nodes as an autoscaler would: the driver is told one is there, so the
        # pool starts at its maximum (the pending actors are the demand). --late-fixed: no autoscaler, the
        # fleet grows only as the run sees nodes join.
        os.environ[AUTOSCALER_ENV] = "1" if name == "late" and not args.late_fixed else "0"
        peak = Peak()
        # Ray starts a node from the main thread only (signal handlers): the run goes in a thread, and the
        # node events (joins, a loss) happen here.
        done, result = threading.Event(), {}

        def generate():
            try:
                result["summary"] = runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=str(out)))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                result["error"] = e
            finally:
                done.set()

        t_run0 = time.time()
        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        if name == "late":  # the autoscaler brings 2 more nodes every load time
            while len(fleet.nodes) < args.nodes and not done.wait(load):
                fleet.add(min(2, args.nodes - len(fleet.nodes)))
        elif name == "loss":  # a node lost once ~40% of the batches are committed; its replacement joins
            parts = out / "manifest"
            while not done.wait(0.5):
                if parts.exists() and len(os.listdir(parts)) >= 0.4 * prompts / spec.execution.batch_size:
                    fleet.lose()
                    fleet.add(1)
                    break
        done.wait()
        t_run1 = time.time()
        peak.stop()
        thread.join()
        if "error" in result:
            raise result["error"]
        summary = result["summary"]
        fs, root = filesystem(str(out))
        rows = read_manifest(fs, OutputLayout(str(out), root))
        ok = [r["id"] for r in rows.to_pylist() if r["status"] == "ok"]
        assert summary.ok == prompts and len(ok) == len(set(ok)) == prompts, (summary.ok, len(ok), len(set(ok)))
        n_rounds = scheduler.rounds(RunSpec(pipeline=spec, prompts=[str(table)], output=str(out)), prompts)
        r = measure(lives(rows), by_round(rows, n_rounds), fleet, t_run0, t_run1, load, batch, pooled=args.pooled)
        if args.dump:  # every actor life's start and calls (epoch seconds), for a closer look
            Path(args.dump).write_text(json.dumps({"t_run0": t_run0, "lives": [
                {"actor": l.actor, "node": l.node, "started": l.started, "calls": l.calls} for l in lives(rows)],
                "commits": [[row["busy_end"].timestamp(), row["finished_at"].timestamp()]
                            for row in rows.select(["busy_end", "finished_at"]).to_pylist() if row["busy_end"]]}))
        r.update(peak.result())
        r.update(scenario=name, prompts=prompts, cpu_stage_max_actors=spec.execution.cpu_stage_max_actors,
                 node_cpus=fleet.node_cpus,
                 round_rows=round_rows, load_s=load, batch_s=batch,
                 time_scale=args.time_scale, concurrency=spec.execution.concurrency,
                 keep_model_actors=spec.execution.keep_model_actors)
        return r
    finally:
        os.environ.pop(AUTOSCALER_ENV, None)
        ray.shutdown()
        fleet.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def report(r: dict) -> None:
    f = lambda v, p=2: "n/a" if v is None else f"{v:.{p}f}"  # noqa: E731
    print(f"[{r['scenario']}] {r['GPUs']} GPUs, {r['prompts']} prompts in {r['rounds']} round(s) of "
          f"{r['round_rows']} rows; load+compile {r['load_s']:.1f} s, batch {r['batch_s']:.2f} s (real, scale "
          f"{r['time_scale']}); pool {r['concurrency']}, "
          f"{'models kept for the run' if r['keep_model_actors'] else 'a pool per round'}; CPU-stage pools of at most "
          f"{r['cpu_stage_max_actors']}; {r['node_cpus']} logical CPUs per node; wall {r['wall_s']:.1f} s")
    print(f"    fleet utilization {r['utilization']:.1%} (after the first load: "
          f"{r['utilization_after_first_load']:.1%}; from each actor's first call: "
          f"{r['utilization_from_each_first_call']:.1%}); {r['actor lives']} model loads for {r['GPUs']} GPUs")
    print(f"    full fleet {f(r['full_fleet_after_first_start_in_loads'])} load times after the first actor "
          f"started (actor starts spread over {r['actor_starts_spread_s']:.1f} s); ramp-up idle "
          f"{f(r['ramp_idle_gpu_s_in_gpu_loads'])} x (GPUs x one load)")
    for k, p in enumerate(r["per_round"]):
        extra = (f"; reload {f(p['reload_s_in_loads'])} load times (first call {p['gap_s']:.1f} s real after the "
                 f"last of the round before), idle "
                 f"{f(p['reload_idle_gpu_s_in_gpu_loads'])} x (GPUs x one load)" if k else "")
        print(f"    round {k + 1}: {p['lives']} actor lives, tail {f(p['tail_s_in_batches'])} batch times{extra}")
    print(f"    end tail {f(r['end_tail_in_batches'])} batch times; median gap between an actor's calls "
          f"{f(r['median_gap_between_calls_ms'], 0)} ms")
    print(f"    idle between an actor's calls {f(r['idle_between_calls_gpu_s_in_gpu_loads'])} x (GPUs x one load), "
          f"{r['gaps_over_1s']} gaps over 1 s; utilization by tenth of the run: "
          f"{' '.join(f'{u:.0%}' for u in r['utilization_by_tenth'])}")
    print(f"    machine: peak memory used {r['peak_memory_gib']:.1f} GiB, peak 1-min load average "
          f"{r['peak_load_average']:.1f}")
    print("RESULT " + json.dumps(r, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=["steady", "late", "loss"], nargs="+", default=["steady"])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--late-start", type=int, default=2, help="late: nodes at the start (2 more per load time)")
    ap.add_argument("--time-scale", type=float, default=0.1, help="real seconds per simulated second")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches-per-round", type=int, default=4, help="batches per GPU per round")
    ap.add_argument("--cpu-stage-actors", type=int, default=None, help="most actors per CPU-stage pool (default: "
                    "the production spec's 16, shared by the rounds under way)")
    ap.add_argument("--node-shape", choices=["scaled", "real"], default="scaled", help="scaled: 1-CPU nodes and "
                    "CPU shares / 17; real: the production node's 17 logical CPUs and the spec's shares")
    ap.add_argument("--dump", default=None, help="write every actor life's start and calls to this JSON file")
    ap.add_argument("--late-fixed", action="store_true", help="late: no autoscaler (the pool grows as the run "
                    "sees nodes join) instead of the script acting as one (the pool starts at its maximum)")
    ap.add_argument("--pooled", action="store_true", help="each round's Ray Data pool loads its own models "
                    "(execution.keep_model_actors off: the behaviour before the generation servers)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="latte-ray-fleet-"))
    try:
        for name in args.scenario:
            report(run_scenario(name, args, work))
        print(f"machine after: load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
