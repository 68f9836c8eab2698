"""A Latte-1-shaped pipeline, built offline from Latte-1's published configs (tests/data/latte-1/).

The real widths - hidden 1152 in 16 heads of 72, T5 d_model 4096 (64 heads of 64, d_ff 10240), in 4 / out
8 channels (noise and variance), patch 2, the VAE's real config - with fewer layers: `LAYERS` transformer
layers instead of 28 and `T5_LAYERS` T5 layers instead of 24, and a T5 embedding table with a row for each
piece the offline tokenizer can produce instead of 32128 (the full table alone would be 0.5 GB of random
numbers to write and load in every session; its width is the real one). Random weights, fixed by
the seed, saved as the hub holds them: fp32 safetensors, the transformer and the VAE one file each, the T5
in the published four shards (`model-0000{1..4}-of-00004.safetensors`) named by a
`model.safetensors.index.json` in the published file's format, every tensor under the name the published index
gives it. The configs in the folder are the published files with only the layer counts (and the T5's vocabulary
size) changed, so the transformer's config has no `video_length`, as on the hub.

`write_latte1_hub` places it in a local Hugging Face cache at the production spec's pinned commit, so the
hub-id path (`model.source: maxin-cn/Latte-1`, HF_HUB_OFFLINE=1) loads it as it would load the real model.
The tokenizer folder holds Latte-1's tokenizer JSON files (tests/data/latte-1/tokenizer/) beside latte-ray's
offline vocabulary written as a sentencepiece `spiece.model` (Latte-1's is not ours to ship: SOURCE.md there),
so `T5Tokenizer.from_pretrained` reads it as it reads the real one: <extra_id_N> at 32000-32099, as published.
"""

from __future__ import annotations

import json
from pathlib import Path

from hubcache import LATTE_1, LATTE_1_COMMIT, LATTE_1_DDIM, latte_1_file, write_hub_cache

LAYERS = 2  # Latte-1: 28 (each a spatial and a temporal block)
T5_LAYERS = 1  # T5-XXL: 24
T5_INDEX = "text_encoder/model.safetensors.index.json"  # the published index: 4 shards, 219 tensors (24 layers)
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _config(rel: str, **changes) -> dict:
    return {**json.loads(latte_1_file(rel)), **changes}


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def save_latte1_shaped(folder: Path, scheduler: str = LATTE_1_DDIM, seed: int = 0) -> Path:
    """Write the Latte-1-shaped pipeline into `folder` in the hub's layout; returns `folder`."""
    import torch
    from diffusers import AutoencoderKL, LatteTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from latte_ray.model.tiny import tiny_spiece_model, tiny_vocab_size

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    transformer_cfg = _config("transformer/config.json", num_layers=LAYERS)
    # Only the offline vocabulary's real pieces can come out of a prompt (the rest is filler: model/tiny.py), so
    # the embedding table has those rows, not 32128 (0.5 GB of random numbers to write and load every session).
    text_cfg = _config("text_encoder/config.json", num_layers=T5_LAYERS, vocab_size=tiny_vocab_size())
    LatteTransformer3DModel.from_config(_public(transformer_cfg)).save_pretrained(folder / "transformer")
    AutoencoderKL.from_config(_public(json.loads(latte_1_file("vae/config.json")))).save_pretrained(folder / "vae")
    save_t5_shards(T5EncoderModel(T5Config(**_public(text_cfg))), folder / "text_encoder")
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "spiece.model").write_bytes(tiny_spiece_model())
    for name in TOKENIZER_FILES:
        (folder / "tokenizer" / name).write_bytes(latte_1_file(f"tokenizer/{name}"))
    # The published configs, with only the layer counts changed (save_pretrained wrote every init argument).
    (folder / "transformer" / "config.json").write_text(json.dumps(transformer_cfg, indent=2) + "\n")
    (folder / "text_encoder" / "config.json").write_text(json.dumps(text_cfg, indent=2) + "\n")
    (folder / "vae" / "config.json").write_bytes(latte_1_file("vae/config.json"))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_bytes(latte_1_file(scheduler))
    (folder / "model_index.json").write_bytes(latte_1_file("model_index.json"))
    return folder


def save_t5_shards(t5, folder: Path) -> Path:
    """`t5`'s weights as the published text_encoder/ holds them: the published index's four shard files, each
    tensor under its published name (the tied `encoder.embed_tokens` left out, as transformers saves it), the
    tensors in the index's (sorted) order cut into four runs of about equal bytes - the published cut falls
    inside layers 5, 12 and 18 of 24, which a model of fewer layers has not - and the index written in the
    published file's format (metadata total_size, sorted keys, 2-space indent)."""
    from safetensors.torch import save_file

    published = json.loads(latte_1_file(T5_INDEX))
    shards = sorted(set(published["weight_map"].values()))
    state = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    unknown = sorted(set(state) - set(published["weight_map"]))
    if unknown:
        raise ValueError(f"tensors the published T5 index does not name: {unknown[:3]}")
    names = sorted(state)
    sizes = [state[k].numel() * state[k].element_size() for k in names]
    total, done, weight_map, parts = sum(sizes), 0, {}, [dict() for _ in shards]
    for name, size in zip(names, sizes):
        shard = min(len(shards) - 1, done * len(shards) // total)
        weight_map[name], parts[shard][name] = shards[shard], state[name]
        done += size
    if not all(parts):
        raise ValueError(f"{len(names)} tensors do not fill {len(shards)} shards")
    folder.mkdir(parents=True, exist_ok=True)
    for shard, part in zip(shards, parts):
        save_file(part, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def write_latte1_hub(cache: Path, model: Path, commit: str = LATTE_1_COMMIT) -> Path:
    """`cache` as HF_HUB_CACHE holding `model` (a save_latte1_shaped folder) as maxin-cn/Latte-1 at `commit`,
    with `main` pointing at it."""
    return write_hub_cache(cache, LATTE_1, {p.name: p for p in sorted(model.iterdir())}, commit=commit)
