"""gpu: the one-command GPU plan (../shared/GPU.md): Latte-1's production path, then Wan 2.1-T2V-1.3B's, measured
on a lent GPU within one 480 s budget, every figure appended to a JSON Lines file the moment it exists.

A lent GPU has 15 minutes in all, machine start included, and no model hub: each model is its architecture from
its published configs (Latte-1: tests/data/latte-1/; Wan 2.1-T2V-1.3B: tests/data/wan/; SOURCE.md in each) with
random weights, built directly on the GPU in the dtypes from_pretrained gives (Latte fp16, T5's `wo` in fp32 as
transformers keeps it; Wan bf16, the modules diffusers keeps in fp32 kept there) and in eval mode. Random weights
make noise videos, but every kernel is the one a real run launches.

The plan, in the order of what matters most; each step is a process of its own (no dynamo, CUDA or allocator
state shared), started only when the time left is worth it, stopped at its own timeout (what is left of the
budget, at most its cap), with its full log under OUT/logs/ and one JSON line for the step (ok, failed,
timeout or skipped, with the reason) after the lines it wrote itself:
  1. eager       the model built once: seconds per denoise step at batch 1/2/4/8 (CUDA events, after
                 warm-up), TFLOP/s against memory.transformer_flops and the GPU's peak, peak memory per
                 phase (reset before the denoise and before the decode; allocated and reserved) next to
                 memory.py's prediction, torch's own FLOP count of one step, T5 encode, VAE decode with and
                 without cudnn.benchmark, one step's top kernels (torch.profiler), row 0 of a batch-1 step
                 against a batch-2 step (batch invariance on CUDA), and one full 50-step batch-2 video with
                 torch.isfinite on its latents (random fp16 weights can overflow over 28 layers x 50 steps)
  2. compiled    the same batch as eager's video (2), inductor mode "default": cold compile seconds, seconds
                 per step and per video, recompiles after warm-up. The whole transformer when a whole-model
                 compile fits the time left beside float8's share, else regional compilation of the repeated
                 blocks (model.compile.scope: blocks, diffusers' compile_repeated_blocks)
  3. float8      torchao float8 dynamic under compile (regional): its error against fp16 at one step, seconds
                 per step and per video. torchao missing: a skipped line saying so
  4. production-mode  the production spec's own compile mode and scope (max-autotune-no-cudagraphs, blocks),
                 only when at least 2 minutes are left: compile seconds and seconds per step
  5. wan-eager   Wan 2.1-T2V-1.3B (spec wan2.1-t2v-1.3b: 81 frames at 480x832, bf16, CFG), the model built once
                 (UMT5-XXL, transformer, VAE): step 1's figures against Wan's FLOP and memory model
                 (model/families/wan_figures.py, from the same configs) at batch 1 and 2, a step being the
                 transformer's two calls (prompt, negative prompt) as WanPipeline makes them; UMT5 encode; VAE
                 decode with and without cudnn.benchmark; the built weights against the model's; batch
                 invariance; one step's FLOPs counted and top kernels; one batch-1 video, all 50 steps when they
                 fit the step's timeout, else as many as fit (said in the line)
  6. wan-compiled  Wan at batch 1, compiled regionally (the Wan engine's compile_repeated_blocks), inductor
                 "default", fed embeddings directly (no UMT5 built): compile seconds, step and video seconds,
                 recompiles
Latte-1 is the project's reference, so the Wan steps come last and run on what the Latte steps leave (a skipped
line says so); `--only wan-eager wan-compiled` gives them the whole budget.
A step whose least useful time (for a compile step: the slowest compile seen so far plus its timing) no longer
fits is skipped with a line saying why. `--device cpu` runs every step's code at toy sizes (compile backend
eager; int8_weight_only stands in for float8, which needs CUDA; 2-step videos; one timed call per figure):
its numbers time nothing.

    python3 benchmarks/gpu.py --plan                       # the plan and its budget, nothing run
    python3 benchmarks/gpu.py --out $OUT                   # on the GPU machine: $OUT/gpu.jsonl, $OUT/logs/
    python3 benchmarks/gpu.py --device cpu --out /tmp/gpu-rehearsal
    python3 benchmarks/gpu.py --only wan-eager wan-compiled --out $OUT   # the Wan table alone
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import REPO, machine

BUDGET_S = 480.0
PUBLISHED_S_PER_VIDEO = 14.6  # Latte-1 with torch.compile on one 80 GB A100 (diffusers docs)
LATTE1 = REPO / "tests" / "data" / "latte-1"  # Latte-1's published configs
BATCHES = (1, 2, 4, 8)  # eager sweep; 2 is the production batch, compiled and float8 run at it
VIDEO_BATCH = 2
TIMED_STEPS, WARM_STEPS = 5, 2
# Dense fp16/bf16 tensor-core peaks (vendor data sheets, SXM parts), for the fraction of peak a step reaches.
PEAK_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}

# The budget logic's allowances (seconds). None is a measurement: they decide what to start, and each step
# stops at its timeout whatever they say.
WHOLE_COMPILE_EST_S = 300.0  # a cold whole-model inductor compile of 28 block pairs + VAE decoder (GPU.md: ~2.5 min)
FLOAT8_RESERVE_S = 90.0  # kept for step 3 when step 2 chooses what to compile
AFTER_COMPILE_S = 40.0  # a compile step's timing after its compile: steps and a 50-step video
PRODUCTION_MIN_LEFT_S = 120.0  # GPU.md: the production mode only if at least 2 minutes remain


WAN_EAGER_MIN_S = 90.0  # process start, UMT5-XXL + transformer built, UMT5 timed, the batch-1 and -2 steps
WAN_NOTE = ("Wan 2.1-1.3B runs on what the Latte steps leave; `--only wan-eager wan-compiled` gives it a whole "
            "budget")


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: float  # the most this step is given (its timeout, when more than that is left)
    min_s: float  # the least time worth starting it with
    compiles: bool = False
    note: str = ""  # said with the step's reason when it is skipped


STEPS = (
    Step("eager", cap_s=240, min_s=60),
    Step("compiled", cap_s=420, min_s=60, compiles=True),
    Step("float8", cap_s=240, min_s=60, compiles=True),
    Step("production-mode", cap_s=420, min_s=PRODUCTION_MIN_LEFT_S, compiles=True),
    # Latte-1 is the reference the project's figures stand on, so Wan comes after every Latte step.
    Step("wan-eager", cap_s=240, min_s=WAN_EAGER_MIN_S, note=WAN_NOTE),
    Step("wan-compiled", cap_s=240, min_s=60, compiles=True, note=WAN_NOTE),
)


# ---- the budget logic (pure: a clock and a launcher are passed in, so tests replay it on a fake clock) ---------


def decide(step: Step, left: float, slowest_compile: float | None, torchao: str | None) -> tuple[dict | None, str]:
    """(options to run `step` with, '') or (None, why it is skipped). `slowest_compile`: the longest compile a
    step has taken so far (or been stopped in); `torchao`: why torchao cannot be used, None when it can."""
    compile_need = (slowest_compile or 0.0) + AFTER_COMPILE_S
    if step.name == "float8" and torchao:
        return None, torchao
    need = step.min_s
    if step.compiles and slowest_compile is not None:
        need = max(need, compile_need)
    if left < need:
        why = (f"a compile here took {slowest_compile:.0f} s or more, + {AFTER_COMPILE_S:.0f} s of timing"
               if step.compiles and slowest_compile is not None and compile_need >= step.min_s
               else "its least useful time")
        return None, f"needs {need:.0f} s ({why}), {left:.0f} s left of the budget" + (
            f" ({step.note})" if step.note else "")
    if step.name == "compiled":
        reserve = 0.0 if torchao else FLOAT8_RESERVE_S
        return {"scope": "whole" if left - reserve >= WHOLE_COMPILE_EST_S else "blocks"}, ""
    return {}, ""


def run_plan(steps, budget_s: float, clock, launch, write, torchao: str | None) -> list[dict]:
    """Run `steps` in order within `budget_s` seconds of `clock()`: each is decided (`decide`), then launched
    (`launch(step, options, timeout) -> dict`: status, seconds and, for a compile, compile_s) or skipped, and
    its line is written (`write(dict)`) before the next starts. Returns the lines."""
    started, slowest, lines = clock(), None, []
    for step in steps:
        left = budget_s - (clock() - started)
        options, reason = decide(step, left, slowest, torchao)
        if options is None:
            line = {"step": step.name, "status": "skipped", "reason": reason, "left_s": round(left, 1)}
        else:
            timeout = min(step.cap_s, left)
            line = {"step": step.name, **options, "timeout_s": round(timeout, 1),
                    **launch(step, options, timeout)}
            if step.compiles:
                took = line.get("compile_s")
                if took is None and line.get("status") == "timeout":  # stopped while compiling: a lower bound
                    took = line.get("seconds", timeout)
                if took is not None:
                    slowest = max(slowest or 0.0, float(took))
        line["at_s"] = round(clock() - started, 1)
        write(line)
        lines.append(line)
    return lines


# ---- the real launcher: one process per step, its log kept -------------------------------------------------------


def append(path: Path, record: dict) -> None:
    """One JSON line, flushed and fsynced at once: a killed session keeps every line written before."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


