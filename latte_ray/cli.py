"""`latte-ray` command line: run, tiny-model, pipelines (and the operations commands built on the same runner).

Also `python -m latte_ray` (latte_ray/__main__.py), the entrypoint for jobs that ship the package as a wheel.

Exit codes: 0 done; 1 a run that failed (every row an error, or an error only an actor could hit, reported
as one line: `error: generation actor failed: <Type>: <message>`), or whose output lease another run took
over mid-run (`error: lease lost: ...`); 2 bad input, caught before any model loads (one line: `error:
<what>`, naming the option, field, path or URL), a plan that cannot fit the cluster, or an output another
live run is writing (its lease, latte_ray/record/lease.py; --wait-for-lease waits instead); 3 a run the
progress watchdog stopped because it made no progress (resume with the same command).
"""

from __future__ import annotations

import functools
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from pydantic import ValidationError

from latte_ray.errors import EXIT_FAILED, EXIT_STALLED, InputError, LatteRayError, SpecError
from latte_ray.resources import examples_dir
from latte_ray.spec import DEFAULT_PIPELINE, PIPELINES_DIR, RunSpec, load_pipeline_spec, option_error

EXAMPLE_PROMPTS = examples_dir() / "prompts.parquet"
MAX_GALLERY_DEFAULT = 5000  # latte_ray.ops.report.MAX_GALLERY (not imported here: the report pulls in matplotlib)
DEMO_OUTPUT = "outputs/demo"

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batch text-to-video generation with Latte on Ray Data.")


def command(on: typer.Typer = app, *args, **kwargs):
    """`on.command(...)` for a function whose LatteRayError becomes one red line and its exit code: the one
    place errors meet the console (latte_ray/errors.py says which code means what)."""
    def register(fn):
        @functools.wraps(fn)
        def mapped(*a, **kw):
            try:
                return fn(*a, **kw)
            except LatteRayError as e:
                _fail(e, e.exit_code)

        on.command(*args, **kwargs)(mapped)
        return fn

    return register


def _print_version(value: bool) -> None:
    if value:
        from latte_ray.versions import provenance, version

        commit = provenance()["latte-ray-commit"]
        typer.echo(f"latte-ray {version()}" + (f" (git {commit})" if commit else ""))
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print latte-ray's version (and the git commit when run from a checkout) and exit."),
) -> None:
    """Batch text-to-video generation with Latte on Ray Data."""


def parse_storage_options(pairs: list[str] | None) -> dict[str, str]:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--storage-option {pair!r}: expected key=value")
        options[key.strip()] = value
    return options


