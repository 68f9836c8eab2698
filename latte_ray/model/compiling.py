"""torch.compile of a generation server's transformer: what is compiled (model.compile.scope) and with how many
inductor compile workers.

Scope. `whole` hands dynamo the transformer's forward: one graph of the 28 spatial and 28 temporal blocks, so
inductor generates and (in a max-autotune mode) benchmarks kernels for every block's code over again. `blocks`
is regional compilation, diffusers' `ModelMixin.compile_repeated_blocks` pattern: each repeated block is
compiled on its own; all 56 share one code object (BasicTransformerBlock), so dynamo traces it once per input
shape (the spatial and the temporal sequences) and every block reuses those graphs, their guards differing
only by the block's parameters. A cold compile is then about the cost of two blocks instead of 56, at the price
of a graph boundary between blocks (the patch embedding, the reshapes between the spatial and temporal blocks
and the output head run eagerly: a few small kernels per step). diffusers 0.42's LatteTransformer3DModel does
not declare `_repeated_blocks`, so the block class is named on the instance and diffusers' own method does
the compiling.

Compile workers. Inductor compiles its generated kernels in a pool of TORCHINDUCTOR_COMPILE_THREADS worker
processes (default: min(32, the cores this process may use)). The actor's CPU share
(execution.num_cpus_per_actor, 2 in the production spec) is what its batches need while serving, not what a
one-off cold compile before the first batch can use: on a 16-core node it would leave 14 cores idle through
minutes of compiling. The pool is sized from the node instead: its usable cores (affinity and cgroup quota)
shared among the generation actors it holds (its GPUs / num_gpus_per_actor), which compile at the same time
when a server starts.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

INDUCTOR_MAX_THREADS = 32  # inductor's own cap on its default pool


def compile_transformer(transformer, opts):
    """`transformer` compiled as model.compile says (`opts`: a CompileSpec); returns what the engine calls: the
    module itself for `blocks`, torch.compile's wrapper of it for `whole`."""
    import torch

    if opts.scope == "blocks":
        compile_in_place(transformer, opts)
        return transformer
    return torch.compile(transformer, **_compile_kwargs(opts))


def compile_in_place(transformer, opts) -> None:
    """`transformer` compiled in place as model.compile says, for an engine whose pipeline calls its own
    `pipe.transformer` (Wan: diffusers' WanPipeline.__call__ runs the loop, so the module it holds must be the
    compiled one; replacing the attribute with torch.compile's wrapper would change what the pipeline
    registered). `whole`: nn.Module.compile, torch.compile of the module's call, one graph of the model;
    `blocks`: compile_repeated_blocks."""
    if opts.scope == "blocks":
        compile_repeated_blocks(transformer, **_compile_kwargs(opts))
    else:
        transformer.compile(**_compile_kwargs(opts))


def _compile_kwargs(opts) -> dict:
    """torch.compile's arguments for a CompileSpec: static shapes (one batch size and text length per actor)."""
    mode = {"mode": opts.mode} if opts.backend == "inductor" else {}
    return {"backend": opts.backend, "fullgraph": opts.fullgraph, "dynamic": False, **mode}


def compile_repeated_blocks(transformer, **compile_kwargs) -> list[str]:
    """Regional compilation with diffusers' `ModelMixin.compile_repeated_blocks` (every submodule whose class
    is named in `_repeated_blocks` is compiled in place with `compile_kwargs`). A model class that does not
    declare its repeated blocks (LatteTransformer3DModel in diffusers 0.42) gets its spatial and temporal
    blocks' class named on the instance. Returns the class names compiled."""
    if not getattr(transformer, "_repeated_blocks", None):
        blocks = [*transformer.transformer_blocks, *getattr(transformer, "temporal_transformer_blocks", [])]
        transformer._repeated_blocks = sorted({type(b).__name__ for b in blocks})
    transformer.compile_repeated_blocks(**compile_kwargs)
    return list(transformer._repeated_blocks)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, bounded by a cgroup v2 CPU quota (a Kubernetes
    pod's CPU limit) where one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def node_gpus() -> float | None:
    """The GPUs of the Ray node this process runs on (None outside Ray or when unknown)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        node = ray.get_runtime_context().get_node_id()
        for info in ray.nodes():
            if info.get("NodeID") == node:
                return float((info.get("Resources") or {}).get("GPU", 0)) or None
    except Exception as e:  # noqa: BLE001 - sizing a worker pool is best effort
        log.debug("node GPUs unknown: %s", e)
    return None


def node_compile_threads(num_gpus_per_actor: float, cores: int | None = None, gpus: float | None = None) -> int:
    """Inductor compile workers for one generation actor: the node's usable cores over the generation actors
    the node holds (its GPUs / num_gpus_per_actor; one where that is unknown), at most inductor's own 32."""
    cores = usable_cores() if cores is None else cores
    actors = max(1, int(gpus // num_gpus_per_actor)) if gpus and num_gpus_per_actor else 1
    return max(1, min(INDUCTOR_MAX_THREADS, cores // actors))


def set_compile_threads(threads: int) -> int:
    """Set inductor's compile workers: TORCHINDUCTOR_COMPILE_THREADS (read by inductor at import and by its
    worker subprocesses) and, when inductor's config is already imported, its compile_threads."""
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(threads)
    config = sys.modules.get("torch._inductor.config")
    if config is not None:
        config.compile_threads = threads
    log.info("inductor compile workers: %d", threads)
    return threads
