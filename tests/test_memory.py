"""Memory figures from the real model's configs (latte_ray/model/memory.py).

- Latte-1's published configs (tests/data/latte-1/, see its SOURCE.md) in fp16: T5-XXL ~11.5 GB because
  transformers keeps its `wo` layers in fp32, transformer ~2.1 GB, VAE ~0.17 GB, ~13.8 GB in all;
- the count agrees byte for byte with what `from_pretrained(dtype=float16)` actually loads (the tiny model's
  saved components, through the libraries' own loaders), so the fp32 rule is the installed transformers' own;
- the activation estimate grows as docs/performance.md says: linearly with batch, CFG and frames; the VAE
  decode with decode_chunk_size and frame area.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from latte_ray.model import memory
from latte_ray.spec import load_pipeline_spec, parse_pipeline_spec

LATTE1 = Path(__file__).parent / "data" / "latte-1"


def config(component: str) -> dict:
    return json.loads((LATTE1 / component / "config.json").read_text())


@pytest.fixture(scope="module")
def latte1_fp16():
    import torch

    return {w.component: w for w in memory.pipeline_weights(config("transformer"), config("text_encoder"),
                                                             config("vae"), torch.float16)}


def test_latte1_weights_in_fp16_from_the_published_configs(latte1_fp16):
    t5, transformer, vae = latte1_fp16["text_encoder"], latte1_fp16["transformer"], latte1_fp16["vae"]
    te = config("text_encoder")
    wo = te["num_layers"] * te["d_ff"] * te["d_model"]  # one wo (d_ff -> d_model, no bias) per encoder layer
    assert t5.by_dtype["float32"] == wo * 4, "T5's wo layers are not counted in fp32"
    assert t5.by_dtype["float16"] == (t5.params - wo) * 2
    assert 11.4 < t5.gb < 11.6, t5.gb
    assert 2.0 < transformer.gb < 2.2 and transformer.by_dtype["float32"] < 10e6, transformer  # fp32 buffers
    assert 0.15 < vae.gb < 0.19, vae.gb
    assert 13.7 < sum(w.gb for w in latte1_fp16.values()) < 13.9


def test_weight_count_is_what_from_pretrained_loads(model_cache):
    """The tiny model's saved T5 and transformer, loaded in fp16 by transformers and diffusers: the bytes they
    hold (wo in fp32 included) equal memory.py's count from their configs."""
    import torch
    from diffusers import LatteTransformer3DModel
    from transformers import T5EncoderModel

    from latte_ray.model.tiny import ensure_tiny_model

    root = ensure_tiny_model(model_cache)

    def held(model) -> tuple[int, dict]:
        by = {}
        for t in [*model.parameters(), *model.buffers()]:
            by[str(t.dtype).removeprefix("torch.")] = by.get(str(t.dtype).removeprefix("torch."), 0) + t.nbytes
        return sum(by.values()), by

    t5 = T5EncoderModel.from_pretrained(root / "text_encoder", dtype=torch.float16)
    counted = memory.t5_encoder_weights(json.loads((root / "text_encoder" / "config.json").read_text()),
                                        torch.float16)
    assert "float32" in held(t5)[1], "transformers no longer keeps wo in fp32: update memory.py's docstring"
    assert held(t5) == (counted.bytes, counted.by_dtype)
    tr = LatteTransformer3DModel.from_pretrained(root / "transformer", dtype=torch.float16)
    counted = memory.diffusers_weights("transformer", json.loads((root / "transformer" / "config.json").read_text()),
                                       torch.float16)
    assert held(tr) == (counted.bytes, counted.by_dtype)