PipelineOpt = typer.Option(DEFAULT_PIPELINE, "--pipeline", "-p", help="Pipeline spec: a YAML path or a built-in name (tiny-cpu, latte-1-t2v-512, ...; see `latte-ray pipelines`).")
OutputOpt = typer.Option(DEMO_OUTPUT, "--output", "-o", help="Output prefix: a local folder or an fsspec URL (s3://bucket/run/).")
StorageOpt = typer.Option(None, "--storage-option", "-s", help="fsspec option key=value for input and output storage (repeatable), e.g. endpoint_url=http://127.0.0.1:5555. Never recorded.")
BatchOpt = typer.Option(None, "--batch-size", help="Override the spec's prompts per generation call.")
ConcurrencyOpt = typer.Option(None, "--concurrency", help="Override the spec's generation actors: N or MIN,MAX.")
SeedOpt = typer.Option(0, "--seed", help="Run seed: rows without a seed column derive their seed from it and their id.")
ResumeOpt = typer.Option(True, "--resume/--no-resume", help="Skip ids that already have an ok manifest row (default).")
RetryOpt = typer.Option(True, "--retry-errors/--no-retry-errors", help="On resume, generate ids whose last attempt failed again.")
LimitOpt = typer.Option(None, "--limit", help="Generate at most this many rows.")
CacheOpt = typer.Option(None, "--cache-dir", help="Node-local model cache (default $LATTE_RAY_CACHE or ~/.cache/latte-ray).")
ScoringRunOpt = typer.Option(None, "--scoring", help="Score every new video with this scoring spec (a YAML path or a pipeline name whose `scoring` section is used); default: the pipeline spec's own scoring section.")
KeepEmbeddingsOpt = typer.Option(None, "--keep-embeddings/--no-keep-embeddings", help="Keep each prompt's T5 embeddings next to its video, for `export --with-embeddings` (default: the spec's sidecars.embeddings).")
KeepLatentsOpt = typer.Option(None, "--keep-latents/--no-keep-latents", help="Keep each video's final latents (before VAE decode) next to it, for `export --with-latents` (default: the spec's sidecars.latents).")
MinMotionOpt = typer.Option(None, "--min-motion", min=0.0, help="Export only videos whose motion_score (mean frame-to-frame change, 0-1) is at least this.")
MinClipOpt = typer.Option(None, "--min-clip-score", help="Export only videos whose clip_score (CLIPScore, 0-100) is at least this; unscored videos are rejected.")
MinAestheticOpt = typer.Option(None, "--min-aesthetic", help="Export only videos whose aesthetic_score is at least this; unscored videos are rejected.")
WithEmbeddingsOpt = typer.Option(None, "--with-embeddings/--without-embeddings", help="Put each prompt's T5 embeddings (fp16, <key>.t5.npy) in its sample; videos generated without them are rejected.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Print Ray Data's operator progress, Ray's notices, library warnings and the actors' output on the console, as they come, instead of into the run's log file (OUTPUT/runs/<run_id>.log).")
ReportRunOpt = typer.Option(True, "--report/--no-report", help="Write OUTPUT/report/ (the video gallery, as `latte-ray report` does) when the run ends (default).")
WaitLeaseOpt = typer.Option(False, "--wait-for-lease", help="When another run holds the output's lease (one writer per output), wait until it ends or its lease expires instead of exiting with code 2.")
MaxLeaseWaitOpt = typer.Option(None, "--max-lease-wait", min=0.0, help="Wait for the output's lease (as --wait-for-lease) at most this many seconds, then exit with code 2.")
NoLeaseOpt = typer.Option(False, "--no-lease", help="Take no output lease: for a store without create-only writes, when nothing else writes to this output. Two writers may then generate the same ids twice.")
WithLatentsOpt = typer.Option(None, "--with-latents/--without-latents", help="Put each video's final latents (<key>.latents.npy) in its sample; videos generated without them are rejected.")


def _lease_policy(wait_for_lease: bool, no_lease: bool, max_lease_wait: float | None = None):
    from latte_ray.record.lease import Policy

    if wait_for_lease and no_lease:
        raise InputError("--wait-for-lease and --no-lease exclude each other")
    return Policy(take=not no_lease, wait=wait_for_lease)


def _concurrency(value: str | None):
    if value is None:
        return None
    lo, _, hi = value.partition(",")
    try:
        return (int(lo), int(hi)) if hi else int(lo)
    except ValueError:
        raise InputError(f"--concurrency {value!r}: expected N or MIN,MAX") from None


OPTION_NAMES = {"batch_size": "--batch-size", "concurrency": "--concurrency", "seed": "--seed", "limit": "--limit",
                "prompts": "--prompts", "output": "--output", "cache_dir": "--cache-dir"}


def build_run_spec(pipeline, prompts, output, storage_option, batch_size, concurrency, seed, resume,
                   retry_errors, limit, cache_dir, scoring=None, keep_embeddings=None, keep_latents=None) -> RunSpec:
    """The RunSpec of a command line. Options go through the same pydantic validation as a spec file; an
    invalid one is an InputError naming the option and the value given."""
    from latte_ray.api import run_spec_of

    spec = load_pipeline_spec(pipeline)
    try:
        spec = spec.with_overrides(batch_size=batch_size, concurrency=_concurrency(concurrency))
    except ValidationError as e:
        raise option_error(e, {"batch_size": ("--batch-size", batch_size),
                               "concurrency": ("--concurrency", concurrency)}) from None
    spec = _with_dataset_options(spec, scoring, keep_embeddings, keep_latents)
    return run_spec_of(spec, prompts, output, seed=seed, resume=resume, retry_errors=retry_errors, limit=limit,
                       storage_options=parse_storage_options(storage_option), cache_dir=cache_dir,
                       option_names=OPTION_NAMES)


