"""Encode stage (CPU tasks): raw frames -> mp4 bytes in memory (PyAV), plus sha256 and cheap stats."""

from __future__ import annotations

import hashlib
import io

import av
import numpy as np

from latte_ray.spec import VideoSpec

BLANK_STD = 2.0  # a frame whose pixels vary by less than this (0-255) is blank
FROZEN_DIFF = 0.5  # a frame that differs from the previous by less than this on average is frozen


def encode_mp4(frames: np.ndarray, video: VideoSpec) -> bytes:
    """(F, H, W, 3) uint8 -> mp4 bytes. One encoder thread, so the bytes are the same on every machine."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(video.codec, rate=video.fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = video.resolved_pix_fmt
        stream.thread_count = 1
        if video.codec in ("libx264", "libx264rgb", "libx265"):
            stream.options = {"crf": str(video.crf), "preset": video.preset}
        elif video.codec == "libvpx-vp9":
            stream.options = {"crf": str(video.crf), "b": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_mp4(data: bytes) -> np.ndarray:
    """mp4 bytes -> (F, H, W, 3) uint8."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def video_stats(frames: np.ndarray) -> dict[str, float]:
    f = frames.astype(np.float32)
    diffs = np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3)) if len(f) > 1 else np.zeros(0)
    return {
        "mean_brightness": float(f.mean() / 255.0),
        "motion_score": float(diffs.mean() / 255.0) if len(diffs) else 0.0,
        "blank_frames": int((f.std(axis=(1, 2, 3)) < BLANK_STD).sum()),
        "frozen_frames": int((diffs < FROZEN_DIFF).sum()),
    }


class EncodeStage:
    def __init__(self, video_spec_json: str):
        self.video = VideoSpec.model_validate_json(video_spec_json)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        out = {k: v for k, v in batch.items() if k != "frames"}
        out["video"] = np.array([b""] * n, dtype=object)
        out["sha256"] = np.array([""] * n, dtype=object)
        out["bytes"] = np.zeros(n, dtype=np.int64)
        stats = {k: np.zeros(n, dtype=np.float64) for k in ("mean_brightness", "motion_score")}
        stats.update({k: np.zeros(n, dtype=np.int32) for k in ("blank_frames", "frozen_frames")})
        out["status"] = np.array(batch["status"], dtype=object)
        out["error"] = np.array(batch["error"], dtype=object)
        for i in range(n):
            if out["status"][i] != "generated":
                continue
            shape = (int(batch["num_frames"][i]), int(batch["height"][i]), int(batch["width"][i]), 3)
            frames = np.frombuffer(batch["frames"][i], dtype=np.uint8).reshape(shape)
            try:
                data = encode_mp4(frames, self.video)
            except Exception as e:  # noqa: BLE001
                out["status"][i] = "error"
                out["error"][i] = f"encoding failed: {type(e).__name__}: {e}"
                continue
            out["video"][i] = data
            out["sha256"][i] = hashlib.sha256(data).hexdigest()
            out["bytes"][i] = len(data)
            for k, v in video_stats(frames).items():
                stats[k][i] = v
            out["status"][i] = "encoded"
        out.update(stats)
        return out
