"""Shared fixtures: one tiny model cache and one local Ray per test session."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/hubcache.py, tests/latte1.py

# No hub at test time: huggingface_hub reads both when it is imported (and Ray's workers inherit them), so they
# are set here, before any test module imports it. The cache is this session's own folder (a Latte-1-shaped
# model is placed in it by the `latte1_hub` fixture); what a user has in ~/.cache/huggingface is never read.
# Made once per process: test modules also import this file as `tests.conftest`, a second module object whose
# code runs again, and a second folder would then be the env's (inherited by Ray's workers) while the fixtures
# fill the first. A child process (its own pid) makes its own.
_OWNER = "LATTE_RAY_TEST_HUB_CACHE_PID"
if os.environ.get(_OWNER) == str(os.getpid()):
    HUB_CACHE = Path(os.environ["HF_HUB_CACHE"])
else:
    HUB_CACHE = Path(tempfile.mkdtemp(prefix="latte-ray-test-hub-"))
    os.environ["HF_HUB_CACHE"] = str(HUB_CACHE)
    os.environ[_OWNER] = str(os.getpid())
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _remove_hub_cache():
    yield
    shutil.rmtree(HUB_CACHE, ignore_errors=True)  # this session's own folder, made above


@pytest.fixture(scope="session")
def latte1_hub(tmp_path_factory) -> Path:
    """Latte-1-shaped random weights (tests/latte1.py) in this session's hub cache as maxin-cn/Latte-1 at the
    production spec's pinned commit, so `model.source: maxin-cn/Latte-1` loads it offline, in this process and
    in Ray's workers. Built once per session (~20 s on 2 cores, 1.2 GB)."""
    from latte1 import save_latte1_shaped, write_latte1_hub

    model = save_latte1_shaped(tmp_path_factory.mktemp("latte1-shaped"))
    write_latte1_hub(HUB_CACHE, model)
    shutil.rmtree(model)  # the cache holds its own copy
    return HUB_CACHE


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A session-wide cache folder holding the tiny model; Ray workers inherit it through the env."""
    cache = Path(os.environ.get("LATTE_RAY_TEST_CACHE") or tmp_path_factory.mktemp("latte-cache"))
    os.environ["LATTE_RAY_CACHE"] = str(cache)
    from latte_ray.model.tiny import ensure_tiny_model

    ensure_tiny_model(cache)
    return cache


@pytest.fixture(scope="session")
def faults_file(tmp_path_factory) -> Path:
    """A fault-rules file every Ray worker of the session reads (latte_ray/faults/injection.py); empty = no faults.
    Tests write rules into it (the `faults` fixture in test_resume.py) and clear it afterwards."""
    path = tmp_path_factory.mktemp("faults") / "rules.txt"
    path.write_text("")
    return path


@pytest.fixture(scope="session")
def retry_scale_file(tmp_path_factory) -> Path:
    """The storage retry scale every Ray worker of the session reads (latte_ray/faults/retry.py): "1";
    a test may write another number into it and must restore "1"."""
    path = tmp_path_factory.mktemp("retry") / "scale.txt"
    path.write_text("1")
    return path


@pytest.fixture(scope="session")
def ray_local(model_cache, faults_file, retry_scale_file):
    """A real local Ray with this machine's CPUs, started once (after LATTE_RAY_CACHE is set) and shut down
    at the end."""
    import ray

    from latte_ray.runner import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    os.environ["LATTE_RAY_FAULTS"] = f"@{faults_file}"  # inherited by Ray's workers
    os.environ["LATTE_RAY_RETRY_DELAY_SCALE"] = f"@{retry_scale_file}"
    # botocore tries each request once: its own legacy retries (up to 5 attempts with backoff) make one
    # failed attempt against a closed endpoint last seconds, and the outage tests measure latte-ray's retry
    # budgets (latte_ray/faults/retry.py), not botocore's.
    os.environ["AWS_MAX_ATTEMPTS"] = "1"
    init_ray()
    yield ray
    ray.shutdown()


def write_prompts(path: Path, columns: dict, schema: pa.Schema | None = None) -> Path:
    """Write a prompt table (dict of column -> list) as Parquet and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


# A line Ray forwards from another process of the cluster this test process is connected to: "(pid=gcs_server) ...",
# "(raylet) ...", "(SomeActor pid=123) ...", "(MapWorker(MapBatches(WriteStage)) pid=2382, ip=10.0.0.2) ...",
# colored or not. Ray writes them to sys.stdout whenever they arrive, so one can land inside a CliRunner capture of
# a command that never touched Ray (CI saw a GCS "Failed to kill actor" line, left from an earlier test's killed
# actor, in front of `run --dry-run`'s one-line error; then a WriteStage worker's line, whose name holds parentheses).
_RAY_FORWARDED = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:raylet|.*?\bpid=\w+)(?:, ip=[\w.:-]+)?\)")


def own_output(result) -> str:
    """What a CliRunner-invoked command itself printed: its output without the lines Ray forwarded meanwhile."""
    return "".join(line for line in result.output.splitlines(keepends=True) if not _RAY_FORWARDED.match(line))


# ------------------------------------------------------------------ loopback S3 (moto's standalone server)

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """A real S3 HTTP endpoint on 127.0.0.1. moto accepts any credentials; it keeps objects in memory."""

    endpoint: str
    log: Path  # the server's request log (one line per HTTP request)

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment for this endpoint, with dummy credentials. With moto the region
        goes in AWS_DEFAULT_REGION, not in s3fs client_kwargs (bucket creation would fail)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def storage_options(self, key: str = "testing", secret: str = "testing") -> dict[str, str]:
        """fsspec options for RunSpec.storage_options: they reach Ray workers, unlike env set after Ray started."""
        return {"endpoint_url": self.endpoint, "key": key, "secret": secret}

    def make_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)
        return name

    def requests(self, method: str, path_part: str) -> int:
        """How many `METHOD /...path_part...` requests the server has answered so far."""
        return sum(1 for line in self.log.read_text(errors="replace").splitlines()
                   if f"{method} /" in line and path_part in line)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server as a subprocess on a free loopback port (as s3fs's own tests run it)."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    moto = Path(sys.executable).with_name("moto_server")
    cmd = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]
    for _attempt in range(3):  # another process may take the port between picking and binding it
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        with open(log, "ab") as out:
            proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
        try:
            if _wait_answering(endpoint, proc, timeout=60):
                break
        except BaseException:
            _stop(proc)
            raise
        _stop(proc)
    else:
        pytest.fail(f"moto S3 server did not start; see {log}")
    try:
        yield S3Server(endpoint=endpoint, log=log)
    finally:
        _stop(proc)


def _wait_answering(endpoint: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
