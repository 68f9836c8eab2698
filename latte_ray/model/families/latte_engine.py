"""The Latte engine: one loaded LattePipeline that turns (prompt, negative prompt, seed) into uint8 frames.

Why not call `LattePipeline.__call__` on a batch: with `mask_feature=True` the stock pipeline cuts text
padding for a batch of one but attends to (zeroed) padding for larger batches, so a prompt's video would
depend on its batch. Here every prompt is padded to the same length and its padding is masked out of
cross-attention, which is what a batch of one computes - now with one static shape for torch.compile.
Everything else (latents, scheduler, guidance, VAE decode, post-processing) is the pipeline's own code.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from latte_ray.model.engine import (CudaGraphOutputs, Engine, TextBatch, inductor_cache_dir, pad_batch,
                                    set_inductor_cache_dir)
from latte_ray.spec import PipelineSpec

log = logging.getLogger(__name__)


def use_default_attention(transformer: torch.nn.Module) -> int:
    """model.attention 'default': every attention layer computes softmax(QK^T)V with plain matmuls (diffusers'
    AttnProcessor: baddbmm, softmax, bmm) instead of torch's fused scaled_dot_product_attention kernels.

    LatteTransformer3DModel has no set_attn_processor (it is not an AttentionMixin in diffusers 0.42) and its
    layers' AttnProcessor2_0 calls torch's SDPA directly, so ModelMixin.set_attention_backend does not reach
    it either: the processor is set per layer with Attention.set_processor, the way set_attn_processor would.
    Returns how many layers were switched (0 would mean the model has no layer this applies to)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    layers = [m for m in transformer.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"model.attention 'default': {type(transformer).__name__} has no diffusers Attention layer")
    processor = AttnProcessor()  # stateless: one instance serves every layer
    for layer in layers:
        layer.set_processor(processor)
    return len(layers)


