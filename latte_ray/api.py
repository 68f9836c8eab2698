"""The public Python API (re-exported lazily by `latte_ray`): load a spec, run it, or map a Ray Dataset.

`latte-ray run` is a thin shell over `run`; `build_processor` is the same generation (the same declared
stages, the same bytes) as one more operation inside a caller's own Ray Data pipeline, the way
`ray.data.llm.build_llm_processor` is for text. Every error raised on purpose is a
`latte_ray.errors.LatteRayError` subclass carrying the exit code the CLI would end with; nothing here
raises SystemExit or prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from pydantic import ValidationError

from latte_ray.errors import InputError, SpecError
from latte_ray.spec import DEFAULT_PIPELINE, PipelineSpec, RunSpec, load_pipeline_spec, option_error, \
    parse_pipeline_spec

if TYPE_CHECKING:  # heavy: imported only when a function runs
    from latte_ray.record.verify import VerifyReport
    from latte_ray.runner import RunSummary
    from latte_ray.stages.processor import Processor


def load_spec(name_or_path: str | Path | PipelineSpec = DEFAULT_PIPELINE,
              overrides: Mapping[str, Any] | None = None) -> PipelineSpec:
    """A pipeline spec: a built-in name (`tiny-cpu`, `latte-1-t2v-512`, ...; `latte-ray pipelines` lists
    them) or a YAML path, with dotted overrides applied and the whole spec validated again.

    Args:
        name_or_path: a built-in spec name, a .yaml path, or a PipelineSpec (copied, then overridden).
        overrides: {"sampling.num_inference_steps": 4, "execution.batch_size": 2, ...}: each key a dotted
            path to a spec field, each value what a YAML file would hold there.

    Returns:
        The validated PipelineSpec.

    Raises:
        SpecError: an unknown name or path, a file that is not valid YAML or not a spec, an override whose
            path names no field, or a value the field refuses (the message names the field).
    """
    spec = name_or_path if isinstance(name_or_path, PipelineSpec) else load_pipeline_spec(name_or_path)
    if not overrides:
        return spec
    raw = spec.model_dump(mode="json", exclude_unset=False)
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        if not all(parts):
            raise SpecError(f"override {dotted!r}: not a dotted field path (e.g. sampling.num_inference_steps)")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise SpecError(f"override {dotted!r}: {'.'.join(parts[:depth + 1])} is not a spec field")
            if node[part] is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict):
            raise SpecError(f"override {dotted!r}: {'.'.join(parts[:-1])} is not a section of the spec")
        node[parts[-1]] = value  # an unknown last key is refused by validation (the spec forbids extra keys)
    return parse_pipeline_spec(raw, origin=f"{spec.name} with overrides")


def run(spec: str | Path | PipelineSpec, prompts: str | list[str], output: str, *, seed: int = 0,
        resume: bool = True, retry_errors: bool = True, limit: int | None = None,
        storage_options: Mapping[str, str] | None = None, cache_dir: str | None = None,
        wait_for_lease: bool = False, max_lease_wait: float | None = None, lease: bool = True,
        command: str = "run", console=None) -> "RunSummary":
    """Everything `latte-ray run` does: check the spec, the tables and the output before Ray starts, take the
    output's lease, bind the output, write the run's record, generate in rounds (resuming: ids with an ok row
    are skipped), and return the counts. Joins the Ray cluster this process runs in (RAY_ADDRESS), or
    starts a private local one. Writes no report (`write_report` from latte_ray.ops.report does).

    Args:
        spec: a PipelineSpec, a built-in spec name or a YAML path.
        prompts: one or more Parquet tables (files, folders or globs; local or fsspec URLs) with a `prompt`
            column and optional `id`, `seed`, `negative_prompt`.
        output: the output prefix (a local folder or an fsspec URL such as s3://bucket/run/).
        seed: the run seed; rows without a seed derive theirs from it and their id.
        resume: skip ids that already have an ok manifest row (default).
        retry_errors: on resume, generate ids whose last row is an error again.
        limit: generate at most this many rows.
        storage_options: fsspec options for the tables and the output (never recorded).
        cache_dir: node-local model cache (default $LATTE_RAY_CACHE or ~/.cache/latte-ray).
        wait_for_lease: wait while another run holds the output's lease instead of raising LeaseHeld.
        max_lease_wait: with wait_for_lease, wait at most this many seconds, then raise LeaseHeld
            (None: until the holder ends or its lease expires).
        lease: take the output's lease (one writer per output); False only for a store without create-only
            writes, when nothing else writes to this output.
        command: the command named in the lease and the run's record.
        console: a latte_ray.console.Console for the progress line and the run's log file (the CLI's);
            None: nothing printed, log records only.

    Returns:
        A RunSummary: ok / error / already-done / duplicate counts, seconds, the first few errors and
        videos, the run id (its record: OUTPUT/runs/<run_id>.json).

    Raises:
        SpecError: a bad spec. InputError: a bad prompt table, option or path. OutputBindingError: an
        output bound to another spec or seed, or not latte-ray's. OutputDamaged: an output record latte-ray
        cannot read. LeaseHeld: another live run writes this output. RunFailed (LeaseLost among them): the
        run could not finish (its root cause in the message). RunStalled: the progress watchdog stopped it.
        KeyboardInterrupt: the run was interrupted (Ctrl-C, SIGTERM); its record says `interrupted`.
    """
    from latte_ray import runner
    from latte_ray.record.lease import Policy

    run_spec = run_spec_of(spec, prompts, output, seed=seed, resume=resume, retry_errors=retry_errors,
                           limit=limit, storage_options=storage_options, cache_dir=cache_dir)
    if wait_for_lease and not lease:
        raise InputError("wait_for_lease and no lease exclude each other (--wait-for-lease, --no-lease)")
    return runner.run(run_spec, Policy(take=lease, wait=wait_for_lease, max_wait_s=max_lease_wait),
                      command=command, console=console)


def run_spec_of(spec: str | Path | PipelineSpec, prompts: str | list[str], output: str, *, seed: int = 0,
                resume: bool = True, retry_errors: bool = True, limit: int | None = None,
                storage_options: Mapping[str, str] | None = None, cache_dir: str | None = None,
                option_names: Mapping[str, str] | None = None) -> RunSpec:
    """The validated RunSpec of `run`'s arguments; InputError names the argument (or, with `option_names`,
    the command-line option that set it) and the value given."""
    pipeline = load_spec(spec)
    prompts = [prompts] if isinstance(prompts, (str, Path)) else [str(p) for p in prompts]
    given = {"prompts": prompts, "output": output, "seed": seed, "limit": limit, "cache_dir": cache_dir}
    try:
        return RunSpec(pipeline=pipeline, prompts=[str(p) for p in prompts], output=str(output),
                       storage_options=dict(storage_options or {}), seed=seed, resume=resume,
                       retry_errors=retry_errors, limit=limit, cache_dir=cache_dir)
    except ValidationError as e:
        names = option_names or {}
        raise option_error(e, {k: (names.get(k, k), v) for k, v in given.items()}) from None


def build_processor(spec: str | Path | PipelineSpec, *, preprocess: Callable | None = None,
                    postprocess: Callable | None = None, seed: int = 0, cache_dir: str | None = None,
                    storage_options: Mapping[str, str] | None = None) -> "Processor":
    """A processor that maps a `ray.data.Dataset` of prompts to a Dataset of videos, lazily, in the caller's
    Ray, like any Ray Data operation (the pattern of `ray.data.llm.build_llm_processor`). The generation
    is the run's own (the same declared stages): a row's `video` holds the same mp4 bytes `run` writes
    for the same (prompt, negative prompt, seed, spec). No output, no lease, no resume, no record: the caller
    owns the dataflow and writes what it keeps. The processor's own tasks ask for the spec's
    `execution.num_cpus_per_cpu_task`; its generation actors hold their CPUs (and GPUs) while the pipeline
    runs, so on a small machine give the pipeline's other tasks a share of a CPU too (`num_cpus=0.25`),
    or a task asking for a whole one may wait behind them for ever (examples/compose.py does).

    Args:
        spec: a PipelineSpec, a built-in spec name or a YAML path.
        preprocess: a row function (dict -> dict) applied first with `Dataset.map`: it must leave a `prompt`
            column, and may set `id`, `seed`, `negative_prompt`; other columns are carried through.
        postprocess: a row function applied to each output row with `Dataset.map`.
        seed: the run seed, as `run`'s: rows without a seed derive theirs from it and their id.
        cache_dir: node-local model cache (default $LATTE_RAY_CACHE or ~/.cache/latte-ray).
        storage_options: fsspec options for a model source on object storage.

    Returns:
        A Processor: `processor(ds)` returns the Dataset with one row per input row: `id`, `prompt`,
        `negative_prompt`, `seed`, `status` ("ok" or "error"), `error` (None when ok), `video` (mp4 bytes,
        empty on error), `sha256`, `bytes`, `num_frames`, `height`, `width`, `fps`, `generate_seconds`,
        the per-video statistics (`motion_score`, `mean_brightness`, `blank_frames`, `frozen_frames`),
        the scores when the spec's scoring is enabled, and the input's other columns.

    Raises:
        SpecError: a bad spec, or video settings the encoder refuses (checked here, before any model loads).
        StageGraphError: a stage whose input column nothing upstream produces (a spec combination the
            declared stages cannot compose); raised when the processor is applied.
    """
    from latte_ray.stages.encode import check_video_settings
    from latte_ray.stages.processor import Processor

    pipeline = load_spec(spec)
    check_video_settings(pipeline.video, pipeline.sampling.height, pipeline.sampling.width)
    return Processor(pipeline, preprocess=preprocess, postprocess=postprocess, seed=seed, cache_dir=cache_dir,
                     storage_options=dict(storage_options or {}))


def verify(output: str, *, deep: bool = False, repair: bool = False,
           storage_options: Mapping[str, str] | None = None, wait_for_lease: bool = False,
           progress: Callable[[int, int], None] | None = None) -> "VerifyReport":
    """Check an output against its own record, as `latte-ray verify` does: every manifest part readable and
    of the manifest's schema, every ok row's video present with its recorded size (from listings), with
    `deep` its sha256 too, and the run records, `latte-ray.json` and lease objects readable and consistent
    with the rows. The report is also written to OUTPUT/verify/<time>.json.

    Args:
        output: the output prefix (a local folder or an fsspec URL).
        deep: also read every ok video and compare its sha256 (every byte: opt-in at scale).
        repair: move what is damaged or not latte-ray's to OUTPUT/quarantine/<time>/ (never deletes) and
            record the damaged ids so that the next resuming run makes them again. Takes the output's lease.
        storage_options: fsspec options for the output (never recorded).
        wait_for_lease: with `repair`, wait while another run holds the lease instead of raising LeaseHeld.
        progress: called as progress(done, total) while `deep` hashes videos.

    Returns:
        A VerifyReport (latte_ray/record/verify.py): counts, `findings` (each a damaged path and what is wrong
        with it), `clean`, and with `repair` what was moved where and the ids the next run makes again.

    Raises:
        InputError: the output is not a latte-ray output (or cannot be reached). LeaseHeld: with `repair`,
        another live run writes this output.
    """
    from latte_ray.record.lease import Policy
    from latte_ray.record.verify import verify as verify_output

    return verify_output(output, deep=deep, repair=repair, storage_options=dict(storage_options or {}),
                         lease=Policy(wait=wait_for_lease), progress=progress)
