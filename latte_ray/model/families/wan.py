"""The Wan family (Wan 2.1 / 2.2 text-to-video, diffusers' WanPipeline): what the driver checks before any
weights load. The engine is wan_engine.py; the tiny offline model model/tiny_wan.py. No torch import here.

Wan encodes every prompt the same way whatever its batch (UMT5 output cut to the prompt's own tokens, then
zero-padded to max_sequence_length; no attention mask reaches the transformer), so diffusers' own denoise loop
is batch-invariant as it is: the engine hands WanPipeline.__call__ per-row latents and prompt embeddings.
"""

from __future__ import annotations

from latte_ray.errors import SpecError

PIPELINE_CLASS = "WanPipeline"
SPATIAL_MULTIPLE = 16  # WanPipeline.check_inputs: height and width divisible by 16


def engine_class():
    from latte_ray.model.families.wan_engine import WanEngine

    return WanEngine


def check_spec(spec) -> None:
    """Wan's own rules, from the spec alone (the model's configs refine them in check_configs)."""
    s, model = spec.sampling, spec.model
    if (s.video_length - 1) % 4:
        raise SpecError(f"sampling.video_length {s.video_length}: a Wan video has 4k + 1 frames (its VAE's temporal "
                        f"scale factor is 4), e.g. {s.video_length - (s.video_length - 1) % 4} or 81")
    for name in ("height", "width"):
        if getattr(s, name) % SPATIAL_MULTIPLE:
            raise SpecError(f"sampling.{name} {getattr(s, name)}: Wan needs a multiple of {SPATIAL_MULTIPLE}")
    if model.channels_last:
        raise SpecError("model.channels_last applies to Latte's 2D VAE; Wan's VAE is 3D: set it to false")
    if model.compile.uses_cuda_graphs:
        # WanPipeline's UniPC scheduler keeps model outputs across steps, which a CUDA-graph replay overwrites; the
        # Latte engine clones every compiled output for that (engine.CudaGraphOutputs), Wan's is not wrapped yet.
        raise SpecError(f"model.compile.mode '{model.compile.mode}' replays CUDA graphs, which the Wan engine does not "
                        "support yet: use 'max-autotune-no-cudagraphs' (the built-in Wan specs' mode) or 'default'")


def tiny_configs() -> dict[str, dict]:
    from latte_ray.model.tiny_wan import model_configs

    return model_configs()


def tiny_version() -> str:
    from latte_ray.model.tiny_wan import TINY_WAN_VERSION

    return TINY_WAN_VERSION


def ensure_tiny(cache_dir=None):
    from latte_ray.model.tiny_wan import ensure_tiny_wan

    return ensure_tiny_wan(cache_dir)


def save_tiny(path):
    from latte_ray.model.tiny_wan import save_tiny_wan

    return save_tiny_wan(path)


def check_configs(spec, configs, src: str) -> str:
    """The source is a WanPipeline whose configs agree with the spec: text width, frame and pixel multiples from
    the VAE's scale factors and the transformer's patch, the experts of Wan 2.2 A14B. One-line SpecError."""
    index = configs.model_index
    if index.get("_class_name") != PIPELINE_CLASS:
        raise SpecError(f"{src} is a {index.get('_class_name') or 'pipeline without a _class_name'} "
                        f"(model_index.json), not a {PIPELINE_CLASS} (model.family 'wan')")
    if not configs.transformer:
        raise SpecError(f"{src}: no transformer/config.json (WanPipeline's text-to-video needs its transformer)")
    if configs.text_encoder is None:
        if not configs.component_present("text_encoder"):
            raise SpecError(f"{src}: the pipeline was saved without a text encoder (model_index.json)")
        raise SpecError(f"{src}: no text_encoder/config.json")
    transformer, text_encoder = configs.resolved()
    if transformer.get("image_dim") is not None and transformer.get("in_channels") != transformer.get("out_channels"):
        raise SpecError(f"{src}: an image-to-video Wan transformer (in_channels {transformer.get('in_channels')}); "
                        f"latte-ray runs text-to-video")
    width, reads = text_encoder.get("d_model"), transformer.get("text_dim")
    if width != reads:
        raise SpecError(f"{src}: its text encoder's width (text_encoder d_model {width}) is not the width the "
                        f"transformer reads (text_dim {reads})")
    vae = configs.extra.get("vae") or {}
    temporal = int(vae.get("scale_factor_temporal") or 4)
    spatial = int(vae.get("scale_factor_spatial") or 8) * int((transformer.get("patch_size") or [1, 2, 2])[1])
    s = spec.sampling
    if (s.video_length - 1) % temporal:
        raise SpecError(f"sampling.video_length {s.video_length}: {src} makes videos of {temporal}k + 1 frames (vae "
                        f"scale_factor_temporal {temporal})")
    for name in ("height", "width"):
        if getattr(s, name) % spatial:
            raise SpecError(f"sampling.{name} {getattr(s, name)}: {src} needs a multiple of {spatial} (vae "
                            f"scale_factor_spatial x transformer patch)")
    experts = configs.component_present("transformer_2")
    boundary = index.get("boundary_ratio")
    if experts and boundary is None:
        raise SpecError(f"{src}: model_index.json names a transformer_2 but no boundary_ratio")
    if s.guidance_scale_2 is not None and boundary is None:
        raise SpecError(f"sampling.guidance_scale_2 is set but {src} has one expert (no boundary_ratio in "
                        f"model_index.json); remove it")
    if experts and configs.extra.get("transformer_2") is None and configs.files is not None:
        raise SpecError(f"{src}: no transformer_2/config.json (model_index.json names a second expert)")
    what = f"two experts switched at boundary_ratio {boundary}" if experts else "one transformer"
    if index.get("expand_timesteps"):
        what += ", per-token timesteps (Wan 2.2 TI2V)"
    return (f"a WanPipeline, {what}, {s.video_length} frames ({temporal}k+1), text width {width}, "
            f"{transformer.get('num_layers')} blocks x {transformer.get('num_attention_heads')} heads")