def test_activation_estimate_grows_with_batch_cfg_frames_and_decode_chunk():
    spec = load_pipeline_spec("latte-1-t2v-512")

    def act(batch=2, **sampling):
        raw = yaml.safe_load(spec.sampling.model_dump_json())
        raw.update(sampling)
        s = parse_pipeline_spec({"sampling": raw}).sampling
        return memory.activations(config("transformer"), config("vae"), s, batch, "float16")

    base = act()
    # rows (batch x 2 CFG halves) x frames x tokens x hidden, 14 values each
    tokens, hidden = (512 // 8 // 2) ** 2, 16 * 72
    assert base.denoise == 14 * 4 * 16 * tokens * hidden * 2
    assert act(batch=4).denoise == 2 * base.denoise and act(guidance_scale=1.0).denoise == base.denoise // 2
    assert act(video_length=8, decode_chunk_size=8).denoise == base.denoise // 2
    # decode_chunk_size frames x H x W x 256 channels (the SD VAE's widest at full resolution), 4 values each
    assert base.vae_decode == 4 * 16 * 512 * 512 * 256 * 2 and act(batch=4).vae_decode == base.vae_decode
    assert act(decode_chunk_size=8).vae_decode == base.vae_decode // 2
    assert act(height=256, width=256).vae_decode == base.vae_decode // 4
    # model.attention 'default': the spatial layers' scores and softmax, rows x frames x 16 heads x tokens^2, on top
    unfused = memory.activations(config("transformer"), config("vae"), spec.sampling, 2, "float16",
                                 unfused_attention=True)
    assert unfused.denoise == base.denoise + 2 * 4 * 16 * 16 * tokens**2 * 2 and unfused.vae_decode == base.vae_decode


def _held(model) -> tuple[int, dict]:
    """Bytes a loaded model holds, by dtype, torchao's quantized weights counted by the tensors inside them."""
    by: dict[str, int] = {}

    def add(t) -> None:
        if hasattr(t, "__tensor_flatten__"):  # a tensor subclass (torchao's Int8Tensor, Float8Tensor)
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        key = str(t.dtype).removeprefix("torch.")
        by[key] = by.get(key, 0) + t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    return sum(by.values()), by


@pytest.mark.parametrize("kind", ["int8_weight_only", "int8_dynamic", "float8_weight_only"])
def test_quantized_weights_are_counted_as_torchao_holds_them(model_cache, kind):
    """model.quantization's kinds that torchao makes on the CPU: the tiny Latte's transformer and T5 and the tiny
    Wan's transformer, loaded, then quantized by the engines' own quantize_pipeline, hold what memory.py counts
    from their configs, by dtype; the dry run's memory line counts them so (the float8 kinds run on CUDA only,
    float8_dynamic cannot be made here: its rule is read from torchao's source)."""
    from types import SimpleNamespace

    import torch
    from diffusers import LatteTransformer3DModel, WanTransformer3DModel
    from transformers import T5EncoderModel

    from latte_ray.model.quantize import quantize_pipeline
    from latte_ray.model.tiny import ensure_tiny_model
    from latte_ray.model.tiny_wan import ensure_tiny_wan
    from latte_ray.spec import QuantizationSpec

    latte, wan = ensure_tiny_model(model_cache), ensure_tiny_wan(model_cache)
    q = QuantizationSpec(kind=kind, components=("transformer", "text_encoder"))
    for dtype in (torch.bfloat16, torch.float16):
        pipe = SimpleNamespace(transformer=LatteTransformer3DModel.from_pretrained(latte / "transformer", dtype=dtype),
                               text_encoder=T5EncoderModel.from_pretrained(latte / "text_encoder", dtype=dtype))
        plain = _held(pipe.transformer)[0]
        linears = {n: sum(isinstance(m, torch.nn.Linear) for m in getattr(pipe, n).modules())
                   for n in ("transformer", "text_encoder")}
        assert quantize_pipeline(pipe, q) == linears and min(linears.values()) > 0
        counted = memory.diffusers_weights("transformer", json.loads((latte / "transformer" / "config.json").read_text()),
                                           dtype, kind)
        assert _held(pipe.transformer) == (counted.bytes, counted.by_dtype), (dtype, kind)
        assert counted.bytes < plain
        counted = memory.t5_encoder_weights(json.loads((latte / "text_encoder" / "config.json").read_text()), dtype,
                                            quantization=kind)
        assert _held(pipe.text_encoder) == (counted.bytes, counted.by_dtype), (dtype, kind)
        wan_pipe = SimpleNamespace(transformer=WanTransformer3DModel.from_pretrained(wan / "transformer", dtype=dtype))
        config = {"_class_name": "WanTransformer3DModel", **json.loads((wan / "transformer" / "config.json").read_text())}
        counted = memory.diffusers_weights("transformer", config, dtype)  # its norms and rope kept in float32
        assert _held(wan_pipe.transformer) == (counted.bytes, counted.by_dtype) and "float32" in counted.by_dtype
        quantize_pipeline(wan_pipe, q)
        counted = memory.diffusers_weights("transformer", config, dtype, kind)
        assert _held(wan_pipe.transformer) == (counted.bytes, counted.by_dtype), (dtype, kind)


def test_wan_figures_count_what_the_tiny_wan_loads(model_cache):
    """wan_figures' weights (the dry run's memory line for Wan) for the tiny Wan's UMT5 and transformer, from
    their configs, equal what transformers and diffusers load, by dtype, in fp16 (UMT5's wo kept in fp32) and
    bf16, plain and quantized (int8_weight_only of both)."""
    from types import SimpleNamespace

    import torch
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from latte_ray.model.families.wan_figures import figures
    from latte_ray.model.quantize import quantize_pipeline
    from latte_ray.model.tiny_wan import ensure_tiny_wan

    wan = ensure_tiny_wan(model_cache)
    configs = [json.loads((wan / c / "config.json").read_text()) for c in ("transformer", "text_encoder", "vae")]
    raw = yaml.safe_load(load_pipeline_spec("tiny-cpu-wan").model_dump_json())
    for dtype in ("float16", "bfloat16"):
        for quantization in (None, {"kind": "int8_weight_only", "components": ["transformer", "text_encoder"]}):
            raw["model"].update(dtype=dtype, quantization=quantization)
            spec = parse_pipeline_spec(raw)
            counted = {w.component: (w.bytes, w.by_dtype) for w in figures(spec, *configs).weights}
            pipe = SimpleNamespace(
                transformer=WanTransformer3DModel.from_pretrained(wan / "transformer", dtype=getattr(torch, dtype)),
                text_encoder=UMT5EncoderModel.from_pretrained(wan / "text_encoder", dtype=getattr(torch, dtype)))
            if quantization:
                quantize_pipeline(pipe, spec.model.quantization)
            for component in ("transformer", "text_encoder"):
                assert _held(getattr(pipe, component)) == counted[component], (dtype, quantization, component)


def test_dry_run_memory_line_reads_the_sources_configs(model_cache):
    """A GPU spec's dry run prints weights computed from its source's own configs (read by diffusers' and
    transformers' config loaders) and the activation estimate; a source it cannot read says why."""
    from latte_ray.model.tiny import ensure_tiny_model

    root = ensure_tiny_model(model_cache)
    raw = yaml.safe_load(load_pipeline_spec("latte-1-t2v-512").model_dump_json())
    raw["model"].update(source=str(root), revision=None)
    raw["sampling"].update(height=128, width=128)
    spec = parse_pipeline_spec(raw)
    saved = [json.loads((root / c / "config.json").read_text()) for c in ("transformer", "text_encoder", "vae")]
    line = memory.dry_run_line(spec)
    assert line.startswith("GPU memory per generation actor") and "estimate" in line, line
    assert line == memory.memory_plan(spec, *saved).line()
    quantized = parse_pipeline_spec({**raw, "model": {**raw["model"], "quantization": {
        "kind": "int8_weight_only", "components": ["transformer", "text_encoder"]}}})
    assert memory.memory_plan(quantized, *saved).weights_bytes < memory.memory_plan(spec, *saved).weights_bytes
    assert memory.dry_run_line(quantized) == memory.memory_plan(quantized, *saved).line()
    raw["model"]["source"] = "tiny"
    assert "not computed for a tiny model.source" in memory.dry_run_line(parse_pipeline_spec(raw))


def test_transformer_flop_model_is_what_torch_counts():
    """memory.transformer_flops against torch's FlopCounterMode (matmuls, convolutions, SDPA) on one call of a
    real LatteTransformer3DModel built from Latte-1's published config at a small width and size, its attention
    run by diffusers' matmul processor (the counter does not see into CPU SDPA's fused kernel): within 0.5 %;
    at Latte-1's own size it is the ~3.4 PFLOP per 50-step guided video the design names."""
    import torch
    from diffusers import LatteTransformer3DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from tests.hubcache import latte_1_file

    published = {k: v for k, v in json.loads(latte_1_file("transformer/config.json")).items() if not k.startswith("_")}
    small = {**published, "num_layers": 2, "num_attention_heads": 4, "attention_head_dim": 16, "caption_channels": 48,
             "cross_attention_dim": 64, "sample_size": 8, "video_length": 4}
    raw = yaml.safe_load(load_pipeline_spec("tiny-cpu").model_dump_json())
    raw["sampling"].update(height=64, width=48, video_length=4)
    sampling = parse_pipeline_spec(raw).sampling
    model = LatteTransformer3DModel.from_config(small).eval()
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    rows, text = 2, 7
    latents = torch.zeros(rows, 4, 4, 64 // 8, 48 // 8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(latents, encoder_hidden_states=torch.zeros(rows, text, 48), timestep=torch.ones(rows, dtype=torch.long),
              return_dict=False)
    counted, modelled = counter.get_total_flops(), memory.transformer_flops(small, sampling, rows, text)
    assert abs(modelled - counted) <= 0.005 * counted, (modelled, counted)

    prod = load_pipeline_spec("latte-1-t2v-512")
    full = {**published, "video_length": 16}
    video = memory.transformer_flops(full, prod.sampling, 2, prod.sampling.max_sequence_length) * 50
    assert 3.3e15 < video < 3.5e15, video
