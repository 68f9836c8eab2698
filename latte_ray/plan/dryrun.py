"""`run --dry-run`: validate the tables, count new versus done work, estimate device time. No model, no Ray.

The tables are streamed record batch by record batch through the same `prepare_rows` the prepare stage
uses, and compared against the same done-id set resume uses (`workplan.done_ids`), so the counts are the ones
a real run would act on. Nothing is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from latte_ray.plan.prompts import check_prompt_schema, prepare_rows, resolve_prompt_files
from latte_ray.spec import RunSpec
from latte_ray.record.storage import OutputLayout, filesystem, read_manifest

READ_BATCH_ROWS = 65_536


@dataclass
class DryRunPlan:
    pipeline: str
    files: int
    rows: int = 0
    invalid: int = 0  # rows that would be recorded as error rows
    already_done: int = 0  # rows whose id resume skips
    to_generate: int = 0
    seconds_per_video: float | None = None
    seconds_source: str = "unknown"
    gpus: int = 1  # GPUs given to the run; for a CPU spec (0 GPUs per actor), generation actors
    gpus_per_actor: float = 1.0

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
            f"{self.already_done} already done, {self.invalid} invalid (recorded as error rows)",
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
        out.append("nothing was loaded or written")
        return out


def _duration(hours: float) -> str:
    seconds = hours * 3600
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def plan(run: RunSpec, gpus: int | None = None) -> DryRunPlan:
    """Counts and estimates for `run`; raises SpecError for a malformed table like a real run."""
    from latte_ray.plan.workplan import done_ids

    in_fs, files = resolve_prompt_files(run.prompts, run.storage_options)
    check_prompt_schema(in_fs, files)
    out_fs, root = filesystem(run.output, run.storage_options)
    layout = OutputLayout(url=run.output.rstrip("/"), root=root.rstrip("/"))
    done = done_ids(run, layout, out_fs) if run.resume else pa.array([], pa.string())

    ex = run.pipeline.execution
    result = DryRunPlan(pipeline=run.pipeline.name, files=len(files), gpus=gpus or 1,
                        gpus_per_actor=ex.num_gpus_per_actor)
    pending = 0
    for path in files:
        with in_fs.open(path, "rb") as f:
            table_file = pq.ParquetFile(f)
            columns = [c for c in ("id", "prompt", "negative_prompt", "seed") if c in table_file.schema_arrow.names]
            for batch in table_file.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
                table = pa.Table.from_batches([batch])
                table = table.append_column("path", pa.array([path] * table.num_rows, pa.string()))
                rows = prepare_rows(table, run.pipeline.sampling.negative_prompt, run.seed)
                is_done = pc.is_in(pa.array(rows["id"], pa.string()), value_set=done).to_numpy(zero_copy_only=False)
                is_error = rows["status"] == "error"
                result.rows += len(is_done)
                result.already_done += int(is_done.sum())
                result.invalid += int((is_error & ~is_done).sum())
                pending += int((~is_error & ~is_done).sum())
    result.to_generate = min(pending, run.limit) if run.limit else pending
    result.seconds_per_video, result.seconds_source = _seconds_per_video(run, layout, out_fs)
    return result


def _seconds_per_video(run: RunSpec, layout: OutputLayout, out_fs) -> tuple[float | None, str]:
    spec_value = run.pipeline.execution.seconds_per_video
    if spec_value is not None:
        return spec_value, "spec"
    measured = read_manifest(out_fs, layout, columns=["status", "generate_seconds"])
    ok = measured.filter(pc.equal(measured["status"], "ok"))["generate_seconds"]
    mean = pc.mean(ok).as_py() if len(ok) else None
    return (mean, f"mean of {len(ok)} finished videos in the output") if mean else (None, "unknown")
