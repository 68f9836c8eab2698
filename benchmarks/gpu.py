"""gpu: seconds per video and peak memory at the production spec (pipelines/latte-1-t2v-512.yaml) with
full-size Latte-1 shapes and random weights (nothing is downloaded), within a time budget: a lent GPU has
15 minutes in all, machine start included, so the plan fits 8 (`--budget-s 480`).

Latte-1's shapes come from its published configs (tests/data/latte-1/, see SOURCE.md there): T5 v1.1 XXL
encoder, the Latte-XL/2 T2V transformer (28 layers, 16 heads x 72, caption_channels 4096), the SD VAE; 16
frames at 512x512, 50 steps, guidance 7.5, fp16. T5's `wo` layers are kept in fp32 as transformers keeps
them when it loads the real weights in fp16. Weights are random, so videos are noise, but every kernel is
the one a real run launches; TeaCache's skips depend on how the model's input changes between steps, which
random weights do not reproduce (its calls/video here are the machinery's cost) unless `--model-dir` points
at the real weights (a save_pretrained folder of maxin-cn/Latte-1).

The plan, cheapest and most important first; each variant runs in a process of its own (no dynamo or CUDA
state shared between variants), and its result is appended to the results file (JSON Lines, `--out`) as soon
as it ends, so a session that is cut short still returns what it measured:
  1. eager fp16, batch 1                          - the baseline, no compile
  2. compiled, mode default, batch 2              - the production shape (inductor, default mode compiles fastest)
  3. batch sweep, eager, 8 / 16 / 32              - while memory.py predicts it fits the GPU, until one runs
                                                    out of memory (4 steps each: memory, and s/step)
  4. TeaCache 0.1, eager, batch 2
  5. float8 dynamic (torchao), eager, batch 2     - refused on GPUs below compute capability 8.9
A variant whose budgeted seconds no longer fit in what is left is skipped (and says so); a running one is
stopped at the budget. Per variant: s/video, 14.6 s / that (the published compiled A100-80GB figure,
diffusers docs; above 1 is faster), transformer calls per video, load+compile+warm-up seconds, and the peak
GPU memory measured (torch.cuda.max_memory_allocated) next to the one predicted from the configs by
latte_ray/model/memory.py (weights + the larger of a denoise step's and a VAE decode's activations).

    .venv/bin/python benchmarks/gpu.py --plan                    # print the plan and its budget, run nothing
    .venv/bin/python benchmarks/gpu.py --budget-s 480 --out $OUT/gpu.jsonl
    .venv/bin/python benchmarks/gpu.py --device cpu --out /tmp/gpu-smoke.jsonl   # toy sizes on the CPU

`--device cpu` runs the same plan at toy sizes (compile backend eager) to check the subprocess and results
path in under a minute; its numbers time nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _common import REPO, machine

PUBLISHED_S_PER_VIDEO = 14.6
LATTE1 = REPO / "tests" / "data" / "latte-1"  # Latte-1's published configs


def published(component: str) -> dict:
    return json.loads((LATTE1 / component / "config.json").read_text())


# DDIM as Latte-1's pipeline runs it (linear betas 1e-4..0.02 over 1000 steps, no clipping).
LATTE1_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                        num_train_timesteps=1000)

# --device cpu: the same architecture at toy widths.
SMOKE = {
    "transformer": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16,
                    "caption_channels": 32, "sample_size": 8},
    "text_encoder": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4},
    "vae": {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64},
}


def configs(smoke: bool) -> dict[str, dict]:
    out = {c: published(c) for c in ("transformer", "text_encoder", "vae")}
    if smoke:
        out = {c: {**cfg, **SMOKE[c]} for c, cfg in out.items()}
    return out


@dataclass
class Step:
    name: str
    variant: str  # eager | compiled | teacache:T | a quantization kind (joined by '+')
    batch: int
    budget_s: float  # seconds this variant is given: build + compile + warm-up + timing, with headroom
    steps: int | None = None  # None: the spec's 50
    mode: str | None = None  # compile mode override
    sweep: bool = False


def plan(smoke: bool) -> list[Step]:
    """The budgeted plan. Seconds are allowances for an H100/H200-class GPU (random init of 5.9B parameters
    ~15 s, an eager 50-step batch-1 video ~10-20 s, an inductor default-mode compile of 28 block pairs and
    the VAE decoder 2-3 min), not measurements; they add up to 480 s."""
    steps = [
        Step("eager-b1", "eager", 1, 60),
        Step("compiled-default-b2", "compiled", 2, 180, mode="default"),
        Step("sweep-eager-b8", "eager", 8, 40, steps=4, sweep=True),
        Step("sweep-eager-b16", "eager", 16, 45, steps=4, sweep=True),
        Step("sweep-eager-b32", "eager", 32, 55, steps=4, sweep=True),
        Step("teacache-0.1-b2", "teacache:0.1", 2, 50),
        Step("float8_dynamic-b2", "float8_dynamic", 2, 50),
    ]
    if smoke:  # a fresh interpreter importing torch, diffusers and latte_ray takes most of it on a small CPU
        for s in steps:
            s.budget_s = 60
    return steps


# ---- one variant, in its own process ------------------------------------------------------------------------


def random_pipeline(device: str, dtype, cfg: dict[str, dict]):
    """A LattePipeline with Latte-1's architecture and random weights, built directly on `device`, each
    component in the dtype from_pretrained would give it (T5's wo in fp32 under fp16)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from latte_ray.model.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        text_encoder = T5EncoderModel(T5Config(**{k: v for k, v in cfg["text_encoder"].items()
                                                  if not k.startswith("_")})).to(dtype)
        keep = text_encoder._get_dtype_plan(dtype)
        for name, module in text_encoder.named_modules():
            if name.split(".")[-1] in keep:
                module.to(keep[name.split(".")[-1]])
        transformer = LatteTransformer3DModel.from_config(cfg["transformer"]).to(dtype)
        vae = AutoencoderKL.from_config(cfg["vae"]).to(dtype)
    return LattePipeline(tokenizer=build_tiny_tokenizer(), text_encoder=text_encoder, vae=vae,
                         transformer=transformer, scheduler=DDIMScheduler(**LATTE1_SCHEDULER))