class ChildLauncher:
    """Runs a step as `gpu.py --child STEP` in its own process group, stdout and stderr into OUT/logs/STEP.log,
    stopped (the whole group) at its timeout; the step's result is what it appended to OUT/gpu.jsonl."""

    def __init__(self, out: Path, device: str):
        self.out, self.device = out, device
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def __call__(self, step: Step, options: dict, timeout: float) -> dict:
        results = self.out / "gpu.jsonl"
        log = self.out / "logs" / f"{step.name}.log"
        before = results.stat().st_size if results.exists() else 0
        cmd = [sys.executable, __file__, "--child", step.name, "--options", json.dumps(options),
               "--out", str(self.out), "--device", self.device,
               "--deadline", f"{time.time() + timeout:.1f}"]
        started = time.monotonic()
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        seconds = time.monotonic() - started
        parts = [json.loads(x) for x in (results.read_text()[before:] if results.exists() else "").splitlines() if x]
        out = {"seconds": round(seconds, 1), "log": str(log.relative_to(self.out)), "parts": [p["part"] for p in parts]}
        compile_s = next((p["compile_s"] for p in parts if "compile_s" in p), None)
        if compile_s is not None:
            out["compile_s"] = compile_s
        if rc is None:
            doing = parts[-1]["part"] if parts else "starting"
            return {**out, "status": "timeout", "reason": f"stopped at its timeout after {seconds:.0f} s, after "
                    f"part {doing!r} (still compiling if no 'compile' part)"}
        if rc != 0 or not parts or parts[-1]["part"] != "done":
            tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:] or ["no output"]
            return {**out, "status": "failed", "reason": f"exit {rc}: {tail[0][:300]} (full log: {out['log']})"}
        return {**out, "status": "ok"}


# ---- the steps' code (in the child) -------------------------------------------------------------------------


def published(component: str) -> dict:
    return json.loads((LATTE1 / component / "config.json").read_text())


# --device cpu: the same architecture at toy widths.
SMOKE = {
    "transformer": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16,
                    "caption_channels": 32, "sample_size": 8},
    "text_encoder": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4},
    "vae": {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64},
}


def configs(smoke: bool, frames: int) -> dict[str, dict]:
    out = {c: published(c) for c in ("transformer", "text_encoder", "vae")}
    if smoke:
        out = {c: {**cfg, **SMOKE[c]} for c, cfg in out.items()}
    out["transformer"]["video_length"] = frames
    return out


