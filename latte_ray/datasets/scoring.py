"""`latte-ray score OUTPUT --scoring SPEC`: score the videos an output already holds, resumably.

    manifest parts (Ray tasks: ok rows not yet scored by this scorer)
      -> sample frames (CPU actors: read each video by its manifest row's video_uri, check its sha256, decode)
      -> score (the scoring actor pool: CLIP + aesthetic head, GPU or CPU)
      -> write scores (CPU: OUTPUT/scores/part-*.parquet, keyed by id, the video's sha256 and the scoring hash)

A video counts as scored by a scorer when its manifest row carries that scorer's scores (a run that scored
it) or a score part has a row for (id, sha256, scoring hash) without an error; everything else is scored.
So a stopped `latte-ray score` picks up where it stopped, a second one scores nothing (and starts no actor),
a regenerated video is scored again, and rows that failed to score are tried again. Nothing in manifest/
is ever rewritten (latte_ray/record/scores.py says why). The driver holds part paths, counts and an object
ref to the sorted keys of what is already scored; rows to score stay in Ray's object store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import ValidationError

from latte_ray.errors import InputError
from latte_ray.spec import ExecutionSpec, ScoringSpec, SpecError, _format_errors, resolve_pipeline_path

log = logging.getLogger(__name__)

_ROW_COLUMNS = ["id", "prompt", "status", "sha256", "video_uri", "clip_score", "scoring_hash"]
CPU_PER_TASK = ExecutionSpec().num_cpus_per_cpu_task
ROWS_TO_SCORE = ("id", "prompt", "sha256", "video_uri", "status")  # rows_to_score's columns


@dataclass
class ScoreSummary:
    output: str
    scoring_hash: str
    todo: int = 0  # ok videos without scores of this scorer when the command started
    scored: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        if not self.todo:
            return f"score: nothing to do: every ok video of {self.output} has scores of scoring {self.scoring_hash}"
        return (f"score: {self.scored} scored, {self.failed} failed of {self.todo} videos without scores of "
                f"scoring {self.scoring_hash}; {self.seconds:.1f}s -> {self.output}/scores/")


def load_scoring_spec(name_or_path: str) -> ScoringSpec:
    """A scoring spec from a YAML file or a pipeline name: a pipeline spec's `scoring` section, or a mapping
    of ScoringSpec fields. Errors name the file and the field."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = resolve_pipeline_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a scoring spec must be a mapping, got {type(raw).__name__}")
    section = raw.get("scoring", {}) if ({"model", "sampling", "scoring", "name"} & set(raw)) else raw
    try:
        return ScoringSpec.model_validate(section or {})
    except ValidationError as e:
        raise SpecError(f"{path}: invalid scoring spec:\n{_format_errors(e)}") from None


def scored_keys(output: str, storage_options: dict | None, scoring_hash: str) -> np.ndarray:
    """Sorted 128-bit keys of (id, sha256) that score parts hold scores of `scoring_hash` for."""
    from latte_ray.plan.keys import KEY_DTYPE, id_keys
    from latte_ray.record.scores import read_scores
    from latte_ray.record.storage import OutputLayout, filesystem

    fs, root = filesystem(output, storage_options)
    parts = read_scores(fs, OutputLayout(url=output.rstrip("/"), root=root.rstrip("/")))
    parts = parts.filter(pc.and_(pc.equal(parts["scoring_hash"], scoring_hash), pc.is_null(parts["error"])))
    if not parts.num_rows:
        return np.empty(0, KEY_DTYPE)
    return np.unique(id_keys(f"{i}\0{s}" for i, s in zip(parts["id"].to_pylist(), parts["sha256"].to_pylist())))


def rows_to_score(batch: pa.Table, output: str, storage_options: dict | None, scoring_hash: str, done) -> pa.Table:
    """The ok rows of the manifest parts named in `batch` that have no scores of `scoring_hash` yet."""
    from latte_ray.faults import retry
    from latte_ray.plan.keys import contains, id_keys
    from latte_ray.record.storage import filesystem, read_part

    if not isinstance(done, np.ndarray):  # an object ref
        import ray

        done = ray.get(done)
    fs, _ = filesystem(output, storage_options)
    tables = [retry.call(lambda: read_part(fs, path, _ROW_COLUMNS), f"read {path}", retry.READ)
              for path in batch["path"].to_pylist()]
    rows = pa.concat_tables(tables) if tables else None
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("sha256", pa.string()),
                        ("video_uri", pa.string()), ("status", pa.string())])
    if rows is None or not rows.num_rows:
        return schema.empty_table()
    rows = rows.filter(pc.equal(rows["status"], "ok"))
    in_manifest = pc.fill_null(pc.and_(pc.equal(rows["scoring_hash"], scoring_hash), pc.is_valid(rows["clip_score"])),
                               False)
    rows = rows.filter(pc.invert(in_manifest))
    keys = id_keys(f"{i}\0{s}" for i, s in zip(rows["id"].to_pylist(), rows["sha256"].to_pylist()))
    rows = rows.filter(pa.array(~contains(done, keys), pa.bool_()))
    status = pa.array(["encoded"] * rows.num_rows, pa.string())  # a stored video, ready to sample and score
    return pa.table({"id": rows["id"], "prompt": rows["prompt"], "sha256": rows["sha256"],
                     "video_uri": rows["video_uri"], "status": status}, schema=schema)