def variant_spec(base, step: Step, smoke: bool, model_dir: str | None = None):
    """The production spec with one variant's options."""
    from latte_ray.spec import QUANTIZATION_KINDS, parse_pipeline_spec

    raw = json.loads(base.model_dump_json())
    model = raw["model"]
    model["compile"]["enabled"] = step.variant != "eager" and not step.variant.startswith(("teacache", "float8"))
    if step.mode:
        model["compile"]["mode"] = step.mode
    if model_dir:
        model["source"] = model_dir
    for option in step.variant.split("+"):
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
            raise SystemExit(f"unknown variant option {option!r}")
    raw["execution"]["batch_size"] = step.batch
    if step.steps:
        raw["sampling"]["num_inference_steps"] = step.steps
    if smoke:
        needs_float8 = model["quantization"] and QUANTIZATION_KINDS[model["quantization"]["kind"]][1]
        # float8 on a CPU is refused by the spec; 'auto' lets the engine's device check refuse it instead.
        model.update(device="auto" if needs_float8 else "cpu", dtype="float32")
        model["compile"].update(backend="eager", vae_decode=False)
        raw["sampling"].update(height=64, width=64, video_length=2, decode_chunk_size=2,
                               num_inference_steps=min(step.steps or 4, 4))
    return parse_pipeline_spec(raw, origin=step.name)


def predicted_peak(spec, cfg: dict[str, dict]) -> dict:
    from latte_ray.model.memory import memory_plan

    transformer = {**cfg["transformer"], "video_length": spec.sampling.video_length}
    p = memory_plan(spec, transformer, cfg["text_encoder"], cfg["vae"])
    return {"predicted_weights_gib": p.weights_bytes / 2**30, "predicted_peak_gib": p.peak / 2**30,
            "predicted_denoise_gib": p.activations.denoise / 2**30,
            "predicted_vae_decode_gib": p.activations.vae_decode / 2**30}


