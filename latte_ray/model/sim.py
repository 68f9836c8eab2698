"""BENCHMARK TOOL, not a model: a GPU actor's time without the GPU (spec `model.source: sim`).

Ray schedules logical GPUs, so how well a fleet is kept busy - pool ramp-up, model loads per actor and per
round, round and end tails, nodes that come and go - can be measured on a few CPUs if something holds each
actor for the time a real one would. This engine does that: its constructor sleeps the load time (and the
compile warm-up when the spec compiles), each generation call sleeps the call's time for its batch size
(model.sim: fixed + per video, default Latte-1's published 14.6 s/video), all times multiplied by
model.sim.time_scale. Sleeping uses no CPU, so 64 simulated GPUs fit on 2 cores. Its frames are the null
engine's (a function of the seed alone, at the spec's frame size), so the encode and write stages downstream
do their real work. Nothing here imports torch.
"""

from __future__ import annotations

import time

import numpy as np

from latte_ray.model.null import NullEngine
from latte_ray.spec import PipelineSpec


class SimEngine(NullEngine):
    def __init__(self, spec: PipelineSpec, sleep=time.sleep, **_ignored):
        super().__init__(spec)
        self.timing = spec.model.sim_timing
        self._sleep = sleep
        t0 = time.perf_counter()
        self.simulated_load_s = self.timing.load_s + (self.timing.compile_s if spec.model.compile.enabled else 0.0)
        self._sleep(self.simulated_load_s * self.timing.time_scale)
        self.load_seconds = time.perf_counter() - t0

    def batch_seconds(self, videos: int) -> float:
        """Real (scaled) seconds one call of `videos` videos sleeps."""
        return self.timing.batch_seconds(videos) * self.timing.time_scale

    def denoise(self, text, seeds: list[int], steps=None) -> np.ndarray:
        """The null engine's frames, returned when the call's time is up (making them counts toward it)."""
        until = time.perf_counter() + self.batch_seconds(len(seeds))
        frames = super().denoise(text, seeds, steps)
        self._sleep(max(0.0, until - time.perf_counter()))
        return frames
