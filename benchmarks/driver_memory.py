"""driver_memory: the driver's RSS does not grow with the prompt table (the driver streams).

Two measurements, each size in a fresh driver process:
  - dry resume over tables of 10k, 100k and 1M prompts: a manifest already records every id as ok, so the
    run reads the whole table, plans (dedupe + resume pre-pass), finds nothing to do and stops;
  - generation with the null engine (frames returned instantly, 2 frames of 32x32 so the cost per row is
    the plan's own) over 2k and 10k pending rows: every row streams through every stage and the driver
    counts the manifest rows. (A million real writes would take hours on this machine.)
Prints, per run, the driver's RSS after `ray.init` and the imports a run needs (baseline), its peak
(VmHWM) and its RSS after the run, and the growth from the smallest table to the largest.
Target: < 50 MB growth 10k -> 1M.

    .venv/bin/python benchmarks/driver_memory.py [--sizes 10000 100000 1000000] [--generate 2000 10000]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, rss_mb, tiny_spec, write_prompt_table

PART_ROWS = 10_000  # manifest rows per part file in the synthetic "all done" manifest


def mark_all_done(table: Path, output: Path) -> None:
    """Write manifest parts recording every id of `table` as ok (other columns null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from latte_ray.record.storage import MANIFEST_SCHEMA, OutputLayout, filesystem, write_manifest_part

    fs, root = filesystem(str(output))
    layout = OutputLayout(str(output), root)
    ids = pq.read_table(table, columns=["id"])["id"]
    for start in range(0, len(ids), PART_ROWS):
        chunk = ids.slice(start, PART_ROWS)
        n = len(chunk)
        cols = {f.name: pa.nulls(n, f.type) for f in MANIFEST_SCHEMA}
        cols["id"] = chunk.combine_chunks()
        cols["status"] = pa.array(["ok"] * n)
        write_manifest_part(fs, layout, pa.table(cols, schema=MANIFEST_SCHEMA))


def child(table: str, output: str, spec_json: str) -> None:
    """The measured driver: prints one JSON line."""
    import ray.data  # noqa: F401  (imports are not growth: load what the run will load first)

    from latte_ray import runner, stages  # noqa: F401
    from latte_ray.spec import PipelineSpec, RunSpec

    runner.init_ray()
    baseline = rss_mb()
    started = time.perf_counter()
    summary = runner.run(RunSpec(pipeline=PipelineSpec.model_validate_json(spec_json), prompts=[table],
                                 output=output))
    after = rss_mb()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back: what is left is really held
    print(json.dumps({
        "baseline_mb": baseline, "after_mb": after, "trimmed_mb": rss_mb(),
        "peak_mb": rss_mb("VmHWM"),
        "seconds": time.perf_counter() - started, "ok": summary.ok, "skipped": summary.skipped_done,
    }))


def measure(table: Path, output: Path, spec) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(table), str(output), spec.model_dump_json()],
                          capture_output=True, text=True, cwd=Path(__file__).parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--generate", type=int, nargs="*", default=[2_000, 10_000],
                    help="null-engine runs over this many pending rows each")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    spec = tiny_spec(**{"model.source": "null", "execution.batch_size": 16})
    work = Path(tempfile.mkdtemp(prefix="latte-ray-driver-mem-"))
    print(f"machine: {machine()}")
    results = {}
    try:
        for n in args.sizes:
            table = write_prompt_table(work / f"p{n}.parquet", n)
            output = work / f"out{n}"
            mark_all_done(table, output)
            r = results[n] = measure(table, output, spec)
            assert r["skipped"] == n and r["ok"] == 0, r
            print(f"{n:>10,} rows (dry resume): baseline {r['baseline_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB, "
                  f"after {r['after_mb']:.0f} MB, {r['seconds']:.1f}s")
        lo, hi = min(results), max(results)
        for key in ("peak_mb", "after_mb"):
            growth = results[hi][key] - results[lo][key]
            print(f"growth {lo:,} -> {hi:,} rows, {key.removesuffix('_mb')} RSS: {growth:+.1f} MB "
                  f"({'meets' if growth < 50 else 'MISSES'} the < 50 MB target)")
        gen_spec = tiny_spec(**{"model.source": "null", "execution.batch_size": int(os.environ.get("BENCH_BATCH", "64")), "sampling.video_length": 2,
                                "sampling.height": 32, "sampling.width": 32, "video.preset": "ultrafast"})
        generated = {}
        for n in args.generate:
            table = write_prompt_table(work / f"gen{n}.parquet", n)
            r = generated[n] = measure(table, work / f"gen-out{n}", gen_spec)
            assert r["ok"] == n, r
            print(f"{n:>9,} rows generated (null engine): baseline {r['baseline_mb']:.0f} MB, peak "
                  f"{r['peak_mb']:.0f} MB, after {r['after_mb']:.0f} MB ({r['trimmed_mb']:.0f} MB after "
                  f"malloc_trim), {r['ok'] / r['seconds']:.1f} videos/s")
        if len(generated) > 1:
            lo, hi = min(generated), max(generated)
            for key in ("peak_mb", "after_mb", "trimmed_mb"):
                growth = generated[hi][key] - generated[lo][key]
                print(f"growth {lo:,} -> {hi:,} generated rows, {key.removesuffix('_mb')} RSS: {growth:+.1f} MB "
                      f"({growth / (hi - lo) * 1e6 / 1024:.2f} KB per row)")
        print(f"machine after: load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
