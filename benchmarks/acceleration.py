"""acceleration: the quality gate for every speed-up - fixed prompts under a baseline spec and under each
candidate (cache kinds, TeaCache thresholds, quantization kinds), compared in one run.

Per candidate it prints PSNR and SSIM of the decoded frames against the baseline, the CLIP score change when
a scorer is importable (else n/a), transformer calls per video (what the manifest's `transformer_calls`
records) and seconds per video, with ratios to the baseline measured in the same run (latte_ray/ops/compare.py
does the work; batches go round-robin over the loaded engines so neighbours' load hits all alike).

TeaCache's rescaling polynomial is fitted per model. `teacache:T` uses the spec's default, TeaCache's
published fit for Latte-1; `teacache-fit:T` uses a polynomial fitted in this run on the pipeline's own model
(teacache.fit_coefficients, on prompts and seeds other than the evaluated ones), which is what a model of
another size needs - the tiny random-weight model's steps change its input far more than Latte-1's do.

    .venv/bin/python benchmarks/acceleration.py [--pipeline tiny-cpu] [--prompts 8] [--threads 0]
        [--candidates faster_cache pyramid_attention_broadcast teacache:0 teacache:0.1 teacache-fit:0.2 ...]
        [--steps N] [--min-psnr 30]   # exit 1 when a candidate that ran falls below (the gate)

Random weights say nothing about visual quality: on the tiny model the figures check the machinery (which
options change pixels, by how much relative to each other, how many calls they save), not what a viewer sees.
"""

from __future__ import annotations

import argparse
import json
import sys

from _common import machine

DEFAULT_CANDIDATES = [
    "faster_cache", "pyramid_attention_broadcast", "teacache:0", "teacache:0.1", "teacache:0.2",
    "teacache-fit:0.15", "teacache-fit:0.2", "teacache-fit:0.3", "teacache-fit:0.5", "int8_weight_only", "int8_dynamic",
    "float8_weight_only", "float8_dynamic",
]
PROMPTS = [
    "a corgi surfing a wave at sunset, cinematic",
    "time lapse of clouds over a mountain lake",
    "a red fox runs through snowy woods at dawn",
    "close up of a chef cooking in a busy kitchen",
    "an astronaut riding a horse on the moon",
    "neon city street at night in the rain, 4k",
    "a paper boat floating down a river",
    "aerial view of waves breaking on a rocky beach",
]
FIT_PROMPTS = ["a dog playing in a park", "fireworks over a harbour", "a cat sleeping on a sofa",
               "a train crossing a bridge"]


def candidate_spec(base, name: str, fitted: tuple[float, ...] | None):
    """The base spec with one option on, named as on the command line."""
    from latte_ray.spec import QUANTIZATION_KINDS, parse_pipeline_spec

    raw = json.loads(base.model_dump_json())
    model = raw["model"]
    kind, _, arg = name.partition(":")
    if kind in ("faster_cache", "pyramid_attention_broadcast"):
        model["cache"] = {"kind": kind}
    elif kind in ("teacache", "teacache-fit"):
        model["cache"] = {"kind": "teacache", "threshold": float(arg or 0.1)}
        if kind == "teacache-fit":
            model["cache"]["coefficients"] = list(fitted)
    elif kind in QUANTIZATION_KINDS:
        model["quantization"] = {"kind": kind}
        if QUANTIZATION_KINDS[kind][1] and model["device"] == "cpu":
            model["device"] = "auto"  # float8: let the engine's device check say whether this machine can
    else:
        raise SystemExit(f"unknown candidate {name!r}; known: {', '.join(DEFAULT_CANDIDATES)}")
    return parse_pipeline_spec(raw, origin=name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="tiny-cpu", help="baseline pipeline spec (name or YAML path)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    ap.add_argument("--prompts", type=int, default=8, help=f"videos per candidate (cycles the {len(PROMPTS)} prompts)")
    ap.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES)
    ap.add_argument("--clip", default="spec", help="CLIP scores: 'spec' (the baseline spec's scoring section; "
                    "tiny random weights by default), a scoring YAML (latte-ray score --scoring), or 'off'")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    ap.add_argument("--sequential", action="store_true", help="load one engine at a time (large models)")
    ap.add_argument("--min-psnr", type=float, default=None, help="exit 1 when a candidate's PSNR is below this")
    args = ap.parse_args()

    import torch

    from latte_ray.model.families.latte_engine import LatteEngine
    from latte_ray.model.teacache import fit_coefficients
    from latte_ray.ops.compare import Candidate, markdown, run_candidates, summarize
    from latte_ray.datasets.scoring import load_scoring_spec
    from latte_ray.spec import load_pipeline_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_pipeline_spec(args.pipeline)
    if args.steps:
        base = base.model_copy(update={"sampling": base.sampling.model_copy(update={"num_inference_steps": args.steps})})
    s = base.sampling
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    print(f"baseline {base.name} ({base.spec_hash()}): {base.model.source}, {s.video_length}x{s.height}x{s.width}, "
          f"{s.num_inference_steps} steps, guidance {s.guidance_scale}, {base.model.dtype} on {base.model.device}, "
          f"batch {base.execution.batch_size}, compile {base.model.compile.enabled}; {args.prompts} videos each")
    fitted = None
    if any(c.startswith("teacache-fit") for c in args.candidates):
        fit_engine = LatteEngine(candidate_spec(base, "teacache:0", None))
        fitted = fit_coefficients(fit_engine, FIT_PROMPTS, [1000 + i for i in range(len(FIT_PROMPTS))])
        del fit_engine
        print(f"teacache-fit: coefficients fitted on {len(FIT_PROMPTS)} other prompts/seeds of this model: "
              f"[{', '.join(f'{c:.6g}' for c in fitted)}]")
    candidates = [Candidate("baseline", base)] + [Candidate(n, candidate_spec(base, n, fitted)) for n in args.candidates]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    seeds = list(range(args.prompts))
    run_candidates(candidates, prompts, seeds, negative=s.negative_prompt, interleave=not args.sequential)
    scoring = None if args.clip == "off" else base.scoring if args.clip == "spec" else load_scoring_spec(args.clip)
    if scoring is not None:
        print(f"CLIP: {scoring.clip_model} ({'random weights: the change measures nothing visual' if scoring.clip_model == 'tiny' else scoring.dtype})")
    rows = summarize(candidates, prompts, scoring)
    print(markdown(rows))
    print("PSNR/SSIM: decoded uint8 frames against the baseline's, same prompts and seeds; fewer calls and "
          "speed-up: baseline / candidate, measured in this run. Random weights say nothing about visual quality.")
    if args.min_psnr is not None:
        failed = [r.name for r in rows[1:] if not r.skipped and r.psnr_all < args.min_psnr]
        if failed:
            print(f"gate: {', '.join(failed)} below {args.min_psnr} dB PSNR")
            sys.exit(1)
        print(f"gate: every candidate that ran is at or above {args.min_psnr} dB PSNR")


if __name__ == "__main__":
    main()
