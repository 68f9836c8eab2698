"""Sidecars: training tensors stored next to a video, made in the generation stage (spec `sidecars`).

    videos/<shard>/<id>.t5.<sha16>.npy        the prompt's T5 embeddings: float16 (tokens, dim), the tokens
                                              the transformer attended to (its attention length = tokens)
    videos/<shard>/<id>.latents.<sha16>.npy   the final denoised latents (channels, frames, h, w) before
                                              VAE decode, in the dtype the model ran in (bfloat16 as float32)

Why .npy and not safetensors: the export puts these bytes into WebDataset samples unchanged, and both
`webdataset`'s autodecoder and `datasets.load_dataset("webdataset")` decode `.npy` out of the box (with
pickles refused); safetensors would reach a training loop as opaque bytes. A sidecar's key carries a hash of
its bytes, so a recorded sidecar is never overwritten by a regeneration that differs (content-addressed,
like the video). Sidecars are written before the manifest part that names them (the commit record), with
the same atomic write and retries as videos.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np

from latte_ray.faults import retry
from latte_ray.record.storage import OutputLayout, shard_of, write_atomic

EMBEDDINGS = "embeddings"  # batch column / manifest column prefix
LATENTS = "latents"
KINDS = {EMBEDDINGS: "t5", LATENTS: "latents"}  # column -> the name part of the key and the sample member
URI_COLUMNS = {EMBEDDINGS: "embeddings_uri", LATENTS: "latents_uri"}


def to_npy(array: np.ndarray) -> bytes:
    """The array as .npy bytes (the same bytes for the same array, on every machine)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def sidecar_key(video_id: str, column: str, data: bytes) -> str:
    """videos/<shard>/<id>.<kind>.<sha16 of the bytes>.npy (content-addressed: never overwritten by others)."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    return f"videos/{shard_of(video_id)}/{video_id}.{KINDS[column]}.{digest}.npy"


def put_sidecars(fs, layout: OutputLayout, video_id: str, blobs: dict[str, bytes]) -> tuple[dict[str, str], str]:
    """Store each non-empty blob ({column: npy bytes}); ({uri column: uri}, "") or ({}, error)."""
    uris = {}
    for column, data in blobs.items():
        if not data:
            continue
        key = sidecar_key(video_id, column, data)
        path = layout.path(key)
        try:
            retry.call(lambda: write_atomic(fs, path, data), f"write {path}", retry.VIDEO)
        except Exception as e:  # noqa: BLE001 - becomes the row's error
            return {}, f"storing the {KINDS[column]} sidecar failed: {type(e).__name__}: {e}"[:2000]
        uris[URI_COLUMNS[column]] = layout.uri(key)
    return uris, ""
