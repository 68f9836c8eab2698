"""Load a LattePipeline from the spec's model source.

Sources: 'tiny' (the offline random-weight model, built on first use), a local folder, an fsspec URL of a
`save_pretrained` folder (mirrored once per node into the local cache), or a hub id. Weights load as
safetensors only and no remote code is ever trusted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import torch
from filelock import FileLock

from latte_ray.spec import TINY_SOURCE, ModelSpec
from latte_ray.storage import filesystem

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LATTE_RAY_CACHE") or Path.home() / ".cache" / "latte-ray")


def is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def resolve_model_dir(model: ModelSpec, cache_dir: str | None = None, storage_options: dict | None = None) -> str:
    """A local folder (or hub id) that `from_pretrained` can read."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if model.source == TINY_SOURCE:
        from latte_ray.model.tiny import ensure_tiny_model

        return str(ensure_tiny_model(cache))
    if is_remote(model.source):
        return str(mirror_to_local(model.source, cache, storage_options))
    local = Path(model.source.removeprefix("file://")).expanduser()
    if local.is_dir():
        return str(local)
    return model.source  # a hub id: from_pretrained resolves it (and fails clearly when offline)


def mirror_to_local(url: str, cache: Path, storage_options: dict | None = None) -> Path:
    """Copy a remote model folder into the node-local cache once; concurrent callers wait on a lock."""
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    target = cache / "models" / key
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model_index.json").exists():
            return target
        fs, root = filesystem(url, storage_options)
        root = root.rstrip("/")
        if not fs.exists(f"{root}/model_index.json"):
            raise FileNotFoundError(f"model mirror {url!r} has no model_index.json")
        tmp = target.parent / f".{key}.tmp-{uuid.uuid4().hex}"
        for remote in fs.find(root):
            rel = remote[len(root) + 1 :]
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(dest))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # the folder appears whole, with model_index.json, or not at all
    return target


def load_pipeline(
    model: ModelSpec,
    cache_dir: str | None = None,
    storage_options: dict | None = None,
    with_text_encoder: bool = True,
    scheduler: str | None = None,
):
    """LattePipeline in the spec's dtype, on CPU; the engine moves it to its device."""
    from diffusers import LattePipeline

    import diffusers

    path = resolve_model_dir(model, cache_dir, storage_options)
    extra = {} if with_text_encoder else {"text_encoder": None}
    pipe = LattePipeline.from_pretrained(
        path,
        dtype=DTYPES[model.dtype],
        use_safetensors=True,
        revision=model.revision if not Path(path).is_dir() else None,
        **extra,
    )
    if scheduler:
        cls = getattr(diffusers, _SCHEDULERS[scheduler])
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe
