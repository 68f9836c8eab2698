"""The Latte family (Latte-1, diffusers' LattePipeline): the reference family, the default of every spec.

Its engine is latte_ray/model/families/latte_engine.py (LatteEngine: our own denoise loop, because the stock pipeline pads text
differently for a batch of one); its tiny offline model is latte_ray/model/tiny.py. This module holds what the
driver checks before any weights load. No torch import here.
"""

from __future__ import annotations

from latte_ray.errors import SpecError

PIPELINE_CLASS = "LattePipeline"


def engine_class():
    from latte_ray.model.families.latte_engine import LatteEngine

    return LatteEngine


def check_spec(spec) -> None:
    """Latte's own spec rules beyond the shared ones: none (its sampling fields are Latte's)."""


def tiny_configs() -> dict[str, dict]:
    from latte_ray.model.tiny import model_configs

    return model_configs()


def tiny_version() -> str:
    from latte_ray.model.tiny import TINY_MODEL_VERSION

    return TINY_MODEL_VERSION


def ensure_tiny(cache_dir=None):
    from latte_ray.model.tiny import ensure_tiny_model

    return ensure_tiny_model(cache_dir)


def save_tiny(path):
    from latte_ray.model.tiny import save_tiny_model

    return save_tiny_model(path)


def check_configs(spec, configs, src: str) -> str:
    """Check that the source is a Latte pipeline whose configs agree with the spec; the summary's middle part,
    or SpecError (one line) naming the field that disagrees."""
    pipeline_class = configs.model_index.get("_class_name")
    if pipeline_class != PIPELINE_CLASS:
        raise SpecError(f"{src} is a {pipeline_class or 'pipeline without a _class_name'} (model_index.json), "
                        f"not a LattePipeline")
    if not configs.transformer:
        raise SpecError(f"{src}: no transformer/config.json (a Latte pipeline needs its transformer)")
    transformer, text_encoder = configs.resolved()
    frames = transformer.get("video_length")
    if frames != spec.sampling.video_length:
        raise SpecError(f"sampling.video_length is {spec.sampling.video_length} but {src} makes {frames}-frame "
                        f"videos (transformer video_length, as diffusers loads transformer/config.json); set "
                        f"sampling.video_length: {frames}")
    if configs.text_encoder is None:
        if not configs.component_present("text_encoder"):
            raise SpecError(f"{src}: the pipeline was saved without a text encoder (model_index.json)")
        raise SpecError(f"{src}: no text_encoder/config.json")
    width, channels = text_encoder.get("d_model"), transformer.get("caption_channels")
    if width != channels:
        raise SpecError(f"{src}: its text encoder's width (text_encoder d_model {width}) is not the width the "
                        f"transformer reads (caption_channels {channels})")
    return f"a LattePipeline, {frames} frames, text width {width}"
