"""What every family's engine shares: the start-up of its pipeline (start_pipeline), the encoded-text batch
(TextBatch, also what the text-encode stage hands the generation actors) and the padding of a short batch, the
device choice, CUDA-graph-safe outputs of compiled callables and the inductor cache.

Each family's engine is its own module under latte_ray/model/families/ (latte_engine.py, wan_engine.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from latte_ray.spec import PipelineSpec

log = logging.getLogger(__name__)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the pipeline spec asks for device 'cuda' but no CUDA device is visible")
    return torch.device(device)


@dataclass
class TextBatch:
    """Encoded prompts, padded to the spec's text length; `keep` is how many tokens each attends to."""

    embeds: torch.Tensor  # (B, L, D)
    negative_embeds: torch.Tensor  # (B, L, D)
    keep: torch.Tensor  # (B,) int
    tokens: list[int]
    truncated: list[bool]

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {
            "prompt_embeds": self.embeds.float().cpu().numpy(),
            "negative_prompt_embeds": self.negative_embeds.float().cpu().numpy(),
            "keep": self.keep.cpu().numpy().astype(np.int32),
            "prompt_tokens": np.array(self.tokens, dtype=np.int32),
            "prompt_truncated": np.array(self.truncated, dtype=bool),
        }

    @classmethod
    def from_numpy(cls, batch: dict[str, np.ndarray], device: torch.device, dtype: torch.dtype) -> "TextBatch":
        return cls(
            embeds=torch.as_tensor(np.stack(list(batch["prompt_embeds"]))).to(device, dtype),
            negative_embeds=torch.as_tensor(np.stack(list(batch["negative_prompt_embeds"]))).to(device, dtype),
            keep=torch.as_tensor(np.asarray(batch["keep"], dtype=np.int64)),
            tokens=[int(t) for t in batch["prompt_tokens"]],
            truncated=[bool(t) for t in batch["prompt_truncated"]],
        )


def pad_batch(text: TextBatch, seeds: list[int], batch_size: int, compiled: bool) -> tuple[TextBatch, list[int]]:
    """Compiled graphs are built for one batch size: pad a short batch by repeating its first row (the engine
    drops the padded rows' videos)."""
    if not compiled or len(seeds) >= batch_size:
        return text, seeds
    extra = batch_size - len(seeds)
    pad = lambda x: torch.cat([x, x[:1].expand(extra, *x.shape[1:])])  # noqa: E731
    return (TextBatch(pad(text.embeds), pad(text.negative_embeds), pad(text.keep), text.tokens, text.truncated),
            seeds + [seeds[0]] * extra)


@dataclass
class Started:
    """A family's pipeline ready for its engine (start_pipeline)."""

    pipe: Any
    device: torch.device
    dtype: torch.dtype
    lora: list[str]  # the LoRAs fused, "file xscale" each, in the spec's order


def start_pipeline(spec: PipelineSpec, cache_dir: str | None = None, storage_options: dict | None = None,
                   with_text_encoder: bool = True, with_denoiser: bool = True, pipe=None) -> Started:
    """Every engine's start-up, in the order it must run: the device; the quantization refused before any
    weights are read; the pipeline loaded (or `pipe`, an already built one: benchmarks/gpu.py passes full-size
    random weights); LoRA fused on the loaded weights (before quantization, which replaces the Linear weights
    LoRA adds to, and before any compile); moved to the device; quantized; progress bars off (an actor logs
    its own progress)."""
    from latte_ray.model.loading import DTYPES, load_pipeline
    from latte_ray.model.quantize import check_supported, quantize_pipeline

    device = pick_device(spec.model.device)
    check_supported(spec.model.quantization, device)  # before any weights are read
    if pipe is None:
        pipe = load_pipeline(spec.model, cache_dir, storage_options, with_text_encoder=with_text_encoder,
                             scheduler=spec.sampling.scheduler, with_denoiser=with_denoiser)
    lora: list[str] = []
    if with_denoiser and spec.model.lora:
        from latte_ray.model.lora import fuse_loras

        lora = fuse_loras(pipe, spec.model.lora, cache_dir, storage_options)
    pipe.to(device)
    quantize_pipeline(pipe, spec.model.quantization)
    pipe.set_progress_bar_config(disable=True)
    return Started(pipe, device, DTYPES[spec.model.dtype], lora)