def _api_run(spec: RunSpec, console, command: str, wait_for_lease: bool, no_lease: bool,
             max_lease_wait: float | None = None):
    """latte_ray.run over a command line's RunSpec (checked already, so errors name the options)."""
    from latte_ray import api

    _lease_policy(wait_for_lease, no_lease, max_lease_wait)  # options that exclude each other, named as options
    return api.run(spec.pipeline, spec.prompts, spec.output, seed=spec.seed, resume=spec.resume,
                   retry_errors=spec.retry_errors, limit=spec.limit, storage_options=spec.storage_options,
                   cache_dir=spec.cache_dir, wait_for_lease=wait_for_lease or max_lease_wait is not None,
                   max_lease_wait=max_lease_wait, lease=not no_lease, command=command,
                   console=console)


def _with_dataset_options(spec, scoring, keep_embeddings, keep_latents):
    """The spec with --scoring (scoring on, with that spec's section) and --keep-* (sidecars) applied."""
    update = {}
    if scoring:
        from latte_ray.datasets.scoring import load_scoring_spec

        update["scoring"] = load_scoring_spec(scoring).model_copy(update={"enabled": True})
    if keep_embeddings is not None or keep_latents is not None:
        update["sidecars"] = spec.sidecars.model_copy(update={
            k: v for k, v in (("embeddings", keep_embeddings), ("latents", keep_latents)) if v is not None})
    return spec.model_copy(update=update) if update else spec


STANDALONE = {"stop_ray_before_failing": False}  # set by main(): this process owns its Ray connection


def _fail(e: Exception, code: int = 2) -> None:
    """One red line and an exit code: 2 bad input or a plan that cannot fit the cluster, 1 a run that failed
    (its root cause), 3 a stalled run (the progress watchdog stopped it; resume with the same command)."""
    if code in (EXIT_FAILED, EXIT_STALLED) and STANDALONE["stop_ray_before_failing"]:
        _stop_ray()
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def _captured(console):
    """The console's capture around a command's work (latte_ray/console.py). A process that owns its Ray
    stops it inside the capture, so that no line Ray forwards from its workers or prints at shutdown lands
    on the console after the summary or the error line."""
    with console.capture():
        try:
            yield console
        finally:
            if STANDALONE["stop_ray_before_failing"]:
                _stop_ray()


def _run_report(output: str, storage_options: dict) -> str | None:
    """Write OUTPUT/report/ after a run; a report that cannot be written is a warning, not a failed run."""
    from latte_ray.ops.report import write_report

    try:
        return write_report(output, storage_options).url
    except Exception as e:  # noqa: BLE001 - the run's videos and manifest are committed whatever happens here
        logging.getLogger("latte_ray.cli").warning("the report was not written (%s: %s); run `latte-ray report %s`",
                                                   type(e).__name__, e, output)
        return None


def _open_hint(url: str) -> str:
    from latte_ray.record.storage import filesystem, is_local

    try:
        local = is_local(filesystem(url)[0])
    except Exception:  # noqa: BLE001
        local = False
    return f"open {url}" if local else f"{url} (copy the report/ folder next to a browser, or serve it)"


def print_run_summary(summary, output: str, report_url: str | None = None) -> None:
    """The summary of a run: counts, the first few real videos, the manifest, the run's record and log, the
    report."""
    typer.echo(summary.line())
    for err in summary.errors[:5]:
        typer.echo(f"  error: {err}")
    out = output.rstrip("/")
    for n, uri in enumerate(summary.videos):
        more = summary.ok - len(summary.videos)
        tail = f"   (+{more} more; the manifest lists every one)" if n == len(summary.videos) - 1 and more > 0 else ""
        typer.echo(f"{'videos:' if n == 0 else '':<10}{uri}{tail}")
    typer.echo(f"manifest: {out}/manifest/")
    typer.echo(f"run:      {out}/runs/{summary.run_id}.json")
    if summary.log:
        typer.echo(f"log:      {summary.log}")
    if report_url:
        typer.echo(f"report:   {_open_hint(report_url)}")


def _stop_ray() -> None:
    """Disconnect from Ray (stopping a local one this process started) before the final error line, so that
    no log line Ray forwards from its workers lands after it."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@command()
def run(
    pipeline: str = PipelineOpt,
    prompts: Optional[list[str]] = typer.Option(None, "--prompts", help="Prompt table(s): Parquet file, folder or glob; local or fsspec URL (repeatable). Default: the example table shipped with latte-ray (examples/prompts.parquet)."),
    output: str = OutputOpt,
    storage_option: Optional[list[str]] = StorageOpt,
    batch_size: Optional[int] = BatchOpt,
    concurrency: Optional[str] = ConcurrencyOpt,
    seed: int = SeedOpt,
    resume: bool = ResumeOpt,
    retry_errors: bool = RetryOpt,
    limit: Optional[int] = LimitOpt,
    cache_dir: Optional[str] = CacheOpt,
    scoring: Optional[str] = ScoringRunOpt,
    keep_embeddings: Optional[bool] = KeepEmbeddingsOpt,
    keep_latents: Optional[bool] = KeepLatentsOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Make every check a run makes before Ray starts (tables, output, model configs, video settings), count what it would do (new, already done, duplicate, conflicting, invalid rows) and estimate GPU-hours and wall time; load no model, start no Ray, write nothing (but a probe of the output it deletes)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="With --dry-run: GPUs to estimate wall time for (generation actors for a CPU spec). Default 1."),
    report: bool = ReportRunOpt,
    verbose: bool = VerboseOpt,
    wait_for_lease: bool = WaitLeaseOpt,
    max_lease_wait: Optional[float] = MaxLeaseWaitOpt,
    no_lease: bool = NoLeaseOpt,
) -> None:
    """Generate one mp4 per prompt and a Parquet manifest, then the report. With no options: the tiny demo into ./outputs/demo."""
    from latte_ray import runner
    from latte_ray.console import Console

    console = Console(verbose=verbose)
    report_url = None

    spec = build_run_spec(pipeline, prompts or [str(EXAMPLE_PROMPTS)], output, storage_option, batch_size,
                          concurrency, seed, resume, retry_errors, limit, cache_dir, scoring, keep_embeddings,
                          keep_latents)
    if dry_run:
        from latte_ray.plan.dryrun import plan

        checked = runner.preflight(spec)
        typer.echo(f"checked: {checked.model}")
        typer.echo("\n".join(plan(spec, checked.in_fs, checked.files, gpus).lines()))
        return
    with _captured(console):
        summary = _api_run(spec, console, "run", wait_for_lease, no_lease, max_lease_wait)
        if report:
            report_url = _run_report(output, spec.storage_options)
    summary.log = console.log_location or summary.log
    print_run_summary(summary, output, report_url)
    if summary.error and not summary.ok:
        raise typer.Exit(1)


@command()
def synth(
    recipe: str = typer.Option(..., "--recipe", help="Recipe YAML (local path or fsspec URL) or a built-in recipe's name (synth-example): prompt templates x attribute lists; see `latte-ray pipelines show synth-example`."),
    output: str = typer.Option(..., "--output", "-o", help="Dataset prefix (local folder or fsspec URL): prompts/, videos/, manifest/, dataset/ go under it."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help="Override the recipe's pipeline spec (a YAML path or a built-in name)."),
    storage_option: Optional[list[str]] = StorageOpt,
    min_motion: Optional[float] = MinMotionOpt,
    drop_blank: Optional[bool] = typer.Option(None, "--drop-blank/--keep-blank", help="Leave videos with any blank (near-uniform) frame out of the export (default: the recipe's export.drop_blank)."),
    min_clip_score: Optional[float] = MinClipOpt,
    min_aesthetic: Optional[float] = MinAestheticOpt,
    with_embeddings: Optional[bool] = WithEmbeddingsOpt,
    with_latents: Optional[bool] = WithLatentsOpt,
    scoring: Optional[str] = typer.Option(None, "--scoring", help="Score videos as they are generated with this scoring spec (overrides the recipe's `scoring`)."),
    export_only: bool = typer.Option(False, "--export-only", help="Skip generation; re-export what the output already holds (e.g. with other filters)."),
    cache_dir: Optional[str] = CacheOpt,
    verbose: bool = VerboseOpt,
    wait_for_lease: bool = WaitLeaseOpt,
    max_lease_wait: Optional[float] = MaxLeaseWaitOpt,
    no_lease: bool = NoLeaseOpt,
) -> None:
    """Build a synthetic video dataset: expand the recipe, generate (resumable), export WebDataset shards + a Parquet index."""
    from latte_ray.console import Console
    from latte_ray.datasets.synth import synthesize

    console = Console(verbose=verbose, name="synth")
    with _captured(console):
        summary = synthesize(recipe, output, pipeline=pipeline,
                             storage_options=parse_storage_options(storage_option), min_motion=min_motion,
                             drop_blank=drop_blank, cache_dir=cache_dir, generate=not export_only,
                             min_clip_score=min_clip_score, min_aesthetic=min_aesthetic,
                             with_embeddings=with_embeddings, with_latents=with_latents, scoring=scoring,
                             console=console, lease=_lease_policy(wait_for_lease, no_lease, max_lease_wait))
    typer.echo("\n".join(summary.lines()))
    if summary.run is not None:
        for n, uri in enumerate(summary.run.videos):
            typer.echo(f"{'videos:' if n == 0 else '':<10}{uri}")
        typer.echo(f"run:      {output.rstrip('/')}/runs/{summary.run.run_id}.json")
    if console.log_location:
        typer.echo(f"log:      {console.log_location}")
    if summary.run is not None and summary.run.error and not summary.run.ok:
        raise typer.Exit(1)


@command()
def score(
    output: str = typer.Argument(..., help="A run's output prefix (local folder or fsspec URL)."),
    scoring: str = typer.Option(..., "--scoring", help="Scoring spec: a YAML path, or a pipeline name or path whose `scoring` section is used (e.g. tiny-cpu)."),
    storage_option: Optional[list[str]] = StorageOpt,
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Score at most this many videos."),
    cache_dir: Optional[str] = CacheOpt,
    verbose: bool = VerboseOpt,
    wait_for_lease: bool = WaitLeaseOpt,
    max_lease_wait: Optional[float] = MaxLeaseWaitOpt,
    no_lease: bool = NoLeaseOpt,
) -> None:
    """Score the ok videos of OUTPUT that have no scores of this scorer yet (CLIPScore, aesthetic); resumable.

    Scores go to OUTPUT/scores/ (the manifest is never rewritten); export, report and status read them.
    """
    from latte_ray.console import Console
    from latte_ray.datasets.scoring import load_scoring_spec, score_output

    console = Console(verbose=verbose, name="score")
    spec = load_scoring_spec(scoring)
    with _captured(console):
        result = score_output(output, spec, parse_storage_options(storage_option), cache_dir=cache_dir,
                              limit=limit, console=console,
                              lease=_lease_policy(wait_for_lease, no_lease, max_lease_wait))
    typer.echo(result.line())
    for err in result.errors[:5]:
        typer.echo(f"  error: {err}")
    if console.log_location:
        typer.echo(f"log:      {console.log_location}")
    if result.failed and not result.scored:
        raise typer.Exit(1)


@command()
def export(
    output: str = typer.Argument(..., help="A run's output prefix (local folder or fsspec URL); the dataset goes to OUTPUT/dataset/."),
    storage_option: Optional[list[str]] = StorageOpt,
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Export only the ids of this prompt table (and carry its template/attributes/variant columns)."),
    min_motion: Optional[float] = MinMotionOpt,
    drop_blank: bool = typer.Option(False, "--drop-blank/--keep-blank", help="Leave videos with any blank (near-uniform) frame out."),
    min_clip_score: Optional[float] = MinClipOpt,
    min_aesthetic: Optional[float] = MinAestheticOpt,
    with_embeddings: bool = typer.Option(False, "--with-embeddings", help="Put each prompt's T5 embeddings (fp16, <key>.t5.npy) in its sample; videos generated without them are rejected."),
    with_latents: bool = typer.Option(False, "--with-latents", help="Put each video's final latents (<key>.latents.npy) in its sample; videos generated without them are rejected."),
    scoring: Optional[str] = typer.Option(None, "--scoring", help="Which scores to filter on and report: a scoring spec (YAML path or pipeline name) or its 16-hex scoring hash; default: the scorer that scored the most videos."),
    samples_per_shard: int = typer.Option(1000, "--samples-per-shard", min=1, help="Most samples in one WebDataset tar."),
    name: Optional[str] = typer.Option(None, "--name", help="Dataset name on the card (default: the pipeline's name)."),
    license: str = typer.Option("other", "--license", help="License on the dataset card (a Hub license id)."),
) -> None:
    """Export OUTPUT's videos as WebDataset shards + index.parquet + a dataset card (README.md), with filters."""
    from latte_ray.datasets.export import export_dataset

    summary = export_dataset(output, parse_storage_options(storage_option), prompts_url=prompts,
                             min_motion=min_motion, drop_blank=drop_blank, samples_per_shard=samples_per_shard,
                             min_clip_score=min_clip_score, min_aesthetic=min_aesthetic,
                             with_embeddings=with_embeddings, with_latents=with_latents,
                             scoring_hash=_scoring_hash(scoring), name=name, license=license)
    typer.echo("\n".join(summary.lines()))


