"""`run --dry-run`: count new versus done work and estimate device time. No model, no Ray.

The driver-side checks of a real run come first (plan/preflight.preflight: tables, output location, binding and
writability, model configs, video settings). The counts are a real run's own: the tables are scanned with
the work plan's `scan_keys` (the same `prepare_rows` as the prepare stage) and reduced with its
`reduce_keys` against the same done-key set resume uses (`workplan.done_keys`), in this process, so
duplicate copies (generated once) and ids repeated with different content (error rows) count as a real
run counts them. Nothing is written but the preflight's writability probe, which it deletes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from latte_ray.plan.keys import KEY_DTYPE
from latte_ray.record.storage import OutputLayout, filesystem, read_manifest
from latte_ray.spec import RunSpec


@dataclass
class DryRunPlan:
    pipeline: str
    files: int
    rows: int = 0
    invalid: int = 0  # rows that would be recorded as error rows (bad values)
    conflicts: int = 0  # rows of ids repeated with different content (error rows, nothing generated)
    duplicates: int = 0  # extra copies of identical rows (generated once)
    already_done: int = 0  # rows whose id resume skips
    to_generate: int = 0
    seconds_per_video: float | None = None
    seconds_source: str = "unknown"
    gpus: int = 1  # GPUs given to the run; for a CPU spec (0 GPUs per actor), generation actors
    gpus_per_actor: float = 1.0
    memory: str | None = None  # a GPU spec's memory per generation actor (latte_ray/model/memory.py)
    compute: str | None = None  # the family's FLOPs per video, where it has a FLOP model (Wan: families/wan_figures.py)

    @property
    def actors(self) -> int:
        return max(1, math.floor(self.gpus / self.gpus_per_actor)) if self.gpus_per_actor else self.gpus

    @property
    def gpu_hours(self) -> float | None:
        """Device-hours: GPU-hours, or actor-hours for a CPU spec."""
        if self.seconds_per_video is None:
            return None
        return self.to_generate * self.seconds_per_video * (self.gpus_per_actor or 1.0) / 3600

    @property
    def wall_hours(self) -> float | None:
        if self.seconds_per_video is None:
            return None
        return math.ceil(self.to_generate / self.actors) * self.seconds_per_video / 3600

    def lines(self) -> list[str]:
        out = [
            f"dry run ({self.pipeline}): {self.rows} rows in {self.files} file{'s' if self.files != 1 else ''}: {self.to_generate} to generate, "
            f"{self.already_done} already done, {self.invalid} invalid and {self.conflicts} with conflicting "
            f"duplicate ids (recorded as error rows), {self.duplicates} duplicate copies skipped",
        ]
        if self.seconds_per_video is None:
            out.append("estimate: unknown (set execution.seconds_per_video in the spec)")
        else:
            gpu = bool(self.gpus_per_actor)
            actors = f"{self.actors} actor{'s' if self.actors != 1 else ''}"
            where = f"{self.gpus} GPU{'s' if self.gpus != 1 else ''} ({actors})" if gpu else actors
            out.append(
                f"estimate: {self.to_generate} videos x {self.seconds_per_video:g} s/video ({self.seconds_source}) "
                f"= {self.gpu_hours:.4g} {'GPU' if gpu else 'actor'}-hours; wall time {_duration(self.wall_hours)} "
                f"on {where}, plus actor start-up and compile warm-up"
            )
        if self.compute:
            out.append(self.compute)
        if self.memory:
            out.append(self.memory)
        out.append("nothing was loaded or written (the output is writable: a probe was written and deleted)")
        return out


def _duration(hours: float) -> str:
    seconds = hours * 3600
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def plan(run: RunSpec, in_fs, files: list[str], gpus: int | None = None) -> DryRunPlan:
    """Counts and estimates for `run` over its resolved input `files` (plan/preflight.preflight resolves and checks
    them first)."""
    from latte_ray.plan.workplan import done_keys, reduce_keys, scan_keys

    out_fs, root = filesystem(run.output, run.storage_options)
    layout = OutputLayout(url=run.output.rstrip("/"), root=root.rstrip("/"))
    done = done_keys(run, layout, out_fs) if run.resume else np.empty(0, KEY_DTYPE)
    rows = scan_keys(in_fs, [(i, path, 0, 1) for i, path in enumerate(files)],
                     run.pipeline.sampling.negative_prompt, run.seed)
    _, counts = reduce_keys(rows, done)

    ex = run.pipeline.execution
    result = DryRunPlan(pipeline=run.pipeline.name, files=len(files), gpus=gpus or 1,
                        gpus_per_actor=ex.num_gpus_per_actor)
    result.rows, result.already_done = counts["rows"], counts["done"]
    result.duplicates, result.conflicts = counts["duplicates"], counts["conflicts"]
    result.invalid = counts["todo"] - counts["conflicts"] - counts["generate"]
    result.to_generate = min(counts["generate"], run.limit) if run.limit else counts["generate"]
    result.seconds_per_video, result.seconds_source = _seconds_per_video(run, layout, out_fs)
    if run.pipeline.model.family == "wan":  # FLOPs and memory from the configs (model/families/wan_figures.py)
        _wan_figures(run.pipeline, result)
    elif ex.num_gpus_per_actor:  # weights computed from the source's configs, activations estimated
        from latte_ray.model.memory import dry_run_line

        result.memory = dry_run_line(run.pipeline)
    return result


def _wan_figures(spec, result: DryRunPlan) -> None:
    """Wan's FLOPs per video, its memory line for a GPU spec, and, when no seconds_per_video is known (spec or
    output), the estimate from the FLOPs at the spec's execution.sustained_tflops."""
    from latte_ray.model.families.wan_figures import dry_run_figures, flops_words

    figures = dry_run_figures(spec)
    if isinstance(figures, str):
        result.compute = figures
        return
    result.compute = figures.flops_line()
    if spec.execution.num_gpus_per_actor:
        result.memory = figures.memory_line()
    rate = spec.execution.sustained_tflops
    if result.seconds_per_video is None and rate:
        result.seconds_per_video = figures.per_video / (rate * 1e12)
        result.seconds_source = (f"Wan FLOP model: {flops_words(figures.per_video)} per video at {rate:g} TFLOP/s "
                                 f"sustained, execution.sustained_tflops")


def _seconds_per_video(run: RunSpec, layout: OutputLayout, out_fs) -> tuple[float | None, str]:
    spec_value = run.pipeline.execution.seconds_per_video
    if spec_value is not None:
        return spec_value, "spec"
    measured = read_manifest(out_fs, layout, columns=["status", "generate_seconds"])
    ok = measured.filter(pc.equal(measured["status"], "ok"))["generate_seconds"]
    mean = pc.mean(ok).as_py() if len(ok) else None
    return (mean, f"mean of {len(ok)} finished videos in the output") if mean else (None, "unknown")
