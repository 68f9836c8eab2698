"""The quality gate for speed-ups: the same prompts and seeds under a baseline spec and under candidate specs
(a cache kind, a quantization kind), compared video by video.

Per candidate: PSNR and SSIM of the decoded uint8 frames against the baseline's, the change in CLIP score
when a scoring spec is given (its CLIP model), transformer calls per video (the engine's count, as the manifest records it)
and seconds per video, measured in the same run. With `interleave` (the default) every engine is loaded
first and the batches go round-robin over them, so a neighbour's load spike hits every candidate alike;
`interleave=False` loads one engine at a time (for models too large to hold several).

SSIM is computed here (torch only; scikit-image is not a dependency): Wang et al. 2004 on the BT.601 luma
of each frame, 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, valid region only, averaged over
frames - the definition of skimage's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)` on grayscale.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass

import numpy as np

from latte_ray.spec import PipelineSpec


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 arrays of one shape (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over the frames of two (F, H, W, 3) uint8 videos (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    def luma(v: np.ndarray) -> torch.Tensor:
        rgb = torch.as_tensor(v, dtype=torch.float64)
        return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114)[:, None]  # (F, 1, H, W)

    x, y = luma(a), luma(b)
    size, sigma = 11, 1.5
    if min(x.shape[-2:]) < size:
        raise ValueError(f"frames of {tuple(x.shape[-2:])} are smaller than SSIM's {size}x{size} window")
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def clip_scorer(scoring):
    """A callable (prompts, videos) -> per-video CLIP scores (latte_ray/model/clip.py: the frames the scoring
    spec samples, the same scorer a run's scoring stage uses), or None when `scoring` is None."""
    if scoring is None:
        return None
    from latte_ray.model.clip import ClipScorer

    scorer = ClipScorer(scoring)

    def score(prompts: list[str], videos: list[np.ndarray]) -> np.ndarray:
        sampled = [v[scorer.frame_indices(len(v))] for v in videos]
        return scorer.score(sampled, list(prompts)).clip

    return score


@dataclass
class Candidate:
    name: str
    spec: PipelineSpec
    videos: list[np.ndarray] | None = None
    calls: list[int] | None = None
    seconds: float = 0.0
    load_seconds: float = 0.0
    skipped: str = ""  # why it did not run (e.g. float8 on a CPU)


@dataclass
class Row:
    name: str
    spec_hash: str
    psnr_all: float  # over all videos' frames pooled (one MSE)
    psnr_min: float  # the worst single video
    ssim_mean: float
    clip_delta: float | None
    calls_per_video: float
    calls_ratio: float  # baseline calls / candidate calls: how many times fewer
    s_per_video: float
    speedup: float  # baseline s/video / candidate s/video, same run
    skipped: str = ""

    def cells(self) -> list[str]:
        if self.skipped:
            return [self.name, "-", "-", "-", "-", "-", "-", "-", f"not run: {self.skipped}"]
        clip = "n/a" if self.clip_delta is None else f"{self.clip_delta:+.4f}"
        fmt = lambda v: "inf (equal)" if math.isinf(v) else f"{v:.1f}"  # noqa: E731
        return [self.name, fmt(self.psnr_all), fmt(self.psnr_min), f"{self.ssim_mean:.4f}", clip,
                f"{self.calls_per_video:.1f}", f"{self.calls_ratio:.2f}x", f"{self.s_per_video:.3f}",
                f"{self.speedup:.2f}x"]


HEADER = ["candidate", "PSNR dB (all videos)", "PSNR dB (worst video)", "SSIM", "CLIP change", "transformer calls/video",
          "fewer calls", "s/video", "speed-up"]


def _load(c: Candidate, cache_dir: str | None, make_engine):
    from latte_ray.model.quantize import QuantizationUnsupported

    started = time.perf_counter()
    try:
        engine = make_engine(c.spec, cache_dir=cache_dir)
    except QuantizationUnsupported as e:
        c.skipped = str(e)
        return None
    c.load_seconds = time.perf_counter() - started
    c.videos, c.calls = [], []
    batch = c.spec.execution.batch_size
    engine.generate(["warm-up"] * batch, [""] * batch, list(range(batch)))  # first-call costs, not timed
    return engine


def _run_batch(c: Candidate, engine, prompts, negatives, seeds) -> None:
    started = time.perf_counter()
    frames, _ = engine.generate(prompts, negatives, seeds)
    c.seconds += time.perf_counter() - started
    c.videos.extend(frames)
    c.calls.extend(engine.last_transformer_calls)


def run_candidates(candidates: list[Candidate], prompts: list[str], seeds: list[int], negative: str = "",
                   cache_dir: str | None = None, interleave: bool = True, make_engine=None) -> None:
    """Generate `prompts` with every candidate (the first is the baseline), filling videos, calls, seconds."""
    if make_engine is None:
        from latte_ray.model.families.latte_engine import LatteEngine as make_engine
    batches = []
    for c in candidates:
        b = c.spec.execution.batch_size
        batches.append([(prompts[i : i + b], [negative] * len(prompts[i : i + b]), seeds[i : i + b])
                        for i in range(0, len(prompts), b)])
    if interleave:
        engines = [_load(c, cache_dir, make_engine) for c in candidates]
        for k in range(max(len(b) for b in batches)):
            for c, engine, work in zip(candidates, engines, batches):
                if engine is not None and k < len(work):
                    _run_batch(c, engine, *work[k])
        return
    for c, work in zip(candidates, batches):
        engine = _load(c, cache_dir, make_engine)
        for item in work if engine is not None else []:
            _run_batch(c, engine, *item)
        del engine
        gc.collect()


def summarize(candidates: list[Candidate], prompts: list[str], scoring=None) -> list[Row]:
    """One row per candidate against the first (the baseline, whose own row compares it with itself).
    `scoring`: a ScoringSpec whose CLIP model scores every video (the CLIP column is n/a without one)."""
    base = candidates[0]
    scorer = clip_scorer(scoring)
    base_clip = np.mean(scorer(prompts, base.videos)) if scorer else None
    base_calls = float(np.mean(base.calls))
    base_s = base.seconds / len(base.videos)
    rows = []
    for c in candidates:
        if c.skipped:
            rows.append(Row(c.name, c.spec.spec_hash(), *[math.nan] * 3, None, *[math.nan] * 4, skipped=c.skipped))
            continue
        p = [psnr(v, ref) for v, ref in zip(c.videos, base.videos)]
        s = [ssim(v, ref) for v, ref in zip(c.videos, base.videos)]
        clip = float(np.mean(scorer(prompts, c.videos)) - base_clip) if scorer else None
        calls = float(np.mean(c.calls))
        per_video = c.seconds / len(c.videos)
        pooled = psnr(np.stack(c.videos), np.stack(base.videos))
        rows.append(Row(c.name, c.spec.spec_hash(), pooled, float(np.min(p)), float(np.mean(s)), clip,
                        calls, base_calls / calls if calls else math.inf, per_video, base_s / per_video))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)
