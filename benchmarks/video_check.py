"""video_check: what a resuming run's video check costs (issue 29), next to the rest of its pre-pass.

Before it skips an ok id, a resuming run checks that the id's video is there with its recorded size, from
listings of the videos/<shard>/ folders (record/verify.video_listing: one LIST per shard page, an Arrow
table of (key, size)), made while the manifest parts are read; plan/workplan.done_keys then looks every ok
row up in it at once. This times, on one output of N ok rows (parts of --part-rows rows) and N video objects
(a few bytes each: a LIST costs the same whatever the objects' sizes):
  1. the manifest side of the pre-pass without the check: every part read (id, status) into sorted 128-bit keys;
  2. the same with the video check (done_keys): plus video_uri and bytes read, the shards listed, every ok row
     looked up;
and prints the check's cost (2 - 1, wall and this process's CPU) as a ratio of (1), and of the whole pre-pass
at 1M rows (resume_scale.py). On S3 it also times one LIST page alone and works out the LISTs at 1M videos.

    .venv/bin/python benchmarks/video_check.py [--rows 1000000] [--store local|s3] [--repeat 1] [--keep DIR]

--store s3 starts moto's standalone server on a loopback port (as the tests do) and writes there. --keep DIR
makes the local output once and measures it again on later runs (1M files take minutes to make).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine

PREPASS_1M_S = 21.0  # benchmarks/README.md, resume_scale: the whole pre-pass at 1M ok ids (this machine)


def make_output(url: str, options: dict, rows: int, part_rows: int) -> None:
    import pyarrow as pa

    from latte_ray.record.storage import MANIFEST_SCHEMA, OutputLayout, filesystem, is_local, write_manifest_part

    fs, root = filesystem(url, options)
    layout = OutputLayout(url, root)
    ids = [f"id-{i:08d}" for i in range(rows)]
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


def measure(url: str, options: dict, repeat: int = 1) -> dict:
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
        for name, client in (("arrow", arrow_s3), ("s3fs", lambda fs: None)):  # the whole listing, each client
            verify.arrow_s3 = client
            try:
                started, cpu = time.perf_counter(), time.process_time()
                listed = verify.video_listing(fs, layout).num_rows
                m[name] = (time.perf_counter() - started, (time.process_time() - cpu) / max(listed, 1))
            finally:
                verify.arrow_s3 = arrow_s3
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--part-rows", type=int, default=1000)
    parser.add_argument("--store", choices=["local", "s3"], default="local")
    parser.add_argument("--repeat", type=int, default=1, help="measure both sides this many times, alternated; "
                        "the fastest of each is printed")
    parser.add_argument("--keep", type=Path, default=None,
                        help="local store only: make the output in this folder and keep it; when it is already there "
                             "(from an earlier --keep run of the same --rows), measure it again without remaking it")
    args = parser.parse_args()
    proc = None
    with tempfile.TemporaryDirectory(prefix="latte-ray-video-check-") as tmp:
        made = False
        if args.store == "local":
            url, options = str((args.keep or Path(tmp)) / "out"), {}
            made = args.keep is not None and (args.keep / f"made-{args.rows}").exists()
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from conftest import free_port

            port = free_port()
            moto = Path(sys.executable).with_name("moto_server")
            proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(3)
            import boto3

            endpoint = f"http://127.0.0.1:{port}"
            boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                         region_name="us-east-1").create_bucket(Bucket="bench")
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            url, options = "s3://bench/out", {"endpoint_url": endpoint, "key": "k", "secret": "s"}
        try:
            started = time.perf_counter()
            if not made:
                make_output(url, options, args.rows, args.part_rows)
                if args.keep is not None:
                    (args.keep / f"made-{args.rows}").touch()
            print(f"{machine()}; store {args.store}: {args.rows} ok rows in {args.rows // args.part_rows} parts and "
                  f"{args.rows} video objects " + (f"kept from an earlier run in {url}" if made else
                                                   f"made in {time.perf_counter() - started:.0f} s"))
            m = measure(url, options, args.repeat)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()
    check = m["new"] - m["old"]
    print(f"manifest side of the pre-pass: {m['old']:.2f} s without the video check, {m['new']:.2f} s with it "
          f"(CPU of this process: {m['old_cpu']:.2f} s, {m['new_cpu']:.2f} s; load average after: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})")
    per_object = check / args.rows
    print(f"video check: {check:.2f} s ({per_object * 1e6:.1f} us per video) = {m['new'] / m['old']:.2f}x the "
          f"manifest side; projected at 1M videos: {per_object * 1e6:.0f} s, {per_object * 1e6 / PREPASS_1M_S:.2f}x "
          f"the whole pre-pass at 1M ids (resume_scale: {PREPASS_1M_S:.0f} s)")
    if "per_list" in m:  # what the LISTs alone would take at 1M videos, if a LIST page cost what it costs here
        shards, per_shard = m["shards"], -(-1_000_000 // m["shards"])
        lists = 1 + shards * -(-per_shard // 1000)
        print(f"one LIST page: {m['per_list'] * 1e3:.0f} ms ({args.rows} objects in the bucket); at 1M videos: "
              f"1 + {shards} shards x ceil({per_shard}/1000) pages = {lists} LISTs, 16 at a time: "
              f"{-(-lists // 16)} x {m['per_list'] * 1e3:.0f} ms = {-(-lists // 16) * m['per_list']:.1f} s "
              f"= {-(-lists // 16) * m['per_list'] / PREPASS_1M_S:.2f}x the pre-pass at 1M ids")
        for name, label in (("arrow", "Arrow's S3 client (what the check uses)"), ("s3fs", "s3fs")):
            wall, cpu = m[name]
            print(f"the listing alone through {label}: {wall:.2f} s, {cpu * 1e6:.1f} us of CPU per object: "
                  f"{cpu * 1e6:.1f} s at 1M videos = {cpu * 1e6 / PREPASS_1M_S:.2f}x the pre-pass at 1M ids")


if __name__ == "__main__":
    main()
