"""A local Hugging Face Hub cache holding a model's config files, for checks that read only configs (the
driver's preflight, dry runs) where no hub can be reached: what a user who has the model cached has. Files
are laid out as huggingface_hub keeps them (models--ORG--NAME/refs/main -> snapshots/<commit>/...), so
`hf_hub_download` with HF_HUB_OFFLINE=1 finds them."""

from __future__ import annotations

import json
from pathlib import Path

LATTE_1 = "maxin-cn/Latte-1"
# The parts of Latte-1's published configs that latte-ray's checks read (model/configs.py), with their real
# values: LattePipeline; a 16-frame transformer whose captions are T5-XXL's 4096-wide embeddings.
LATTE_1_CONFIGS = {
    "model_index.json": {"_class_name": "LattePipeline", "_diffusers_version": "0.28.0",
                         "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
                         "tokenizer": ["transformers", "T5Tokenizer"],
                         "transformer": ["diffusers", "LatteTransformer3DModel"], "vae": ["diffusers", "AutoencoderKL"]},
    "transformer/config.json": {"_class_name": "LatteTransformer3DModel", "video_length": 16,
                                "caption_channels": 4096, "sample_size": 64, "num_layers": 28},
    "text_encoder/config.json": {"architectures": ["T5EncoderModel"], "d_model": 4096, "num_layers": 24},
}


def write_hub_cache(root: Path, repo_id: str, files: dict[str, dict], commit: str = "0" * 40) -> Path:
    """`root` as HF_HUB_CACHE with `files` (relative path -> JSON) in `repo_id`'s main revision."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, content in files.items():
        path = repo / "snapshots" / commit / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    return root