def random_pipeline(device: str, dtype, cfg: dict[str, dict]):
    """A LattePipeline with Latte-1's architecture and random weights, built directly on `device`, each
    component in the dtype from_pretrained would give it (T5's wo in fp32 under fp16) and in eval mode as
    from_pretrained leaves it (T5's dropout_rate is 0.1: in training mode each call drops other units), with
    the pinned revision's scheduler config."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from latte_ray.model.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    with torch.device(device):
        t5 = {k: v for k, v in cfg["text_encoder"].items() if not k.startswith("_")}
        text_encoder = T5EncoderModel(T5Config(**t5)).to(dtype)  # the published 32128 rows
        keep = text_encoder._get_dtype_plan(dtype)
        for name, module in text_encoder.named_modules():
            if name.split(".")[-1] in keep:
                module.to(keep[name.split(".")[-1]])
        transformer = LatteTransformer3DModel.from_config(cfg["transformer"]).to(dtype)
        vae = AutoencoderKL.from_config(cfg["vae"]).to(dtype)
    for model in (text_encoder, transformer, vae):
        model.eval()
    scheduler = DDIMScheduler.from_config(json.loads((LATTE1 / "scheduler" / "scheduler_config.json").read_text()))
    return LattePipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                         scheduler=scheduler)


class Child:
    """One step's process: its spec, model, timers and the lines it appends (`emit`)."""

    published_s_per_video: float | None = PUBLISHED_S_PER_VIDEO
    video_batch = VIDEO_BATCH

    def __init__(self, step: str, out: Path, smoke: bool, deadline: float | None = None):
        import torch

        self.step, self.results, self.smoke = step, out / "gpu.jsonl", smoke
        self.device = "cpu" if smoke else "cuda"
        self.warm, self.repeat = (1, 1) if smoke else (WARM_STEPS, TIMED_STEPS)
        self.cuda = self.device == "cuda"
        self.torch = torch
        self.deadline = deadline  # time.time() at which the launcher stops this process (None: never)

    def left(self) -> float:
        """Seconds until the launcher stops this process (infinite when it gave no deadline)."""
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def emit(self, part: str, **fields) -> None:
        append(self.results, {"step": self.step, "part": part, **fields})
        print(part, json.dumps(fields)[:400], flush=True)

    def spec(self, batch: int, compile_: dict | None = None, quantization: str | None = None):
        from latte_ray.spec import load_pipeline_spec, parse_pipeline_spec

        raw = json.loads(load_pipeline_spec("latte-1-t2v-512").model_dump_json())
        model = raw["model"]
        model["compile"].update(enabled=compile_ is not None, **(compile_ or {}))
        model["quantization"] = {"kind": quantization} if quantization else None
        raw["execution"]["batch_size"] = batch
        if self.smoke:
            model.update(device="cpu", dtype="float32")
            model["compile"].update(backend="eager", vae_decode=False)
            raw["sampling"].update(height=64, width=64, video_length=2, decode_chunk_size=2, num_inference_steps=2)
        return parse_pipeline_spec(raw, origin=f"gpu.py {self.step}")

    def engine(self, spec, pipe=None):
        from latte_ray.model.families.latte_engine import LatteEngine
        from latte_ray.model.loading import DTYPES

        self.cfg = configs(self.smoke, spec.sampling.video_length)
        pipe = pipe or random_pipeline(self.device, DTYPES[spec.model.dtype], self.cfg)
        return LatteEngine(spec, pipe=pipe)

    # -- measuring

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def timed(self, fn, repeat: int = 1) -> float:
        """Seconds per call of `fn`: CUDA events around `repeat` calls on the GPU, the wall clock on the CPU."""
        torch = self.torch
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeat):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000 / repeat
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - started) / repeat

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def memory(self, prefix: str) -> dict:
        if not self.cuda:
            return {}
        c = self.torch.cuda
        return {f"{prefix}_allocated_gib": c.max_memory_allocated() / 2**30,
                f"{prefix}_reserved_gib": c.max_memory_reserved() / 2**30,
                "now_allocated_gib": c.memory_allocated() / 2**30}

    def predicted(self, spec) -> dict:
        from latte_ray.model.memory import memory_plan

        p = memory_plan(spec, self.cfg["transformer"], self.cfg["text_encoder"], self.cfg["vae"])
        return {"predicted_weights_gib": p.weights_bytes / 2**30, "predicted_denoise_gib": p.activations.denoise / 2**30,
                "predicted_vae_decode_gib": p.activations.vae_decode / 2**30, "predicted_peak_gib": p.peak / 2**30}

    def text(self, engine, batch: int):
        prompts = [f"a corgi surfing a wave at sunset, cinematic, prompt number {i}" for i in range(batch)]
        return engine.encode_text(prompts, [""] * batch)

    def step_call(self, engine, text, batch: int, seed: int = 0):
        """One denoise step's transformer call as the engine makes it (both CFG halves, text padded to
        max_sequence_length with its mask, as compiled graphs always take it), on fixed random latents."""
        torch, s = self.torch, engine.sampling
        t = engine.pipe.transformer.config
        embeds = torch.cat([text.negative_embeds, text.embeds])
        keep = torch.cat([text.keep, text.keep])
        bias = torch.zeros(2 * batch, 1, embeds.shape[1], dtype=embeds.dtype)
        bias.masked_fill_(torch.arange(embeds.shape[1])[None, None, :] >= keep[:, None, None], float("-inf"))
        bias = bias.repeat_interleave(s.video_length, dim=0).to(engine.device)
        g = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(batch, t.in_channels, s.video_length, s.height // 8, s.width // 8, generator=g)
        latents = torch.cat([latents] * 2).to(engine.device, engine.dtype)
        # As the engine's loop makes it (a scheduler timestep expanded over the rows: stride 0), so a compiled
        # graph sees the inputs it was warmed up with and does not recompile for this call.
        timestep = torch.tensor(999, device=engine.device)[None].expand(2 * batch)

        def call():
            return engine.transformer(hidden_states=latents, encoder_hidden_states=embeds, timestep=timestep,
                                      encoder_attention_mask=bias, enable_temporal_attentions=s.enable_temporal_attentions,
                                      return_dict=False)[0]

        return call

    def step_flops(self, engine, text, batch: int) -> float:
        """The FLOP model's count of one denoise step at `batch` (both CFG halves)."""
        from latte_ray.model.memory import transformer_flops

        return transformer_flops(self.cfg["transformer"], engine.sampling, 2 * batch, text.embeds.shape[1])

    def time_steps(self, engine, text, batch: int) -> dict:
        call = self.step_call(engine, text, batch)
        with self.torch.inference_mode():
            for _ in range(self.warm):
                out = call()
            self.sync()
            self.reset_peak()
            seconds = self.timed(call, self.repeat)
            finite = bool(self.torch.isfinite(call()).all())
        flops = self.step_flops(engine, text, batch)
        result = {"batch": batch, "s_per_step": seconds, "s_per_step_per_video": seconds / batch,
                  "tflops": flops / seconds / 1e12, "model_tflop_per_step": flops / 1e12, "finite": finite,
                  **self.memory("denoise_peak")}
        peak = next((v for k, v in PEAK_TFLOPS.items() if self.cuda and k in self.torch.cuda.get_device_name()), None)
        if peak:
            result.update(peak_tflops=peak, fraction_of_peak=result["tflops"] / peak)
        del out
        return result

    def video(self, engine, batch: int | None = None, text=None, steps: int | None = None) -> dict:
        """One whole video batch through the engine (denoise loop, decode, uint8 frames), by the wall clock
        around synchronized calls; `steps` fewer than the spec's when a caller has no time for them all."""
        torch, batch = self.torch, batch or self.video_batch
        text, seeds, capture = text or self.text(engine, batch), list(range(batch)), {}
        self.sync()
        started = time.perf_counter()
        frames = engine.denoise(text, seeds, steps=steps, capture=capture)
        self.sync()
        seconds = time.perf_counter() - started
        result = {"batch": batch, "steps": steps or engine.sampling.num_inference_steps, "s_per_batch": seconds,
                  "s_per_video": seconds / batch, "latents_finite": bool(torch.isfinite(capture["latents"]).all()),
                  "frames_std": float(frames.std())}
        if self.published_s_per_video and result["steps"] == engine.sampling.num_inference_steps:
            result["published_ratio"] = self.published_s_per_video / (seconds / batch)
        return result


def child_eager(c: Child, options: dict) -> None:
    import torch

    from latte_ray.plan.fit import CUDA_GRID_LIMIT, temporal_attention_sequences

    started = time.perf_counter()
    spec = c.spec(VIDEO_BATCH)
    engine = c.engine(spec)
    c.sync()
    c.emit("build", build_s=time.perf_counter() - started, **c.memory("build_peak"), **c.predicted(spec))
    with torch.inference_mode():
        for batch in (1, VIDEO_BATCH):
            c.text(engine, batch)  # warm-up
            c.emit("t5", batch=batch, s=c.timed(lambda: c.text(engine, batch)))
    total = torch.cuda.mem_get_info()[1] / 2**30 if c.cuda else None
    texts = {}
    for batch in BATCHES:
        sized = c.spec(batch)
        sequences = temporal_attention_sequences(batch, sized.sampling)
        predicted = c.predicted(sized)
        if sequences > CUDA_GRID_LIMIT:
            c.emit("step", batch=batch, status="skipped", reason=f"{sequences} temporal sequences > {CUDA_GRID_LIMIT}")
            continue
        if total and predicted["predicted_peak_gib"] > 0.95 * total:
            c.emit("step", batch=batch, status="skipped", reason=f"predicted {predicted['predicted_peak_gib']:.0f} "
                   f"GiB > 95% of {total:.0f} GiB", **predicted)
            continue
        try:
            with torch.inference_mode():
                texts[batch] = c.text(engine, batch)
            c.emit("step", status="ok", **c.time_steps(engine, texts[batch], batch), **predicted)
        except torch.OutOfMemoryError as e:
            c.emit("step", batch=batch, status="oom", reason=str(e).splitlines()[0], **predicted)
            break
    with torch.inference_mode():
        # torch's own FLOP count of one step (FlopCounterMode counts the matmuls and SDPA kernels it dispatches).
        from torch.utils.flop_counter import FlopCounterMode

        from latte_ray.model.memory import transformer_flops

        call = c.step_call(engine, texts.get(1) or c.text(engine, 1), 1)
        with FlopCounterMode(display=False) as counter:
            call()
        modelled = transformer_flops(c.cfg["transformer"], engine.sampling, 2, engine.sampling.max_sequence_length)
        c.emit("flops", batch=1, counted_tflop=counter.get_total_flops() / 1e12, modelled_tflop=modelled / 1e12)
        # One step's top kernels.
        call = c.step_call(engine, texts.get(VIDEO_BATCH) or c.text(engine, VIDEO_BATCH), VIDEO_BATCH)
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if c.cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            call()
            c.sync()
        key = "self_device_time_total" if c.cuda else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:12]
        c.emit("profile", batch=VIDEO_BATCH, by=key, top=[{"name": e.key[:120], "calls": e.count,
                                                            "ms": getattr(e, key, 0) / 1000} for e in events])
        # Batch invariance: row 0 alone and beside another row, one step, the same inputs.
        one = c.step_call(engine, c.text(engine, 1), 1)()
        two = c.step_call(engine, c.text(engine, 2), 2)()
        c.emit("batch-invariance", max_abs_diff=float((one[0] - two[0]).abs().max()),
               rows_equal=bool(torch.equal(one[0], two[0])))
        # VAE decode, per phase peak, with and without cudnn.benchmark.
        s = engine.sampling
        latents = torch.randn(VIDEO_BATCH, 4, s.video_length, s.height // 8, s.width // 8,
                              generator=torch.Generator("cpu").manual_seed(1)).to(engine.device, engine.dtype)
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            engine.pipe.decode_latents(latents, s.video_length, decode_chunk_size=s.decode_chunk_size)  # warm-up
            c.sync()
            c.reset_peak()
            seconds = c.timed(lambda: engine.pipe.decode_latents(latents, s.video_length,
                                                                 decode_chunk_size=s.decode_chunk_size))
            c.emit("vae-decode", batch=VIDEO_BATCH, cudnn_benchmark=bench, s=seconds, **c.memory("decode_peak"),
                   **c.predicted(spec))
        torch.backends.cudnn.benchmark = False
    c.reset_peak()
    c.emit("video", **c.video(engine), **c.memory("video_peak"))


def child_compiled(c: Child, options: dict) -> None:
    """Compile at the video batch: cold compile seconds (the engine's load + compile + warm-up), then
    seconds per step and per video, and how many frames dynamo converted after warm-up (recompiles)."""
    from torch._dynamo.utils import counters

    from latte_ray.spec import load_pipeline_spec

    prod = load_pipeline_spec("latte-1-t2v-512").model.compile
    compile_ = {"mode": options.get("mode", "default"), "scope": options.get("scope", "blocks")}
    if c.step == "production-mode":
        compile_ = {"mode": prod.mode, "scope": prod.scope}
    spec = c.spec(VIDEO_BATCH, compile_)
    counters.clear()
    started = time.perf_counter()
    engine = c.engine(spec)
    c.emit("compile", compile_s=engine.warmup_seconds, load_s=time.perf_counter() - started - engine.warmup_seconds,
           frames=counters["frames"]["total"], **compile_, vae_decode=spec.model.compile.vae_decode)
    import torch

    warmed = counters["frames"]["total"]
    with torch.inference_mode():
        step = c.time_steps(engine, c.text(engine, VIDEO_BATCH), VIDEO_BATCH)
    c.emit("step", **step, recompiles=counters["frames"]["total"] - warmed, **c.predicted(spec))
    warmed = counters["frames"]["total"]
    c.emit("video", **c.video(engine), recompiles=counters["frames"]["total"] - warmed)


def child_float8(c: Child, options: dict) -> None:
    """fp16 reference output of one step, then the same pipeline quantized (torchao float8 dynamic; on the CPU
    int8_weight_only stands in) and compiled regionally: its error at that step, its step and video seconds."""
    import torch

    kind = "float8_dynamic" if c.cuda else "int8_weight_only"
    eager = c.engine(c.spec(VIDEO_BATCH))
    with torch.inference_mode():
        text = c.text(eager, VIDEO_BATCH)
        reference = c.step_call(eager, text, VIDEO_BATCH)().float()
    # Only the transformer is quantized: its compile alone (no VAE decode compile) keeps the step short.
    spec = c.spec(VIDEO_BATCH, {"mode": "default", "scope": "blocks", "vae_decode": False}, quantization=kind)
    started = time.perf_counter()
    engine = c.engine(spec, pipe=eager.pipe)  # quantizes the same weights in place, then compiles
    c.emit("compile", compile_s=engine.warmup_seconds, kind=kind, stand_in=not c.cuda,
           load_s=time.perf_counter() - started - engine.warmup_seconds)
    with torch.inference_mode():
        out = c.step_call(engine, text, VIDEO_BATCH)().float()
        error = (out - reference).norm() / reference.norm()
        c.emit("error", kind=kind, relative_l2=float(error), max_abs=float((out - reference).abs().max()),
               finite=bool(torch.isfinite(out).all()))
        c.emit("step", **c.time_steps(engine, text, VIDEO_BATCH))
    c.emit("video", **c.video(engine))


# ---- Wan 2.1-T2V-1.3B (steps wan-eager and wan-compiled) -----------------------------------------------------

WAN_SPEC = "wan2.1-t2v-1.3b"  # the built-in production spec: 81 frames at 480x832, bf16, batch 1, 50 steps, CFG 5
WAN_DATA = REPO / "tests" / "data" / "wan"  # published configs (SOURCE.md there)
WAN_CONFIGS = WAN_DATA / "Wan-AI--Wan2.1-T2V-1.3B-Diffusers"
# 1.3B's own scheduler_config.json is not vendored (SOURCE.md: missing); the sibling Wan 2.1 repo's UniPC
# flow-matching config is, and it is what the tiny Wan uses too (flow_shift 3.0, Wan's setting for 480p).
WAN_SCHEDULER = WAN_DATA / "Wan-AI--Wan2.1-VACE-14B-diffusers" / "scheduler" / "scheduler_config.json"
WAN_BATCHES = (1, 2)  # 1 is the production batch (compiled runs at it); 2 for scaling and batch invariance
WAN_VIDEO_BATCH = 1
WAN_TIMED_STEPS, WAN_WARM_STEPS = 3, 1  # a Wan step is ~1 s or more at full size: fewer calls give as firm a mean


