"""Wan's FLOP and memory model per built-in spec (latte_ray/model/families/wan_figures.py), offline.

Reads the published configs vendored in tests/data/wan/ (see its SOURCE.md) instead of the hub, so it runs
anywhere; where a spec's repo lacks a vendored file, the same architecture's published file stands in and the
table says which. Prints one row per spec: FLOPs per video (UMT5, transformer per call and per video, VAE
decode), the estimate at the spec's execution.sustained_tflops, and the memory model's figures.

    .venv/bin/python benchmarks/wan_figures.py [--specs wan2.1-t2v-1.3b ...] [--batch-size 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data" / "wan"
SPECS = ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b"]
# Where a repo's own file is missing: the published file of the same architecture (SOURCE.md).
STAND_INS = {
    ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "transformer/config.json"):
        ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "transformer_2/config.json"),  # 14B: 40 x 40 heads x 128, ffn 13824
    ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "transformer/config.json"):
        ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "transformer_2/config.json"),  # the two experts share one config
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "text_encoder/config.json"):
        ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "text_encoder/config.json"),
    ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "vae/config.json"):
        ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae/config.json"),  # the Wan 2.1 VAE, one for every 2.1 model
    ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "vae/config.json"):
        ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae/config.json"),  # A14B decodes with the Wan 2.1 VAE (z_dim 16)
    ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "text_encoder/config.json"):
        ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "text_encoder/config.json"),  # the same UMT5-XXL
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "text_encoder/config.json"):
        ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "text_encoder/config.json"),
}


# TI2V-5B's vae/config.json could not be read (SOURCE.md): its geometry alone, from the model authors' config
# (https://raw.githubusercontent.com/Wan-Video/Wan2.2/main/wan/configs/wan_ti2v_5B.py: vae_stride = (4, 16, 16)).
GEOMETRY_ONLY = {"Wan-AI/Wan2.2-TI2V-5B-Diffusers": {"scale_factor_temporal": 4, "scale_factor_spatial": 16}}


def vendored(repo: str, rel: str) -> tuple[dict | None, str]:
    for r, f in ((repo, rel), STAND_INS.get((repo, rel), (None, None))):
        if r and (DATA / r.replace("/", "--") / f).exists():
            return json.loads((DATA / r.replace("/", "--") / f).read_text()), ("own" if r == repo else f"{r}'s")
    return None, "missing"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="*", default=SPECS)
    parser.add_argument("--batch-size", type=int, default=None, help="Override execution.batch_size.")
    args = parser.parse_args()

    from latte_ray.model.families.wan_figures import figures, flops_words
    from latte_ray.spec import load_pipeline_spec

    print(f"# machine: {time.strftime('%Y-%m-%d')}; FLOPs counted by torch's FlopCounterMode on meta-device models")
    print("| spec | size | UMT5 (2 prompts) | transformer per call | calls | transformer per video | VAE decode | "
          "per video | est. s/video at sustained TFLOP/s | weights GB | activations GB (denoise / VAE) | configs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.specs:
        spec = load_pipeline_spec(name)
        if args.batch_size:
            spec = spec.with_overrides(batch_size=args.batch_size)
        repo = spec.model.source
        transformer, t_from = vendored(repo, "transformer/config.json")
        if transformer and transformer.get("image_dim") is not None and transformer["in_channels"] == 48:
            # The vendored TI2V-5B copy comes from an image-to-video repackaging (SOURCE.md): its image projections
            # cannot run in WanPipeline's text-to-video call (no image tokens), so the stock TI2V-5B text-to-video
            # path has none; counted without them.
            transformer = {**transformer, "image_dim": None, "added_kv_proj_dim": None}
            t_from += " (image projections dropped)"
        text, e_from = vendored(repo, "text_encoder/config.json")
        vae, v_from = vendored(repo, "vae/config.json")
        if vae is None and repo in GEOMETRY_ONLY:
            vae, v_from = GEOMETRY_ONLY[repo], "missing (stride (4, 16, 16) from Wan-Video/Wan2.2's wan_ti2v_5B.py)"
        experts = 2 if spec.sampling.guidance_scale_2 is not None else 1
        f = figures(spec, transformer, text, vae, experts=experts)
        s = spec.sampling
        rate = spec.execution.sustained_tflops
        est = f"{f.per_video / (rate * 1e12):.0f} s at {rate:g}" if rate and f.vae_decode is not None else "n/a"
        vae_flops = flops_words(f.vae_decode) if f.vae_decode is not None else "n/a (VAE config missing)"
        print(f"| {name} | {s.video_length} x {s.height} x {s.width}, {s.num_inference_steps} steps | "
              f"{flops_words(f.t5)} | {flops_words(f.transformer_per_forward)} | {f.forwards_per_video} | "
              f"{flops_words(f.transformer)} | {vae_flops} | {flops_words(f.per_video)}"
              f"{'' if f.vae_decode is not None else ' + VAE'} | {est} | {f.weights_bytes / 1e9:.1f} | "
              f"{f.denoise_activations / 1e9:.1f} / {f.vae_activations / 1e9:.1f} | "
              f"transformer {t_from}, UMT5 {e_from}, VAE {v_from} |")


if __name__ == "__main__":
    main()