def _scoring_hash(scoring: str | None) -> str | None:
    import re

    if not scoring or re.fullmatch(r"[0-9a-f]{16}", scoring):
        return scoring
    from latte_ray.datasets.scoring import load_scoring_spec

    return load_scoring_spec(scoring).scoring_hash()


@command()
def report(
    output: str = typer.Argument(..., help="A run's output prefix (local folder or fsspec URL)."),
    dest: Optional[str] = typer.Option(None, "--dest", help="Where to write index.html and its PNGs (default OUTPUT/report/)."),
    storage_option: Optional[list[str]] = StorageOpt,
    samples: int = typer.Option(12, "--samples", min=1, help="Videos on the contact sheet (evenly spaced by id)."),
    extremes: int = typer.Option(3, "--extremes", min=0, help="Lowest- and highest-scoring videos (by clip_score and by aesthetic_score) added to the contact sheet when the output has scores."),
    scoring: Optional[str] = typer.Option(None, "--scoring", help="Which scores to show: a scoring spec or its hash (default: the scorer that scored the most videos)."),
    video_base_url: Optional[str] = typer.Option(None, "--video-base-url", help="For a remote output: the https URL (endpoint, CDN) that serves OUTPUT's objects; the gallery plays <URL>/videos/<shard>/<name>.mp4. Default: the object's URL on the storage endpoint."),
    presign_expiry: Optional[int] = typer.Option(None, "--presign-expiry", min=1, max=7 * 24 * 3600, help="For an s3:// output: link each video by a presigned URL valid this many seconds (they carry the access key id and a signature, never the secret key; the page says when they expire)."),
    max_gallery: int = typer.Option(MAX_GALLERY_DEFAULT, "--max-gallery", min=1, help="Most cards in the gallery; a larger output is sampled (every latest error row up to a quarter of it, the extremes by each score, the rest evenly spaced by id)."),
) -> None:
    """Write OUTPUT/report/: a gallery of the videos (each plays inline; sort by score, motion or time; filter by status, error rows with their message), counts, throughput, errors, score distributions and a contact sheet."""
    from latte_ray.ops.report import write_report

    result = write_report(output, parse_storage_options(storage_option), dest=dest, samples=samples,
                          extremes=extremes, scoring_hash=_scoring_hash(scoring), video_base_url=video_base_url,
                          presign_seconds=presign_expiry, max_gallery=max_gallery)
    c = result.counts
    sampled = f" (gallery: a sample of {result.gallery})" if result.gallery < result.gallery_of else ""
    typer.echo(f"report: {c['ok']} ok, {c['error']} error of {c['prompts']} prompts{sampled} -> {result.url}")
    for key in ("videos missing", "videos wrong size", "record disagrees"):
        if c.get(key):
            typer.echo(f"damaged: {key}: {c[key]} (`latte-ray verify {output}` names them)")
    typer.echo(f"        {_open_hint(result.url)}")


