"""A local Hugging Face Hub cache holding a model's files, for code that reads the hub where no hub can be
reached: what a user who has the model cached has. Files are laid out as huggingface_hub keeps them
(models--ORG--NAME/refs/<branch> -> snapshots/<commit>/...), so `hf_hub_download` and `from_pretrained` with
HF_HUB_OFFLINE=1 find them, by branch name or by commit.

Latte-1's configs are the published files in tests/data/latte-1/ (SOURCE.md there says where each came
from), copied byte for byte, never rewritten."""

from __future__ import annotations

import shutil
from pathlib import Path

LATTE_1 = "maxin-cn/Latte-1"
LATTE_1_DATA = Path(__file__).parent / "data" / "latte-1"
# The production spec's pin (pipelines/latte-1-t2v-512.yaml model.revision): the newest hub commit that changed
# a config file.
LATTE_1_COMMIT = "f8a2f04e507c27d0a8c623220d089c27491be528"
LATTE_1_SCHEDULERS = {  # every published scheduler config we have, by the hub commit it was read at
    "ddim fixed_small (pinned f8a2f04e)": "scheduler/scheduler_config.json",
    "dpm-solver++ (b873980c, first upload)": "scheduler/versions/scheduler_config@b873980cc6ba5a86b865769a6588c933e6f4792f.json",
    "ddim learned_range (86e75847)": "scheduler/versions/scheduler_config@86e75847737f45438be78b1274899b015814c660.json",
}
# At the pin: DDIM with variance_type fixed_small, while the transformer predicts a learned sigma (out 8).
LATTE_1_DDIM = LATTE_1_SCHEDULERS["ddim fixed_small (pinned f8a2f04e)"]
LATTE_1_LEARNED_RANGE = LATTE_1_SCHEDULERS["ddim learned_range (86e75847)"]
# What the driver's checks read (model/configs.py), as published: hub path -> vendored file.
LATTE_1_CONFIGS = {
    "model_index.json": "model_index.json",
    "transformer/config.json": "transformer/config.json",
    "text_encoder/config.json": "text_encoder/config.json",
    "vae/config.json": "vae/config.json",
    "scheduler/scheduler_config.json": LATTE_1_DDIM,
}


def latte_1_file(rel: str) -> bytes:
    """A vendored Latte-1 file's bytes (`rel` relative to tests/data/latte-1/)."""
    return (LATTE_1_DATA / rel).read_bytes()


def write_hub_cache(root: Path, repo_id: str, files: dict[str, str | bytes | Path], commit: str = LATTE_1_COMMIT,
                    branch: str | None = "main") -> Path:
    """`root` as HF_HUB_CACHE holding `files` (hub path -> vendored file under tests/data/latte-1/, bytes, or a
    local file or folder to copy) at `commit`; `branch` (if given) points at it."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    if branch:
        (repo / "refs" / branch).write_text(commit)
    snapshot = repo / "snapshots" / commit
    for rel, content in files.items():
        path = snapshot / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path) and content.is_dir():
            shutil.copytree(content, path, dirs_exist_ok=True)
        elif isinstance(content, Path):
            shutil.copyfile(content, path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_bytes(latte_1_file(content))
    return root