def run_variant(step: Step, smoke: bool, model_dir: str | None) -> dict:
    import torch

    from latte_ray.model.engine import DTYPES, LatteEngine
    from latte_ray.model.quantize import QuantizationUnsupported
    from latte_ray.spec import load_pipeline_spec

    device = "cpu" if smoke else "cuda"
    cfg = configs(smoke)
    spec = variant_spec(load_pipeline_spec("latte-1-t2v-512"), step, smoke, model_dir)
    cfg["transformer"]["video_length"] = spec.sampling.video_length
    result = {"name": step.name, "variant": step.variant, "batch": step.batch,
              "steps": spec.sampling.num_inference_steps, "device": device, **predicted_peak(spec, cfg)}
    started = time.perf_counter()
    try:
        pipe = None if model_dir else random_pipeline(device, DTYPES[spec.model.dtype], cfg)
        engine = LatteEngine(spec, pipe=pipe)
    except QuantizationUnsupported as e:
        return {**result, "status": "skipped", "reason": str(e)}
    batch = spec.execution.batch_size
    try:
        if not spec.model.compile.enabled:  # compiled engines warm up in __init__; give eager the same chance
            engine.generate(["warm-up"] * batch, [""] * batch, list(range(batch)), steps=2)
        ready = time.perf_counter() - started
        prompts = [f"a corgi surfing a wave at sunset, cinematic, prompt number {i}" for i in range(batch)]
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        frames, _ = engine.generate(prompts, [""] * batch, list(range(batch)))
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    except torch.OutOfMemoryError as e:
        return {**result, "status": "oom", "reason": str(e).splitlines()[0],
                **({"peak_gib": torch.cuda.max_memory_allocated() / 2**30} if device == "cuda" else {})}
    result.update(status="ok", s_per_video=seconds / batch, ready_s=ready, nonflat=bool(frames.std() > 0),
                  calls=sum(engine.last_transformer_calls) / len(engine.last_transformer_calls),
                  s_per_step_video=seconds / batch / spec.sampling.num_inference_steps)
    if device == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["total_gib"] = torch.cuda.mem_get_info()[1] / 2**30
    return result


