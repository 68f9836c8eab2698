"""Wan's FLOP and memory figures, computed from a model's configs, not guessed (dry runs, benchmarks/README.md).

FLOPs: each component is built from its config on the meta device (no memory, no weights) and run once at the
spec's shapes under torch's own FlopCounterMode, which counts every matmul, convolution and attention kernel from
their shapes: the UMT5 encoder over max_sequence_length tokens (a prompt and its negative), one transformer
forward at the video's latent size (run once per step, twice with classifier-free guidance: WanPipeline calls
the model for the prompt and for the negative prompt separately; Wan 2.2 A14B's two experts have one shape, so
a step costs the same whichever runs it), and one VAE decode of the whole latent video.

Memory: weights counted as model/memory.py counts Latte's (every parameter and buffer at its loaded dtype, the
libraries' keep-in-fp32 rules applied, Linear weights as torchao holds them under model.quantization), both
experts of A14B held at once (WanPipeline keeps both on the device);
activations estimated as for Latte (model/memory.py: DENOISE_FACTOR x rows x tokens x hidden, one row per
video and call since WanPipeline never stacks the CFG halves), plus the VAE decode's full-resolution tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from latte_ray.model.memory import DENOISE_FACTOR, GB, VAE_FACTOR, Weights

TFLOP = 1e12


@dataclass
class WanFigures:
    t5_per_prompt: float  # FLOPs of one UMT5 pass over max_sequence_length tokens
    transformer_per_forward: float  # one transformer call for one video
    forwards_per_video: int  # steps x (2 with CFG)
    vae_decode: float | None  # one video's decode (None: no VAE config to build it from)
    weights: list[Weights] = field(default_factory=list)
    denoise_activations: int = 0
    vae_activations: int = 0

    @property
    def t5(self) -> float:
        return 2 * self.t5_per_prompt  # the prompt and its negative

    @property
    def transformer(self) -> float:
        return self.transformer_per_forward * self.forwards_per_video

    @property
    def per_video(self) -> float:
        return self.t5 + self.transformer + (self.vae_decode or 0.0)

    @property
    def weights_bytes(self) -> int:
        return sum(w.bytes for w in self.weights)

    def flops_line(self) -> str:
        vae = flops_words(self.vae_decode) if self.vae_decode is not None else "n/a (no VAE config)"
        return (f"compute per video (Wan FLOP model, from the model's configs): {flops_words(self.per_video)} = "
                f"UMT5 {flops_words(self.t5)} + transformer {flops_words(self.transformer_per_forward)} per call x "
                f"{self.forwards_per_video} calls = {flops_words(self.transformer)} + VAE decode {vae}")

    def memory_line(self) -> str:
        parts = ", ".join(f"{w.component} {w.gb:.2f}" for w in self.weights)
        peak = max(self.denoise_activations, self.vae_activations)
        return (f"GPU memory per generation actor (computed from the model's configs): weights "
                f"{self.weights_bytes / GB:.1f} GB ({parts}) + activations ~{peak / GB:.1f} GB (estimate: denoise "
                f"step {self.denoise_activations / GB:.1f}, VAE decode {self.vae_activations / GB:.1f}) = "
                f"~{(self.weights_bytes + peak) / GB:.1f} GB")


def flops_words(flops: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= size:
            return f"{flops / size:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _meta_models(transformer: dict, text_encoder: dict | None, vae: dict | None, dtype):
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        t = WanTransformer3DModel.from_config(_clean(transformer))  # float32: FLOPs do not depend on the dtype
        e = UMT5EncoderModel(UMT5Config(**_clean(text_encoder))) if text_encoder else None
        v = AutoencoderKLWan.from_config(_clean(vae)) if vae and "z_dim" in vae else None
    return t, e, v


def figures(spec, transformer: dict, text_encoder: dict | None, vae: dict | None, experts: int = 1) -> WanFigures:
    """The spec's figures per video; `experts`: 2 for Wan 2.2 A14B (transformer and transformer_2). `vae` may hold
    only the VAE's scale factors (its geometry): then its FLOPs and weights are not counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latte_ray.model.memory import _count, diffusers_weights, quantized

    dtype = getattr(torch, spec.model.dtype)
    s = spec.sampling
    t, e, v = _meta_models(transformer, text_encoder, vae, dtype)
    spatial = int((vae or {}).get("scale_factor_spatial") or 8)
    temporal = int((vae or {}).get("scale_factor_temporal") or 4)
    frames = (s.video_length - 1) // temporal + 1
    latents = torch.empty(1, t.config.in_channels, frames, s.height // spatial, s.width // spatial, device="meta")
    text = torch.empty(1, s.max_sequence_length, t.config.text_dim, device="meta")
    with FlopCounterMode(display=False) as count:
        t(hidden_states=latents, timestep=torch.zeros(1, device="meta"), encoder_hidden_states=text, return_dict=False)
    per_forward = count.get_total_flops()
    t5 = 0.0
    if e is not None:
        with FlopCounterMode(display=False) as count:  # no mask: a meta tensor cannot be inspected; same FLOPs
            e(input_ids=torch.zeros(1, s.max_sequence_length, dtype=torch.long, device="meta"))
        t5 = count.get_total_flops()
    decode = None
    if v is not None:
        with FlopCounterMode(display=False) as count:
            v.decode(latents)
        decode = count.get_total_flops()
    calls = s.num_inference_steps * (2 if s.guidance_scale > 1.0 else 1)

    weights = [diffusers_weights("transformer", {"_class_name": "WanTransformer3DModel", **_clean(transformer)}, dtype,
                                 quantized(spec.model, "transformer"))]  # transformer_2 is quantized alike
    if experts == 2:
        weights.append(Weights("transformer_2", weights[0].params, weights[0].bytes, dict(weights[0].by_dtype)))
    if v is not None:
        weights.append(diffusers_weights("vae", {"_class_name": "AutoencoderKLWan", **_clean(vae)}, dtype))
    if e is not None and not spec.execution.text_encode_stage:
        kept = set(getattr(e, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()
        weights.insert(0, _count("text_encoder", e, dtype, lambda name: bool(kept & set(name.split("."))),
                                 quantized(spec.model, "text_encoder")))
    itemsize = dtype.itemsize
    patch = t.config.patch_size
    tokens = frames * (s.height // spatial // patch[1]) * (s.width // spatial // patch[2])
    hidden = t.config.num_attention_heads * t.config.attention_head_dim
    denoise = DENOISE_FACTOR * spec.execution.batch_size * tokens * hidden * itemsize
    channels = int((vae or {}).get("base_dim") or 96) * 2  # the decoder's widest stage at full resolution
    vae_act = VAE_FACTOR * temporal * s.height * s.width * channels * itemsize  # one latent frame -> 4 frames
    return WanFigures(t5, per_forward, calls, decode, weights, denoise, vae_act)


def source_configs(model) -> tuple[dict, dict | None, dict | None, int]:
    """(transformer, text_encoder, vae, experts) of the spec's source: the tiny model's literals, or a hub id /
    local folder read with the libraries' config loaders (honours model.revision and HF_HUB_OFFLINE)."""
    from latte_ray.model.configs import source_kind

    kind = source_kind(model.source)
    if kind == "tiny":
        from latte_ray.model import tiny_wan

        from latte_ray.model.tiny import build_tiny_tokenizer

        text = {**tiny_wan.TEXT_ENCODER, "vocab_size": len(build_tiny_tokenizer())}
        return dict(tiny_wan.TRANSFORMER), text, dict(tiny_wan.VAE), 1
    from diffusers import AutoencoderKLWan, DiffusionPipeline, WanTransformer3DModel
    from transformers import AutoConfig

    source = model.source.removeprefix("file://")
    source = os.path.expanduser(source) if os.path.isdir(os.path.expanduser(source)) else model.source
    kwargs = {"revision": model.revision} if model.revision else {}
    index = DiffusionPipeline.load_config(source, **kwargs)
    transformer = dict(WanTransformer3DModel.load_config(source, subfolder="transformer", **kwargs))
    vae = dict(AutoencoderKLWan.load_config(source, subfolder="vae", **kwargs))
    text = AutoConfig.from_pretrained(source, subfolder="text_encoder", **kwargs).to_dict()
    experts = 2 if isinstance(index.get("transformer_2"), list) and any(index["transformer_2"]) else 1
    return transformer, text, vae, experts


def dry_run_figures(spec) -> WanFigures | str:
    """The spec's figures, or a line saying why they are not computed (the run's own checks already passed)."""
    try:
        transformer, text, vae, experts = source_configs(spec.model)
        return figures(spec, transformer, text, vae, experts=experts)
    except Exception as e:  # noqa: BLE001 - an estimate
        return f"Wan figures not computed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