def score_output(output: str, scoring: ScoringSpec, storage_options: dict | None = None,
                 cache_dir: str | None = None, limit: int | None = None, console=None, lease=None) -> ScoreSummary:
    """Score every ok video of `output` that has no scores of this scorer yet (see the module docstring),
    holding the output's lease (record/lease.py; `lease`: a Policy, default take it and refuse if held)
    from before Ray starts to the end. `console` (latte_ray.console.Console, the CLI's): the line saying what
    will run, the progress line and the log file, OUTPUT/runs/score-<stamp>.log."""
    from latte_ray.record.lease import Policy, hold_output, output_terms
    from latte_ray.record.output import new_run_id, require_output

    out, record = require_output(output, storage_options)
    run_id = new_run_id()
    with hold_output(out, run_id, "score", output_terms(record), lease or Policy()) as held:
        return _score(output, scoring, storage_options, cache_dir, limit, run_id, held, console)


def _score(output: str, scoring: ScoringSpec, storage_options: dict | None, cache_dir: str | None,
           limit: int | None, run_id: str, held, console=None) -> ScoreSummary:
    import ray

    from latte_ray.record.output import require_output
    from latte_ray.record.scores import write_scoring_record
    from latte_ray.record.storage import manifest_files
    from latte_ray.runner import init_ray
    from latte_ray.spec import PipelineSpec
    from latte_ray.stages.declare import Context, compose
    from latte_ray.stages.sample_frames import STAGE as SAMPLE_FRAMES
    from latte_ray.stages.score import STAGE as SCORE
    from latte_ray.stages.write_scores import STAGE as WRITE_SCORES

    started = time.perf_counter()
    out, _record = require_output(output, storage_options)
    fs, layout = out.fs, out.layout
    try:
        parts = manifest_files(fs, layout)
    except Exception as e:  # noqa: BLE001 - an unreadable output fails before any model loads
        raise InputError(f"score: cannot read {layout.url}/manifest/: {type(e).__name__}: {e}") from e
    if not parts:
        raise InputError(f"score: {output} has no manifest parts (not a latte-ray output, or nothing generated yet)")
    from latte_ray.model.clip import check_sources

    check_sources(scoring, storage_options)
    digest = write_scoring_record(fs, layout, scoring)
    summary = ScoreSummary(output=output, scoring_hash=digest)
    if console is not None and console.log_local is not None:
        console.attach_log(fs, f"{layout.runs_dir}/score-{run_id}.log", f"{layout.url}/runs/score-{run_id}.log")

    init_ray()
    done = ray.remote(scored_keys).options(num_cpus=CPU_PER_TASK).remote(output, storage_options, digest)
    ds = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=min(len(parts), 64))
    ds = ds.map_batches(rows_to_score, fn_kwargs={"output": output, "storage_options": storage_options,
                                                  "scoring_hash": digest, "done": done},
                        batch_format="pyarrow", num_cpus=CPU_PER_TASK)
    if limit:
        ds = ds.limit(limit)
    ds = ds.materialize()  # the rows to score, in the object store: counted before any model loads
    summary.todo = ds.count()
    if console is not None:
        from latte_ray.cluster import cluster_line

        log_part = f"; log: {console.log_now}" if console.log_now else ""
        console.echo(f"score: scorer {digest} ({scoring.clip_model}) over {output}: {summary.todo} videos to "
                     f"score; cluster: {cluster_line()}{log_part}")
        if summary.todo:
            console.start_progress(summary.todo)
    if not summary.todo:
        summary.seconds = time.perf_counter() - started
        return summary
    # The declared stages, as a run composes them; the CPU stages with the default execution settings.
    ctx = Context(spec=PipelineSpec(), cache_dir=cache_dir, storage_options=storage_options, run_id=run_id,
                  output=output, fence=held.fence if held is not None else None, scoring_spec=scoring,
                  extra={"fetch_from": output, "scoring_hash": digest})
    ds = ds.repartition(target_num_rows_per_block=scoring.batch_size)
    ds = compose(ds, [SAMPLE_FRAMES, SCORE, WRITE_SCORES], ctx, ROWS_TO_SCORE)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
        if held is not None:
            held.check()
        for video_id, error in zip(batch["id"].to_pylist(), batch["error"].to_pylist()):
            if error is None:
                summary.scored += 1
            else:
                summary.failed += 1
                if len(summary.errors) < 20:
                    summary.errors.append(f"{video_id}: {error}")
        if console is not None and console.progress is not None:
            console.progress.update(summary.scored + summary.failed, summary.failed)
    summary.seconds = time.perf_counter() - started
    log.info(summary.line())
    return summary
