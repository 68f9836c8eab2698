"""A tiny random-weight WanPipeline, built entirely offline (`latte-ray tiny-model PATH --family wan`).

The published Wan 2.1 T2V configs (tests/data/wan/, checked in tests/test_wan.py) scaled down: the same classes
(UMT5 text encoder, WanTransformer3DModel, AutoencoderKLWan with its published latents_mean/latents_std, the
flow-matching UniPC scheduler of the published scheduler_config.json) with toy widths and depths, so a 17-frame
64x64 video takes well under a second on a CPU. Weights are random but fixed by the seed, and the tokenizer is
the Latte tiny model's fixed-vocabulary T5 tokenizer (model/tiny.py), so every process builds the same model.
Saved like the tiny Latte (model/tiny.py's save_atomically: marker, refuses folders it did not make).
"""

from __future__ import annotations

import os
from pathlib import Path

from latte_ray.model.tiny import cache_root, ensure_built, save_atomically

TINY_WAN_VERSION = "v1"
VIDEO_LENGTH = 17  # 4k + 1 frames: the VAE's temporal scale factor is 4
RESOLUTION = 64
TEXT_DIM = 32  # UMT5 d_model, which is also the transformer's text_dim
MAX_SEQUENCE_LENGTH = 32

# Published values kept as they are (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, tests/data/wan/SOURCE.md).
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
               1.6382, 1.1253, 2.8251, 1.916]
SCHEDULER = {  # the published scheduler_config.json's settings (UniPCMultistepScheduler, flow prediction)
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True,
    "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
TRANSFORMER = {  # published: heads 12, head dim 128, ffn 8960, 30 layers, text_dim 4096 (1.3B)
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 16,
    "out_channels": 16, "text_dim": TEXT_DIM, "freq_dim": 32, "ffn_dim": 48, "num_layers": 2,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 32,
}
VAE = {  # published: base_dim 96, dim_mult [1, 2, 4, 4], 2 res blocks
    "base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_scales": [],
    "temperal_downsample": [False, True, True], "dropout": 0.0, "latents_mean": LATENTS_MEAN,
    "latents_std": LATENTS_STD,
}
TEXT_ENCODER = {  # published: UMT5-XXL, d_model 4096, 24 layers, 64 heads, d_ff 10240, 32 buckets
    "d_model": TEXT_DIM, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 128, "dropout_rate": 0.0, "feed_forward_proj": "gated-gelu",
    "scalable_attention": True, "tie_word_embeddings": False, "layer_norm_epsilon": 1e-6,
}


def model_configs() -> dict[str, dict]:
    """The parts of the saved configs that driver-side checks read (model/configs.py), without building it."""
    return {
        "model_index": {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                        "text_encoder": ["transformers", "UMT5EncoderModel"], "vae": ["diffusers", "AutoencoderKLWan"],
                        "transformer_2": [None, None], "boundary_ratio": None, "expand_timesteps": False},
        "transformer": {**TRANSFORMER, "patch_size": list(TRANSFORMER["patch_size"])},
        "text_encoder": {"d_model": TEXT_DIM},
        "vae": {**VAE, "scale_factor_temporal": 4, "scale_factor_spatial": 8},
        "transformer_2": None,
    }


def ensure_tiny_wan(cache_dir: str | os.PathLike | None = None) -> Path:
    """The tiny Wan's folder in the cache, built on first use; safe to call from many processes at once."""
    return ensure_built(cache_root(cache_dir) / f"tiny-wan-{TINY_WAN_VERSION}", save_tiny_wan)


def save_tiny_wan(path: str | os.PathLike, experts: int = 1) -> Path:
    """Build the tiny Wan pipeline and save it to `path` (safetensors only), as save_tiny_model does."""
    return save_atomically(path, lambda folder: build_tiny_wan(experts=experts).save_pretrained(
        folder, safe_serialization=True))


# The two-expert variant's switch: diffusers' WanPipeline runs `transformer` while the timestep is at or above
# boundary_ratio x 1000 and `transformer_2` below. A tiny-model choice (Wan 2.2 A14B's own model_index.json is not
# vendored, tests/data/wan/SOURCE.md): with the scheduler's flow_shift 3 a 4-step schedule (1000, 900, 750, 500)
# gives each expert two steps.
TWO_EXPERT_BOUNDARY = 0.8


def build_tiny_wan(seed: int = 0, experts: int = 1):
    """A random-weight WanPipeline; the same seed gives the same weights in any process. `experts=2`: Wan 2.2
    A14B's layout at toy size, a second WanTransformer3DModel (transformer_2, other random weights) and a
    boundary_ratio."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from latte_ray.model.tiny import build_tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, **TEXT_ENCODER,
    ))
    vae = AutoencoderKLWan(**VAE)
    transformer = WanTransformer3DModel(**TRANSFORMER)
    scheduler = UniPCMultistepScheduler.from_config(SCHEDULER)
    second = WanTransformer3DModel(**TRANSFORMER) if experts == 2 else None
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler, transformer_2=second,
                       boundary_ratio=TWO_EXPERT_BOUNDARY if second is not None else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe
