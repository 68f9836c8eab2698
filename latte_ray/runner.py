"""Build the Ray Data plan for a RunSpec and run it.

    read Parquet -> prepare (CPU) -> [text_encode (actors)] -> denoise (GPU actor pool) -> encode (CPU)
    -> write (CPU) -> the driver iterates manifest rows to count them (it never holds the table)

Everything that can fail on bad input (specs, table schemas, output location) is checked here before any
actor starts, so a malformed run costs no GPU time.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from latte_ray.prompts import check_prompt_schema, resolve_prompt_files
from latte_ray.spec import RunSpec
from latte_ray.storage import OutputLayout, filesystem, is_local, read_manifest, write_atomic

log = logging.getLogger(__name__)

_VERSIONED = ["latte-ray", "torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec", "s3fs", "av", "pydantic"]


@dataclass
class RunSummary:
    output: str
    ok: int = 0
    error: int = 0
    skipped_done: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def videos_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (
            f"latte-ray: {self.ok} ok, {self.error} error, {self.skipped_done} already done; "
            f"{self.seconds:.1f}s ({self.videos_per_second:.2f} videos/s) -> {self.output}"
        )


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def run_record(run: RunSpec, files: list[str], started: datetime) -> dict:
    """What run.json holds: enough to reproduce the run, and no credentials."""
    return {
        "started_at": started.isoformat(),
        "pipeline": run.pipeline.model_dump(mode="json"),
        "spec_hash": run.pipeline.spec_hash(),
        "prompts": run.prompts,
        "prompt_files": len(files),
        "output": run.output,
        "seed": run.seed,
        "resume": run.resume,
        "retry_errors": run.retry_errors,
        "limit": run.limit,
        "storage_option_keys": sorted(run.storage_options),
        "versions": package_versions(),
        "host": platform.node(),
    }


def done_ids(run: RunSpec, layout: OutputLayout, out_fs) -> "object":
    """Ids to skip on resume: those with an ok row, plus errored ids unless errors are retried.

    Resume is an anti-join against our own manifest rather than Ray Data's CheckpointConfig: the manifest
    is already the commit record (it must exist for correctness), so a second checkpoint store could only
    disagree with it; and the manifest also answers `status` and reports without Ray.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = read_manifest(out_fs, layout, columns=["id", "status"])
    if rows.num_rows == 0:
        return pa.array([], pa.string())
    if run.retry_errors:
        rows = rows.filter(pc.equal(rows["status"], "ok"))
    return pc.unique(rows["id"])


LOCAL_MIN_CPUS = 4


def init_ray() -> None:
    """Join the cluster this runs in (RAY_ADDRESS, `ray job submit`), or start a local Ray.

    A local Ray gets at least 4 logical CPUs: Ray Data's file listing and read tasks each ask for a whole
    CPU, and on a 2-core machine the generation actors' share would leave them unschedulable (a silent hang).
    """
    import os

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        return
    ray.init(num_cpus=max(LOCAL_MIN_CPUS, os.cpu_count() or 1), logging_level=logging.WARNING)


def _arrow_filesystem(fs):
    if is_local(fs):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def build_plan(run: RunSpec, in_fs, files: list[str], skip_ids):
    """The Ray Data dataset whose rows are the manifest rows of this run."""
    import ray
    import pyarrow.parquet as pq  # noqa: F401  (pyarrow must be importable on workers)

    from latte_ray.stages import DenoiseStage, EncodeStage, PrepareStage, WriteStage

    spec = run.pipeline
    ex = spec.execution
    spec_json = spec.model_dump_json()
    # CPU stages are small autoscaling actor pools: encoders and writers keep their state between batches.
    cpu_pool = ray.data.ActorPoolStrategy(min_size=1, max_size=ex.cpu_stage_max_actors)
    ds = ray.data.read_parquet(
        files, filesystem=_arrow_filesystem(in_fs), include_paths=True,
        num_cpus=ex.num_cpus_per_cpu_task,
    )
    ds = ds.map_batches(
        PrepareStage,
        fn_constructor_kwargs={
            "default_negative": spec.sampling.negative_prompt, "run_seed": run.seed, "skip_ids": skip_ids,
        },
        batch_format="pyarrow",
        compute=cpu_pool,
        num_cpus=ex.num_cpus_per_cpu_task,
    )
    if run.limit:
        ds = ds.limit(run.limit)
    # Small blocks, one generation batch each, so every actor in the pool gets work.
    ds = ds.repartition(target_num_rows_per_block=ex.batch_size)
    if ex.text_encode_stage:
        from latte_ray.stages.text_encode import TextEncodeStage

        ds = ds.map_batches(
            TextEncodeStage,
            fn_constructor_kwargs={"spec_json": spec_json, "cache_dir": run.cache_dir,
                                   "storage_options": run.storage_options},
            batch_size=ex.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=ex.num_cpus_per_actor, num_gpus=ex.num_gpus_per_actor,
            max_restarts=ex.max_restarts, max_task_retries=-1,
        )
    lo, hi = (ex.concurrency, ex.concurrency) if isinstance(ex.concurrency, int) else ex.concurrency
    ds = ds.map_batches(
        DenoiseStage,
        fn_constructor_kwargs={"spec_json": spec_json, "cache_dir": run.cache_dir,
                               "storage_options": run.storage_options},
        batch_size=ex.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_cpus=ex.num_cpus_per_actor,
        num_gpus=ex.num_gpus_per_actor,
        max_restarts=ex.max_restarts,
        max_task_retries=-1,
    )
    ds = ds.map_batches(
        EncodeStage, fn_constructor_kwargs={"video_spec_json": spec.video.model_dump_json()},
        batch_format="numpy", compute=cpu_pool, num_cpus=ex.num_cpus_per_cpu_task,
    )
    ds = ds.map_batches(
        WriteStage,
        fn_constructor_kwargs={"output_url": run.output, "spec_json": spec_json,
                               "storage_options": run.storage_options},
        batch_format="numpy", compute=cpu_pool, num_cpus=ex.num_cpus_per_cpu_task,
    )
    return ds


def run(run: RunSpec) -> RunSummary:
    started_wall = datetime.now(timezone.utc)
    started = time.perf_counter()
    in_fs, files = resolve_prompt_files(run.prompts, run.storage_options)
    check_prompt_schema(in_fs, files)
    out_fs, root = filesystem(run.output, run.storage_options)
    layout = OutputLayout(url=run.output.rstrip("/"), root=root.rstrip("/"))
    skip = done_ids(run, layout, out_fs) if run.resume else None
    write_atomic(out_fs, layout.run_json, json.dumps(run_record(run, files, started_wall), indent=2).encode())

    init_ray()
    import ray

    skip_ref = ray.put(skip) if skip is not None and len(skip) else None
    ds = build_plan(run, in_fs, files, skip_ref)
    summary = RunSummary(output=run.output, skipped_done=len(skip) if skip is not None else 0)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
        for status, error in zip(batch["status"].to_pylist(), batch["error"].to_pylist()):
            if status == "ok":
                summary.ok += 1
            else:
                summary.error += 1
                if len(summary.errors) < 20:
                    summary.errors.append(error)
    summary.seconds = time.perf_counter() - started
    log.info(summary.line())
    return summary


def summary_dict(summary: RunSummary) -> dict:
    return asdict(summary)
