"""resume_scale: the resume filter against a manifest of 1,000,000 ok ids.

Setup: an input table of N ids (default 1,000,000) plus 1% new ones, and an output whose manifest records
the N ids as ok, in parts of --part-rows rows (default 1,000: 1,000 part files), with their N video files
(the pre-pass checks that each is there: what that check costs is video_check.py's measure).
Measures, each in a fresh driver process (driver RSS from /proc: after ray.init and imports, after, peak):
  1. the run's resume filter: workplan.plan_work (key-scan tasks + one reduce task that streams the
     manifest into 128-bit keys); the driver only holds object refs;
  2. for comparison, the same set built in the driver as strings (workplan.done_ids);
  3. the per-batch filter in the prepare stage (one 4,096-row batch against the 1M-id set): 128-bit keys and
     a binary search (what PrepareStage does) vs pyarrow.compute.is_in (which rebuilds its hash table of
     the whole value set on every call), and both extrapolated to the whole input.

    .venv/bin/python benchmarks/resume_scale.py [--ids 1000000] [--part-rows 1000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, rss_mb, tiny_spec, write_prompt_table

BATCH = 4096


def mark_done(ids, output: Path, part_rows: int) -> None:
    """The ids recorded ok, each with its video (video_check.make_output): a resuming run's video check finds
    them all there, so the pre-pass skips every one, as it would on a real output."""
    from video_check import make_output

    make_output(str(output), {}, len(ids), part_rows, ids.to_pylist())


def child(mode: str, table: str, output: str) -> None:
    """The measured driver: prints one JSON line."""
    import ray.data  # noqa: F401  (imports are not growth)

    from latte_ray import runner
    from latte_ray.plan.prompts import resolve_prompt_files
    from latte_ray.spec import RunSpec
    from latte_ray.record.storage import OutputLayout, filesystem
    from latte_ray.plan import workplan
    from latte_ray.plan.prompts import read_input
    from latte_ray.plan.workplan import plan_work

    run = RunSpec(pipeline=tiny_spec(), prompts=[table], output=output)
    in_fs, files = resolve_prompt_files(run.prompts)
    runner.init_ray()
    import ray

    ray.get(ray.remote(lambda: 0).options(num_cpus=0.25).remote())  # warm a worker
    baseline = rss_mb()
    started = time.perf_counter()
    if mode == "plan":
        work = plan_work(run, in_fs, files, lambda subset: read_input(run, in_fs, subset))
        result = {"done": work.done, "todo": work.todo}
    else:
        out_fs, root = filesystem(output)
        done = workplan.done_ids(run, OutputLayout(output, root), out_fs)
        result = {"done": len(done)}
    seconds = time.perf_counter() - started
    print(json.dumps({**result, "seconds": seconds, "baseline_mb": baseline, "after_mb": rss_mb(),
                      "peak_mb": rss_mb("VmHWM")}))


def measure(mode: str, table: Path, output: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(table), str(output)],
                          capture_output=True, text=True, cwd=Path(__file__).parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def filter_timings(ids, total_rows: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    from latte_ray.plan.keys import contains, id_keys, key_set

    started = time.perf_counter()
    done = key_set(id_keys(ids.to_pylist()))
    build = time.perf_counter() - started
    strings = pc.unique(ids)
    batch = ids.slice(len(ids) - BATCH // 2, BATCH // 2).to_pylist() + [f"new-{i}" for i in range(BATCH // 2)]

    def best(fn, repeat: int = 5) -> float:
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    keyed = best(lambda: contains(done, id_keys(batch)))
    is_in = best(lambda: pc.is_in(pa.array(batch), value_set=strings))
    assert contains(done, id_keys(batch)).sum() == BATCH // 2
    batches = total_rows / BATCH
    print(f"done set as keys: {len(done):,} ids, {done.nbytes / 1e6:.0f} MB (strings: {strings.nbytes / 1e6:.0f} MB), "
          f"built in {build:.2f}s")
    print(f"filter one {BATCH}-row batch against {len(done):,} done ids: keys + binary search {keyed * 1e3:.1f} ms, "
          f"pyarrow is_in {is_in * 1e3:.1f} ms ({is_in / keyed:.0f}x)")
    print(f"filter the whole input ({total_rows:,} rows, {batches:.0f} batches): keys {keyed * batches:.1f} s, "
          f"is_in {is_in * batches:.1f} s of CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=1_000_000, help="ok ids in the manifest")
    ap.add_argument("--part-rows", type=int, default=1_000, help="rows per manifest part")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="latte-ray-resume-scale-"))
    print(f"machine: {machine()}")
    try:
        total = args.ids + args.ids // 100
        table = write_prompt_table(work / "prompts.parquet", total)
        ids = pq.read_table(table, columns=["id"])["id"]
        started = time.perf_counter()
        mark_done(ids.slice(0, args.ids), work / "out", args.part_rows)
        print(f"setup: {total:,} input rows, {args.ids:,} ok ids in {-(-args.ids // args.part_rows):,} manifest "
              f"parts (written in {time.perf_counter() - started:.0f}s)")
        for mode, what in (("plan", "run's resume filter (workplan.plan_work: tasks)"),
                           ("strings", "in-driver string set (workplan.done_ids)")):
            r = measure(mode, table, work / "out")
            print(f"{what}: {r['seconds']:.1f}s, driver RSS {r['baseline_mb']:.0f} MB -> {r['after_mb']:.0f} MB "
                  f"(growth {r['after_mb'] - r['baseline_mb']:+.0f} MB, peak {r['peak_mb'] - r['baseline_mb']:+.0f} MB)"
                  f"; {json.dumps({k: v for k, v in r.items() if k in ('done', 'todo')})}")
        filter_timings(ids.slice(0, args.ids), total)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
