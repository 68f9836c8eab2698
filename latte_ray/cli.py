"""`latte-ray` command line: run, tiny-model (and the operations commands built on the same runner).

Exit codes: 0 done; 1 a run that failed (every row an error, or an error only an actor could hit, reported
as one line: `error: generation actor failed: <Type>: <message>`); 2 bad input, caught before any model
loads (one line: `error: <what>`, naming the option, field, path or URL).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from pydantic import ValidationError

from latte_ray.faults.rootcause import RunFailed
from latte_ray.spec import DEFAULT_PIPELINE, PIPELINES_DIR, RunSpec, SpecError, load_pipeline_spec, option_error

EXAMPLE_PROMPTS = PIPELINES_DIR.parent / "examples" / "prompts.parquet"
DEMO_OUTPUT = "outputs/demo"

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batch text-to-video generation with Latte on Ray Data.")


def parse_storage_options(pairs: list[str] | None) -> dict[str, str]:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--storage-option {pair!r}: expected key=value")
        options[key.strip()] = value
    return options


PipelineOpt = typer.Option(DEFAULT_PIPELINE, "--pipeline", "-p", help="Pipeline spec: a YAML path or a name in pipelines/ (tiny-cpu, latte-1-t2v-512, ...).")
OutputOpt = typer.Option(DEMO_OUTPUT, "--output", "-o", help="Output prefix: a local folder or an fsspec URL (s3://bucket/run/).")
StorageOpt = typer.Option(None, "--storage-option", "-s", help="fsspec option key=value for input and output storage (repeatable), e.g. endpoint_url=http://127.0.0.1:5555. Never recorded.")
BatchOpt = typer.Option(None, "--batch-size", help="Override the spec's prompts per generation call.")
ConcurrencyOpt = typer.Option(None, "--concurrency", help="Override the spec's generation actors: N or MIN,MAX.")
SeedOpt = typer.Option(0, "--seed", help="Run seed: rows without a seed column derive their seed from it and their id.")
ResumeOpt = typer.Option(True, "--resume/--no-resume", help="Skip ids that already have an ok manifest row (default).")
RetryOpt = typer.Option(True, "--retry-errors/--no-retry-errors", help="On resume, generate ids whose last attempt failed again.")
LimitOpt = typer.Option(None, "--limit", help="Generate at most this many rows.")
CacheOpt = typer.Option(None, "--cache-dir", help="Node-local model cache (default $LATTE_RAY_CACHE or ~/.cache/latte-ray).")


def _concurrency(value: str | None):
    if value is None:
        return None
    lo, _, hi = value.partition(",")
    try:
        return (int(lo), int(hi)) if hi else int(lo)
    except ValueError:
        raise SpecError(f"--concurrency {value!r}: expected N or MIN,MAX") from None


def build_run_spec(pipeline, prompts, output, storage_option, batch_size, concurrency, seed, resume,
                   retry_errors, limit, cache_dir) -> RunSpec:
    """The RunSpec of a command line. Options go through the same pydantic validation as a spec file; an
    invalid one is a SpecError naming the option and the value given."""
    spec = load_pipeline_spec(pipeline)
    try:
        spec = spec.with_overrides(batch_size=batch_size, concurrency=_concurrency(concurrency))
        return RunSpec(
            pipeline=spec, prompts=prompts, output=output, storage_options=parse_storage_options(storage_option),
            seed=seed, resume=resume, retry_errors=retry_errors, limit=limit, cache_dir=cache_dir,
        )
    except ValidationError as e:
        raise option_error(e, {
            "batch_size": ("--batch-size", batch_size), "concurrency": ("--concurrency", concurrency),
            "seed": ("--seed", seed), "limit": ("--limit", limit), "prompts": ("--prompts", prompts),
            "output": ("--output", output), "cache_dir": ("--cache-dir", cache_dir),
        }) from None


STANDALONE = {"stop_ray_before_failing": False}  # set by main(): this process owns its Ray connection


def _fail(e: Exception, code: int = 2) -> None:
    if code == 1 and STANDALONE["stop_ray_before_failing"]:
        _stop_ray()
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _stop_ray() -> None:
    """Disconnect from Ray (stopping a local one this process started) before the final error line, so that
    no log line Ray forwards from its workers lands after it."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@app.command()
