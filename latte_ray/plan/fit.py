"""Does the plan fit the cluster? Schedulable operators, and a check before any actor starts.

1. Every task-based operator asks for at most `execution.num_cpus_per_cpu_task` CPUs. Ray Data (2.60)
   gives a task operator that was not told otherwise a whole CPU (`_canonicalize_ray_remote_args`), and
   its own file listing (`ListFiles`, planned with fixed remote args) and `repartition(
   target_num_rows_per_block=...)` cannot be told otherwise through the public API. On a 2-CPU node whose
   actor pools hold 1.25 CPUs, such a task can never be scheduled: the run hangs without a word (what
   `ray job submit` on a 2-core head did). `TaskCpuCap`, an ExecutionCallback registered on the driver's
   DataContext (`use_task_cpu_cap`), lowers every task operator's request before execution starts; the
   workplan's own tasks ask for the same share.
2. `check_fit`: before any actor starts, the plan's minimum (generation actors at the pool's minimum size,
   the optional text-encode actor, one actor per CPU stage, one task slot) is packed onto the alive nodes'
   resources. When it cannot fit and no autoscaler can add nodes, the run is refused (PlanDoesNotFit: one line,
   exit 2) with the numbers and the fix; with an autoscaler, what must be added is logged and the run goes
   on (the progress watchdog covers a cluster that never grows).
3. `initial_pool_size`: the generation pool starts as large as the cluster allows.
4. `check_attention_grid` (called in the driver's preflight, before Ray starts): a CUDA batch whose temporal
   attention would get more sequences than a CUDA grid dimension holds is refused, naming the largest batch
   that fits.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

from latte_ray.raycompat import autoscaler_max_resources, autoscaler_status_key
from latte_ray.errors import PlanDoesNotFit, SpecError
from latte_ray.spec import STAND_IN_SOURCES, pool_bounds

log = logging.getLogger(__name__)

AUTOSCALER_ENV = "LATTE_RAY_AUTOSCALER"  # "1"/"0": say whether an autoscaler can add nodes (overrides detection)
EPS = 1e-6


# ---- 1. task operators ask for a small share of a CPU


def _task_cpu_cap_class(cpus: float):
    from ray.data._internal.execution.execution_callback import ExecutionCallback
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    class TaskCpuCap(ExecutionCallback):
        cap = cpus

        def before_execution_starts(self, executor) -> None:
            for op in executor._topology:
                args = getattr(op, "_ray_remote_args", None)
                if args is None or isinstance(op, ActorPoolMapOperator) or args.get("num_gpus"):
                    continue
                if args.get("num_cpus", 1) > self.cap:
                    log.debug("operator %s: num_cpus %s -> %s", op.name, args.get("num_cpus"), self.cap)
                    args["num_cpus"] = self.cap

    return TaskCpuCap


def use_task_cpu_cap(cpus: float) -> None:
    """From now on, every Ray Data execution this driver starts caps its task operators at `cpus` CPUs
    (datasets copy the current DataContext when they are created)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    kept = [c for c in ctx.custom_execution_callback_classes if c.__name__ != "TaskCpuCap"]
    ctx.custom_execution_callback_classes = [*kept, _task_cpu_cap_class(cpus)]


# ---- 2. the plan's minimum against the cluster


@dataclass(frozen=True)
class Demand:
    what: str
    cpu: float
    gpu: float = 0.0


def plan_minimum(spec, generate: bool = True) -> list[Demand]:
    """What must run at once for the plan to make progress (stages/graph.build_plan's operators)."""
    ex = spec.execution
    task = ex.num_cpus_per_cpu_task
    demands = [Demand("write-stage actor", task)]
    if generate:
        demands.append(Demand("encode-stage actor", task))
        lo, _ = pool_bounds(ex.concurrency)
        if ex.text_encode_stage:
            demands.append(Demand("text-encode actor", ex.num_cpus_per_actor, ex.num_gpus_per_actor))
        demands += [Demand("generation actor", ex.num_cpus_per_actor, ex.num_gpus_per_actor)] * lo
        scoring = spec.scoring
        if scoring.enabled:  # stages/graph.generation: the sample-frames CPU stage, then the scoring actor pool
            demands.append(Demand("sample-frames-stage actor", task))
            low, _ = pool_bounds(scoring.concurrency)
            demands += [Demand("scoring actor", scoring.num_cpus, scoring.num_gpus)] * low
    demands.append(Demand("task slot (file listing, reads with the prepare stage, repartition, pre-pass)", task))
    return demands


