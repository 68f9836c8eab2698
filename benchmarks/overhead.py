"""overhead: what latte-ray costs (or gains) over a bare diffusers loop doing the same work.

Same tiny random-weight Latte, same prompts and seeds, same mp4 settings:
  (a) bare loop: LattePipeline per prompt -> uint8 frames -> mp4 in memory (PyAV) -> write the file, with
      torch on every core (its intra-op threads: the only way a bare loop can use them);
  (c) the same loop through latte-ray's engine (LatteEngine.generate), in this process, no Ray;
  (b) latte-ray: runner.run with pipelines/tiny-cpu.yaml's execution settings as shipped (batch size,
      generation actors, CPUs per actor), so its generation may use every core too.
(a) and (c) alternate video by video, so both see the same load from anything else on the machine; each
also reports CPU seconds per video, which neighbours do not inflate. (b) runs after them. Prints b/a
throughput end to end (actor start and model load included) and steady state (videos per second over the
second half of the committed videos: what a long run sees), and a last line with every figure.
Target: b/a >= 0.95 at steady state.

    .venv/bin/python benchmarks/overhead.py [--prompts 24] [--steps 200] [--threads 0]
        [--batch-size N] [--actors N | --actors MIN,MAX] [--actor-cpus C]   # override tiny-cpu's execution

--actors 1 --actor-cpus 2 --batch-size 1 is the configuration of the first measurements (one actor with one
torch thread per core: 0.81); --threads 1 --actors 1 gives each side one core.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import CpuMeter, machine, same_priority_as_baseline, tiny_spec, write_prompt_table


class Loop:
    """One in-process generate -> encode -> write loop, timed per video (wall and CPU)."""

    def __init__(self, name: str, generate, spec, out: Path):
        self.name, self.generate, self.spec, self.out = name, generate, spec, out
        out.mkdir(parents=True, exist_ok=True)
        self.wall, self.cpu, self.finished = [], [], []

    def one(self, row: dict) -> None:
        from latte_ray.stages.encode import encode_mp4

        wall, cpu = time.perf_counter(), time.process_time()
        data = encode_mp4(self.generate(row), self.spec.video)
        (self.out / f"{row['id']}.mp4").write_bytes(data)
        self.finished.append(time.perf_counter())
        self.wall.append(self.finished[-1] - wall)
        self.cpu.append(time.process_time() - cpu)


def bare_generate(spec):
    import numpy as np
    import torch
    from diffusers import LattePipeline

    from latte_ray.model.tiny import ensure_tiny_model

    pipe = LattePipeline.from_pretrained(str(ensure_tiny_model()), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    s = spec.sampling

    def generate(row):
        frames = pipe(
            prompt=row["prompt"], negative_prompt=s.negative_prompt, num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale, height=s.height, width=s.width, video_length=s.video_length,
            output_type="np", clean_caption=False, generator=torch.Generator("cpu").manual_seed(row["seed"]),
        ).frames[0]
        return (frames * 255).round().astype(np.uint8)

    return generate


def engine_generate(spec):
    from latte_ray.model.families.latte_engine import LatteEngine

    engine = LatteEngine(spec)
    return lambda row: engine.generate([row["prompt"]], [spec.sampling.negative_prompt], [row["seed"]])[0][0]


def latte_ray_run(spec, table: Path, out: Path) -> tuple[float, list[float]]:
    from latte_ray import runner
    from latte_ray.spec import RunSpec
    from latte_ray.record.storage import OutputLayout, filesystem, read_manifest

    runner.init_ray()  # Ray start-up is timed separately (end to end), not in the CPU breakdown
    # Sampled every 2 s: at 0.5 s the meter itself took 1.5% of a core in this process, which (b)'s
    # generation would pay for and (a)'s would not.
    with CpuMeter(interval=2.0) as cpu:
        started = time.perf_counter()
        summary = runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=str(out)))
        seconds = time.perf_counter() - started
    assert summary.error == 0, summary.errors
    fs, root = filesystem(str(out))
    stamps = sorted(t.timestamp() for t in read_manifest(
        fs, OutputLayout(str(out), root), columns=["finished_at"])["finished_at"].to_pylist())
    half = stamps[len(stamps) // 2]
    window = stamps[-1] - half
    busy = {k: v / window for k, v in cpu.between(half, stamps[-1]).items()}
    print("    (b) CPUs busy per kind of process, second half of the videos: " + ", ".join(
        f"{k} {v:.2f}" for k, v in busy.items() if v >= 0.01) + f" (sum {sum(busy.values()):.2f})")
    return seconds, stamps


def steady_rate(finished: list[float], second_half: bool = False) -> float:
    """Videos per second between the first stamp (or the middle one) and the last, counting only videos
    finished after it: the videos of a batch share one stamp, so the first stamp's batch is not counted."""
    stamps = sorted(finished)
    t0 = stamps[len(stamps) // 2] if second_half else stamps[0]
    after = sum(1 for t in stamps if t > t0)
    return after / (stamps[-1] - t0) if stamps[-1] > t0 else float("nan")


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def torch_threads_in_actor(num_cpus: float) -> int:
    import ray

    from latte_ray.runner import init_ray

    init_ray()

    @ray.remote(num_cpus=num_cpus)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def actors_arg(value: str):
    lo, _, hi = value.partition(",")
    return int(lo) if not hi else (int(lo), int(hi))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--steps", type=int, default=200, help="denoising steps (200: ~1.5 s per video on 2 idle cores)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in (a)/(c); 0: every core")
    ap.add_argument("--batch-size", type=int, default=None, help="(b)'s batch size (default: tiny-cpu's)")
    ap.add_argument("--actors", type=actors_arg, default=None, help="(b)'s generation actors, N or MIN,MAX "
                    "(default: tiny-cpu's)")
    ap.add_argument("--actor-cpus", type=float, default=None, help="(b)'s CPUs per generation actor, which Ray "
                    "also makes its torch threads (floor, at least 1) (default: tiny-cpu's)")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    cpus = args.threads or os.cpu_count() or 1
    torch.set_num_threads(cpus)
    overrides = {"sampling.num_inference_steps": args.steps, "execution.batch_size": args.batch_size,
                 "execution.concurrency": args.actors, "execution.num_cpus_per_actor": args.actor_cpus}
    spec = tiny_spec(**{k: v for k, v in overrides.items() if v is not None})
    ex = spec.execution
    work = Path(tempfile.mkdtemp(prefix="latte-ray-overhead-"))
    try:
        table = write_prompt_table(work / "prompts.parquet", args.prompts)
        rows = pq.read_table(table).to_pylist()
        print(f"machine: {machine()}; {same_priority_as_baseline()}")
        load_before = load()
        a = Loop("a", bare_generate(spec), spec, work / "bare")
        c = Loop("c", engine_generate(spec), spec, work / "engine")
        for i, row in enumerate(rows):
            for loop in ((a, c) if i % 2 == 0 else (c, a)):
                loop.one(row)
        for loop, what in ((a, "(a) bare diffusers loop"), (c, "(c) latte-ray's engine, in process, no Ray")):
            print(f"{what}: steady {1 / steady_rate(loop.finished):.2f} s/video wall (interleaved), median "
                  f"{median(loop.wall):.2f} s wall, {median(loop.cpu):.2f} s CPU per video")
        print(f"c/a median wall {median(a.wall) / median(c.wall):.3f}, CPU {median(a.cpu) / median(c.cpu):.3f} "
              f"(throughput ratios); load average now {load()}")
        actor_threads = torch_threads_in_actor(ex.num_cpus_per_actor)
        print(f"torch threads: bare loop {torch.get_num_threads()}, each generation actor {actor_threads}")
        b_s, b_done = latte_ray_run(spec, table, work / "latte-ray")
        load_after = load()
        steady = steady_rate(b_done, second_half=True)
        print(f"(b) latte-ray, actors {ex.concurrency} x {ex.num_cpus_per_actor} CPU, batch {ex.batch_size}: "
              f"{args.prompts} videos in {b_s:.1f}s, {b_s / args.prompts:.2f} s/video end to end, steady "
              f"{1 / steady:.2f} s/video; load average now {load_after}")
        ratio_steady = steady * median(a.wall)
        ratio_e2e = median(a.wall) * args.prompts / b_s
        print(f"b/a throughput, steady state: {ratio_steady:.3f} (vs a's median wall per video)")
        print(f"b/a throughput, end to end (actor start and model load included; Ray already up): {ratio_e2e:.3f}")
        print(f"RESULT b/a steady {ratio_steady:.3f} end-to-end {ratio_e2e:.3f} c/a {median(a.wall) / median(c.wall):.3f}"
              f" | a {median(a.wall):.3f} s/video ({torch.get_num_threads()} threads) b {1 / steady:.3f} s/video"
              f" (actors {ex.concurrency} x {ex.num_cpus_per_actor} CPU = {actor_threads} thread(s), batch "
              f"{ex.batch_size}) | {args.prompts} prompts {args.steps} steps | {os.cpu_count()} CPUs, load "
              f"{load_before} -> {load_after}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
