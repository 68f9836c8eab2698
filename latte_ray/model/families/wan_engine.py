"""The Wan engine: one loaded WanPipeline that turns (prompt, negative prompt, seed) into uint8 frames.

Prompts are encoded with the pipeline's own `encode_prompt` (UMT5, each prompt cut to its own tokens and
zero-padded to max_sequence_length, so a prompt's embedding does not depend on its batch); latents come from one
CPU generator per row (`prepare_latents` with a list of generators: row i is what a batch of one makes with
seed i); then diffusers' own `WanPipeline.__call__` runs the denoise loop (both experts and the boundary of Wan
2.2 A14B included), the VAE decode and the post-processing, given those embeddings and latents. So the reference
(`WanPipeline.__call__` for one prompt with `torch.Generator("cpu").manual_seed(seed)`) is the same code.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from latte_ray.model.engine import Engine, TextBatch, inductor_cache_dir, pad_batch, set_inductor_cache_dir
from latte_ray.spec import PipelineSpec

log = logging.getLogger(__name__)


def use_math_attention(experts: list[torch.nn.Module]) -> None:
    """model.attention 'default' for Wan: WanAttnProcessor calls diffusers' dispatch_attention_fn, so the backend is
    chosen per model with ModelMixin.set_attention_backend; '_native_math' is torch's unfused math SDPA (the whole
    score matrix, no fused kernel). set_attention_backend also makes its backend the process-wide default for
    every model whose layers name none; the `attention_backend` context manager puts the previous default back,
    so an 'sdpa' engine built later in the same process still runs the fused SDPA."""
    from diffusers.models.attention_dispatch import attention_backend

    for expert in experts:
        with attention_backend():
            expert.set_attention_backend("_native_math")


class WanEngine(Engine):
    """Owns one WanPipeline on one device: loaded, LoRA fused, optionally quantized and compiled, then reused."""

    def __init__(self, spec: PipelineSpec, cache_dir: str | None = None, storage_options: dict | None = None,
                 with_text_encoder: bool = True, with_denoiser: bool = True, pipe=None):
        super().__init__(spec, cache_dir, storage_options, with_text_encoder, with_denoiser, pipe)
        if with_denoiser and spec.model.attention == "default":
            use_math_attention(self._experts())
        if with_denoiser and spec.model.compile.enabled:
            self._compile()
        self.load_seconds = time.perf_counter() - self.started

    # ---- setup -------------------------------------------------------------------------------

    def _experts(self) -> list:
        return [m for m in (self.pipe.transformer, getattr(self.pipe, "transformer_2", None)) if m is not None]

    def _compile(self) -> None:
        """Compile every expert as model.compile.scope says (compiling.compile_in_place: `blocks` is diffusers'
        compile_repeated_blocks, WanTransformer3DModel declaring its WanTransformerBlock as `_repeated_blocks`;
        `whole` the expert's forward as one graph), for the one shape this actor sees (text always
        max_sequence_length tokens, a short batch padded to batch_size), then one warm-up call."""
        opts = self.spec.model.compile
        from latte_ray.model.compiling import compile_in_place, node_compile_threads, node_gpus, set_compile_threads

        set_compile_threads(node_compile_threads(self.spec.execution.num_gpus_per_actor, gpus=node_gpus()))
        set_inductor_cache_dir(inductor_cache_dir(opts.cache_dir, self.cache_dir))
        for expert in self._experts():
            compile_in_place(expert, opts)
        if opts.vae_decode:
            kwargs = {"mode": opts.mode} if opts.backend == "inductor" else {}
            self.pipe.vae.decode = torch.compile(self.pipe.vae.decode, backend=opts.backend, dynamic=False, **kwargs)
        started = time.perf_counter()
        batch, length = self.spec.execution.batch_size, self.sampling.max_sequence_length
        width = self._experts()[0].config.text_dim
        zeros = torch.zeros(batch, length, width, dtype=self.dtype, device=self.device)
        text = TextBatch(zeros, zeros, torch.full((batch,), length), [length] * batch, [False] * batch)
        self.denoise(text, list(range(batch)), steps=2)
        self.warmup_seconds = time.perf_counter() - started
        log.info("compiled and warmed up in %.1fs", self.warmup_seconds)

    # ---- text --------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_text(self, prompts: list[str], negative_prompts: list[str]) -> TextBatch:
        """UMT5 embeddings (WanPipeline.encode_prompt: the prompt's own tokens, zeros after them up to
        max_sequence_length); `keep` is the prompt's token count."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        pipe, length = self.pipe, self.sampling.max_sequence_length
        embeds, negative = pipe.encode_prompt(
            prompt=list(prompts), negative_prompt=list(negative_prompts), do_classifier_free_guidance=True,
            max_sequence_length=length, device=self.device, dtype=self.dtype,
        )
        full = [len(ids) for ids in pipe.tokenizer([prompt_clean(p) for p in prompts], add_special_tokens=True)["input_ids"]]
        tokens = [min(n, length) for n in full]
        return TextBatch(embeds=embeds, negative_embeds=negative, keep=torch.tensor(tokens), tokens=tokens,
                         truncated=[n > length for n in full])

    # ---- denoise + decode --------------------------------------------------------------------

    @torch.inference_mode()
    def denoise(self, text: TextBatch, seeds: list[int], steps: int | None = None,
                capture: dict | None = None) -> np.ndarray:
        """uint8 frames (B, F, H, W, 3); row i depends only on (text row i, seeds[i], spec).

        `capture`: when given, receives "latents": the final denoised latents (B, C, f, h, w) on the CPU, as the
        VAE got them (before WanPipeline un-normalizes them with the VAE's latents_mean / latents_std)."""
        pipe, s = self.pipe, self.sampling
        n = len(seeds)
        text, seeds = self._pad_batch(text, list(seeds))
        cfg = s.guidance_scale > 1.0
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        latents = pipe.prepare_latents(
            len(seeds), self._experts()[0].config.in_channels, s.height, s.width, s.video_length, torch.float32,
            self.device, generators,
        )
        steps = steps or s.num_inference_steps
        kept: dict = {}

        def keep_last(_pipe, i, _t, tensors):  # the loop's final latents, for the sidecars
            if i == steps - 1:
                kept["latents"] = tensors["latents"]
            return {}

        video = pipe(
            prompt_embeds=_inference_tensor(text.embeds.to(self.device, self.dtype)),
            negative_prompt_embeds=_inference_tensor(text.negative_embeds.to(self.device, self.dtype)) if cfg else None,
            height=s.height, width=s.width, num_frames=s.video_length, num_inference_steps=steps,
            guidance_scale=s.guidance_scale, guidance_scale_2=s.guidance_scale_2, latents=latents,
            max_sequence_length=s.max_sequence_length, output_type="pt",
            callback_on_step_end=keep_last if capture is not None else None,
        ).frames  # (B, F, C, H, W) in [0, 1]
        self.last_transformer_calls = [steps * (2 if cfg else 1)] * n
        if capture is not None:
            capture["latents"] = kept["latents"][:n].cpu()
        frames = (video * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2)
        return frames[:n].cpu().numpy()

    def _pad_batch(self, text: TextBatch, seeds: list[int]) -> tuple[TextBatch, list[int]]:
        return pad_batch(text, seeds, self.spec.execution.batch_size, self.spec.model.compile.enabled)


def _inference_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` as an inference tensor (a copy made under inference_mode where it is not one). WanPipeline hands the
    embeddings to the transformer as they are, and a whole-model compile guards on their dispatch keys: the
    warm-up's stand-in zeros and the text-encode stage's arrays (TextBatch.from_numpy) are ordinary tensors,
    encode_text's are inference tensors, and a graph built for one recompiles for the other."""
    return t if t.is_inference() else t.clone()
