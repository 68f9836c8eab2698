"""The processor: latte-ray's generation as one operation inside a caller's own Ray Data pipeline.

`latte_ray.build_processor(spec)` returns a Processor; `processor(ds)` maps a Dataset with a `prompt` column
(optional `id`, `seed`, `negative_prompt`; other columns ride along) through the run's own declared stages
(prepare, [text-encode], denoise, encode, [sample-frames, score]; stages/graph.generation), so a row's
`video` holds the bytes a run writes for the same (prompt, negative prompt, seed, spec), and ends with this
module's stage, which turns the internal row states into `ok`/`error`. It is lazy, like any Ray Data
operation: nothing runs until the caller consumes the Dataset, in the caller's Ray. No output, no lease, no
resume: the caller owns the dataflow.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from latte_ray.stages.declare import Context, Stage, check

ENCODED = "encoded"  # a row whose video was made (the encode stage's state; the write stage makes it "ok")


def finish_rows(batch: dict[str, np.ndarray], fps: float) -> dict[str, np.ndarray]:
    """`status` ok or error, `error` None when ok, no `sha256` for an error row, and the video's fps."""
    n = len(batch["id"])
    ok = np.array([str(s) == ENCODED for s in batch["status"]], dtype=bool)
    out = dict(batch)
    out["status"] = np.where(ok, "ok", "error").astype(object)
    out["error"] = np.array([None if good else (str(e) or "not generated") for good, e in zip(ok, batch["error"])],
                            dtype=object)
    out["sha256"] = np.array([str(h) if good else None for good, h in zip(ok, batch["sha256"])], dtype=object)
    out["fps"] = np.full(n, fps)
    return out


def _map_args(ctx: Context) -> dict:
    return {"fn": finish_rows, "fn_kwargs": {"fps": ctx.spec.video.fps}, "batch_format": "numpy",
            "num_cpus": ctx.cpu_task_cpus}


STAGE = Stage(name="finish_rows", label="processor's finishing stage",
              reads=("id", "status", "error", "video", "sha256"), writes=("status", "error", "sha256", "fps"),
              map_args=_map_args)


class Processor:
    """A Dataset -> Dataset map (see latte_ray.api.build_processor for the columns). `stages()` lists the
    declared stages it composes."""

    def __init__(self, spec, preprocess: Callable | None = None, postprocess: Callable | None = None,
                 seed: int = 0, cache_dir: str | None = None, storage_options: dict | None = None):
        self.spec = spec
        self.preprocess, self.postprocess = preprocess, postprocess
        self.seed, self.cache_dir, self.storage_options = seed, cache_dir, dict(storage_options or {})

    def context(self) -> Context:
        return Context(spec=self.spec, cache_dir=self.cache_dir, storage_options=self.storage_options,
                       run_seed=self.seed, extra={"carry": True})

    def stages(self, ctx: Context | None = None) -> list[Stage]:
        from latte_ray.stages.graph import generation
        from latte_ray.stages.prepare import CARRYING

        ctx = ctx or self.context()
        return [CARRYING, *generation(ctx), STAGE]

    def __call__(self, ds):
        """`ds` mapped to one row per input row (lazily). StageGraphError before anything runs if the
        declared stages cannot compose."""
        from latte_ray.stages.declare import apply

        ctx = self.context()
        stages = self.stages(ctx)
        check(stages, ctx, ("prompt",))
        if self.preprocess is not None:
            ds = ds.map(self.preprocess, num_cpus=ctx.cpu_task_cpus)
        # No repartition (a run makes one block per generation batch): its task asks for a whole CPU, which
        # the generation actors may hold; how the caller's rows are blocked is the caller's (several
        # blocks, or `ds.repartition(...)` upstream, spread the rows over the generation actors).
        for stage in stages:
            ds = apply(ds, stage, ctx)
        if self.postprocess is not None:
            ds = ds.map(self.postprocess, num_cpus=ctx.cpu_task_cpus)
        return ds
