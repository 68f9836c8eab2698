"""`latte-ray` command line: run, tiny-model (and the operations commands built on the same runner)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from latte_ray.faults.watchdog import EXIT_CODE as EXIT_STALLED, RunStalled
from latte_ray.spec import DEFAULT_PIPELINE, PIPELINES_DIR, RunSpec, SpecError, load_pipeline_spec

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
    spec = load_pipeline_spec(pipeline).with_overrides(batch_size=batch_size, concurrency=_concurrency(concurrency))
    return RunSpec(
        pipeline=spec, prompts=prompts, output=output, storage_options=parse_storage_options(storage_option),
        seed=seed, resume=resume, retry_errors=retry_errors, limit=limit, cache_dir=cache_dir,
    )


def _fail(e: Exception, code: int = 2) -> None:
    """One red line and an exit code: 2 bad input or a plan that cannot fit the cluster, 3 a stalled run
    (the progress watchdog stopped it; resume with the same command)."""
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


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
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the tables, count new vs already-done rows and estimate GPU-hours and wall time; load no model, start no Ray, write nothing."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="With --dry-run: GPUs to estimate wall time for (generation actors for a CPU spec). Default 1."),
) -> None:
    """Generate one mp4 per prompt and a Parquet manifest. With no options: the tiny demo into ./outputs/demo."""
    from latte_ray import runner

    try:
        spec = build_run_spec(pipeline, prompts or [str(EXAMPLE_PROMPTS)], output, storage_option, batch_size,
                              concurrency, seed, resume, retry_errors, limit, cache_dir)
        if dry_run:
            from latte_ray.plan.dryrun import plan

            typer.echo("\n".join(plan(spec, gpus).lines()))
            return
        summary = runner.run(spec)
    except SpecError as e:
        _fail(e)
    except RunStalled as e:
        _fail(e, EXIT_STALLED)
    typer.echo(summary.line())
    for err in summary.errors[:5]:
        typer.echo(f"  error: {err}")
    typer.echo(f"videos:   {output.rstrip('/')}/videos/<shard>/<id>.mp4")
    typer.echo(f"manifest: {output.rstrip('/')}/manifest/*.parquet")
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
    except RunStalled as e:
        _fail(e, EXIT_STALLED)
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
    except RunStalled as e:
        _fail(e, EXIT_STALLED)
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
    seed: Optional[int] = typer.Option(None, "--seed", help="The run seed (ids of rows without an id column depend on it); default: the one in OUTPUT/run.json."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help="The run's pipeline spec (its default negative prompt enters derived ids); default: the one in OUTPUT/run.json."),
    top: int = typer.Option(5, "--top", min=0, help="How many of the most common errors to list."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as one JSON object."),
) -> None:
    """ok / error / pending counts (per id, against the input with --prompts), the most common errors and throughput so far."""
    import json

    from latte_ray.ops.status import status as output_status

    try:
        options = parse_storage_options(storage_option)
        negative, run_seed = _run_defaults(output, options, pipeline, seed) if prompts else ("", 0)
        result = output_status(output, options, prompts=prompts, run_seed=run_seed, default_negative=negative,
                               top=top)
    except SpecError as e:
        _fail(e)
    typer.echo(json.dumps(result.as_dict(), indent=2) if as_json else "\n".join(result.lines()))


def _run_defaults(output: str, options: dict, pipeline: str | None, seed: int | None) -> tuple[str, int]:
    """The default negative prompt and run seed a run used (both enter derived ids): given, or run.json's."""
    import json

    from latte_ray.record.storage import OutputLayout, filesystem

    fs, root = filesystem(output, options)
    try:
        record = json.loads(fs.cat_file(OutputLayout(url=output.rstrip("/"), root=root.rstrip("/")).run_json))
    except FileNotFoundError:
        record = {}
    negative = (load_pipeline_spec(pipeline).sampling.negative_prompt if pipeline
                else record.get("pipeline", {}).get("sampling", {}).get("negative_prompt", ""))
    return negative, seed if seed is not None else int(record.get("seed", 0))


@app.command()
def compact(
    output: str = typer.Argument(..., help="A run's output prefix (local folder or fsspec URL)."),
    storage_option: Optional[list[str]] = StorageOpt,
    min_age_minutes: float = typer.Option(60.0, "--min-age-minutes", min=0.0, help="Leave parts younger than this alone (a running job's batch may still rewrite its part)."),
    parts_per_file: int = typer.Option(10_000, "--parts-per-file", min=2, help="Most parts merged into one compacted part."),
) -> None:
    """Merge the manifest's small parts (one per batch) into a few large ones; safe to stop at any instant."""
    from latte_ray.record.compact import compact as compact_manifest

    try:
        result = compact_manifest(output, parse_storage_options(storage_option), min_age_s=min_age_minutes * 60,
                                  parts_per_file=parts_per_file)
    except SpecError as e:
        _fail(e)
    typer.echo(result.line())


@app.command("tiny-model")
def tiny_model(path: Path = typer.Argument(..., help="Folder to save the tiny random-weight Latte pipeline into.")) -> None:
    """Build the offline tiny Latte pipeline (random weights, local tokenizer) and save it with save_pretrained."""
    from latte_ray.model.tiny import save_tiny_model

    out = save_tiny_model(path)
    typer.echo(f"tiny Latte pipeline saved to {out} (load with LattePipeline.from_pretrained)")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
