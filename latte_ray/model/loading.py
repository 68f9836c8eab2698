"""Load a LattePipeline from the spec's model source.

Sources: 'tiny' (the offline random-weight model, built on first use), a local folder, an fsspec URL of a
`save_pretrained` folder (mirrored once per node into the local cache), or a hub id. Weights load as
safetensors only and no remote code is ever trusted.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from latte_ray.errors import ModelSourceError  # noqa: F401 - re-exported: latte_ray.model.loading.ModelSourceError
from latte_ray.spec import ModelSpec
from latte_ray.record.storage import filesystem

log = logging.getLogger(__name__)

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


def resolve_model_dir(model: ModelSpec, cache_dir: str | None = None, storage_options: dict | None = None) -> str:
    """A local folder (or hub id) that `from_pretrained` can read ('tiny': the spec family's tiny model)."""
    from latte_ray.model.families import FAMILIES

    return resolve_source(model.source, cache_dir, storage_options, tiny=FAMILIES[model.family].load().ensure_tiny)


def resolve_source(source: str, cache_dir: str | None = None, storage_options: dict | None = None, *,
                   tiny=None, marker: str = "model_index.json", field: str = "model.source") -> str:
    """Any model source (the video model, the scoring CLIP, the aesthetic head) as a local folder or hub id,
    by the rule of `configs.source_kind`: 'tiny' -> `tiny(cache)` (built offline on first use), an fsspec
    URL -> its once-per-node mirror (which must hold `marker`), an existing folder -> itself, anything else
    -> a hub id for from_pretrained."""
    from latte_ray.model.configs import source_kind

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    kind = source_kind(source)
    if kind == "tiny" and tiny is not None:
        return str(tiny(cache))
    if kind == "remote":
        return str(mirror_to_local(source, cache, storage_options, marker=marker, field=field))
    if kind == "local":
        return str(Path(source.removeprefix("file://")).expanduser())
    if kind == "missing":
        raise ModelSourceError(f"{field} {source!r}: no such folder on this node")
    return source  # a hub id: from_pretrained resolves it (load_pipeline explains failures)


# Pickled weights are never loaded (safetensors only), so they are not copied either.
_SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")
MIRROR_RECORD = ".latte-ray-mirror.json"


def mirror_to_local(url: str, cache: Path, storage_options: dict | None = None, marker: str = "model_index.json",
                    field: str = "model.source") -> Path:
    """Copy a remote `save_pretrained` folder into the node-local cache, once per node.

    Concurrent callers (actors on one node, or several processes) serialize on a file lock; the one that
    holds it downloads into a temp folder, checks every file's size against the listing, and renames the
    folder into place, so a reader sees the whole model or nothing. A mirror URL is treated as immutable:
    publish a new model version under a new prefix. Storage options are used, never recorded.
    """
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    target = cache / "models" / key
    if (target / MIRROR_RECORD).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process to mirror %s", url)
        lock.acquire()
    try:
        if (target / MIRROR_RECORD).exists():
            return target
        for stale in target.parent.glob(f".{key}.tmp-*"):  # left by a process that died holding the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{key}.tmp-{uuid.uuid4().hex}"
        try:
            files = _download(url, tmp, storage_options, marker, field)
            (tmp / MIRROR_RECORD).write_text(json.dumps({
                "source": url, "files": len(files), "bytes": sum(files.values()), "pid": os.getpid(),
                "host": socket.gethostname(), "finished_at": time.time(),
            }))
            shutil.rmtree(target, ignore_errors=True)  # only a partial copy from an older version can be here
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("mirrored %s (%d files, %d bytes) to %s", url, len(files), sum(files.values()), target)
    finally:
        lock.release()
    return target


def _download(url: str, dest: Path, storage_options: dict | None, marker: str = "model_index.json",
              field: str = "model.source") -> dict[str, int]:
    """Fetch every file under `url` into `dest`; returns {relative path: size}. Raises on any mismatch."""
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    try:
        listing = fs.find(root, detail=True)
    except Exception as e:
        raise ModelSourceError(f"{field} {url!r}: cannot list it: {type(e).__name__}: {e}") from e
    files = {
        path[len(root) + 1 :]: int(info.get("size") or 0)
        for path, info in listing.items()
        if info.get("type") != "directory" and not path.endswith("/") and not path.endswith(_SKIP_SUFFIXES)
    }
    if marker not in files:
        raise ModelSourceError(f"{field} {url!r}: no {marker} there (not a save_pretrained folder)")
    rels = sorted(files)
    for rel in rels:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
    fs.get([f"{root}/{rel}" for rel in rels], [str(dest / rel) for rel in rels])
    for rel in rels:
        got = (dest / rel).stat().st_size if (dest / rel).exists() else -1
        if got != files[rel]:
            raise ModelSourceError(f"{field} {url!r}: {rel} arrived with {got} bytes, expected {files[rel]}")
    return files


def load_pipeline(
    model: ModelSpec,
    cache_dir: str | None = None,
    storage_options: dict | None = None,
    with_text_encoder: bool = True,
    scheduler: str | None = None,
    with_denoiser: bool = True,
):
    """The spec family's pipeline (LattePipeline, WanPipeline) in the spec's dtype, on CPU; the engine moves it
    to its device."""
    import diffusers

    from latte_ray.model.families import FAMILIES

    pipeline_class = getattr(diffusers, FAMILIES[model.family].pipeline_class)

    path = resolve_model_dir(model, cache_dir, storage_options)
    extra = {} if with_text_encoder else {"text_encoder": None}
    if not with_denoiser:  # a text-encode actor: tokenizer and T5 only, transformer and VAE never loaded
        extra.update(transformer=None, vae=None)
        if "transformer_2" in inspect.signature(pipeline_class.__init__).parameters:  # Wan 2.2 A14B's 2nd expert
            extra["transformer_2"] = None
    is_hub_id = not Path(path).is_dir()
    try:
        pipe = pipeline_class.from_pretrained(
            path,
            dtype=DTYPES[model.dtype],
            use_safetensors=True,
            revision=model.revision if is_hub_id else None,
            **extra,
        )
    except OSError as e:
        if not is_hub_id:
            raise
        offline = " HF_HUB_OFFLINE is set, so nothing is downloaded." if _hub_offline() else ""
        raise ModelSourceError(
            f"model.source {model.source!r} is not 'tiny', a folder on this node or a URL, so it was loaded as "
            f"a Hugging Face Hub id, and that failed.{offline} Use a reachable hub id, a local folder, or an "
            f"s3:// mirror of a save_pretrained folder. Cause: {e}"
        ) from e
    if scheduler:
        cls = getattr(diffusers, _SCHEDULERS[scheduler])
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
