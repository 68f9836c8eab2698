"""gpu: seconds per video at the production spec (pipelines/latte-1-t2v-512.yaml) with full-size Latte-1
shapes and random weights (nothing is downloaded), eager vs torch.compile vs cache acceleration.

Latte-1's real shapes: T5 v1.1 XXL text encoder (24 layers, d_model 4096), the Latte-XL/2 T2V transformer
(28 layers, 16 heads x 72, caption_channels 4096), the SD VAE (128-256-512-512); 16 frames at 512x512,
50 DDIM steps, guidance 7.5, fp16, batch 2. Weights are random, so videos are noise, but every kernel is
the one a real run launches; random fp16 T5 activations may overflow, which does not change the timing.
Prints each variant's s/video and its ratio to the published 14.6 s (compiled, A100 80GB, diffusers docs).
Without a CUDA device it says so and exits; `--cpu-smoke` runs the same code at toy sizes on the CPU to
check it works.

    .venv/bin/python benchmarks/gpu.py [--videos 4] [--variants eager compiled faster_cache compiled+faster_cache]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

from _common import machine

PUBLISHED_S_PER_VIDEO = 14.6

LATTE1_TRANSFORMER = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    cross_attention_dim=1152, attention_bias=True, sample_size=64, patch_size=2, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    caption_channels=4096, video_length=16,
)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              scaling_factor=0.18215)
LATTE1_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                        num_train_timesteps=1000)

SMOKE_TRANSFORMER = {**LATTE1_TRANSFORMER, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8,
                     "cross_attention_dim": 16, "caption_channels": 32, "sample_size": 8, "video_length": 2}
SMOKE_T5 = {**T5_XXL, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4}
SMOKE_VAE = {**SD_VAE, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4,
             "sample_size": 64}


def random_pipeline(device: str, dtype, smoke: bool):
    """A LattePipeline with Latte-1's architecture and random weights, built directly on `device`."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from latte_ray.model.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        text_encoder = T5EncoderModel(T5Config(**(SMOKE_T5 if smoke else T5_XXL))).to(dtype)
        transformer = LatteTransformer3DModel(**(SMOKE_TRANSFORMER if smoke else LATTE1_TRANSFORMER)).to(dtype)
        vae = AutoencoderKL(**(SMOKE_VAE if smoke else SD_VAE)).to(dtype)
    return LattePipeline(tokenizer=build_tiny_tokenizer(), text_encoder=text_encoder, vae=vae,
                         transformer=transformer, scheduler=DDIMScheduler(**LATTE1_SCHEDULER))


def variant_spec(base, variant: str, smoke: bool):
    from latte_ray.spec import parse_pipeline_spec

    raw = json.loads(base.model_dump_json())
    raw["model"]["compile"]["enabled"] = variant.startswith("compiled")
    raw["model"]["cache"] = {"kind": "faster_cache"} if variant.endswith("faster_cache") else None
    if smoke:
        raw["model"].update(device="cpu", dtype="float32")
        raw["model"]["compile"].update(backend="eager", vae_decode=False)
        raw["sampling"].update(num_inference_steps=2, height=64, width=64, video_length=2, decode_chunk_size=2)
    return parse_pipeline_spec(raw)


def time_variant(spec, videos: int, smoke: bool) -> dict:
    import torch

    from latte_ray.model.engine import DTYPES, LatteEngine

    device = "cpu" if smoke else "cuda"
    started = time.perf_counter()
    engine = LatteEngine(spec, pipe=random_pipeline(device, DTYPES[spec.model.dtype], smoke))
    batch = spec.execution.batch_size
    if not spec.model.compile.enabled:  # compiled engines warm up in __init__; give eager the same chance
        engine.generate(["warm-up"] * batch, [""] * batch, list(range(batch)), steps=2)
    ready = time.perf_counter() - started
    prompts = [f"a corgi surfing a wave at sunset, cinematic, prompt number {i}" for i in range(videos)]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    finite = True
    for i in range(0, videos, batch):
        frames, _ = engine.generate(prompts[i:i + batch], [""] * len(prompts[i:i + batch]), list(range(i, i + batch)))
        finite &= bool(frames.std() > 0)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"s_per_video": seconds / videos, "ready_s": ready, "peak_gib": peak, "nonflat": finite}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4, help="videos timed per variant (after warm-up)")
    ap.add_argument("--variants", nargs="+", default=["eager", "compiled", "faster_cache", "compiled+faster_cache"])
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU: checks the code, times nothing")
    args = ap.parse_args()

    import torch

    from latte_ray.spec import load_pipeline_spec

    print(f"machine: {machine()}")
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu benchmark skipped: no CUDA device visible (torch.cuda.is_available() is False)")
        return
    base = load_pipeline_spec("latte-1-t2v-512")
    s = base.sampling
    print(f"spec {base.name}: {s.video_length}x{s.height}x{s.width}, {s.num_inference_steps} steps, "
          f"{base.model.dtype}, batch {base.execution.batch_size}, compile mode {base.model.compile.mode}"
          + (" [CPU SMOKE: toy sizes]" if args.cpu_smoke else ""))
    results = {}
    for variant in args.variants:
        r = results[variant] = time_variant(variant_spec(base, variant, args.cpu_smoke), args.videos, args.cpu_smoke)
        print(f"{variant:>22}: {r['s_per_video']:7.2f} s/video, {r['s_per_video'] / PUBLISHED_S_PER_VIDEO:.2f}x "
              f"the published {PUBLISHED_S_PER_VIDEO} s; load+compile+warm-up {r['ready_s']:.0f}s; "
              f"peak {r['peak_gib']:.1f} GiB")
    if "eager" in results:
        for variant, r in results.items():
            print(f"speed-up of {variant} over eager: {results['eager']['s_per_video'] / r['s_per_video']:.2f}x")


if __name__ == "__main__":
    main()
