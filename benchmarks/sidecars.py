"""sidecars: what keeping the T5 embeddings and the final latents costs per video (spec `sidecars`).

Same tiny random-weight Latte (pipelines/tiny-cpu.yaml: 16 frames at 128x128, 20 steps), same prompts and
seeds. One generation stage (one loaded model, so both settings share the same weights in memory) takes
batches in turns with sidecars off and with embeddings and latents kept, so both see the same load from
anything else on the machine:

  (gen)   DenoiseStage.__call__ per video: what the generation actor (the GPU, in production) spends; the
          sidecars are tensors it computes anyway, copied to the CPU and serialized as .npy;
  (write) encode + write per video (EncodeStage, WriteStage to a local folder): what the CPU stages spend,
          the sidecar objects being stored next to each video.

Prints wall and CPU seconds per video for each (CPU seconds are what neighbours on a shared machine inflate
least), the ratio on/off (target: ~1.00 for generation: the GPU does not wait), the added work measured
directly (the sidecar copy-and-serialize step alone, timed over many repetitions), and the bytes each sidecar
adds to the plan per video, here and at Latte-1's production shapes.

    .venv/bin/python benchmarks/sidecars.py [--batches 8] [--batch-size 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine, tiny_spec


def batch(n: int, start: int) -> dict[str, np.ndarray]:
    words = "a red fox runs through snowy woods at dawn while birds circle above the frozen river".split()
    prompts = [" ".join(words[: 3 + (start + i) % (len(words) - 3)]) for i in range(n)]
    return {"id": np.array([f"v{start + i:06d}" for i in range(n)], object), "prompt": np.array(prompts, object),
            "negative_prompt": np.array([""] * n, object), "seed": np.arange(start, start + n, dtype=np.int64),
            "status": np.array(["pending"] * n, object), "error": np.array([""] * n, object)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import torch

    from latte_ray.spec import SidecarSpec
    from latte_ray.stages.denoise import DenoiseStage
    from latte_ray.stages.encode import EncodeStage
    from latte_ray.stages.write import WriteStage

    torch.set_num_threads(1)  # one core per generator, like one GPU per actor
    off = tiny_spec(**{"sampling.num_inference_steps": args.steps, "execution.batch_size": args.batch_size})
    on = off.model_copy(update={"sidecars": SidecarSpec(embeddings=True, latents=True)})
    with tempfile.TemporaryDirectory() as tmp:
        denoise, encode = DenoiseStage(on.model_dump_json()), EncodeStage(on.video.model_dump_json())
        writers = {name: WriteStage(str(Path(tmp) / name), spec.model_dump_json()) for name, spec in
                   (("off", off), ("on", on))}
        sidecars = {"off": off.sidecars, "on": on.sidecars}
        for name in ("off", "on"):  # warm-up, not timed
            denoise.sidecars = sidecars[name]
            writers[name](encode(denoise(batch(args.batch_size, 10_000))))
        gen = {"off": [], "on": []}
        gen_cpu = {"off": [], "on": []}
        write = {"off": [], "on": []}
        write_cpu = {"off": [], "on": []}
        sizes = {"embeddings": [], "latents": []}
        for k in range(args.batches):
            for name in (("off", "on") if k % 2 == 0 else ("on", "off")):
                denoise.sidecars, writer = sidecars[name], writers[name]
                rows = batch(args.batch_size, k * args.batch_size)
                started, cpu = time.perf_counter(), time.process_time()
                generated = denoise(rows)
                gen[name].append((time.perf_counter() - started) / args.batch_size)
                gen_cpu[name].append((time.process_time() - cpu) / args.batch_size)
                started, cpu = time.perf_counter(), time.process_time()
                committed = writer(encode(generated))
                write[name].append((time.perf_counter() - started) / args.batch_size)
                write_cpu[name].append((time.process_time() - cpu) / args.batch_size)
                assert set(committed["status"].to_pylist()) == {"ok"}
                if name == "on":
                    for column in sizes:
                        sizes[column] += [len(b) for b in generated[column]]
        # The added work alone: the sidecar step of the generation stage on one real batch's tensors.
        denoise.sidecars = sidecars["on"]
        frames, text, kept = denoise._generate(batch(args.batch_size, 0), list(range(args.batch_size)))
        reps = 200
        started = time.perf_counter()
        for _ in range(reps):
            for j in range(args.batch_size):
                denoise._sidecars(text, kept, j)
        packing = (time.perf_counter() - started) / (reps * args.batch_size)

    print(f"machine: {machine()}")
    print(f"tiny Latte, {args.steps} steps, 16x128x128, batch {args.batch_size}, {args.batches} batches per "
          f"setting, alternating; median seconds per video")
    for label, times in (("generation stage, wall", gen), ("generation stage, CPU", gen_cpu),
                         ("encode + write, wall", write), ("encode + write, CPU", write_cpu)):
        a, b = statistics.median(times["off"]), statistics.median(times["on"])
        paired = statistics.median(y / x for x, y in zip(times["off"], times["on"]))  # the same turn's pair
        print(f"  {label:24s} off {a * 1e3:8.2f} ms   on {b * 1e3:8.2f} ms   on/off {b / a:.3f} "
              f"(median of paired turns {paired:.3f})")
    print(f"  sidecar step alone (copy to CPU, fp16, .npy): {packing * 1e6:.0f} us per video = "
          f"{packing / statistics.median(gen['off']) * 100:.3f}% of a video's generation")
    emb, lat = statistics.mean(sizes["embeddings"]), statistics.mean(sizes["latents"])
    print(f"  bytes per video through the plan: t5 embeddings {emb / 1e3:.1f} KB, latents {lat / 1e3:.1f} KB "
          f"(Latte-1 512px: ~{120 * 4096 * 2 / 1e6:.2f} MB fp16 embeddings at 120 tokens, "
          f"{4 * 16 * 64 * 64 * 2 / 1e6:.2f} MB fp16 latents)")


if __name__ == "__main__":
    main()