def wan_smoke() -> dict[str, dict]:
    """--device cpu: the published configs with the tiny Wan's widths and depths (model/tiny_wan.py), every other
    key as published (UMT5's 256,384-row vocabulary included)."""
    from latte_ray.model import tiny_wan

    pick = lambda d, keys: {k: d[k] for k in keys}  # noqa: E731
    return {
        "transformer": pick(tiny_wan.TRANSFORMER, ("num_attention_heads", "attention_head_dim", "ffn_dim",
                                                  "num_layers", "text_dim", "freq_dim", "rope_max_seq_len")),
        "text_encoder": pick(tiny_wan.TEXT_ENCODER, ("d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                                                    "relative_attention_num_buckets")),
        "vae": pick(tiny_wan.VAE, ("base_dim", "dim_mult", "num_res_blocks")),
    }


def wan_configs(smoke: bool) -> dict[str, dict]:
    out = {c: json.loads((WAN_CONFIGS / c / "config.json").read_text()) for c in ("transformer", "text_encoder", "vae")}
    if smoke:
        out = {c: {**cfg, **wan_smoke()[c]} for c, cfg in out.items()}
    return out


def as_loaded(model, dtype):
    """`model` (a diffusers model built in float32) in the dtypes diffusers' from_pretrained(torch_dtype=dtype)
    gives it: a class without `_keep_in_fp32_modules` cast whole; otherwise each floating tensor of its state
    dict cast to `dtype` except those under a kept module (WanTransformer3DModel keeps rope, time_embedder,
    scale_shift_table and its norms in float32, whatever the dtype), and tensors outside the state dict left
    as built."""
    keep = model._keep_in_fp32_modules
    if keep is None:
        return model.to(dtype)
    saved = set(model.state_dict())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in saved and tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype if not set(keep) & set(name.split(".")) else tensor.dtype)
    return model


def random_wan_pipeline(device: str, dtype, cfg: dict[str, dict], with_text_encoder: bool = True):
    """A WanPipeline with Wan 2.1-T2V-1.3B's published architecture and random weights, built directly on
    `device` in the dtypes from_pretrained with that dtype gives each component (`as_loaded`; UMT5 keeps `wo`
    in fp32 only under fp16), in eval mode. The tokenizer is the tiny model's fixed offline one (UMT5's own is
    not vendored): its ids fit the published vocabulary, and UMT5 always runs over max_sequence_length tokens,
    so the encoder's work is the same. Without the text encoder (a compile step feeds the transformer embeddings directly) 11 GB less."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from latte_ray.model.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = text_encoder = None
    with torch.device(device):
        if with_text_encoder:
            tokenizer = build_tiny_tokenizer()
            t5 = {k: v for k, v in cfg["text_encoder"].items() if not k.startswith("_")}
            text_encoder = UMT5EncoderModel._from_config(UMT5Config(**t5), dtype=dtype)
            keep = text_encoder._get_dtype_plan(dtype)
            for name, module in text_encoder.named_modules():
                if name.split(".")[-1] in keep:
                    module.to(keep[name.split(".")[-1]])
        transformer = as_loaded(WanTransformer3DModel.from_config(cfg["transformer"]), dtype)
        vae = as_loaded(AutoencoderKLWan.from_config(cfg["vae"]), dtype)
    for model in (text_encoder, transformer, vae):
        if model is not None:
            model.eval()  # as from_pretrained leaves it (UMT5's published dropout_rate is 0.1)
    scheduler = UniPCMultistepScheduler.from_config(json.loads(WAN_SCHEDULER.read_text()))
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)


def video_steps(full: int, step_s: float | None, decode_s: float | None, left: float,
                spare_s: float = 20.0) -> int | None:
    """None (the spec's `full` steps) when they fit in `left` seconds beside the decode and `spare_s`, or no
    step time is known; else as many as fit, at least 2. The video is a Wan step's last and longest part, and a
    cut-short video still measures a whole loop and decode."""
    if step_s is None:
        return None
    steps = max(2, int((left - (decode_s or 0.0) - spare_s) / step_s)) if left != float("inf") else full
    return None if steps >= full else steps


def cut_short(steps: int | None, spec) -> dict:
    return {"cut_short": f"{steps} of {spec.sampling.num_inference_steps} steps fit the time left"} if steps else {}


class WanChild(Child):
    """A Wan step's process: Latte's measurements, against Wan's FLOP and memory model
    (model/families/wan_figures.py, computed from the same configs the model is built from). WanPipeline calls
    the transformer once per CFG half, so a step here is two calls, as in the pipeline's own loop."""

    published_s_per_video = None  # no published seconds per video for Wan on a known GPU to compare with
    video_batch = WAN_VIDEO_BATCH

    def __init__(self, step: str, out: Path, smoke: bool, deadline: float | None = None):
        super().__init__(step, out, smoke, deadline)
        if not smoke:
            self.warm, self.repeat = WAN_WARM_STEPS, WAN_TIMED_STEPS
        self.cfg = wan_configs(smoke)
        self._figures: dict[int, object] = {}

    def spec(self, batch: int, compile_: dict | None = None, quantization: str | None = None,
             text_encoder: bool = True):
        from latte_ray.spec import load_pipeline_spec, parse_pipeline_spec

        raw = json.loads(load_pipeline_spec(WAN_SPEC).model_dump_json())
        model = raw["model"]
        model["compile"].update(enabled=compile_ is not None, **(compile_ or {}))
        model["quantization"] = {"kind": quantization} if quantization else None
        raw["execution"]["batch_size"] = batch
        # No text encoder on the device: the memory model leaves UMT5 out, as for a separate text-encode stage.
        raw["execution"]["text_encode_stage"] = not text_encoder
        if self.smoke:
            model.update(device="cpu", dtype="float32")
            model["compile"].update(backend="eager")
            raw["sampling"].update(height=32, width=32, video_length=5, num_inference_steps=2, max_sequence_length=32)
        return parse_pipeline_spec(raw, origin=f"gpu.py {self.step}")

    def engine(self, spec, pipe=None):
        from latte_ray.model.families.wan_engine import WanEngine
        from latte_ray.model.loading import DTYPES

        with_text_encoder = not spec.execution.text_encode_stage
        pipe = pipe or random_wan_pipeline(self.device, DTYPES[spec.model.dtype], self.cfg, with_text_encoder)
        return WanEngine(spec, with_text_encoder=with_text_encoder, pipe=pipe)

    def weights_gib(self, engine) -> float:
        """The built pipeline's parameters and buffers, each storage once (what the memory model predicts)."""
        seen = {}
        for model in (engine.pipe.text_encoder, engine.pipe.transformer, engine.pipe.vae):
            for t in [*model.parameters(), *model.buffers()] if model is not None else []:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values()) / 2**30

    def figures(self, spec):
        """wan_figures.figures for `spec` at batch 1 (its FLOPs are per video; at full size it takes seconds of
        CPU, so once per process and text-encoder choice)."""
        from latte_ray.model.families.wan_figures import figures

        key = spec.execution.text_encode_stage
        if key not in self._figures:
            one = spec.model_copy(update={"execution": spec.execution.model_copy(update={"batch_size": 1})})
            self._figures[key] = figures(one, self.cfg["transformer"], self.cfg["text_encoder"], self.cfg["vae"])
        return self._figures[key]

    def predicted(self, spec) -> dict:
        """Wan's memory model for `spec`: its denoise estimate is per row (DENOISE_FACTOR x rows x tokens x
        hidden), so batch 1's times the batch."""
        f = self.figures(spec)
        denoise = f.denoise_activations * spec.execution.batch_size
        peak = f.weights_bytes + max(denoise, f.vae_activations)
        return {"predicted_weights_gib": f.weights_bytes / 2**30, "predicted_denoise_gib": denoise / 2**30,
                "predicted_vae_decode_gib": f.vae_activations / 2**30, "predicted_peak_gib": peak / 2**30}

    def step_flops(self, engine, text, batch: int) -> float:
        calls = 2 if engine.sampling.guidance_scale > 1.0 else 1
        return self.figures(engine.spec).transformer_per_forward * calls * batch

    def synthetic_text(self, engine, batch: int):
        """Embeddings without a text encoder (a compile step): random rows, max_sequence_length long."""
        from latte_ray.model.engine import TextBatch

        torch, length = self.torch, engine.sampling.max_sequence_length
        g = torch.Generator("cpu").manual_seed(2)
        embeds, negative = (torch.randn(batch, length, engine.pipe.transformer.config.text_dim, generator=g)
                            .to(engine.device, engine.dtype) for _ in range(2))
        return TextBatch(embeds, negative, torch.full((batch,), length), [length] * batch, [False] * batch)

    def latent_shape(self, engine, batch: int) -> tuple:
        pipe, s = engine.pipe, engine.sampling
        frames = (s.video_length - 1) // pipe.vae_scale_factor_temporal + 1
        return (batch, pipe.transformer.config.in_channels, frames, s.height // pipe.vae_scale_factor_spatial,
                s.width // pipe.vae_scale_factor_spatial)

    def step_call(self, engine, text, batch: int, seed: int = 0):
        """One denoise step as WanPipeline's loop makes it: the transformer called for the prompt, then for the
        negative prompt, at the scheduler's first timestep expanded over the rows, on fixed random latents.
        Returns both calls' outputs stacked: (2, B, C, f, h, w)."""
        torch, pipe, s = self.torch, engine.pipe, engine.sampling
        g = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(*self.latent_shape(engine, batch), generator=g).to(engine.device, engine.dtype)
        pipe.scheduler.set_timesteps(s.num_inference_steps, device=engine.device)
        timestep = pipe.scheduler.timesteps[0].expand(batch)
        embeds = text.embeds.to(engine.device, engine.dtype)
        negative = text.negative_embeds.to(engine.device, engine.dtype)
        cfg = s.guidance_scale > 1.0

        def call():
            outs = [pipe.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=e,
                                     return_dict=False)[0] for e in ([embeds, negative] if cfg else [embeds])]
            return torch.stack(outs)

        return call

    def decode_call(self, engine, batch: int):
        """The VAE decode as WanPipeline makes it (latents un-normalized by latents_mean/std, then vae.decode)."""
        torch, vae = self.torch, engine.pipe.vae
        g = torch.Generator("cpu").manual_seed(1)
        latents = torch.randn(*self.latent_shape(engine, batch), generator=g).to(engine.device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        latents = latents * std + mean
        return lambda: vae.decode(latents, return_dict=False)[0]

    def video_steps(self, step_s: float | None, decode_s: float | None, spare_s: float = 20.0) -> int | None:
        return video_steps(self.spec(self.video_batch).sampling.num_inference_steps, step_s, decode_s, self.left(),
                           spare_s)


def child_wan_eager(c: WanChild, options: dict) -> None:
    """Wan 2.1-T2V-1.3B eager, the model built once (UMT5-XXL 5.7 B parameters, transformer 1.4 B, VAE): as
    child_eager, in the order that keeps the most if the step is stopped at its timeout."""
    import torch

    started = time.perf_counter()
    spec = c.spec(WAN_VIDEO_BATCH)
    engine = c.engine(spec)
    c.sync()
    c.emit("build", build_s=time.perf_counter() - started, model=WAN_SPEC, configs=str(WAN_CONFIGS.relative_to(REPO)),
           weights_gib=c.weights_gib(engine), **c.memory("build_peak"), **c.predicted(spec))
    figures = c.figures(spec)
    with torch.inference_mode():
        for batch in WAN_BATCHES:
            c.text(engine, batch)  # warm-up
            seconds = c.timed(lambda: c.text(engine, batch))
            c.emit("umt5", batch=batch, s=seconds, model_tflop=figures.t5 * batch / 1e12,
                   tflops=figures.t5 * batch / seconds / 1e12)
    total = torch.cuda.mem_get_info()[1] / 2**30 if c.cuda else None
    texts, step_s = {}, {}
    for batch in WAN_BATCHES:
        predicted = c.predicted(c.spec(batch))
        if total and predicted["predicted_peak_gib"] > 0.95 * total:
            c.emit("step", batch=batch, status="skipped", reason=f"predicted {predicted['predicted_peak_gib']:.0f} "
                   f"GiB > 95% of {total:.0f} GiB", **predicted)
            continue
        try:
            with torch.inference_mode():
                texts[batch] = c.text(engine, batch)
            result = c.time_steps(engine, texts[batch], batch)
            step_s[batch] = result["s_per_step"]
            c.emit("step", status="ok", **result, **predicted)
        except torch.OutOfMemoryError as e:
            c.emit("step", batch=batch, status="oom", reason=str(e).splitlines()[0], **predicted)
            break
    with torch.inference_mode():
        one = c.step_call(engine, texts.get(1) or c.text(engine, 1), 1)()
        two = c.step_call(engine, texts.get(2) or c.text(engine, 2), 2)()
        c.emit("batch-invariance", max_abs_diff=float((one[:, 0] - two[:, 0]).abs().max()),
               rows_equal=bool(torch.equal(one[:, 0], two[:, 0])))
        del one, two
        decode, decode_s = c.decode_call(engine, WAN_VIDEO_BATCH), None
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            decode()  # warm-up (and cudnn's autotuning when benchmark is on)
            c.sync()
            c.reset_peak()
            seconds = c.timed(decode)
            decode_s = seconds if decode_s is None else min(decode_s, seconds)
            c.emit("vae-decode", batch=WAN_VIDEO_BATCH, cudnn_benchmark=bench, s=seconds,
                   model_tflop=(figures.vae_decode or 0) / 1e12, tflops=(figures.vae_decode or 0) / seconds / 1e12,
                   **c.memory("decode_peak"), **c.predicted(spec))
        torch.backends.cudnn.benchmark = False
        del decode
        from torch.utils.flop_counter import FlopCounterMode

        call = c.step_call(engine, texts.get(1) or c.text(engine, 1), 1)
        with FlopCounterMode(display=False) as counter:
            call()
        c.emit("flops", batch=1, counted_tflop=counter.get_total_flops() / 1e12,
               modelled_tflop=c.step_flops(engine, None, 1) / 1e12)
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if c.cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            call()
            c.sync()
        key = "self_device_time_total" if c.cuda else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:12]
        c.emit("profile", batch=1, by=key, top=[{"name": e.key[:120], "calls": e.count,
                                                 "ms": getattr(e, key, 0) / 1000} for e in events])
    c.reset_peak()
    steps = c.video_steps(step_s.get(WAN_VIDEO_BATCH), decode_s)
    c.emit("video", **c.video(engine, steps=steps), **c.memory("video_peak"), **cut_short(steps, spec))


def child_wan_compiled(c: WanChild, options: dict) -> None:
    """Wan compiled at the production batch, regionally (the engine's only way: diffusers'
    compile_repeated_blocks over WanTransformerBlock), inductor mode "default"; the transformer fed embeddings
    directly, so UMT5 is not built. Cold compile seconds (the engine's compile + its 2-step warm-up video),
    seconds per step and per video, recompiles after warm-up."""
    import torch
    from torch._dynamo.utils import counters

    compile_ = {"mode": options.get("mode", "default"), "scope": "blocks", "vae_decode": False}
    spec = c.spec(WAN_VIDEO_BATCH, compile_, text_encoder=False)
    counters.clear()
    started = time.perf_counter()
    engine = c.engine(spec)
    c.emit("compile", compile_s=engine.warmup_seconds, load_s=time.perf_counter() - started - engine.warmup_seconds,
           frames=counters["frames"]["total"], weights_gib=c.weights_gib(engine), **compile_)
    warmed = counters["frames"]["total"]
    text = c.synthetic_text(engine, WAN_VIDEO_BATCH)
    with torch.inference_mode():
        step = c.time_steps(engine, text, WAN_VIDEO_BATCH)
    c.emit("step", **step, recompiles=counters["frames"]["total"] - warmed, **c.predicted(spec))
    warmed = counters["frames"]["total"]
    steps = c.video_steps(step["s_per_step"], None, spare_s=30.0)
    c.emit("video", **c.video(engine, text=text, steps=steps), recompiles=counters["frames"]["total"] - warmed,
           **cut_short(steps, spec))


CHILDREN = {"eager": child_eager, "compiled": child_compiled, "float8": child_float8,
            "production-mode": child_compiled, "wan-eager": child_wan_eager, "wan-compiled": child_wan_compiled}


def run_child(step: str, options: dict, out: Path, smoke: bool, deadline: float | None = None) -> None:
    run = CHILDREN[step]
    import torch

    c = (WanChild if step.startswith("wan-") else Child)(step, out, smoke, deadline)
    if c.cuda:
        c.emit("device", name=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()))
    run(c, options)
    c.emit("done")