def pack(demands: list[Demand], nodes: list[dict]) -> list[Demand]:
    """First-fit decreasing of the demands onto the nodes' resources; returns what does not fit."""
    free = [{"CPU": float(n.get("CPU", 0)), "GPU": float(n.get("GPU", 0))} for n in nodes]
    left = []
    for demand in sorted(demands, key=lambda d: (d.gpu, d.cpu), reverse=True):
        for node in free:
            if node["CPU"] + EPS >= demand.cpu and node["GPU"] + EPS >= demand.gpu:
                node["CPU"] -= demand.cpu
                node["GPU"] -= demand.gpu
                break
        else:
            left.append(demand)
    return left


def alive_nodes() -> list[dict]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive") and n.get("Resources")]


@dataclass
class Autoscaler:
    present: bool
    how: str
    max_resources: dict | None = None  # the most the autoscaler can reach, when it says


_READONLY_TYPE = re.compile(r"^node_[0-9a-f]+$")  # the anonymous node types of a cluster without autoscaler


def autoscaler() -> Autoscaler:
    """Whether an autoscaler can add nodes to this cluster:
    - LATTE_RAY_AUTOSCALER=1|0 decides when set;
    - the cluster config that autoscaler v2 (and KubeRay with it) reports to the GCS, read as Ray Data
      reads it (ray.data's is_autoscaling_enabled: a node type whose max count exceeds its min);
    - autoscaler v1 (`ray up`, KubeRay's default) publishes its status under `__autoscaling_status`: a
      real one names node types from its config, while a cluster without one (`ray start`) has only
      anonymous `node_<id>` types.
    """
    forced = os.environ.get(AUTOSCALER_ENV)
    if forced in ("0", "1"):
        return Autoscaler(forced == "1", f"{AUTOSCALER_ENV}={forced}")
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.util import is_autoscaling_enabled

        if is_autoscaling_enabled():
            limits = autoscaler_max_resources()
            return Autoscaler(True, "the cluster config reported by the autoscaler", limits)
    except Exception as e:  # noqa: BLE001 - detection is best effort
        log.debug("autoscaler v2 config unreadable: %s", e)
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(autoscaler_status_key())
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
        types = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {})
        types |= set(report.get("pending_launches") or {}) | set((report.get("node_type_mapping") or {}).values())
        if any(not _READONLY_TYPE.match(t) for t in types):
            return Autoscaler(True, f"autoscaler v1 with node types {sorted(types)}")
    except Exception as e:  # noqa: BLE001
        log.debug("autoscaler v1 status unreadable: %s", e)
    return Autoscaler(False, "no autoscaler found (set LATTE_RAY_AUTOSCALER=1 if one can add nodes)")


def _describe(demands: list[Demand]) -> str:
    counts: dict[Demand, int] = {}
    for d in demands:
        counts[d] = counts.get(d, 0) + 1
    return ", ".join(f"{n} {d.what}{'s' if n > 1 else ''} x ({d.cpu:g} CPU{f', {d.gpu:g} GPU' if d.gpu else ''})"
                     for d, n in counts.items())


def _need(demands: list[Demand]) -> tuple[float, float]:
    return sum(d.cpu for d in demands), sum(d.gpu for d in demands)


def _have(nodes: list[dict]) -> tuple[float, float]:
    return sum(float(n.get("CPU", 0)) for n in nodes), sum(float(n.get("GPU", 0)) for n in nodes)


def _fix(spec, demands: list[Demand], nodes: list[dict], left: list[Demand]) -> str:
    ex = spec.execution
    cluster_gpus = _have(nodes)[1]
    if any(d.gpu for d in left) or (spec.model.device == "cuda" and cluster_gpus == 0):
        if cluster_gpus == 0:
            return ("run it on a cluster with GPU nodes (or one whose autoscaler adds them), or use a CPU spec "
                    "(model.device: cpu, execution.num_gpus_per_actor: 0, e.g. --pipeline tiny-cpu)")
        others = [d for d in demands if d.what != "generation actor"]
        fits = 0
        gen = next(d for d in demands if d.what == "generation actor")
        while fits < 1024 and not pack(others + [gen] * (fits + 1), nodes):
            fits += 1
        _, hi = pool_bounds(ex.concurrency)
        return (f"lower the generation pool's minimum to what fits ({fits}: --concurrency {max(fits, 1)},{max(hi, 1)} "
                f"or execution.concurrency: [{max(fits, 1)}, {max(hi, 1)}]), or add GPU nodes")
    return ("lower execution.num_cpus_per_actor / num_cpus_per_cpu_task, or run on nodes with more CPUs "
            "(each node must have at least one CPU beyond a generation actor's share)")


