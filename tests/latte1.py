"""A Latte-1-shaped pipeline, built offline from Latte-1's published configs (tests/data/latte-1/).

The real widths - hidden 1152 in 16 heads of 72, T5 d_model 4096 (64 heads of 64, d_ff 10240), in 4 / out
8 channels (noise and variance), patch 2, the VAE's real config - with fewer layers: `LAYERS` transformer
layers instead of 28 and `T5_LAYERS` T5 layers instead of 24, and a T5 vocabulary the size of the offline
tokenizer's instead of 32128 (the embedding table alone would be 0.5 GB of random numbers to write and load
in every session; its width is the real one). Random weights, fixed by
the seed, saved as the hub holds them: fp32 safetensors, the transformer and the VAE one file each, the T5
in shards with a `model.safetensors.index.json`. The configs in the folder are the published files with only
the layer counts changed, so the transformer's config has no `video_length`, as on the hub.

`write_latte1_hub` places it in a local Hugging Face cache at the production spec's pinned commit, so the
hub-id path (`model.source: maxin-cn/Latte-1`, HF_HUB_OFFLINE=1) loads it as it would load the real model.
The tokenizer is latte-ray's offline one: Latte-1's spiece.model is not ours to ship (tests/data/latte-1/
SOURCE.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from hubcache import LATTE_1, LATTE_1_COMMIT, LATTE_1_DDIM, latte_1_file, write_hub_cache

LAYERS = 2  # Latte-1: 28 (each a spatial and a temporal block)
T5_LAYERS = 1  # T5-XXL: 24
T5_SHARDS = 4  # about as many as the hub's text_encoder/model-0000{1..4}-of-00004.safetensors (tensors decide)


def _config(rel: str, **changes) -> dict:
    return {**json.loads(latte_1_file(rel)), **changes}


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def save_latte1_shaped(folder: Path, scheduler: str = LATTE_1_DDIM, seed: int = 0) -> Path:
    """Write the Latte-1-shaped pipeline into `folder` in the hub's layout; returns `folder`."""
    import torch
    from diffusers import AutoencoderKL, LatteTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from latte_ray.model.tiny import build_tiny_tokenizer

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    transformer_cfg = _config("transformer/config.json", num_layers=LAYERS)
    text_cfg = _config("text_encoder/config.json", num_layers=T5_LAYERS, vocab_size=len(tokenizer))
    LatteTransformer3DModel.from_config(_public(transformer_cfg)).save_pretrained(folder / "transformer")
    AutoencoderKL.from_config(_public(json.loads(latte_1_file("vae/config.json")))).save_pretrained(folder / "vae")
    t5 = T5EncoderModel(T5Config(**_public(text_cfg)))
    total = sum(p.numel() * p.element_size() for p in t5.state_dict().values())
    t5.save_pretrained(folder / "text_encoder", max_shard_size=total // (T5_SHARDS + 1))
    del t5
    tokenizer.save_pretrained(folder / "tokenizer")
    # The published configs, with only the layer counts changed (save_pretrained wrote every init argument).
    (folder / "transformer" / "config.json").write_text(json.dumps(transformer_cfg, indent=2) + "\n")
    (folder / "text_encoder" / "config.json").write_text(json.dumps(text_cfg, indent=2) + "\n")
    (folder / "vae" / "config.json").write_bytes(latte_1_file("vae/config.json"))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_bytes(latte_1_file(scheduler))
    (folder / "model_index.json").write_bytes(latte_1_file("model_index.json"))
    return folder


def write_latte1_hub(cache: Path, model: Path, commit: str = LATTE_1_COMMIT) -> Path:
    """`cache` as HF_HUB_CACHE holding `model` (a save_latte1_shaped folder) as maxin-cn/Latte-1 at `commit`,
    with `main` pointing at it."""
    return write_hub_cache(cache, LATTE_1, {p.name: p for p in sorted(model.iterdir())}, commit=commit)