@command()
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
    report: bool = ReportRunOpt,
    verbose: bool = VerboseOpt,
    wait_for_lease: bool = WaitLeaseOpt,
    max_lease_wait: Optional[float] = MaxLeaseWaitOpt,
    no_lease: bool = NoLeaseOpt,
) -> None:
    """Generate every row of the input tables that lacks an ok row in OUTPUT; a second backfill does nothing.

    The same operation as `run` with resume forced on, over a set of tables (e.g. every date partition so
    far): duplicates across tables are generated once, and when nothing is left no model is loaded.
    """
    from latte_ray import runner
    from latte_ray.console import Console

    console = Console(verbose=verbose, name="backfill")
    report_url = None
    spec = build_run_spec(pipeline, prompts, output, storage_option, batch_size, concurrency, seed, True,
                          retry_errors, limit, cache_dir)
    with _captured(console):
        summary = _api_run(spec, console, "backfill", wait_for_lease, no_lease, max_lease_wait)
        if report and (summary.ok or summary.error):
            report_url = _run_report(output, spec.storage_options)
    summary.log = console.log_location or summary.log
    if summary.ok == 0 and summary.error == 0:
        typer.echo(f"backfill: nothing to do ({summary.skipped_done} rows already done) -> {output}")
        if summary.log:
            typer.echo(f"log:      {summary.log}")
        return
    print_run_summary(summary, output, report_url)
    if summary.error and not summary.ok:
        raise typer.Exit(1)


