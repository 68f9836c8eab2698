"""Prometheus metrics, recorded in the stages through `ray.util.metrics`.

Ray exports them from every node's metrics agent (`ray.nodes()[i]["MetricsExportPort"]`, set with
`ray start --metrics-export-port`), with a `ray_` prefix and `_total` on counters:

    ray_latte_ray_videos_total{status="ok"|"error", pipeline}      manifest rows committed (write stage)
    ray_latte_ray_video_bytes_written_total{pipeline}              bytes of video objects written (write stage)
    ray_latte_ray_generation_seconds_bucket|_sum|_count{pipeline}  seconds per generated video (denoise stage)

Outside a Ray worker (a stage called in-process) recording is a harmless no-op.
"""

from __future__ import annotations

from typing import Iterable

VIDEOS = "latte_ray_videos"
BYTES_WRITTEN = "latte_ray_video_bytes_written"
GENERATION_SECONDS = "latte_ray_generation_seconds"
# Covers the tiny CPU model (~0.5 s) through production Latte-1 on one GPU (~15 s) and slow fallbacks.
SECONDS_BOUNDARIES = [0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300]


class StageMetrics:
    """The run's metrics, tagged with the pipeline name; created once per stage actor."""

    def __init__(self, pipeline: str):
        from ray.util.metrics import Counter, Histogram

        tags = {"pipeline": pipeline}
        self.videos = Counter(VIDEOS, description="Videos committed to the manifest, by status.",
                              tag_keys=("status", "pipeline")).set_default_tags(tags)
        self.bytes_written = Counter(BYTES_WRITTEN, description="Bytes of video objects written.",
                                     tag_keys=("pipeline",)).set_default_tags(tags)
        self.generation_seconds = Histogram(
            GENERATION_SECONDS, description="Generation seconds per video (batch time / batch size).",
            boundaries=SECONDS_BOUNDARIES, tag_keys=("pipeline",),
        ).set_default_tags(tags)

    def committed(self, statuses: Iterable[str], video_bytes: int) -> None:
        counts: dict[str, int] = {}
        for status in statuses:
            counts[str(status)] = counts.get(str(status), 0) + 1
        for status, n in counts.items():
            self.videos.inc(n, tags={"status": status})
        if video_bytes:
            self.bytes_written.inc(video_bytes)

    def generated(self, seconds_per_video: float, videos: int) -> None:
        for _ in range(videos):
            self.generation_seconds.observe(seconds_per_video)
