"""Encode stage (CPU tasks): raw frames -> mp4 bytes in memory (PyAV), plus sha256 and cheap stats."""

from __future__ import annotations

import hashlib
import io

import av
import numpy as np

from latte_ray.spec import SpecError, VideoSpec
from latte_ray.stages.declare import Context, Stage

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


def browser_unplayable(video: VideoSpec, height: int, width: int) -> str | None:
    """Why browsers would not play these videos inline, or None: the report's gallery plays the stored mp4
    with a `<video>` element, which Chromium, Firefox and Safari decode for H.264 (or VP9) in 4:2:0 at even
    sizes; libx264rgb (the lossless spec), 4:4:4, x265 and MPEG-4 part 2 are not played."""
    pix_fmt = video.resolved_pix_fmt
    if video.codec not in ("libx264", "libvpx-vp9"):
        return f"video.codec {video.codec} is not played by browsers (libx264 is)"
    if pix_fmt != "yuv420p":
        return f"video.pix_fmt {pix_fmt} is not played by browsers (yuv420p is)"
    if height % 2 or width % 2:
        return f"{width}x{height} has an odd side (4:2:0 video needs even sizes)"
    return None


def check_video_settings(video: VideoSpec, height: int, width: int) -> None:
    """Encode (and decode back) a 2-frame clip of the spec's size with the spec's settings, in the driver,
    before any model loads: settings the encoder refuses would otherwise turn every generated video into an
    error row at the encode stage. SpecError names the field at fault."""
    pix_fmt = video.resolved_pix_fmt
    try:
        av.VideoFormat(pix_fmt)
    except ValueError:
        raise SpecError(f"video.pix_fmt {pix_fmt!r}: not a pixel format FFmpeg knows (e.g. yuv420p, yuv444p, "
                        f"rgb24)") from None
    try:
        formats = [f.name for f in av.Codec(video.codec, "w").video_formats or ()]
    except Exception as e:  # noqa: BLE001 - an encoder missing from this PyAV build
        raise SpecError(f"video.codec {video.codec!r}: not available in this PyAV build ({e})") from None
    if formats and pix_fmt not in formats:
        raise SpecError(f"video.pix_fmt {pix_fmt!r}: the {video.codec} encoder cannot write it (it takes "
                        f"{', '.join(formats[:8])}{', ...' if len(formats) > 8 else ''})")
    ramp = np.linspace(0, 255, width, dtype=np.uint8)[None, None, :, None]
    frames = np.broadcast_to(ramp, (2, height, width, 3)).copy()
    try:
        decoded = decode_mp4(encode_mp4(frames, video))
    except Exception as e:  # noqa: BLE001 - find which setting the encoder refused
        culprit = _culprit(video, frames)
        raise SpecError(f"{culprit}: the {video.codec} encoder refuses these video settings ({type(e).__name__}: "
                        f"{e})") from None
    if decoded.shape != frames.shape:
        raise SpecError(f"video (codec {video.codec}, pix_fmt {pix_fmt}): a {frames.shape} test clip came back "
                        f"as {decoded.shape}")


def _culprit(video: VideoSpec, frames: np.ndarray) -> str:
    """The field whose default makes the test clip encode, or a summary of the settings."""
    defaults = VideoSpec(codec=video.codec)
    for field in ("preset", "crf", "pix_fmt"):
        if getattr(video, field) != getattr(defaults, field):
            try:
                encode_mp4(frames, video.model_copy(update={field: getattr(defaults, field)}))
            except Exception:  # noqa: BLE001
                continue
            return f"video.{field} {getattr(video, field)!r}"
    return f"video (codec {video.codec}, pix_fmt {video.resolved_pix_fmt}, crf {video.crf}, preset {video.preset})"


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


STATS = ("mean_brightness", "motion_score", "blank_frames", "frozen_frames")


def _map_args(ctx: Context) -> dict:
    return {"fn": EncodeStage, "fn_constructor_kwargs": {"video_spec_json": ctx.spec.video.model_dump_json()},
            "batch_format": "numpy", "compute": ctx.cpu_pool(), "num_cpus": ctx.cpu_task_cpus}


STAGE = Stage(
    name="EncodeStage", label="encode actor",
    reads=("id", "status", "error", "frames", "num_frames", "height", "width"),
    writes=("status", "error", "video", "sha256", "bytes", *STATS), drops=("frames",), map_args=_map_args,
)
