"""BENCHMARK TOOL, not a model: an engine that returns frames instantly (spec `model.source: null`).

It stands in for LatteEngine so benchmarks/plane.py and benchmarks/driver_memory.py can measure the data
plane alone (Ray Data scheduling, mp4 encoding, uploads, manifest commits) with no generation cost. Frames
are a moving colour gradient, different per seed, so the encoder sees video-like (compressible) content
rather than noise. Nothing here loads weights or touches torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from latte_ray.spec import PipelineSpec


@dataclass
class NullText:
    tokens: list[int]
    truncated: list[bool]


class NullEngine:
    device = "cpu"
    dtype = None
    load_seconds = 0.0
    last_transformer_calls: list[int] = []

    def __init__(self, spec: PipelineSpec, **_ignored):
        s = spec.sampling
        f, y, x = np.meshgrid(np.arange(s.video_length), np.arange(s.height), np.arange(s.width), indexing="ij")
        self._base = np.stack([x + 3 * f, y + 2 * f, x + y], axis=-1).astype(np.uint8)  # (F, H, W, 3)

    def generate(self, prompts: list[str], negative_prompts: list[str], seeds: list[int], steps=None):
        text = NullText([len(p.split()) for p in prompts], [False] * len(prompts))
        return self.denoise(text, seeds), text

    def denoise(self, text, seeds: list[int], steps=None) -> np.ndarray:
        self.last_transformer_calls = [0] * len(seeds)  # no transformer here
        return np.stack([self._base + np.uint8(int(seed) % 256) for seed in seeds])
