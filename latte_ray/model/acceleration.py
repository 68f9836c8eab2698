"""Cache acceleration: diffusers' FasterCache or Pyramid Attention Broadcast hooks on the Latte transformer,
or TeaCache (latte_ray/model/teacache.py, the engine's own per-video implementation).

FasterCache and PAB reuse attention outputs from earlier denoising steps inside a timestep window, trading a
little fidelity for speed (diffusers' tables for Latte: FasterCache ~1.31x, PAB ~1.15x); FasterCache also
skips the unconditional half of the batch at some steps and extrapolates it. They change pixels, so the
cache settings are part of the spec hash and the manifest's `cache` column names the kind. The hooks keep
per-video state; the engine resets it before and after every batch (latte_engine._reset_cache_state).
"""

from __future__ import annotations

from latte_ray.spec import CacheSpec

HOOK_KINDS = ("faster_cache", "pyramid_attention_broadcast")


def _faster_cache_config(cache: CacheSpec, guidance_scale: float, current_timestep=lambda: None):
    from diffusers import FasterCacheConfig

    weight = cache.attention_weight
    return FasterCacheConfig(
        spatial_attention_block_skip_range=cache.spatial_attention_block_skip_range,
        spatial_attention_timestep_skip_range=cache.spatial_attention_timestep_skip_range,
        current_timestep_callback=current_timestep,
        attention_weight_callback=lambda _module: weight,
        tensor_format="BCFHW",  # Latte's latents: (batch, channels, frames, height, width)
        # Without classifier-free guidance there is no unconditional half of the batch to skip.
        is_guidance_distilled=guidance_scale <= 1.0,
    )


def enable_cache(pipe, cache: CacheSpec, guidance_scale: float = 7.5) -> None:
    """Attach the spec's cache hook to `pipe.transformer`; it reads the step from `pipe.current_timestep`."""
    from diffusers import PyramidAttentionBroadcastConfig

    if cache.kind not in HOOK_KINDS:
        raise ValueError(f"cache kind {cache.kind!r} is not a diffusers hook (teacache runs in the engine)")

    def current_timestep():
        return pipe.current_timestep

    if cache.kind == "faster_cache":
        config = _faster_cache_config(cache, guidance_scale, current_timestep)
    else:
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=cache.spatial_attention_block_skip_range,
            spatial_attention_timestep_skip_range=cache.spatial_attention_timestep_skip_range,
            current_timestep_callback=current_timestep,
        )
    pipe.transformer.enable_cache(config)


def compile_under_hooks(transformer, backend: str, mode: str | None = None) -> int:
    """torch.compile a transformer that carries FasterCache or PAB hooks, so that it compiles a fixed set of
    graphs once and never again. Returns how many blocks were compiled.

    Why not `torch.compile(transformer)`: the hooks decide per step in Python (is the timestep inside the
    window, is the step counter a multiple of the skip range, is the cache filled yet), and dynamo guards on
    those values: a tensor timestep in the range check is a data-dependent branch (a graph break), and every
    new value of the hooks' `iteration` counter fails a guard and recompiles. Measured on the tiny model
    (tests/test_throughput.py): FasterCache recompiled at every step until dynamo's recompile limit (8) and
    then ran the frame eagerly for good; a graph break inside the transformer's loop over blocks also made
    dynamo skip its whole `forward` (it cannot resume inside a loop), so nothing of the top module was
    compiled. Here instead:
    - every module a hook is attached to (the attention layers the cache reuses) runs its hooked forward under
      `torch.compiler.disable`: the hook's decision and, when it computes, that attention layer run eagerly,
      as diffusers' own newer caches (first_block_cache, mag_cache) disable their decision functions;
    - each transformer block (spatial and temporal) is compiled on its own ("regional compilation"): every
      block shares one code object, so dynamo compiles its graphs once for all 28 blocks; they differ only
      by shape (spatial or temporal sequences; both CFG halves, or FasterCache's conditional half alone);
    - the top module's `forward` (FasterCache's denoiser hook splits the CFG batch there) stays eager.
    What is compiled: the blocks' norms, AdaLN modulation, cross-attention and feed-forward; what is not:
    the hooked self-attention layers (mostly matmuls and SDPA, kernels eager already runs)."""
    import torch

    kwargs = {"mode": mode} if backend == "inductor" and mode else {}
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if module is not transformer and registry is not None and registry.hooks:
            module.forward = torch.compiler.disable(module.forward)
    blocks = [*transformer.transformer_blocks, *transformer.temporal_transformer_blocks]
    for block in blocks:
        block.compile(backend=backend, dynamic=False, **kwargs)
    return len(blocks)


def transformer_calls(cache: CacheSpec | None, timesteps, guidance_scale: float) -> int:
    """Transformer calls one video makes over `timesteps` with no cache or a diffusers hook cache: rows of
    the video that go through the transformer, summed over steps (a CFG half at one step is one call).

    No cache and PAB: every step, both halves. FasterCache skips the unconditional half at step i when
    i > 0, the timestep lies inside unconditional_batch_timestep_skip_range and i is not a multiple of
    unconditional_batch_skip_range (diffusers' FasterCacheDenoiserHook.new_forward); the numbers are read
    from the same FasterCacheConfig the hook gets. tests/test_acceleration.py counts the rows that reach
    the transformer's patch embedding and checks this against them."""
    cfg = guidance_scale > 1.0
    halves = 2 if cfg else 1
    if cache is None or cache.kind != "faster_cache" or not cfg:
        return halves * len(timesteps)
    config = _faster_cache_config(cache, guidance_scale)
    lo, hi = config.unconditional_batch_timestep_skip_range
    calls = 0
    for i, t in enumerate(timesteps):
        skip = i > 0 and lo < float(t) < hi and i % config.unconditional_batch_skip_range != 0
        calls += 1 if skip else 2
    return calls
