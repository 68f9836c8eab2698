"""The run's Ray Data graph, composed from the declared stages (stages/declare.py):

    read Parquet -> prepare (in the read tasks) -> [text_encode] -> denoise (GPU actor pool, or thin clients of
    the run's generation servers) -> encode (CPU) -> [sample_frames -> score] -> write (CPU)

`generation` is the part a run and the processor (stages/processor.py) share, so both make the same bytes.
"""

from __future__ import annotations

from latte_ray.plan.prompts import read_input
from latte_ray.stages.declare import Context, Stage, apply, check

SOURCE_COLUMNS = ("prompt", "path", "row_hash")  # read_input's columns a run's graph relies on


def generation(ctx: Context) -> list[Stage]:
    """Prompts to encoded videos (and their scores when the spec scores): the stages between prepare and
    write, as the spec asks for them."""
    from latte_ray.stages.encode import STAGE as ENCODE

    stages = []
    if ctx.spec.execution.text_encode_stage:
        from latte_ray.stages.text_encode import STAGE as TEXT_ENCODE

        stages.append(TEXT_ENCODE)
    if ctx.extra.get("servers") is not None:  # thin clients of the run's servers, which hold GPUs and models
        from latte_ray.fleet.client import STAGE as DENOISE
    else:
        from latte_ray.stages.denoise import STAGE as DENOISE
    stages += [DENOISE, ENCODE]
    if ctx.scoring.enabled:  # scores go into the manifest rows this run commits (latte_ray/record/scores.py)
        from latte_ray.stages.sample_frames import STAGE as SAMPLE_FRAMES
        from latte_ray.stages.score import STAGE as SCORE

        stages += [SAMPLE_FRAMES, SCORE]
    return stages


def build_plan(run, in_fs, files: list[str], work=None, run_id: str = "",
               round_of: tuple[int, int] | None = None, fence: dict | None = None, servers=None,
               executions: int = 1):
    """The Ray Data dataset whose rows are the manifest rows of this run (`work`: a workplan.WorkPlan;
    when none of its rows needs a model, only error rows are written and no generation actor starts;
    `round_of`: (k, rounds) to take on only the ids of round k, see scheduler.rounds; `servers`: the run's
    fleet/servers.ModelServers when the models live for the whole run, execution.keep_model_actors;
    `executions`: how many of the run's executions are under way at once, which share the CPU stages' most
    actors). StageGraphError before anything runs if the declared stages cannot compose."""
    import pyarrow.parquet as pq  # noqa: F401  (pyarrow must be importable on workers)

    from latte_ray.stages.prepare import STAGE as PREPARE
    from latte_ray.stages.write import STAGE as WRITE

    generates = work is None or bool(work.generate)
    ctx = Context(spec=run.pipeline, cache_dir=run.cache_dir, storage_options=run.storage_options, run_id=run_id,
                  output=run.output, fence=fence, run_seed=run.seed, executions=executions,
                  extra={"work": work, "round_of": round_of, "servers": servers, "generates": generates})
    middle = generation(ctx) if generates else []
    check([PREPARE, *middle, WRITE], ctx, SOURCE_COLUMNS)
    ds = apply(read_input(run, in_fs, files), PREPARE, ctx)
    if run.limit:
        ds = ds.limit(run.limit)
    if middle:
        # Small blocks, one generation batch each, so every actor in the pool gets work.
        ds = ds.repartition(target_num_rows_per_block=run.pipeline.execution.batch_size)
    for stage in [*middle, WRITE]:
        ds = apply(ds, stage, ctx)
    return ds