def run(
    pipeline: str = PipelineOpt,
    prompts: Optional[list[str]] = typer.Option(None, "--prompts", help="Prompt table(s): Parquet file, folder or glob; local or fsspec URL (repeatable). Default: the example table shipped in examples/."),
    output: str = OutputOpt,
    storage_option: Optional[list[str]] = StorageOpt,
    batch_size: Optional[int] = BatchOpt,
    concurrency: Optional[str] = ConcurrencyOpt,
    seed: int = SeedOpt,
    resume: bool = ResumeOpt,
    retry_errors: bool = RetryOpt,
    limit: Optional[int] = LimitOpt,
    cache_dir: Optional[str] = CacheOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Make every check a run makes before Ray starts (tables, output, model configs, video settings), count what it would do (new, already done, duplicate, conflicting, invalid rows) and estimate GPU-hours and wall time; load no model, start no Ray, write nothing (but a probe of the output it deletes)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="With --dry-run: GPUs to estimate wall time for (generation actors for a CPU spec). Default 1."),
) -> None:
    """Generate one mp4 per prompt and a Parquet manifest. With no options: the tiny demo into ./outputs/demo."""
    from latte_ray import runner

    try:
        spec = build_run_spec(pipeline, prompts or [str(EXAMPLE_PROMPTS)], output, storage_option, batch_size,
                              concurrency, seed, resume, retry_errors, limit, cache_dir)
        if dry_run:
            from latte_ray.plan.dryrun import plan

            checked = runner.preflight(spec)
            typer.echo(f"checked: {checked.model}")
            typer.echo("\n".join(plan(spec, checked.in_fs, checked.files, gpus).lines()))
            return
        summary = runner.run(spec)
    except SpecError as e:
        _fail(e)
    except RunFailed as e:
        _fail(e, 1)
    typer.echo(summary.line())
    for err in summary.errors[:5]:
        typer.echo(f"  error: {err}")
    typer.echo(f"videos:   {output.rstrip('/')}/videos/<shard>/<id>.<sha256[:32]>.mp4")
    typer.echo(f"manifest: {output.rstrip('/')}/manifest/*.parquet")
    typer.echo(f"run:      {output.rstrip('/')}/runs/{summary.run_id}.json")
    if summary.error and not summary.ok:
        raise typer.Exit(1)


@app.command()
def synth(
    recipe: str = typer.Option(..., "--recipe", help="Recipe YAML (local path or fsspec URL): prompt templates x attribute lists; see pipelines/synth-example.yaml."),
    output: str = typer.Option(..., "--output", "-o", help="Dataset prefix (local folder or fsspec URL): prompts/, videos/, manifest/, dataset/ go under it."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help="Override the recipe's pipeline spec (a YAML path or a name in pipelines/)."),
    storage_option: Optional[list[str]] = StorageOpt,
    min_motion: Optional[float] = typer.Option(None, "--min-motion", min=0.0, help="Export only videos whose motion_score (mean frame-to-frame change, 0-1) is at least this."),
    drop_blank: Optional[bool] = typer.Option(None, "--drop-blank/--keep-blank", help="Leave videos with any blank (near-uniform) frame out of the export (default: the recipe's export.drop_blank)."),
    export_only: bool = typer.Option(False, "--export-only", help="Skip generation; re-export what the output already holds (e.g. with other filters)."),
    cache_dir: Optional[str] = CacheOpt,
) -> None:
    """Build a synthetic video dataset: expand the recipe, generate (resumable), export WebDataset shards + a Parquet index."""
    from latte_ray.datasets.synth import synthesize

    try:
        summary = synthesize(recipe, output, pipeline=pipeline, storage_options=parse_storage_options(storage_option),
                             min_motion=min_motion, drop_blank=drop_blank, cache_dir=cache_dir,
                             generate=not export_only)
    except SpecError as e:
        _fail(e)
    except RunFailed as e:
        _fail(e, 1)
    typer.echo("\n".join(summary.lines()))
    if summary.run is not None and summary.run.error and not summary.run.ok:
        raise typer.Exit(1)


@app.command()
def report(
    output: str = typer.Argument(..., help="A run's output prefix (local folder or fsspec URL)."),
    dest: Optional[str] = typer.Option(None, "--dest", help="Where to write index.html and its PNGs (default OUTPUT/report/)."),
    storage_option: Optional[list[str]] = StorageOpt,
    samples: int = typer.Option(12, "--samples", min=1, help="Videos on the contact sheet (evenly spaced by id)."),
) -> None:
    """Write an HTML report of a run: counts, throughput over time, errors, and a contact sheet."""
    from latte_ray.ops.report import write_report

    try:
        result = write_report(output, parse_storage_options(storage_option), dest=dest, samples=samples)
    except SpecError as e:
        _fail(e)
    c = result.counts
    typer.echo(f"report: {c['ok']} ok, {c['error']} error of {c['prompts']} prompts -> {result.url}")


