"""The Wan engine's start-up on the tiny offline Wan (latte_ray/model/families/wan_engine.py): torch.compile as
model.compile.scope says, and Wan 2.2 A14B's second expert (transformer_2) getting its LoRA and quantization.

Compiled engines use the aot_eager backend, as tests/test_throughput.py does: real dynamo graphs and guards
(so a recompile is seen), no inductor kernels to build on a CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latte_ray.spec import SpecError, load_pipeline_spec, parse_pipeline_spec
from tests.test_lora import make_lora
from tests.test_throughput import DynamoCompiles

STEPS = 3
PROMPTS, NEGATIVES, SEEDS = ["a red fox runs through snow", "a cat"], ["", "blurry"], [1, 2]


def tiny_wan_spec(steps: int = STEPS, **model):
    """tiny-cpu-wan at `steps` steps, batch 2, with model fields replaced."""
    raw = json.loads(load_pipeline_spec("tiny-cpu-wan").model_dump_json())
    raw["model"].update(model)
    raw["sampling"]["num_inference_steps"] = steps
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


# ------------------------------------------------------------------ Wan 2.2 A14B's second expert

EXPERT_STEPS = 4  # the tiny two-expert model's schedule 1000, 900 | 750, 500: two steps on each expert


@pytest.fixture(scope="module")
def two_experts(tmp_path_factory):
    """The tiny Wan with A14B's layout (transformer, transformer_2, boundary_ratio) in a folder, and a LoRA for
    each expert made with peft (other random weights each)."""
    from latte_ray.model.tiny_wan import save_tiny_wan

    root = tmp_path_factory.mktemp("two-experts")
    model = str(save_tiny_wan(root / "model", experts=2))
    return model, make_lora(root / "high", seed=1), make_lora(root / "low", seed=2)


def expert_spec(model: str, loras: list[dict], **fields):
    return tiny_wan_spec(steps=EXPERT_STEPS, source=model, lora=loras, **fields)


def stock(pipe, prompt: str, seed: int) -> np.ndarray:
    video = pipe(prompt=prompt, height=64, width=64, num_frames=17, num_inference_steps=EXPERT_STEPS,
                 guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                 max_sequence_length=32).frames[0]
    return (video * 255).round().astype(np.uint8)


def test_each_expert_gets_its_lora_as_diffusers_load_into_transformer_2_fuses_it(two_experts, model_cache):
    """A LoRA per expert (component: transformer / transformer_2) equals diffusers' own load_lora_weights (with
    load_into_transformer_2=True for the second) + fuse_lora, within one level; the second expert's LoRA is
    not a no-op in the video."""
    from diffusers import WanPipeline

    from latte_ray.model.choose import make_engine
    from latte_ray.model.configs import check_model

    model, high, low = two_experts
    loras = [{"source": high, "scale": 0.7, "component": "transformer"},
             {"source": low, "scale": 0.5, "component": "transformer_2"}]
    spec = expert_spec(model, loras)
    summary, _ = check_model(spec)
    assert "lora.safetensors into transformer x0.7" in summary and "into transformer_2 x0.5" in summary
    engine = make_engine(spec, cache_dir=str(model_cache))
    assert engine.lora == ["lora.safetensors into transformer x0.7", "lora.safetensors into transformer_2 x0.5"]
    frames, _ = engine.generate(PROMPTS, ["", ""], SEEDS)

    pipe = WanPipeline.from_pretrained(model, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(high, weight_name="lora.safetensors", adapter_name="high")
    pipe.fuse_lora(components=["transformer"], lora_scale=0.7, adapter_names=["high"])
    high_only = stock(pipe, PROMPTS[0], SEEDS[0])
    pipe.load_lora_weights(low, weight_name="lora.safetensors", adapter_name="low", load_into_transformer_2=True)
    pipe.fuse_lora(components=["transformer_2"], lora_scale=0.5, adapter_names=["low"])
    for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):
        assert diff(frames[i], stock(pipe, prompt, seed)) <= 1, f"row {i}"
    assert diff(frames[0], high_only) > 8  # transformer_2's LoRA reached the video


def test_a_lora_is_refused_when_its_expert_is_unnamed_missing_or_does_not_fit(two_experts, tmp_path):
    from latte_ray.model.configs import check_model

    model, high, _ = two_experts
    with pytest.raises(SpecError, match=r"model.lora\[0\] .*the model has two experts \(transformer, transformer_2: "
                       r".*component: transformer_2 \(one entry per expert\)$") as e:
        check_model(expert_spec(model, [{"source": high}]))
    assert "\n" not in str(e.value)
    with pytest.raises(SpecError, match=r"component 'transformer_2', but the model has no transformer_2"):
        check_model(tiny_wan_spec(lora=[{"source": high, "component": "transformer_2"}]))
    deep = make_lora(tmp_path / "deep", num_layers=3)  # a block neither expert has
    with pytest.raises(SpecError, match=r"model.lora\[1\] .*key 'transformer.blocks.2.attn1.to_\w+.lora_A.weight' "
                       r"matches no module of the WanTransformer3DModel"):
        check_model(expert_spec(model, [{"source": high, "component": "transformer"},
                                        {"source": deep, "component": "transformer_2"}]))
    # the expert is part of the model's identity; left unset it stays out of the hash (older specs keep theirs)
    from latte_ray.spec import hashed_fields

    specs = [expert_spec(model, [{"source": high, "component": c}]) for c in (None, "transformer", "transformer_2")]
    assert len({s.spec_hash() for s in specs}) == 3
    assert "component" not in hashed_fields(specs[0].model_dump(mode="json"))["model"]["lora"][0]


def test_quantization_reaches_both_experts_after_their_loras(two_experts, model_cache):
    """model.quantization's "transformer" is the denoiser: both experts' Linear weights are quantized (after
    each got its LoRA fused), and the engine still makes a video."""
    from latte_ray.model.choose import make_engine

    model, high, low = two_experts
    spec = expert_spec(model, [{"source": high, "component": "transformer"},
                               {"source": low, "component": "transformer_2"}],
                       quantization={"kind": "int8_weight_only"})
    engine = make_engine(spec, cache_dir=str(model_cache))
    for expert in (engine.pipe.transformer, engine.pipe.transformer_2):
        assert "Int8" in type(expert.blocks[0].attn1.to_q.weight).__name__
    assert type(engine.pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Parameter"
    frames, _ = engine.generate(PROMPTS[:1], [""], SEEDS[:1])
    assert frames.std() > 5


def test_wan_loads_alike_from_a_folder_a_hub_id_at_its_revision_and_an_s3_mirror(model_cache, s3_server, tmp_path):
    """The three model sources a Wan spec can name go through the same loader as Latte's: a local folder, a hub
    id at a pinned revision (read from this session's offline hub cache, where only that commit is there: no
    branch points at it) and an s3:// mirror (copied once under the cache folder). The same weights from all
    three, every component, and both load WanPipeline."""
    import uuid

    from conftest import HUB_CACHE
    from hubcache import write_hub_cache
    from latte_ray.model.loading import load_pipeline
    from latte_ray.model.tiny_wan import ensure_tiny_wan
    from latte_ray.record.storage import filesystem
    from latte_ray.spec import ModelSpec

    tiny = ensure_tiny_wan(model_cache)
    repo, commit = "latte-ray-tests/tiny-wan", "0123456789abcdef0123456789abcdef01234567"
    write_hub_cache(HUB_CACHE, repo, {"": tiny}, commit=commit, branch=None)
    bucket = s3_server.make_bucket("wan-models-" + uuid.uuid4().hex[:8])
    fs, _ = filesystem(f"s3://{bucket}", s3_server.storage_options())
    fs.put(str(tiny), f"{bucket}/models/tiny-wan", recursive=True)

    pipes = {
        "folder": load_pipeline(ModelSpec(family="wan", source=str(tiny))),
        "hub": load_pipeline(ModelSpec(family="wan", source=repo, revision=commit)),
        "s3": load_pipeline(ModelSpec(family="wan", source=f"s3://{bucket}/models/tiny-wan/"), cache_dir=str(tmp_path),
                            storage_options=s3_server.storage_options()),
    }
    assert {type(p).__name__ for p in pipes.values()} == {"WanPipeline"}
    for name in ("transformer", "vae", "text_encoder"):
        ref = getattr(pipes["folder"], name).state_dict()
        for source in ("hub", "s3"):
            got = getattr(pipes[source], name).state_dict()
            assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), (source, name)