class LatteEngine(Engine):
    """Owns one pipeline on one device: loaded, optionally compiled, warmed up, then reused."""

    def __init__(
        self,
        spec: PipelineSpec,
        cache_dir: str | None = None,
        storage_options: dict | None = None,
        with_text_encoder: bool = True,
        with_denoiser: bool = True,
        pipe=None,
    ):
        super().__init__(spec, cache_dir, storage_options, with_text_encoder, with_denoiser, pipe)
        self.pipe._current_timestep = None  # read by cache hooks through pipe.current_timestep; set per step
        self.transformer = self.pipe.transformer
        self.teacache = None  # latte_ray/model/teacache.py when model.cache.kind is teacache
        if with_denoiser:
            self._check_model_shapes()
            self._configure_denoiser()
        self.load_seconds = time.perf_counter() - self.started

    # ---- setup -------------------------------------------------------------------------------

    def _check_model_shapes(self) -> None:
        model_frames = self.pipe.transformer.config.video_length
        if model_frames != self.sampling.video_length:
            raise ValueError(
                f"sampling.video_length is {self.sampling.video_length} but the model was trained for "
                f"{model_frames} frames (transformer.config.video_length)"
            )

    def _configure_denoiser(self) -> None:
        pipe, model = self.pipe, self.spec.model
        if model.attention == "default":
            use_default_attention(pipe.transformer)
        if model.channels_last:
            pipe.vae.to(memory_format=torch.channels_last)
        if model.cache is not None and model.cache.kind == "teacache":
            from latte_ray.model.teacache import TeaCacheLatte

            self.teacache = TeaCacheLatte(pipe.transformer, model.cache, self.spec.execution.batch_size)
        elif model.cache is not None:
            from latte_ray.model.acceleration import enable_cache

            enable_cache(pipe, model.cache, self.sampling.guidance_scale)
        if model.compile.enabled:
            self._compile()

    def _compile(self) -> None:
        """Compile for the one shape this actor will see, then run it once so no batch pays for compiling.

        Shapes are static: text is always padded to max_sequence_length and a short batch is padded to
        batch_size (_pad_batch), so no prompt and no last batch triggers a recompile.
        """
        opts = self.spec.model.compile
        from latte_ray.model.compiling import compile_transformer, node_compile_threads, node_gpus, set_compile_threads

        set_compile_threads(node_compile_threads(self.spec.execution.num_gpus_per_actor, gpus=node_gpus()))
        set_inductor_cache_dir(inductor_cache_dir(opts.cache_dir, self.cache_dir))
        kwargs = {"mode": opts.mode} if opts.backend == "inductor" else {}
        cuda_graphs = opts.uses_cuda_graphs and self.device.type == "cuda"
        if self.teacache is not None:
            # TeaCache runs the model in three parts, the blocks at a few fixed sub-batch sizes (teacache.py).
            self.teacache.compile(opts.backend, opts.mode, opts.fullgraph)
        elif self.spec.model.cache is not None:
            # FasterCache/PAB hooks decide per step in Python: compile the blocks, run the hooks outside the graphs.
            from latte_ray.model.acceleration import compile_under_hooks

            compile_under_hooks(self.pipe.transformer, opts.backend, opts.mode)
        else:
            self.transformer = compile_transformer(self.pipe.transformer, opts)  # model.compile.scope: whole|blocks
            if cuda_graphs:
                self.transformer = CudaGraphOutputs(self.transformer, "transformer")
        if opts.vae_decode:
            self.pipe.vae.decode = torch.compile(self.pipe.vae.decode, backend=opts.backend, dynamic=False, **kwargs)
            if cuda_graphs:
                self.pipe.vae.decode = CudaGraphOutputs(self.pipe.vae.decode, "VAE decode")
        started = time.perf_counter()
        seeds = list(range(self.spec.execution.batch_size))
        if self.teacache is not None:
            # One step per compiled sub-batch size, between a first and a last step on the whole batch.
            schedule = self.teacache.warm_up_schedule()
            self.teacache.script(schedule)
            try:
                self.denoise(self._warmup_text(), seeds, steps=len(schedule))
            finally:
                self.teacache.script(None)
        else:
            # With a hook cache the blocks see two batch shapes (both CFG halves, or FasterCache's conditional
            # half alone at steps inside its window): warm up over the full schedule so both are compiled now.
            steps = self.sampling.num_inference_steps if self.spec.model.cache else 2
            self.denoise(self._warmup_text(), seeds, steps=steps)
        self.warmup_seconds = time.perf_counter() - started
        log.info("compiled and warmed up in %.1fs", self.warmup_seconds)

    def _warmup_text(self) -> TextBatch:
        """Stand-in embeddings of the real shape (works without a text encoder in this actor)."""
        batch, length = self.spec.execution.batch_size, self.sampling.max_sequence_length
        width = self.pipe.transformer.config.caption_channels
        zeros = torch.zeros(batch, length, width, dtype=self.dtype, device=self.device)
        return TextBatch(zeros, zeros, torch.full((batch,), length), [length] * batch, [False] * batch)

    # ---- text --------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_text(self, prompts: list[str], negative_prompts: list[str]) -> TextBatch:
        """T5 embeddings of prompts and negative prompts, each padded to the same fixed length."""
        pipe, s = self.pipe, self.sampling
        length = s.max_sequence_length
        prompts = pipe._text_preprocessing(list(prompts), clean_caption=s.clean_caption)
        negatives = pipe._text_preprocessing(list(negative_prompts), clean_caption=s.clean_caption)
        pos, pos_mask = self._t5(prompts, length)
        neg, _ = self._t5(negatives, length)
        full = [len(ids) for ids in pipe.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        keep = pos_mask.sum(dim=1).cpu() if s.mask_feature else torch.full((len(prompts),), length)
        return TextBatch(
            embeds=pos.to(self.dtype),
            negative_embeds=neg.to(self.dtype),
            keep=keep,
            tokens=[min(n, length) for n in full],
            truncated=[n > length for n in full],
        )

    def _t5(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.pipe.tokenizer(
            texts, padding="max_length", max_length=length, truncation=True,
            return_attention_mask=True, add_special_tokens=True, return_tensors="pt",
        )
        mask = tok.attention_mask.to(self.device)
        hidden = self.pipe.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden, mask

    # ---- denoise + decode --------------------------------------------------------------------

    @torch.inference_mode()
    def denoise(self, text: TextBatch, seeds: list[int], steps: int | None = None,
                capture: dict | None = None) -> np.ndarray:
        """uint8 frames (B, F, H, W, 3); row i depends only on (text row i, seeds[i], spec).

        `capture`: when given, receives "latents": the final denoised latents (B, C, F, h, w) on the CPU, as the
        VAE got them (before its 1 / scaling_factor), for the sidecars (latte_ray/record/sidecars.py)."""
        pipe, s = self.pipe, self.sampling
        n = len(seeds)
        text, seeds = self._pad_batch(text, list(seeds))
        batch = len(seeds)
        cfg = s.guidance_scale > 1.0
        embeds = torch.cat([text.negative_embeds, text.embeds]) if cfg else text.embeds
        keep = torch.cat([text.keep, text.keep]) if cfg else text.keep
        if not self.spec.model.compile.enabled:
            # Eager shapes may vary: attend over the batch's longest prompt, not all max_sequence_length
            # tokens. Dropped columns are masked anyway, so each video is unchanged; a batch of one becomes
            # exactly the stock pipeline's call (padding cut, no mask).
            embeds = embeds[:, : int(keep.max())]
        positions = torch.arange(embeds.shape[1])
        bias = torch.zeros(keep.shape[0], 1, embeds.shape[1], dtype=embeds.dtype)
        bias.masked_fill_(positions[None, None, :] >= keep[:, None, None], float("-inf"))
        # The spatial blocks see (batch * frames) sequences; give each frame its video's mask.
        bias = bias.repeat_interleave(s.video_length, dim=0).to(self.device)
        # A mask only where there is something to mask (compiled graphs always take one): without it attention
        # can use its unmasked kernels. Left out of the call, not passed as None: FasterCache splits every
        # mask argument it is given into its CFG halves.
        needs_mask = self.spec.model.compile.enabled or bool((keep < embeds.shape[1]).any())
        masked = {"encoder_attention_mask": bias} if needs_mask else {}

        _reset_cache_state(pipe)  # also after a batch that raised mid-loop
        timesteps, _ = _retrieve_timesteps(pipe.scheduler, steps or s.num_inference_steps, self.device)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        latents = pipe.prepare_latents(
            batch, pipe.transformer.config.in_channels, s.video_length, s.height, s.width,
            embeds.dtype, self.device, generators,
        )
        extra = pipe.prepare_extra_step_kwargs(generators, s.eta)
        split_variance = keeps_noise_half(pipe.transformer.config, pipe.scheduler)
        if self.teacache is not None:
            self.teacache.start(videos=batch, real=n, cfg=cfg)
        for i, t in enumerate(timesteps):
            pipe._current_timestep = t
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = pipe.scheduler.scale_model_input(model_input, t)
            timestep = t[None].to(self.device).expand(model_input.shape[0])
            if self.teacache is not None:
                noise = self.teacache(model_input, embeds, timestep, masked.get("encoder_attention_mask"),
                                      s.enable_temporal_attentions, step=i, steps=len(timesteps))
            else:
                noise = self.transformer(
                    hidden_states=model_input,
                    encoder_hidden_states=embeds,
                    timestep=timestep,
                    **masked,
                    enable_temporal_attentions=s.enable_temporal_attentions,
                    return_dict=False,
                )[0]
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + s.guidance_scale * (cond - uncond)
            if split_variance:  # the model's output is [noise, variance]: the step takes the noise
                noise = noise.chunk(2, dim=1)[0]
            latents = pipe.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        pipe._current_timestep = None
        _reset_cache_state(pipe)
        if self.teacache is not None:
            self.last_transformer_calls = self.teacache.calls()
            self.teacache.state = None  # its residuals are the size of the batch's activations
        else:
            from latte_ray.model.acceleration import transformer_calls

            self.last_transformer_calls = [transformer_calls(self.spec.model.cache, timesteps, s.guidance_scale)] * n

        if capture is not None:
            capture["latents"] = latents[:n].cpu()
        video = pipe.decode_latents(latents, s.video_length, decode_chunk_size=s.decode_chunk_size)
        video = pipe.video_processor.postprocess_video(video=video, output_type="pt")  # (B, F, C, H, W) in [0, 1]
        frames = (video * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2)
        return frames[:n].cpu().numpy()

    def _pad_batch(self, text: TextBatch, seeds: list[int]) -> tuple[TextBatch, list[int]]:
        return pad_batch(text, seeds, self.spec.execution.batch_size, self.spec.model.compile.enabled)


def predicts_variance(transformer_config) -> bool:
    """Does the transformer predict a variance beside the noise? Decided from the model, as Latte's own
    sampling code does (`learn_sigma`: out_channels == 2 * in_channels), not from the scheduler's config."""
    return int(transformer_config.out_channels) == 2 * int(transformer_config.in_channels)


def keeps_noise_half(transformer_config, scheduler) -> bool:
    """Should the denoise loop drop the variance half of the model output before the scheduler step?

    diffusers' LattePipeline decides this from `scheduler.config.variance_type` and leaves all 8 channels in
    when it reads "learned_range", which Latte-1's DDIM config said at hub commit 86e75847 (at the pinned f8a2f04
    it says fixed_small, and the stock pipeline takes the noise half itself): DDIM's
    step then fails on the first step (4 vs 8 channels). Only DDPM's step reads a predicted variance itself
    (it splits a 2x-channel output when its variance_type is learned or learned_range); every other
    scheduler (DDIM, DPM-Solver, Euler, PNDM) wants the noise alone."""
    if not predicts_variance(transformer_config):
        return False
    from diffusers import DDPMScheduler

    consumes = isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type in ("learned", "learned_range")
    return not consumes


def _retrieve_timesteps(scheduler, steps: int, device: torch.device):
    from diffusers.pipelines.latte.pipeline_latte import retrieve_timesteps

    return retrieve_timesteps(scheduler, steps, device)


def _reset_cache_state(pipe) -> None:
    """Cache hooks (FasterCache, PAB) keep per-video state (step counters, cached attention outputs): clear
    it so a video never depends on the batch before it. diffusers' CacheMixin._reset_stateful_cache walks
    the transformer's HookRegistry and resets every stateful hook."""
    if getattr(pipe.transformer, "is_cache_enabled", False):
        pipe.transformer._reset_stateful_cache()
