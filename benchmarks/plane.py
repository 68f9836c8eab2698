"""plane: the data plane alone. A null engine returns frames instantly (spec `model.source: null`), so
what is measured is Ray Data scheduling, mp4 encoding, video uploads and manifest commits.

Runs the real plan to a local folder and to a loopback S3 (moto_server started here, on 127.0.0.1) and
prints videos/s and ms per video for each, and the CPU milliseconds per video spent by each kind of process
of the local Ray cluster (stage actors, driver, Ray's daemons; CPU time, so other load on the machine does
not inflate it much), next to the parts measured in isolation in this process (encode one video, put one
object). Target: >= 50 videos/s to S3.

    .venv/bin/python benchmarks/plane.py [--videos 1600] [--batch-size 16] [--preset medium]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from _common import CpuMeter, MotoServer, machine, same_priority_as_baseline, tiny_spec, write_prompt_table


def run_plane(spec, table: Path, output: str, storage_options: dict, exclude: tuple[int, ...]) -> dict:
    """One run: videos/s from its start and at steady state, and CPU seconds per kind of process of this
    process tree (Ray included, the S3 server excluded), over the whole run and at steady state."""
    from latte_ray import runner
    from latte_ray.spec import RunSpec
    from latte_ray.record.storage import OutputLayout, filesystem, read_manifest

    runner.init_ray()  # started once, outside the measured runs
    with CpuMeter(exclude) as cpu:
        started = time.perf_counter()
        summary = runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=output,
                                     storage_options=storage_options))
        seconds = time.perf_counter() - started
    assert summary.error == 0, summary.errors
    fs, root = filesystem(output, storage_options)
    stamps = sorted(t.timestamp() for t in read_manifest(
        fs, OutputLayout(output, root), columns=["finished_at"])["finished_at"].to_pylist())
    # Steady state: the second half of the videos, once the autoscaling CPU pools have grown (Ray Data adds
    # one actor at a time, each a few seconds to start), rate and CPU per video over that window.
    mid = stamps[len(stamps) // 2]
    steady_videos = sum(1 for t in stamps if t > mid)
    steady = steady_videos / (stamps[-1] - mid) if stamps[-1] > mid else float("nan")
    window = cpu.between(mid, stamps[-1])
    return {"videos": summary.ok, "rate": summary.ok / seconds, "steady": steady,
            "by_process": cpu.by_process(), "steady_by_process": window, "steady_videos": steady_videos}


def parts_in_isolation(spec, s3: MotoServer, n: int = 40) -> dict[str, float]:
    """ms per video: encoding (CPU time), one object write (wall: local atomic write, S3 PUT), in this process."""
    from latte_ray.model.null import NullEngine
    from latte_ray.stages.encode import encode_mp4
    from latte_ray.record.storage import filesystem, write_atomic

    frames = NullEngine(spec).denoise(None, list(range(n)))
    t = time.process_time()
    blobs = [encode_mp4(f, spec.video) for f in frames]
    out = {"encode (CPU)": (time.process_time() - t) / n * 1000, "mp4 KB": sum(map(len, blobs)) / n / 1024}
    local = Path(tempfile.mkdtemp(prefix="latte-ray-plane-put-"))
    for name, (fs, root) in {"local write": filesystem(str(local)),
                             "S3 put": filesystem("s3://plane/put-test", s3.storage_options)}.items():
        t = time.perf_counter()
        for i, blob in enumerate(blobs):
            write_atomic(fs, f"{root}/{i:02x}/{uuid.uuid4().hex}.mp4", blob)
        out[name] = (time.perf_counter() - t) / n * 1000
    shutil.rmtree(local, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--preset", default="medium", help="x264 preset of the benchmark spec (tiny-cpu: medium)")
    ap.add_argument("--cpu-actors", type=int, default=4, help="max actors per CPU stage (encode, write)")
    args = ap.parse_args()

    spec = tiny_spec(**{"model.source": "null", "video.preset": args.preset,
                        "execution.batch_size": args.batch_size, "execution.cpu_stage_max_actors": args.cpu_actors})
    s = spec.sampling
    work = Path(tempfile.mkdtemp(prefix="latte-ray-plane-"))
    print(f"machine: {machine()}; {same_priority_as_baseline()}")
    print(f"videos: {args.videos} x {s.video_length} frames {s.width}x{s.height}, {spec.video.codec} "
          f"crf {spec.video.crf} preset {spec.video.preset}; batch {args.batch_size}, "
          f"CPU stages up to {args.cpu_actors} actors")
    try:
        table = write_prompt_table(work / "prompts.parquet", args.videos)
        cores = os.cpu_count() or 1
        with MotoServer() as s3:
            s3.make_bucket("plane")
            parts = parts_in_isolation(spec, s3)
            print("in isolation, per video: " + ", ".join(
                f"{k} {v:.1f}" + ("" if k == "mp4 KB" else " ms") for k, v in parts.items()))
            for name, output, options in (("local disk", str(work / "out"), {}),
                                          ("loopback S3", "s3://plane/run", s3.storage_options)):
                moto = _cpu_of(s3.proc.pid)
                r = run_plane(spec, table, output, options, (s3.proc.pid,))
                moto = _cpu_of(s3.proc.pid) - moto
                print(f"{name}: {r['rate']:.1f} videos/s end to end ({1000 / r['rate']:.1f} ms/video), "
                      f"{r['steady']:.1f} videos/s steady ({1000 / r['steady']:.1f} ms/video)")
                for what, cpu, videos in (("whole run, start-up included", r["by_process"], r["videos"]),
                                          ("steady state", r["steady_by_process"], r["steady_videos"])):
                    per_video = {k: v / videos * 1000 for k, v in cpu.items()}
                    total = sum(per_video.values())
                    print(f"    CPU per video, {what}: {total:.0f} ms (so at most {cores * 1000 / total:.0f} "
                          f"videos/s on {cores} idle cores) = " + ", ".join(
                              f"{k} {v:.1f}" for k, v in list(per_video.items())[:6] if v >= 0.5))
                if options:
                    print(f"    the S3 server itself (same cores, not counted above): "
                          f"{moto / r['videos'] * 1000:.1f} ms CPU/video")
        print(f"machine after: load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cpu_of(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


if __name__ == "__main__":
    main()