@command()
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

    options = parse_storage_options(storage_option)
    negative = load_pipeline_spec(pipeline).sampling.negative_prompt if pipeline else None
    result = output_status(output, options, prompts=prompts, run_seed=seed, default_negative=negative, top=top)
    typer.echo(json.dumps(result.as_dict(), indent=2, default=str) if as_json else "\n".join(result.lines()))


@command()
def compact(
    output: str = typer.Argument(..., help="A run's output prefix (local folder or fsspec URL)."),
    storage_option: Optional[list[str]] = StorageOpt,
    min_age_minutes: float = typer.Option(60.0, "--min-age-minutes", min=0.0, help="Leave parts and videos younger than this alone (a running job's batch may still rewrite its part, or be about to commit its video)."),
    parts_per_file: int = typer.Option(10_000, "--parts-per-file", min=2, help="Most parts merged into one compacted part."),
    wait_for_lease: bool = WaitLeaseOpt,
    max_lease_wait: Optional[float] = MaxLeaseWaitOpt,
    no_lease: bool = NoLeaseOpt,
) -> None:
    """Merge the manifest's small parts (one per batch) into a few large ones, and delete video objects no ok row names (older than the margin); safe to stop at any instant."""
    from latte_ray.record.compact import compact as compact_manifest

    result = compact_manifest(output, parse_storage_options(storage_option), min_age_s=min_age_minutes * 60,
                              parts_per_file=parts_per_file, lease=_lease_policy(wait_for_lease, no_lease, max_lease_wait))
    typer.echo(result.line())


