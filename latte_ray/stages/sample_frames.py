"""Sample-frames stage (CPU): the frames a video is scored on, from its stored mp4 bytes.

Scores are a function of the stored video and its prompt alone, so this decodes the mp4 (what a dataset
user gets), not the raw frames the generator made: a run that scores (spec `scoring.enabled`) and a later
`latte-ray score` over the same output give the same scores. In a run the bytes come from the encode stage
(`video` column); in `latte-ray score` (`fetch_from`: the output) each row's video is read through its
manifest row's `video_uri`, taken relative to the output (a copied output is read from the copy), and
checked against the recorded sha256. Decoding runs here, on CPU actors, so the scoring
actors (on GPUs in production) only run CLIP.

Rows leave with `score_frames` (the sampled uint8 frames as bytes, (k, H, W, 3)) and `score_shape`; a row
whose video cannot be read or decoded keeps empty frames and says why in `score_error`.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np

from latte_ray.stages.declare import Context, Stage

log = logging.getLogger(__name__)


class SampleFramesStage:
    def __init__(self, frames: int, fetch_from: str | None = None, storage_options: dict | None = None):
        from latte_ray.record.output import open_output

        self.frames = frames
        self.output = open_output(fetch_from, storage_options) if fetch_from else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from latte_ray.model.clip import sample_indices
        from latte_ray.stages.encode import decode_mp4

        n = len(batch["id"])
        out = dict(batch)
        out["score_frames"] = np.array([b""] * n, dtype=object)
        out["score_shape"] = np.zeros((n, 4), dtype=np.int32)
        out["score_error"] = np.array([""] * n, dtype=object)
        for i in range(n):
            if str(batch["status"][i]) != "encoded":
                continue
            try:
                data = self._fetch(batch, i) if self.output else batch["video"][i]
                frames = decode_mp4(data)
            except Exception as e:  # noqa: BLE001 - an unreadable video is an unscored row, not a failed run
                out["score_error"][i] = f"{type(e).__name__}: {e}"[:2000]
                log.warning("cannot score %s: %s", batch["id"][i], out["score_error"][i])
                continue
            sampled = np.ascontiguousarray(frames[sample_indices(len(frames), self.frames)])
            out["score_frames"][i] = sampled.tobytes()
            out["score_shape"][i] = sampled.shape
        return out

    def _fetch(self, batch: dict[str, np.ndarray], i: int) -> bytes:
        from latte_ray.faults import retry

        uri = str(batch["video_uri"][i])
        path = self.output.layout.video_path(uri)
        data = retry.call(lambda: self.output.fs.cat_file(path), f"read {uri}", retry.READ)
        if hashlib.sha256(data).hexdigest() != str(batch["sha256"][i]):
            raise ValueError(f"{uri}: its bytes do not match the manifest's sha256")
        return data


def _reads(ctx: Context) -> tuple[str, ...]:
    """A run's rows carry the mp4 bytes; `latte-ray score`'s are manifest rows, read by video_uri."""
    return ("id", "status", *(("video_uri", "sha256") if ctx.extra.get("fetch_from") else ("video",)))


def _map_args(ctx: Context) -> dict:
    return {"fn": SampleFramesStage,
            "fn_constructor_kwargs": {"frames": ctx.scoring.frames, "fetch_from": ctx.extra.get("fetch_from"),
                                      "storage_options": ctx.storage_options},
            "batch_format": "numpy", "compute": ctx.cpu_pool(), "num_cpus": ctx.cpu_task_cpus}


STAGE = Stage(name="SampleFramesStage", label="sample-frames actor", reads=_reads,
              writes=("score_frames", "score_shape", "score_error"), map_args=_map_args)
