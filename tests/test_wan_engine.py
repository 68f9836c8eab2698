"""The Wan engine's start-up on the tiny offline Wan (latte_ray/model/families/wan_engine.py): torch.compile as
model.compile.scope says, and Wan 2.2 A14B's second expert (transformer_2) getting its LoRA and quantization.

Compiled engines use the aot_eager backend, as tests/test_throughput.py does: real dynamo graphs and guards
(so a recompile is seen), no inductor kernels to build on a CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from latte_ray.spec import load_pipeline_spec, parse_pipeline_spec
from tests.test_throughput import DynamoCompiles

STEPS = 3
PROMPTS, NEGATIVES, SEEDS = ["a red fox runs through snow", "a cat"], ["", "blurry"], [1, 2]


def tiny_wan_spec(**model):
    """tiny-cpu-wan at STEPS steps, batch 2, with model fields replaced."""
    raw = json.loads(load_pipeline_spec("tiny-cpu-wan").model_dump_json())
    raw["model"].update(model)
    raw["sampling"]["num_inference_steps"] = STEPS
    raw["execution"]["batch_size"] = 2
    return parse_pipeline_spec(raw)


def diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def eager_videos(model_cache):
    from latte_ray.model.choose import make_engine

    videos, _ = make_engine(tiny_wan_spec(), cache_dir=str(model_cache)).generate(PROMPTS, NEGATIVES, SEEDS)
    assert videos.std() > 5
    return videos


@pytest.mark.parametrize("scope", ["whole", "blocks"])
def test_compile_scope_compiles_what_it_names_once_and_matches_eager(scope, eager_videos, model_cache):
    """`whole` compiles each expert's forward, `blocks` each WanTransformerBlock (diffusers'
    compile_repeated_blocks) and not the model around them; warm-up compiles, a full batch and a short (padded)
    one after it compile nothing, nothing falls back to eager at dynamo's limit, and the videos are eager's."""
    from latte_ray.model.choose import make_engine
    from latte_ray.model.engine import TextBatch

    spec = tiny_wan_spec(compile={"enabled": True, "backend": "aot_eager", "scope": scope})
    with DynamoCompiles() as compiles:
        engine = make_engine(spec, cache_dir=str(model_cache))
        warmed = compiles.frames
        video, _ = engine.generate(PROMPTS, NEGATIVES, SEEDS)
        short, _ = engine.generate(PROMPTS[1:], NEGATIVES[1:], SEEDS[1:])
        # behind a text-encode stage the embeddings come as arrays (ordinary tensors, not inference tensors)
        columns = engine.encode_text(PROMPTS, NEGATIVES).to_numpy()
        staged = engine.denoise(TextBatch.from_numpy(columns, engine.device, engine.dtype), SEEDS)
    t = engine.pipe.transformer
    whole, blocks = t._compiled_call_impl is not None, [b._compiled_call_impl is not None for b in t.blocks]
    assert (whole, set(blocks)) == ((True, {False}) if scope == "whole" else (False, {True})), (whole, blocks)
    assert warmed >= 1 and compiles.frames == warmed, (scope, warmed, compiles.frames)
    assert not compiles.limit_hits, compiles.limit_hits
    assert diff(video, eager_videos) <= 1 and diff(short[0], eager_videos[1]) <= 1, f"{scope}: differs from eager"
    assert np.array_equal(staged, video)