@command()
def verify(
    output: str = typer.Argument(..., help="A run's output prefix (local folder or fsspec URL)."),
    storage_option: Optional[list[str]] = StorageOpt,
    deep: bool = typer.Option(False, "--deep", help="Also read every ok video and check its sha256 against the manifest (every byte: at a million videos a terabyte); by default sizes are checked from listings."),
    repair: bool = typer.Option(False, "--repair", help="Move what is damaged or not latte-ray's to OUTPUT/quarantine/<time>/ (never deletes) and rebuild a damaged latte-ray.json from the run records; the next run (the same command, resuming) makes the affected videos again. Takes the output's lease."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    wait_for_lease: bool = WaitLeaseOpt,
    max_lease_wait: Optional[float] = MaxLeaseWaitOpt,
) -> None:
    """Check OUTPUT against its own record: manifest parts readable and of the manifest's schema, every ok video present with its recorded size (and --deep its sha256), run records, latte-ray.json and lease objects readable and consistent. Exit 0 clean, 1 damaged (after --repair: 0 once it is repaired)."""
    import json
    import time as _time

    from latte_ray.record.verify import verify as verify_output

    last = [0.0]

    def progress(done: int, total: int) -> None:
        if done == total or _time.monotonic() - last[0] >= 2.0:
            last[0] = _time.monotonic()
            typer.echo(f"sha256: {done}/{total} videos", err=True)

    report = verify_output(output, deep=deep, repair=repair, storage_options=parse_storage_options(storage_option),
                           lease=_lease_policy(wait_for_lease, False, max_lease_wait), progress=progress if deep else None)
    typer.echo(json.dumps(report.as_dict(), indent=2, default=str) if as_json else "\n".join(report.lines()))
    if report.findings and not repair:
        raise typer.Exit(1)


pipelines_app = typer.Typer(
    add_completion=False, invoke_without_command=True,
    help="List the built-in pipeline specs and synth recipes; `pipelines show NAME` prints one.",
)
app.add_typer(pipelines_app, name="pipelines")


def _builtin(name: str) -> Path:
    path = PIPELINES_DIR / f"{name}.yaml"
    if "/" in name or not path.is_file():
        known = ", ".join(sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml")))
        raise SpecError(f"no built-in pipeline spec or recipe named {name!r} (built-in: {known})")
    return path


def builtin_entries() -> list[tuple[str, str, str]]:
    """(kind, name, description) of every shipped YAML: kind 'spec' (a PipelineSpec) or 'recipe' (synth)."""
    import yaml

    from latte_ray.datasets.synth import Recipe
    from latte_ray.spec import parse_pipeline_spec

    entries = []
    for path in sorted(PIPELINES_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if isinstance(raw, dict) and "templates" in raw:
            entries.append(("recipe", path.stem, Recipe.model_validate(raw).description))
        else:
            entries.append(("spec", path.stem, parse_pipeline_spec(raw, origin=str(path)).description))
    return entries


@pipelines_app.callback()
def pipelines(ctx: typer.Context) -> None:
    """List the built-in pipeline specs (for --pipeline) and synth recipes (for synth --recipe), one line each."""
    if ctx.invoked_subcommand is not None:
        return
    entries = builtin_entries()
    width = max(len(name) for _, name, _ in entries)
    for kind, title in (("spec", "pipeline specs (run/backfill --pipeline NAME):"),
                        ("recipe", "synth recipes (synth --recipe NAME):")):
        rows = [(name, desc) for k, name, desc in entries if k == kind]
        if rows:
            typer.echo(title)
            for name, desc in rows:
                typer.echo(f"  {name:<{width}}  {desc}".rstrip())
    typer.echo("`latte-ray pipelines show NAME > my.yaml` prints one to copy and edit; pass it back with --pipeline my.yaml.")


@command(pipelines_app, "show")
def pipelines_show(name: str = typer.Argument(..., help="A built-in spec or recipe name, e.g. latte-1-t2v-512.")) -> None:
    """Print a built-in spec or recipe as shipped (comments included), ready to copy and edit."""
    path = _builtin(name)
    typer.echo(path.read_text(), nl=False)


@command(app, "tiny-model")
def tiny_model(path: Path = typer.Argument(..., help="Folder to save the tiny random-weight pipeline into: missing, empty, or an earlier tiny model."),
               family: str = typer.Option("latte", "--family", help="Model family: latte (LattePipeline) or wan (WanPipeline).")) -> None:
    """Build an offline tiny pipeline (random weights, local tokenizer) and save it with save_pretrained.

    PATH must be missing, an empty folder, or an earlier tiny model saved by this command (which is replaced);
    anything else is refused and left untouched."""
    from latte_ray.model.families import FAMILIES

    if family not in FAMILIES:
        raise InputError(f"--family {family!r}: one of {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    out = fam.load().save_tiny(path)
    typer.echo(f"tiny {fam.display} pipeline saved to {out} (load with {fam.pipeline_class}.from_pretrained)")


def main() -> None:
    from latte_ray.model.quantize import leave_torchao_unimported

    # The driver never quantizes (model actors do, and lift this where a spec asks): diffusers imports peft,
    # which imports torchao when installed, whose load failures on a machine without its kernels would
    # otherwise stand in front of every command's output.
    leave_torchao_unimported(None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    STANDALONE["stop_ray_before_failing"] = True
    app()


if __name__ == "__main__":
    main()
