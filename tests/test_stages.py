"""Declared stages (latte_ray/stages/declare.py): the run's graph, `latte-ray score`'s and the processor's are
composed from the same declarations, composing checks every column a stage reads, and root causes name every
declared stage. Unit tests: nothing executes."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import latte_ray.stages
from latte_ray import load_spec
from latte_ray.datasets.scoring import ROWS_TO_SCORE
from latte_ray.faults.rootcause import describe
from latte_ray.record.storage import MANIFEST_SCHEMA
from latte_ray.stages.declare import Context, Stage, StageGraphError, check, declared, labels
from latte_ray.stages.denoise import STAGE as DENOISE
from latte_ray.stages.encode import STAGE as ENCODE
from latte_ray.stages.graph import SOURCE_COLUMNS, generation
from latte_ray.stages.prepare import STAGE as PREPARE
from latte_ray.stages.processor import Processor
from latte_ray.stages.write import STAGE as WRITE

SHAPES = [{}, {"execution.text_encode_stage": True}, {"scoring.enabled": True},
          {"sidecars.embeddings": True, "sidecars.latents": True}]


@pytest.mark.parametrize("overrides", SHAPES)
def test_the_run_graph_composes_for_every_spec_shape(overrides):
    spec = load_spec("tiny-cpu", overrides)
    for servers in (None, object()):  # pooled generation actors, or clients of the run's kept servers
        ctx = Context(spec=spec, extra={"servers": servers})
        assert check([PREPARE, *generation(ctx), WRITE], ctx, SOURCE_COLUMNS) == set(MANIFEST_SCHEMA.names)
    nothing_to_generate = Context(spec=spec, extra={"generates": False})
    assert check([PREPARE, WRITE], nothing_to_generate, SOURCE_COLUMNS) == set(MANIFEST_SCHEMA.names)


@pytest.mark.parametrize("overrides", SHAPES)
def test_the_processor_composes_from_the_runs_generation_stages(overrides):
    processor = Processor(load_spec("tiny-cpu", overrides))
    ctx = processor.context()
    stages = processor.stages(ctx)
    assert stages[1:-1] == generation(ctx)
    out = check(stages, ctx, ("prompt",))
    assert {"id", "seed", "status", "error", "video", "sha256", "num_frames", "height", "width", "fps",
            "generate_seconds", "motion_score"} <= out
    assert "frames" not in out  # the raw frames stay inside the graph


def test_the_score_command_composes_its_stages_from_the_declarations():
    from latte_ray.stages.sample_frames import STAGE as SAMPLE_FRAMES
    from latte_ray.stages.score import STAGE as SCORE
    from latte_ray.stages.write_scores import STAGE as WRITE_SCORES

    ctx = Context(spec=load_spec("tiny-cpu"), extra={"fetch_from": "out", "scoring_hash": "0" * 16})
    assert "clip_score" in check([SAMPLE_FRAMES, SCORE, WRITE_SCORES], ctx, ROWS_TO_SCORE)


def test_a_stage_whose_input_nothing_upstream_produces_is_refused_in_one_line():
    ctx = Context(spec=load_spec("tiny-cpu"))
    with pytest.raises(StageGraphError) as refused:
        check([PREPARE, ENCODE, WRITE], ctx, SOURCE_COLUMNS)  # no generation stage: nothing makes frames
    message = str(refused.value)
    assert message.startswith("stage EncodeStage (encode actor) reads column 'frames', which nothing upstream "
                              "produces"), message
    assert "\n" not in message
    # A column the spec makes the stage read: embeddings, with a text-encode stage that is not there.
    encoded = Context(spec=load_spec("tiny-cpu", {"execution.text_encode_stage": True}))
    with pytest.raises(StageGraphError, match=r"^stage DenoiseStage \(generation actor\) reads column 'prompt_embeds'"):
        check([PREPARE, DENOISE], encoded, SOURCE_COLUMNS)
    # What a stage drops is gone downstream: the encode stage drops the raw frames.
    with pytest.raises(StageGraphError, match=r"reads column 'frames'"):
        check([PREPARE, DENOISE, ENCODE, ENCODE], ctx, SOURCE_COLUMNS)
    assert refused.value.exit_code == 2


def test_every_stage_module_declares_its_stage():
    helpers = {"declare", "graph"}
    modules = [m.name for m in pkgutil.iter_modules(latte_ray.stages.__path__) if m.name not in helpers]
    stages = declared()
    for name in modules:
        stage = importlib.import_module(f"latte_ray.stages.{name}").STAGE
        assert isinstance(stage, Stage) and stage in stages, name
    assert len({s.name for s in stages}) == len(stages)


class RayTaskError(Exception):
    """Stands in for Ray's wrapper: its module says ray, and it carries the actor's traceback as text only."""


RayTaskError.__module__ = "ray.exceptions"


def test_root_causes_name_every_declared_stage():
    names = labels()
    # The four that faults/rootcause.py's own map missed before it read the declarations:
    assert {"SampleFramesStage", "ScoreStage", "WriteScoresStage", "finish_rows"} <= set(names)
    for name, label in names.items():
        error = RayTaskError(f"ray::MapBatches({name})() (pid=1, ip=127.0.0.1)\nTraceback (most recent call last):\n"
                             f"  File \"x.py\", line 1, in __call__\nValueError: row 3 is bad")
        assert describe(error, names) == f"{label} failed: ValueError: row 3 is bad"
    assert describe(RayTaskError("ray::MapBatches(Unknown)()\nValueError: x"), names).startswith("Ray Data execution")