def append(path: Path, record: dict) -> None:
    """One JSON line per variant, flushed and fsynced at once: a killed session keeps every finished line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def line(r: dict) -> str:
    head = f"{r['name']:>22}:"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason', '')}"[:300]
    peak = f"peak {r['peak_gib']:.1f} GiB measured" if "peak_gib" in r else "peak not measured (CPU)"
    speed = (f"{r['s_per_video']:7.2f} s/video, {PUBLISHED_S_PER_VIDEO / r['s_per_video']:.2f}x the published "
             f"{PUBLISHED_S_PER_VIDEO} s" if r["steps"] >= 50 else
             f"{r['s_per_step_video']:.3f} s per step per video ({r['steps']} steps)")
    return (f"{head} {speed}; {r['calls']:.0f} transformer calls/video; load+compile+warm-up {r['ready_s']:.0f} s; "
            f"{peak} vs {r['predicted_peak_gib']:.1f} GiB predicted (weights {r['predicted_weights_gib']:.1f} + "
            f"max(denoise {r['predicted_denoise_gib']:.1f}, VAE decode {r['predicted_vae_decode_gib']:.1f}))"
            + ("" if r["nonflat"] else "; WARNING: flat frames"))


# ---- the budgeted driver -------------------------------------------------------------------------------------


def print_plan(steps: list[Step], budget: float, smoke: bool) -> None:
    total = sum(s.budget_s for s in steps)
    print(f"plan ({'CPU smoke, toy sizes' if smoke else 'GPU, full-size Latte-1 shapes'}), budget {budget:.0f} s; "
          f"each variant in its own process, results appended after each:")
    at = 0.0
    for i, s in enumerate(steps, 1):
        at += s.budget_s
        extra = f", {s.steps} steps" if s.steps else ""
        extra += f", compile mode {s.mode}" if s.mode else ""
        extra += ", stops at the first out-of-memory" if s.sweep else ""
        fits = "" if at <= budget else "  [past the budget: skipped unless earlier steps finish early]"
        print(f"  {i:2}. {s.name:<22} {s.variant}, batch {s.batch}{extra}: up to {s.budget_s:.0f} s "
              f"(ends by {at:.0f} s){fits}")
    print(f"  total allowance {total:.0f} s of {budget:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", action="store_true", help="print the plan and its time budget, run nothing")
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole plan (default 480)")
    ap.add_argument("--out", default="gpu-results.jsonl", help="results file, one JSON line per variant (appended)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: toy sizes, checks the code")
    ap.add_argument("--only", nargs="+", default=None, help="run only these plan steps (names from --plan)")
    ap.add_argument("--model-dir", default=None, help="real Latte-1 weights (save_pretrained folder) instead of random")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one plan step, as JSON (internal)
    args = ap.parse_args()
    smoke = args.device == "cpu"

    if args.child:
        step = Step(**json.loads(args.child))
        r = run_variant(step, smoke, args.model_dir)
        append(Path(args.out), r)
        print(line(r), flush=True)
        return

    steps = [s for s in plan(smoke) if not args.only or s.name in args.only]
    print(f"machine: {machine()}")
    print_plan(steps, args.budget_s, smoke)
    if args.plan:
        return
    import torch

    if not smoke and not torch.cuda.is_available():
        print("gpu benchmark not run: no CUDA device visible (torch.cuda.is_available() is False); "
              "--device cpu runs the plan at toy sizes")
        return
    from latte_ray.spec import load_pipeline_spec

    base = load_pipeline_spec("latte-1-t2v-512")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    swept_out, total_gib, largest = False, None, None
    for step in steps:
        left = args.budget_s - (time.monotonic() - started)
        predicted = predicted_peak(variant_spec(base, step, smoke), configs(smoke))["predicted_peak_gib"]
        if step.sweep and swept_out:
            r = {"name": step.name, "status": "skipped", "reason": "a smaller batch already ran out of memory"}
        elif step.sweep and total_gib and predicted > 0.95 * total_gib:
            r = {"name": step.name, "status": "skipped",
                 "reason": f"predicted peak {predicted:.0f} GiB > 95% of the GPU's {total_gib:.0f} GiB"}
        elif step.budget_s > left:
            r = {"name": step.name, "status": "skipped",
                 "reason": f"needs up to {step.budget_s:.0f} s, {left:.0f} s left"}
        else:
            r = _run_child(step, args, out, timeout=left)
            if step.sweep and r.get("status") == "oom":
                swept_out = True
            if r.get("status") == "ok":
                total_gib = r.get("total_gib", total_gib)
                if step.variant == "eager" and (largest is None or step.batch > largest["batch"]):
                    largest = r
        if r.get("status") != "ok" and r.get("_parent_writes"):
            r.pop("_parent_writes")
            append(out, r)
        print(line(r) if r.get("status") == "ok" else f"{step.name:>22}: {r['status']}: {r.get('reason', '')}",
              flush=True)
    if largest:
        measured = f"peak {largest['peak_gib']:.1f} GiB measured, " if "peak_gib" in largest else ""
        print(f"largest batch that ran (eager): {largest['batch']} ({measured}{largest['predicted_peak_gib']:.1f} GiB "
              "predicted)")
    print(f"done in {time.monotonic() - started:.0f} s of {args.budget_s:.0f} s; results in {out}")


def _run_child(step: Step, args, out: Path, timeout: float) -> dict:
    """Run one step in a fresh interpreter; its own result line is what it appended to `out`."""
    before = out.stat().st_size if out.exists() else 0
    cmd = [sys.executable, __file__, "--child", json.dumps(asdict(step)), "--out", str(out),
           "--device", args.device] + (["--model-dir", args.model_dir] if args.model_dir else [])
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"name": step.name, "status": "timeout", "reason": f"stopped at the budget after {timeout:.0f} s",
                "_parent_writes": True}
    written = out.read_text()[before:] if out.exists() else ""
    if proc.returncode == 0 and written.strip():
        return json.loads(written.strip().splitlines()[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"name": step.name, "status": "failed", "reason": f"exit {proc.returncode}: {tail[0]}",
            "_parent_writes": True}


if __name__ == "__main__":
    main()
