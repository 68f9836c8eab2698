"""gpu: seconds per video at the production spec (pipelines/latte-1-t2v-512.yaml) with full-size Latte-1
shapes and random weights (nothing is downloaded), for every speed option: eager, compiled (the production
default), FasterCache, Pyramid Attention Broadcast, TeaCache at two thresholds, and int8 / float8 weights.

Latte-1's real shapes: T5 v1.1 XXL text encoder (24 layers, d_model 4096), the Latte-XL/2 T2V transformer
(28 layers, 16 heads x 72, caption_channels 4096), the SD VAE (128-256-512-512); 16 frames at 512x512,
50 DDIM steps, guidance 7.5, fp16, batch 2. Weights are random, so videos are noise, but every kernel is
the one a real run launches; random fp16 T5 activations may overflow, which does not change the timing.
TeaCache's skips depend on how the model's input changes between steps, which random weights do not
reproduce: its calls/video and s/video here are the machinery's cost, not Latte-1's speed-up, unless
`--model-dir` points at the real weights (a save_pretrained folder of maxin-cn/Latte-1).

Per variant it prints s/video and 14.6 s / that (the published compiled A100-80GB figure, diffusers docs;
above 1 is faster), transformer calls per video, peak GPU memory, and the largest batch estimated to fit
the GPU: (free memory - memory held before generating) / (activation memory per video at the spec's batch),
assuming activations grow linearly with the batch (labelled "est."). Without a CUDA device it says so and
exits; `--cpu-smoke` runs every variant at toy sizes on the CPU to check the code (float8 variants then
show the device check refusing them).

    .venv/bin/python benchmarks/gpu.py [--videos 4] [--variants compiled teacache:0.1 float8_dynamic ...]
        [--compile-mode default] [--model-dir /models/latte-1] [--cpu-smoke]

Every variant compiles (inductor, several minutes each at max-autotune); `--compile-mode default` compiles
faster at some speed cost, `--variants` picks a subset.
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


VARIANTS = ["eager", "compiled", "faster_cache", "pyramid_attention_broadcast", "teacache:0.1", "teacache:0.2",
            "int8_weight_only", "int8_dynamic", "float8_weight_only", "float8_dynamic", "float8_dynamic+teacache:0.1"]


def variant_spec(base, variant: str, smoke: bool, compile_mode: str | None = None, model_dir: str | None = None):
    """The production spec with one variant's options: `eager`, `compiled`, or options joined by '+'
    (a cache kind, `teacache:THRESHOLD`, a quantization kind), compiled."""
    from latte_ray.spec import QUANTIZATION_KINDS, parse_pipeline_spec

    raw = json.loads(base.model_dump_json())
    model = raw["model"]
    model["compile"]["enabled"] = variant != "eager"
    if compile_mode:
        model["compile"]["mode"] = compile_mode
    if model_dir:
        model["source"] = model_dir
    for option in variant.split("+"):
        kind, _, arg = option.partition(":")
        if kind in ("eager", "compiled"):
            continue
        if kind in ("faster_cache", "pyramid_attention_broadcast"):
            model["cache"] = {"kind": kind}
        elif kind == "teacache":
            model["cache"] = {"kind": "teacache", "threshold": float(arg or 0.1)}
        elif kind in QUANTIZATION_KINDS:
            model["quantization"] = {"kind": kind}
        else:
            raise SystemExit(f"unknown variant option {option!r}; variants look like {', '.join(VARIANTS)}")
    if smoke:
        needs_float8 = model["quantization"] and QUANTIZATION_KINDS[model["quantization"]["kind"]][1]
        # float8 on a CPU is refused by the spec; 'auto' lets the engine's device check refuse it instead.
        model.update(device="auto" if needs_float8 else "cpu", dtype="float32")
        model["compile"].update(backend="eager", vae_decode=False)
        raw["sampling"].update(num_inference_steps=4, height=64, width=64, video_length=2, decode_chunk_size=2)
    return parse_pipeline_spec(raw, origin=variant)


def time_variant(spec, videos: int, smoke: bool, model_dir: str | None) -> dict:
    import torch

    from latte_ray.model.engine import DTYPES, LatteEngine
    from latte_ray.model.quantize import QuantizationUnsupported

    device = "cpu" if smoke else "cuda"
    started = time.perf_counter()
    pipe = None if model_dir else random_pipeline(device, DTYPES[spec.model.dtype], smoke)
    try:
        engine = LatteEngine(spec, pipe=pipe)
    except QuantizationUnsupported as e:
        return {"skipped": str(e)}
    batch = spec.execution.batch_size
    if not spec.model.compile.enabled:  # compiled engines warm up in __init__; give eager the same chance
        engine.generate(["warm-up"] * batch, [""] * batch, list(range(batch)), steps=2)
    ready = time.perf_counter() - started
    prompts = [f"a corgi surfing a wave at sunset, cinematic, prompt number {i}" for i in range(videos)]
    held = 0.0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    t = time.perf_counter()
    nonflat, calls = True, []
    for i in range(0, videos, batch):
        chunk = prompts[i:i + batch]
        frames, _ = engine.generate(chunk, [""] * len(chunk), list(range(i, i + len(chunk))))
        nonflat &= bool(frames.std() > 0)
        calls += engine.last_transformer_calls
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    result = {"s_per_video": seconds / videos, "ready_s": ready, "nonflat": nonflat,
              "calls": sum(calls) / len(calls), "peak_gib": float("nan"), "largest_batch": None}
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        free, total = torch.cuda.mem_get_info()
        per_video = max(peak - held, 1) / batch  # activations of one video (compiled batches are padded to batch)
        result["peak_gib"] = peak / 2**30
        result["largest_batch"] = int((total * 0.95 - held) // per_video)
    del engine, pipe
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4, help="videos timed per variant (after warm-up)")
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--compile-mode", default=None, help="override the spec's compile mode (e.g. default)")
    ap.add_argument("--model-dir", default=None, help="real Latte-1 weights (save_pretrained folder) instead of random")
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
          f"{base.model.dtype}, batch {base.execution.batch_size}, compile mode "
          f"{args.compile_mode or base.model.compile.mode}; weights: {args.model_dir or 'random, full size'}"
          + (" [CPU SMOKE: toy sizes]" if args.cpu_smoke else ""))
    results = {}
    for variant in args.variants:
        spec = variant_spec(base, variant, args.cpu_smoke, args.compile_mode, args.model_dir)
        r = results[variant] = time_variant(spec, args.videos, args.cpu_smoke, args.model_dir)
        if "skipped" in r:
            print(f"{variant:>28}: not run: {r['skipped']}")
            continue
        fits = f"~{r['largest_batch']} (est.)" if r["largest_batch"] is not None else "n/a"
        print(f"{variant:>28}: {r['s_per_video']:7.2f} s/video, {PUBLISHED_S_PER_VIDEO / r['s_per_video']:.2f}x the "
              f"published {PUBLISHED_S_PER_VIDEO} s; {r['calls']:.0f} transformer calls/video; load+compile+warm-up "
              f"{r['ready_s']:.0f}s; peak {r['peak_gib']:.1f} GiB; largest batch {fits}"
              + ("" if r["nonflat"] else "; WARNING: flat frames"))
    base_name = "compiled" if "compiled" in results and "skipped" not in results["compiled"] else None
    if base_name:
        for variant, r in results.items():
            if "skipped" not in r:
                print(f"speed-up of {variant} over compiled: "
                      f"{results[base_name]['s_per_video'] / r['s_per_video']:.2f}x")


if __name__ == "__main__":
    main()