# ---- the driver ----------------------------------------------------------------------------------------------


def torchao_missing() -> str | None:
    """Why torchao cannot be used here (None when it can), without importing it in this process."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed here (GPU.md: bring its wheel in .gpu-wheels/)"
    return None


def environment(device: str) -> dict:
    import importlib.metadata as md

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {"step": "env", "machine": machine(), "torch": torch.__version__, "diffusers": version("diffusers"),
           "transformers": version("transformers"), "torchao": version("torchao"), "device": device,
           "inductor_compile_threads": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   gpu_total_gib=torch.cuda.mem_get_info()[1] / 2**30)
    return env


def print_plan(budget: float) -> None:
    print(f"plan: {len(STEPS)} steps in {budget:.0f} s, each its own process (timeout: the time left, at most its cap)")
    for i, s in enumerate(STEPS, 1):
        print(f"  {i}. {s.name:<16} cap {s.cap_s:.0f} s, started with at least {s.min_s:.0f} s left"
              f"{' (a compile step: at least the slowest compile so far + ' + str(int(AFTER_COMPILE_S)) + ' s)' if s.compiles else ''}"
              f"{'; ' + s.note if s.note else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", action="store_true", help="print the plan and its budget, run nothing")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"seconds for the whole plan ({BUDGET_S:.0f})")
    ap.add_argument("--out", default="gpu-results", help="folder: gpu.jsonl (appended) and logs/ (one per step)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: toy sizes, rehearses the code")
    ap.add_argument("--only", nargs="+", default=None, help="run only these steps")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one step, in its own process (internal)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # time.time() of the child's kill
    args = ap.parse_args()
    out = Path(args.out)
    if args.child:
        run_child(args.child, json.loads(args.options), out, args.device == "cpu", args.deadline)
        return
    print_plan(args.budget_s)
    if args.plan:
        return
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("not run: no CUDA device visible (torch.cuda.is_available() is False); --device cpu rehearses it")
        raise SystemExit(1)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "gpu.jsonl"
    env = environment(args.device)
    append(results, env)
    print(json.dumps(env))
    steps = [s for s in STEPS if not args.only or s.name in args.only]

    def write(line: dict) -> None:
        append(results, line)
        print(json.dumps(line)[:600], flush=True)

    run_plan(steps, args.budget_s, time.monotonic, ChildLauncher(out, args.device), write, torchao_missing())
    print(f"results: {results}; logs: {out / 'logs'}")


if __name__ == "__main__":
    main()
