"""The model-family seam: everything that differs between text-to-video families lives in one module each.

A family module (latte.py, wan.py) says how to get its pipeline (the class named in model_index.json, its tiny
offline stand-in), how to check a source's configs against the spec before any weights load, which engine turns
(prompt, negative prompt, seed) into uint8 frames (encode prompts, latents from per-row seeds, denoise, decode),
and its memory and FLOP figures. Stages, fleet, record and datasets call the engine through the same methods
(`generate`, `denoise`, `encode_text`, `device`, `dtype`, `last_transformer_calls`) whatever the family.

This module imports neither torch nor diffusers: the driver asks it what a family supports before a model
loads, and a feature the family does not support is refused in one line (SpecError, exit 2).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from latte_ray.errors import SpecError


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str  # model_index.json's _class_name for this family
    module: str  # the family module, imported only where its engine or configs are needed
    caches: tuple[str, ...]  # model.cache kinds it runs
    text_encode_stage: bool  # can run T5 in its own actor stage (execution.text_encode_stage)
    lora: bool  # its diffusers pipeline loads LoRA (load_lora_weights + fuse_lora)
    scheduler_override: bool  # sampling.scheduler may replace the saved scheduler
    display: str  # for messages: "Latte", "Wan"

    def load(self):
        return importlib.import_module(self.module)


FAMILIES: dict[str, Family] = {
    "latte": Family("latte", "LattePipeline", "latte_ray.model.families.latte",
                    caches=("faster_cache", "pyramid_attention_broadcast", "teacache"), text_encode_stage=True,
                    lora=False, scheduler_override=True, display="Latte"),
    "wan": Family("wan", "WanPipeline", "latte_ray.model.families.wan", caches=(), text_encode_stage=True,
                  lora=True, scheduler_override=False, display="Wan"),
}


def family_of(spec) -> Family:
    """The spec's family (spec.model.family; the spec's Literal keeps it one of FAMILIES)."""
    return FAMILIES[spec.model.family]


def check_supported(spec) -> None:
    """Refuse, in one line naming the field, what the spec's family cannot do; before any model loads."""
    fam = family_of(spec)
    model, sampling = spec.model, spec.sampling
    where = f"model.family {fam.name!r}"
    if model.cache is not None and model.cache.kind not in fam.caches:
        runs = f"runs {', '.join(fam.caches)}" if fam.caches else "runs no cache acceleration yet"
        raise SpecError(f"model.cache.kind {model.cache.kind!r} is not supported for {where} (the {fam.display} "
                        f"family {runs}); remove model.cache")
    if model.lora and not fam.lora:
        raise SpecError(f"model.lora is not supported for {where}: diffusers' {fam.pipeline_class} does not load "
                        f"LoRA weights; remove model.lora")
    if sampling.scheduler is not None and not fam.scheduler_override:
        raise SpecError(f"sampling.scheduler {sampling.scheduler!r} is not supported for {where}: it keeps the "
                        f"scheduler saved with the model (its scheduler_config.json); remove sampling.scheduler")
    if spec.execution.text_encode_stage and not fam.text_encode_stage:
        raise SpecError(f"execution.text_encode_stage is not supported for {where}; set it to false")
    if sampling.guidance_scale_2 is not None and fam.name != "wan":
        raise SpecError(f"sampling.guidance_scale_2 applies to model.family 'wan' (Wan 2.2 A14B's low-noise "
                        f"expert) only, not {fam.name!r}")
    fam.load().check_spec(spec)  # the family's own rules (frame counts, sizes): cheap, no torch


def make_engine(spec, **kwargs):
    """The family's engine for the spec (loads the model)."""
    check_supported(spec)
    return family_of(spec).load().engine_class()(spec, **kwargs)