def check_fit(spec, generate: bool = True, nodes: list[dict] | None = None,
              scaler: Autoscaler | None = None) -> None:
    """Refuse a plan that can never be scheduled on this cluster (PlanDoesNotFit naming the numbers and the
    fix), or log what the autoscaler must add."""
    demands = plan_minimum(spec, generate)
    nodes = alive_nodes() if nodes is None else nodes
    left = pack(demands, nodes)
    # The stand-in engines (null, sim) touch no device: a sim fleet of CPU actors is a valid plan.
    needs_cuda = (generate and spec.model.device == "cuda" and _have(nodes)[1] == 0
                  and spec.model.source not in STAND_IN_SOURCES)
    if not left and not needs_cuda:
        return
    need_cpu, need_gpu = _need(demands)
    have_cpu, have_gpu = _have(nodes)
    what = (f"the plan needs at least {need_cpu:g} CPU and {need_gpu:g} GPU at once ({_describe(demands)}); "
            f"the cluster has {len(nodes)} node{'s' if len(nodes) != 1 else ''} with {have_cpu:g} CPU and "
            f"{have_gpu:g} GPU in all")
    if needs_cuda and not left:
        what += ", and the spec asks for model.device: cuda"
    else:
        what += f"; these do not fit: {_describe(left)}"
    scaler = autoscaler() if scaler is None else scaler
    if scaler.present:
        limits = scaler.max_resources or {}
        over = [name for name, need in (("CPU", need_cpu), ("GPU", need_gpu))
                if name in limits and need > float(limits[name]) + EPS]
        if not over:
            log.warning("%s. An autoscaler can add nodes (%s): waiting for it; the progress watchdog stops "
                        "the run if the cluster never grows", what, scaler.how)
            return
        what += f"; the autoscaler's limit is {', '.join(f'{n} {limits[n]:g}' for n in over)}"
    else:
        what += f" ({scaler.how})"
    raise PlanDoesNotFit(f"the plan cannot run on this cluster: {what}. Fix: {_fix(spec, demands, nodes, left)}")


# ---- 3. the generation pool starts as large as the cluster allows


def initial_pool_size(spec, nodes: list[dict] | None = None, scaler: Autoscaler | None = None) -> int:
    """How many generation actors the pool starts with (Ray Data's ActorPoolStrategy `initial_size`).

    Ray Data starts an autoscaling pool at its minimum and adds actors only while inputs queue up, a few at
    a time, each then loading its model: with `concurrency: [1, 64]` a fleet took many load times to fill,
    and did so again in every round (benchmarks/fleet.py). Actors that start together load together, so
    the pool starts with as many as the alive nodes hold beside the plan's other minimum (every GPU busy
    about one load time after the first), and with its maximum when an autoscaler can add nodes: the
    pending actors are the resource demand that makes it add them at once rather than one at a time. On a
    fixed cluster smaller than the maximum, no actor is left pending that could never be placed; the
    pool still grows toward its maximum when nodes join."""
    ex = spec.execution
    lo, hi = pool_bounds(ex.concurrency)
    if lo == hi:
        return lo
    if (scaler or autoscaler()).present:
        return hi
    nodes = alive_nodes() if nodes is None else nodes
    others = [d for d in plan_minimum(spec) if d.what != "generation actor"]
    gen = Demand("generation actor", ex.num_cpus_per_actor, ex.num_gpus_per_actor)
    fits = lo
    while fits < hi and not pack(others + [gen] * (fits + 1), nodes):
        fits += 1
    return fits


# ---- 4. temporal attention within CUDA's grid

