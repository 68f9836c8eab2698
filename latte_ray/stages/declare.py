"""What a stage declares, and composing declared stages into a Ray Data graph.

Each stage file declares one `Stage` (the pattern of ray.llm's batch stages and NeMo Curator's
`ProcessingStage.inputs()/outputs()`): its name (the UDF's, as Ray Data shows it, `MapBatches(<name>)`), what
an error message calls it, the columns it reads, writes and drops, and how it is mapped (`map_batches`
arguments: the UDF, its constructor arguments, batch size and format, compute, resources) for a given
`Context`. The run's graph (stages/graph.py), the processor (stages/processor.py) and `latte-ray score`
compose the same declarations; `compose` checks, before anything executes, that every column a stage reads
is produced upstream, and refuses in one line naming the stage and the column. Root-cause attribution
(faults/rootcause.py) names a failed stage by its declared label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Union

from latte_ray.errors import StageGraphError  # noqa: F401 - re-exported

Columns = Union[tuple[str, ...], Callable[["Context"], tuple[str, ...]]]


@dataclass
class Context:
    """What a stage's map_batches arguments depend on: the spec and the run (or processor) around it."""

    spec: Any  # latte_ray.spec.PipelineSpec
    cache_dir: str | None = None
    storage_options: dict = field(default_factory=dict)
    run_id: str = ""
    output: str | None = None  # the output prefix a write stage commits to
    fence: dict | None = None  # the run's lease fence (record/lease.py), None without a lease
    run_seed: int = 0
    executions: int = 1  # executions under way at once, which share the CPU stages' most actors
    extra: dict = field(default_factory=dict)  # per-stage extras: the work plan's refs, the round, the broker
    scoring_spec: Any = None  # a ScoringSpec other than the pipeline's (`latte-ray score --scoring`)

    @property
    def scoring(self):
        return self.scoring_spec if self.scoring_spec is not None else self.spec.scoring

    @property
    def cpu_task_cpus(self) -> float:
        """CPUs each CPU-stage task or actor holds."""
        return self.spec.execution.num_cpus_per_cpu_task

    def cpu_pool(self):
        """The CPU stages' small autoscaling actor pool (encoders and writers keep state between batches),
        one strategy object for every CPU stage of the graph. Overlapping executions share
        execution.cpu_stage_max_actors: one whose pools had grown onto every spare CPU left the next none
        to start on (its reads and first actors waited for the last one's end)."""
        if "cpu_pool" not in self.extra:
            import ray

            most = self.spec.execution.cpu_stage_max_actors
            self.extra["cpu_pool"] = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, most // self.executions))
        return self.extra["cpu_pool"]


@dataclass(frozen=True)
class Stage:
    """One declared stage. `reads`/`writes`/`drops`: column names, or a function of the Context for columns
    that depend on the spec (the denoise stage reads embeddings when a text-encode stage runs before it).
    `replaces`: the stage's output holds only its `writes` (a write stage returns manifest rows)."""

    name: str
    label: str
    reads: Columns
    writes: Columns
    map_args: Callable[[Context], dict]
    drops: Columns = ()
    replaces: bool = False

    def columns(self, which: str, ctx: Context) -> tuple[str, ...]:
        value = getattr(self, which)
        return tuple(value(ctx) if callable(value) else value)


def check(stages: Iterable[Stage], ctx: Context, columns: Iterable[str]) -> set[str]:
    """The columns after `stages`, starting from `columns`; StageGraphError names the first stage that reads
    a column nothing upstream produces."""
    have = set(columns)
    for stage in stages:
        missing = [c for c in stage.columns("reads", ctx) if c not in have]
        if missing:
            raise StageGraphError(
                f"stage {stage.name} ({stage.label}) reads column {missing[0]!r}, which nothing upstream produces "
                f"(upstream columns: {', '.join(sorted(have)) or 'none'})")
        written = set(stage.columns("writes", ctx))
        have = written if stage.replaces else (have - set(stage.columns("drops", ctx))) | written
    return have


def apply(ds, stage: Stage, ctx: Context):
    """`ds.map_batches` with the stage's declared arguments (the graph was checked before)."""
    args = dict(stage.map_args(ctx))
    return ds.map_batches(args.pop("fn"), **args)


def compose(ds, stages: list[Stage], ctx: Context, columns: Iterable[str]):
    """`ds` mapped through `stages` in order, once `check` has passed."""
    check(stages, ctx, columns)
    for stage in stages:
        ds = apply(ds, stage, ctx)
    return ds


def declared() -> list[Stage]:
    """Every stage latte-ray declares (imports each stage module)."""
    from latte_ray.fleet.client import STAGE as client
    from latte_ray.stages.denoise import STAGE as denoise
    from latte_ray.stages.encode import STAGE as encode
    from latte_ray.stages.prepare import STAGE as prepare
    from latte_ray.stages.processor import STAGE as rows
    from latte_ray.stages.sample_frames import STAGE as sample_frames
    from latte_ray.stages.score import STAGE as score
    from latte_ray.stages.text_encode import STAGE as text_encode
    from latte_ray.stages.write import STAGE as write
    from latte_ray.stages.write_scores import STAGE as write_scores

    return [prepare, text_encode, denoise, client, encode, sample_frames, score, write, write_scores, rows]


def labels() -> dict[str, str]:
    """{stage name: what an error calls it}, for faults/rootcause.describe."""
    return {stage.name: stage.label for stage in declared()}