@app.command()
def backfill(
    pipeline: str = PipelineOpt,
    prompts: list[str] = typer.Option(..., "--prompts", help="Input tables: Parquet files, folders or globs, e.g. 's3://bucket/prompts/date=2026-11-*/' (repeatable)."),
    output: str = typer.Option(..., "--output", "-o", help="Output prefix shared by every backfill over these inputs (local folder or fsspec URL)."),
    storage_option: Optional[list[str]] = StorageOpt,
    batch_size: Optional[int] = BatchOpt,
    concurrency: Optional[str] = ConcurrencyOpt,
    seed: int = SeedOpt,
    retry_errors: bool = RetryOpt,
    limit: Optional[int] = LimitOpt,
    cache_dir: Optional[str] = CacheOpt,
) -> None:
    """Generate every row of the input tables that lacks an ok row in OUTPUT; a second backfill does nothing.

    The same operation as `run` with resume forced on, over a set of tables (e.g. every date partition so
    far): duplicates across tables are generated once, and when nothing is left no model is loaded.
    """
    from latte_ray import runner

    try:
        spec = build_run_spec(pipeline, prompts, output, storage_option, batch_size, concurrency, seed, True,
                              retry_errors, limit, cache_dir)
        summary = runner.run(spec)
    except SpecError as e:
        _fail(e)
    except RunFailed as e:
        _fail(e, 1)
    if summary.ok == 0 and summary.error == 0:
        typer.echo(f"backfill: nothing to do ({summary.skipped_done} rows already done) -> {output}")
        return
    typer.echo(summary.line())
    for err in summary.errors[:5]:
        typer.echo(f"  error: {err}")
    if summary.error and not summary.ok:
        raise typer.Exit(1)


@app.command()
def status(
    output: str = typer.Argument(..., help="A run's output prefix (local folder or fsspec URL)."),
    prompts: Optional[list[str]] = typer.Option(None, "--prompts", help="Input tables to count pending ids against (files, folders or globs; repeatable)."),
    storage_option: Optional[list[str]] = StorageOpt,
    seed: Optional[int] = typer.Option(None, "--seed", help="The run seed (ids of rows without an id column depend on it); default: the one the output is bound to (OUTPUT/latte-ray.json)."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help="The run's pipeline spec (its default negative prompt enters derived ids); default: the one the output is bound to (OUTPUT/latte-ray.json)."),
    top: int = typer.Option(5, "--top", min=0, help="How many of the most common errors to list."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as one JSON object."),
) -> None:
    """ok / error / pending counts (per id, against the input with --prompts), the most common errors, throughput so far, the spec the output is bound to and its last runs."""
    import json

    from latte_ray.ops.status import status as output_status

    try:
        options = parse_storage_options(storage_option)
        negative = load_pipeline_spec(pipeline).sampling.negative_prompt if pipeline else None
        result = output_status(output, options, prompts=prompts, run_seed=seed, default_negative=negative, top=top)
    except SpecError as e:
        _fail(e)
    typer.echo(json.dumps(result.as_dict(), indent=2, default=str) if as_json else "\n".join(result.lines()))


@app.command()
def compact(
    output: str = typer.Argument(..., help="A run's output prefix (local folder or fsspec URL)."),
    storage_option: Optional[list[str]] = StorageOpt,
    min_age_minutes: float = typer.Option(60.0, "--min-age-minutes", min=0.0, help="Leave parts and videos younger than this alone (a running job's batch may still rewrite its part, or be about to commit its video)."),
    parts_per_file: int = typer.Option(10_000, "--parts-per-file", min=2, help="Most parts merged into one compacted part."),
) -> None:
    """Merge the manifest's small parts (one per batch) into a few large ones, and delete video objects no ok row names (older than the margin); safe to stop at any instant."""
    from latte_ray.record.compact import compact as compact_manifest

    try:
        result = compact_manifest(output, parse_storage_options(storage_option), min_age_s=min_age_minutes * 60,
                                  parts_per_file=parts_per_file)
    except SpecError as e:
        _fail(e)
    typer.echo(result.line())


@app.command("tiny-model")
def tiny_model(path: Path = typer.Argument(..., help="Folder to save the tiny random-weight Latte pipeline into: missing, empty, or an earlier tiny model.")) -> None:
    """Build the offline tiny Latte pipeline (random weights, local tokenizer) and save it with save_pretrained.

    PATH must be missing, an empty folder, or an earlier tiny model saved by this command (which is replaced);
    anything else is refused and left untouched."""
    from latte_ray.model.tiny import save_tiny_model

    try:
        out = save_tiny_model(path)
    except SpecError as e:
        _fail(e)
    typer.echo(f"tiny Latte pipeline saved to {out} (load with LattePipeline.from_pretrained)")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    STANDALONE["stop_ray_before_failing"] = True
    app()


if __name__ == "__main__":
    main()
