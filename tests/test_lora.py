"""LoRA weights (spec model.lora, latte_ray/model/lora.py) on the tiny offline Wan.

LoRAs are made here offline with peft on the tiny model's transformer and saved with diffusers'
`save_lora_weights` (the layout a trained LoRA has). The engine's fused model is compared with diffusers' own
`load_lora_weights` + `fuse_lora` on a fresh pipeline; a LoRA that does not fit is refused by the driver's check.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from diffusers import WanPipeline

from latte_ray.model.configs import check_model
from latte_ray.spec import SpecError, load_pipeline_spec, parse_pipeline_spec

STEPS = 4


def make_lora(folder, seed: int = 1, **transformer_changes) -> str:
    """A rank-4 LoRA on the tiny Wan transformer's attention projections with random (non-zero) weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusers import WanTransformer3DModel
    from latte_ray.model import tiny_wan

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**{**tiny_wan.TRANSFORMER, **transformer_changes})
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    WanPipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer),
                                  safe_serialization=True, weight_name="lora.safetensors")
    return str(folder)


def spec_with(lora: list[dict]):
    raw = yaml.safe_load(load_pipeline_spec("tiny-cpu-wan").model_dump_json())
    raw["model"]["lora"] = lora
    raw["sampling"]["num_inference_steps"] = STEPS
    raw["execution"]["batch_size"] = 2
    return parse_pipeline_spec(raw)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("lora"))


def test_fused_lora_equals_diffusers_load_lora_weights_and_fuse_lora(lora_dir, model_cache):
    from latte_ray.model.choose import make_engine
    from latte_ray.model.tiny_wan import ensure_tiny_wan

    spec = spec_with([{"source": lora_dir, "weight_name": "lora.safetensors", "scale": 0.7}])
    engine = make_engine(spec, cache_dir=str(model_cache))
    prompts, seeds = ["a red fox runs through snow", "a cat"], [1, 2]
    frames, _ = engine.generate(prompts, ["", ""], seeds)

    pipe = WanPipeline.from_pretrained(str(ensure_tiny_wan(model_cache)), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    # the LoRA changes the video (it is not a no-op that would pass the comparison below trivially): row 0 suffices
    plain = pipe(prompt=prompts[0], height=64, width=64, num_frames=17, num_inference_steps=STEPS, guidance_scale=5.0,
                 generator=torch.Generator("cpu").manual_seed(seeds[0]), output_type="np", max_sequence_length=32).frames[0]
    pipe.load_lora_weights(lora_dir, weight_name="lora.safetensors")
    pipe.fuse_lora(lora_scale=0.7)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        ref = pipe(prompt=p, height=64, width=64, num_frames=17, num_inference_steps=STEPS, guidance_scale=5.0,
                   generator=torch.Generator("cpu").manual_seed(s), output_type="np", max_sequence_length=32).frames[0]
        ref8 = (ref * 255).round().astype(np.int16)
        assert np.abs(frames[i].astype(np.int16) - ref8).max() <= 1, f"row {i}"
        if i == 0:
            assert np.abs((plain * 255).round().astype(np.int16) - ref8).max() > 8


def test_lora_and_its_scale_are_part_of_the_spec_hash(lora_dir):
    base = spec_with([])
    one = spec_with([{"source": lora_dir, "weight_name": "lora.safetensors", "scale": 0.7}])
    other_scale = spec_with([{"source": lora_dir, "weight_name": "lora.safetensors", "scale": 0.8}])
    assert len({base.spec_hash(), one.spec_hash(), other_scale.spec_hash()}) == 3
    assert base.spec_hash() == load_pipeline_spec("tiny-cpu-wan").model_copy(
        update={"sampling": base.sampling, "execution": base.execution}).spec_hash()


def test_driver_check_names_the_lora_and_its_digest(lora_dir):
    summary, identity = check_model(spec_with([{"source": lora_dir, "scale": 0.7}]))
    assert "LoRA lora.safetensors x0.7 (rank 4, 16 modules, sha256 " in summary  # 2 blocks x 2 attentions x q, k, v, out
    assert identity["lora"][0]["file"] == "lora.safetensors" and len(identity["lora"][0]["sha256"]) == 64


def test_a_lora_for_another_model_is_refused_before_any_model_loads(tmp_path):
    wide = make_lora(tmp_path / "wide", attention_head_dim=16)  # another width: shapes do not fit
    with pytest.raises(SpecError, match=r"model.lora\[0\] .*has shape .* inputs \(a LoRA for another model size") as e:
        check_model(spec_with([{"source": wide}]))
    assert "\n" not in str(e.value)

    from safetensors.torch import load_file, save_file

    deep = make_lora(tmp_path / "deep", num_layers=3)  # a block the tiny model does not have
    with pytest.raises(SpecError, match=r"key 'transformer.blocks.2.attn1.to_\w+.lora_A.weight' matches no module"):
        check_model(spec_with([{"source": deep}]))
    (tmp_path / "two").mkdir()
    tensors = load_file(str(tmp_path / "deep" / "lora.safetensors"))
    for name in ("a", "b"):
        save_file(tensors, str(tmp_path / "two" / f"{name}.safetensors"))
    with pytest.raises(SpecError, match="2 .safetensors files there; name one with weight_name"):
        check_model(spec_with([{"source": str(tmp_path / "two")}]))
    with pytest.raises(SpecError, match="LoRA weights load as .safetensors only"):
        spec_with([{"source": str(tmp_path), "weight_name": "lora.bin"}])


def test_report_shows_the_family_and_each_lora():
    from latte_ray.ops.report import _model_rows

    model = spec_with([{"source": "org/style", "revision": "a" * 40, "weight_name": "s.safetensors", "scale": 0.8},
                       {"source": "s3://b/l/x.safetensors", "scale": -0.5}]).model.model_dump(mode="json")
    assert _model_rows(model) == {"model family": "wan", "LoRA 1": f"org/style/s.safetensors @ {'a' * 40} x0.8",
                                  "LoRA 2": "s3://b/l/x.safetensors x-0.5"}
    assert _model_rows(load_pipeline_spec("tiny-cpu").model.model_dump(mode="json")) == {}
