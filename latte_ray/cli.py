"""`latte-ray` command line: run, tiny-model (and the operations commands built on the same runner)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

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


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


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
) -> None:
    """Generate one mp4 per prompt and a Parquet manifest. With no options: the tiny demo into ./outputs/demo."""
    from latte_ray import runner

    try:
        spec = build_run_spec(pipeline, prompts or [str(EXAMPLE_PROMPTS)], output, storage_option, batch_size,
                              concurrency, seed, resume, retry_errors, limit, cache_dir)
        summary = runner.run(spec)
    except SpecError as e:
        _fail(e)
    typer.echo(summary.line())
    for err in summary.errors[:5]:
        typer.echo(f"  error: {err}")
    typer.echo(f"videos:   {output.rstrip('/')}/videos/<shard>/<id>.mp4")
    typer.echo(f"manifest: {output.rstrip('/')}/manifest/*.parquet")
    if summary.error and not summary.ok:
        raise typer.Exit(1)


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