CUDA_GRID_LIMIT = 65_535  # a CUDA grid's y and z dimensions; SDPA's kernels put the batch of sequences on one
LATTE_PATCH_SIZE, LATTE_VAE_SCALE = 2, 8  # Latte-1's (and the tiny model's), when the configs cannot be read


def temporal_attention_sequences(batch_size: int, sampling, patch_size: int = LATTE_PATCH_SIZE,
                                 vae_scale_factor: int = LATTE_VAE_SCALE) -> int:
    """How many sequences one temporal-attention call of LatteTransformer3DModel gets (diffusers 0.42
    `forward`): the transformer runs on (2 x batch with classifier-free guidance) latent videos of
    height // vae_scale_factor x width // vae_scale_factor; its patch embedding makes
    (h // patch_size) x (w // patch_size) tokens per frame, and before each temporal block it reshapes
    (batch x frames, tokens, hidden) to (batch x tokens, frames, hidden): one sequence of `frames` per token
    of every video."""
    rows = batch_size * (2 if sampling.guidance_scale > 1.0 else 1)
    tokens = (sampling.height // vae_scale_factor // patch_size) * (sampling.width // vae_scale_factor // patch_size)
    return rows * tokens


def largest_batch_within_grid(sampling, patch_size: int = LATTE_PATCH_SIZE,
                              vae_scale_factor: int = LATTE_VAE_SCALE) -> int:
    """The largest batch whose temporal attention stays within CUDA_GRID_LIMIT sequences (0: not even one)."""
    per_video = temporal_attention_sequences(1, sampling, patch_size, vae_scale_factor)
    return CUDA_GRID_LIMIT // per_video if per_video else 1 << 30


def grid_geometry(spec) -> tuple[int, int]:
    """(patch_size, vae_scale_factor) of the spec's model, read from its transformer and VAE configs (a hub id
    or local folder; LattePipeline's vae_scale_factor is 2 ** (len(block_out_channels) - 1)); Latte-1's
    values for sources whose configs are not read here (the tiny model has the same)."""
    from latte_ray.model.configs import source_kind

    if source_kind(spec.model.source) in ("hub", "local"):
        try:
            from latte_ray.model.memory import source_configs

            transformer, _, vae = source_configs(spec.model)
            return int(transformer.get("patch_size") or LATTE_PATCH_SIZE), 2 ** (len(vae["block_out_channels"]) - 1)
        except Exception as e:  # noqa: BLE001 - check_model already refused an unreadable source
            log.debug("grid check: configs unreadable (%s); Latte-1's patch and VAE scale assumed", e)
    return LATTE_PATCH_SIZE, LATTE_VAE_SCALE


def check_attention_grid(spec, patch_size: int | None = None, vae_scale_factor: int | None = None) -> None:
    """Refuse (SpecError, one line) a CUDA spec whose batch puts more than CUDA_GRID_LIMIT sequences into one
    temporal-attention call: some SDPA kernels launch one grid row per sequence and fail at 65,536 (a crash
    at the first step, not the out-of-memory a batch that is too large gives). Latte-1 at 512x512 with
    guidance: 2 x 32 x 32 x 32 = 65,536 at batch 32, so 31 is the largest."""
    if spec.model.device != "cuda" or spec.model.source in STAND_IN_SOURCES:
        return
    if patch_size is None or vae_scale_factor is None:
        patch_size, vae_scale_factor = grid_geometry(spec)
    s, batch = spec.sampling, spec.execution.batch_size
    sequences = temporal_attention_sequences(batch, s, patch_size, vae_scale_factor)
    if sequences <= CUDA_GRID_LIMIT:
        return
    most = largest_batch_within_grid(s, patch_size, vae_scale_factor)
    cfg = "2 (guidance) x " if s.guidance_scale > 1.0 else ""
    per = f"{s.height // vae_scale_factor // patch_size} x {s.width // vae_scale_factor // patch_size}"
    fix = (f"the largest batch that fits is {most}: set execution.batch_size: {most} or less" if most else
           "not even one video fits: lower sampling.height and sampling.width")
    raise SpecError(
        f"execution.batch_size {batch} puts {sequences:,} sequences into one temporal attention call ({cfg}{batch} "
        f"videos x {per} latent patches at {s.height}x{s.width}), past CUDA's grid limit of {CUDA_GRID_LIMIT:,}; "
        f"{fix}")