class CudaGraphOutputs:
    """A compiled callable in a CUDA-graph mode ("reduce-overhead", "max-autotune"), made safe to keep outputs
    of. A CUDA graph replays into the same output buffers, and under inference_mode every call of a compiled
    function starts a new cudagraph-trees generation that may overwrite the last one's outputs; the engine keeps
    outputs past the next call (the DPM multistep scheduler keeps model outputs across steps, and
    pipe.decode_latents holds each VAE chunk until it concatenates them), so every output is cloned before the
    call returns. CUDA graph trees are per thread: a Ray actor (max_concurrency 1) runs __init__ (warm-up) and
    every batch on its one task thread; a call from another thread records its graphs again (correct, with a
    second memory pool), which is logged once."""

    def __init__(self, fn, what: str):
        import threading

        self.fn, self.what, self.thread, self.warned = fn, what, threading.get_ident(), False

    def __call__(self, *args, **kwargs):
        import threading

        if threading.get_ident() != self.thread and not self.warned:
            self.warned = True
            log.warning("compiled %s called from another thread than its warm-up: CUDA graphs are recorded "
                        "again for this thread", self.what)
        torch.compiler.cudagraph_mark_step_begin()
        return _clone_outputs(self.fn(*args, **kwargs))


def _clone_outputs(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_outputs(x) for x in out)
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):  # diffusers' DecoderOutput
        out.sample = out.sample.clone()
    return out


def inductor_cache_dir(spec_dir: str | None, model_cache_dir: str | None = None) -> str:
    """model.compile.cache_dir, or else `inductor/` under the model cache (LATTE_RAY_CACHE: /cache on the
    infra/ nodes, a volume shared by a pod's actors and kept across restarts), so compiled kernels are reused
    by every actor of a node and by the next run."""
    if spec_dir:
        return spec_dir
    from latte_ray.model.loading import default_cache_dir

    import os

    return os.path.join(model_cache_dir or str(default_cache_dir()), "inductor")


def set_inductor_cache_dir(path: str) -> str:
    """Point inductor's caches at `path`. Overwrites the variable, which torch itself sets to its default on
    first use, and clears inductor's memoized cache paths so the new folder is used from now on."""
    import os

    from torch._inductor.utils import clear_caches

    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    clear_caches()
    return path


class Engine:
    """What the stages ask of every family's engine (the seam's interface): `encode_text` for the text-encode
    stage, `denoise` for the generation actors given that stage's TextBatch, and `generate`, the two in one
    actor. A family's engine (families/<family>_engine.py) subclasses this and sets, when built: spec,
    sampling, pipe, device, dtype, load_seconds, and after each denoise last_transformer_calls (per video: the
    manifest's transformer_calls column)."""

    spec: PipelineSpec
    pipe: Any
    device: torch.device
    dtype: torch.dtype

    def __init__(self, spec: PipelineSpec, cache_dir: str | None = None, storage_options: dict | None = None,
                 with_text_encoder: bool = True, with_denoiser: bool = True, pipe=None):
        """The start every family's engine shares (start_pipeline); the family's __init__ then configures its
        denoiser and sets load_seconds from self.started. `pipe`: an already built pipeline to use instead of
        loading spec.model.source (benchmarks/gpu.py passes full-size random weights this way)."""
        self.spec, self.cache_dir, self.sampling = spec, cache_dir, spec.sampling
        self.started = time.perf_counter()
        ready = start_pipeline(spec, cache_dir, storage_options, with_text_encoder, with_denoiser, pipe)
        self.device, self.dtype, self.lora, self.pipe = ready.device, ready.dtype, ready.lora, ready.pipe
        self.last_transformer_calls: list[int] = []  # per video of the last denoise call (manifest column)

    def encode_text(self, prompts: list[str], negative_prompts: list[str]) -> TextBatch:
        raise NotImplementedError

    def denoise(self, text: TextBatch, seeds: list[int], steps: int | None = None,
                capture: dict | None = None) -> np.ndarray:
        """uint8 frames (B, F, H, W, 3); row i depends only on (text row i, seeds[i], spec). `capture`, when
        given, receives "latents": the final denoised latents on the CPU (for the sidecars)."""
        raise NotImplementedError

    @torch.inference_mode()
    def generate(self, prompts: list[str], negative_prompts: list[str], seeds: list[int], steps: int | None = None,
                 capture: dict | None = None) -> tuple[np.ndarray, TextBatch]:
        text = self.encode_text(prompts, negative_prompts)
        return self.denoise(text, seeds, steps=steps, capture=capture), text


def make_engine(spec: PipelineSpec, **kwargs):
    """The spec's engine (latte_ray/model/choose.py, which the denoise stage calls without importing torch)."""
    from latte_ray.model.choose import make_engine as choose

    return choose(spec, **kwargs)
