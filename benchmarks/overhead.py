"""overhead: what latte-ray costs (or gains) over a bare diffusers loop doing the same work.

Same tiny random-weight Latte, same prompts and seeds, same mp4 settings, run twice in this process:
  (a) bare loop: LattePipeline per prompt -> uint8 frames -> mp4 in memory (PyAV) -> write the file;
  (b) latte-ray: runner.run with ONE generation actor (holding as many CPUs, so as many torch threads, as (a));
  (c) latte-ray's engine in this process, same loop as (a): separates the engine's cost from Ray's.
Prints b/a throughput twice: end to end (Ray start and model load included) and steady state (videos per
second from the first finished video to the last, i.e. what a long run sees). Target: b/a >= 0.95, > 1.0
when encode/write overlap the next generation.

    .venv/bin/python benchmarks/overhead.py [--prompts 24] [--steps 200] [--batch-size 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import machine, same_priority_as_baseline, tiny_spec, write_prompt_table


def bare_loop(spec, table: Path, out: Path) -> tuple[float, list[float]]:
    """(seconds, finish times) for the plain diffusers loop, model load included."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from diffusers import LattePipeline

    from latte_ray.model.tiny import ensure_tiny_model
    from latte_ray.stages.encode import encode_mp4

    started = time.perf_counter()
    pipe = LattePipeline.from_pretrained(str(ensure_tiny_model()), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    s = spec.sampling
    out.mkdir(parents=True, exist_ok=True)
    finished = []
    for row in pq.read_table(table).to_pylist():
        frames = pipe(
            prompt=row["prompt"], negative_prompt=s.negative_prompt, num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale, height=s.height, width=s.width, video_length=s.video_length,
            output_type="np", clean_caption=False, generator=torch.Generator("cpu").manual_seed(row["seed"]),
        ).frames[0]
        data = encode_mp4((frames * 255).round().astype(np.uint8), spec.video)
        (out / f"{row['id']}.mp4").write_bytes(data)
        finished.append(time.perf_counter())
    return time.perf_counter() - started, finished


def engine_loop(spec, table: Path, out: Path) -> tuple[float, list[float]]:
    """(c) the same loop through latte-ray's engine, in this process: its cost without Ray."""
    import pyarrow.parquet as pq

    from latte_ray.model.engine import LatteEngine
    from latte_ray.stages.encode import encode_mp4

    started = time.perf_counter()
    engine = LatteEngine(spec)
    out.mkdir(parents=True, exist_ok=True)
    finished = []
    for row in pq.read_table(table).to_pylist():
        frames, _ = engine.generate([row["prompt"]], [spec.sampling.negative_prompt], [row["seed"]])
        (out / f"{row['id']}.mp4").write_bytes(encode_mp4(frames[0], spec.video))
        finished.append(time.perf_counter())
    return time.perf_counter() - started, finished


def latte_ray_run(spec, table: Path, out: Path) -> tuple[float, list[float]]:
    from latte_ray import runner
    from latte_ray.spec import RunSpec
    from latte_ray.storage import OutputLayout, filesystem, read_manifest

    started = time.perf_counter()
    summary = runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=str(out)))
    seconds = time.perf_counter() - started
    assert summary.error == 0, summary.errors
    fs, root = filesystem(str(out))
    stamps = read_manifest(fs, OutputLayout(str(out), root), columns=["finished_at"])["finished_at"]
    finished = sorted(t.timestamp() for t in stamps.to_pylist())
    return seconds, finished


def steady_rate(finished: list[float]) -> float:
    return (len(finished) - 1) / (finished[-1] - finished[0]) if len(finished) > 1 else float("nan")


def torch_threads_in_actor(num_cpus: float) -> int:
    import ray

    from latte_ray.runner import init_ray

    init_ray()

    @ray.remote(num_cpus=num_cpus)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--steps", type=int, default=200, help="denoising steps (200: ~1.1 s per video on 2 idle cores)")
    ap.add_argument("--batch-size", type=int, default=1)
    args = ap.parse_args()

    cpus = os.cpu_count() or 1
    spec = tiny_spec(**{"sampling.num_inference_steps": args.steps, "execution.batch_size": args.batch_size,
                        "execution.concurrency": 1, "execution.num_cpus_per_actor": cpus})
    work = Path(tempfile.mkdtemp(prefix="latte-ray-overhead-"))
    try:
        table = write_prompt_table(work / "prompts.parquet", args.prompts)
        print(f"machine: {machine()}; {same_priority_as_baseline()}")
        a_s, a_done = bare_loop(spec, table, work / "bare")
        print(f"(a) bare diffusers loop: {args.prompts} videos in {a_s:.1f}s, "
              f"{a_s / args.prompts:.2f} s/video end to end, steady {1 / steady_rate(a_done):.2f} s/video")
        print(f"    torch threads: bare loop {__import__('torch').get_num_threads()}, "
              f"generation actor {torch_threads_in_actor(cpus)}")
        c_s, c_done = engine_loop(spec, table, work / "engine")
        print(f"(c) latte-ray's engine in this process, no Ray: {c_s / args.prompts:.2f} s/video end to end, "
              f"steady {1 / steady_rate(c_done):.2f} s/video (c/a {steady_rate(c_done) / steady_rate(a_done):.3f}: "
              f"text padded to {spec.sampling.max_sequence_length} tokens and masked, for batch invariance)")
        b_s, b_done = latte_ray_run(spec, table, work / "latte-ray")
        print(f"(b) latte-ray, 1 actor, batch {args.batch_size}: {args.prompts} videos in {b_s:.1f}s, "
              f"{b_s / args.prompts:.2f} s/video end to end, steady {1 / steady_rate(b_done):.2f} s/video")
        print(f"b/a throughput, end to end (Ray start + actor load included): {a_s / b_s:.3f}")
        print(f"b/a throughput, steady state: {steady_rate(b_done) / steady_rate(a_done):.3f}")
        print(f"b/c throughput, steady state (Ray plan vs the same engine without Ray): "
              f"{steady_rate(b_done) / steady_rate(c_done):.3f}")
        print(f"machine after: load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
