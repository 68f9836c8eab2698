"""Storage outages: the loopback S3 endpoint goes away in the middle of a run.

A small TCP proxy stands in front of the moto server; closing it stops listening and resets every live
connection (SO_LINGER 0), so the clients see real refused and reset connections, not injected exceptions.
The null engine generates (frames at once): what is under test is the data plane's storage writes.
- An outage shorter than the retry budgets (latte_ray/faults/retry.py) is ridden out: no error rows.
- One longer than the budgets ends the run with a clear storage error; a resume completes exactly once.
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter

import pytest

from latte_ray import runner
from latte_ray.record.storage import OutputLayout, filesystem, read_manifest
from latte_ray.spec import RunSpec
from tests.conftest import free_port, write_prompts
from tests.test_liveness import null_spec

OUTAGE_S = 8.0  # with the retry scale of test_a_short_outage_is_ridden_out: a 40 s outage


class TcpProxy:
    """Forwards 127.0.0.1:port to a target port. close(): stop listening and reset live connections;
    reopen(): listen on the same port again."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.connections = 0
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self.reopen()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reopen(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(128)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            try:
                server.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread
            except OSError:
                pass
            server.close()
        with self._lock:
            live, self._live = self._live, set()
        for sock in live:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                sock.close()
            except OSError:
                pass

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._live |= {client, upstream}
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._live -= {src, dst}


@pytest.fixture
def proxy(s3_server):
    endpoint_port = int(s3_server.endpoint.rsplit(":", 1)[1])
    p = TcpProxy(endpoint_port)
    yield p
    p.close()


def _committed(fs, layout) -> list[dict]:
    fs.invalidate_cache()  # s3fs caches listings
    try:
        return read_manifest(fs, layout).to_pylist()
    except FileNotFoundError:
        return []


def assert_exactly_once_s3(fs, layout, ids: set[str]) -> list[dict]:
    """Every id has exactly one ok row whose object has the recorded size and sha256."""
    fs.invalidate_cache()
    rows = read_manifest(fs, layout).to_pylist()
    ok = Counter(r["id"] for r in rows if r["status"] == "ok")
    assert set(ok) == ids and max(ok.values()) == 1, ok
    for r in rows:
        if r["status"] == "ok":
            data = fs.cat_file(r["video_uri"].removeprefix("s3://"))
            assert len(data) == r["bytes"] and hashlib.sha256(data).hexdigest() == r["sha256"], r["id"]
    return rows


def _outage_when_committed(fs, layout, proxy: TcpProxy, seconds: float | None, times: dict) -> threading.Thread:
    """In the background: as soon as a first row is committed, take the endpoint away (for `seconds`, or
    until told otherwise when None)."""
    def run():
        while not _committed(fs, layout):
            time.sleep(0.2)
        proxy.close()
        times["closed"] = time.time()
        if seconds is not None:
            time.sleep(seconds)  # the length of the outage, not a wait for a result
            proxy.reopen()
            times["reopened"] = time.time()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_short_outage_is_ridden_out(ray_local, s3_server, proxy, tmp_path, retry_scale_file):
    bucket = s3_server.make_bucket("outage-" + uuid.uuid4().hex[:8])
    direct, _ = filesystem(f"s3://{bucket}", s3_server.storage_options())  # the test reads past the proxy
    output = f"s3://{bucket}/out"
    layout = OutputLayout(url=output, root=f"{bucket}/out")
    ids = [f"o-{i:02d}" for i in range(24)]
    table = write_prompts(tmp_path / "p.parquet", {"id": ids, "prompt": [f"rain on a window {i}" for i in ids]})
    spec = null_spec()
    options = {**s3_server.storage_options(), "endpoint_url": proxy.endpoint}
    times: dict = {}
    watcher = _outage_when_committed(direct, layout, proxy, OUTAGE_S, times)
    started = time.time()
    # Delays and budgets / 5 (videos 24 s, manifest parts 60 s: still 3x the outage), so that the first
    # retry after the endpoint is back comes within ~3 s instead of ~16 s.
    retry_scale_file.write_text("0.2")
    try:
        summary = runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=output, storage_options=options))
    finally:
        retry_scale_file.write_text("1")
    watcher.join(timeout=60)
    print(f"outage of {OUTAGE_S:.0f} s ridden out: the run ended {time.time() - times['reopened']:.0f} s after "
          f"the endpoint came back ({time.time() - started:.0f} s in all)")
    assert (summary.ok, summary.error) == (len(ids), 0), summary.errors
    rows = assert_exactly_once_s3(direct, layout, set(ids))
    assert all(r["status"] == "ok" for r in rows)
    finished = sorted(r["finished_at"].timestamp() for r in rows)
    assert finished[0] < times["closed"] and finished[-1] > times["reopened"], "the outage was not mid-run"


def test_a_long_outage_fails_clearly_and_a_resume_completes_exactly_once(ray_local, s3_server, proxy, tmp_path,
                                                                          retry_scale_file):
    bucket = s3_server.make_bucket("outage-" + uuid.uuid4().hex[:8])
    direct, _ = filesystem(f"s3://{bucket}", s3_server.storage_options())
    output = f"s3://{bucket}/out"
    layout = OutputLayout(url=output, root=f"{bucket}/out")
    ids = [f"l-{i:02d}" for i in range(16)]
    table = write_prompts(tmp_path / "p.parquet", {"id": ids, "prompt": [f"a long night {i}" for i in ids]})
    run = RunSpec(pipeline=null_spec(), prompts=[str(table)], output=output,
                  storage_options={**s3_server.storage_options(), "endpoint_url": proxy.endpoint})
    times: dict = {}
    retry_scale_file.write_text("0.02")  # budgets / 50: videos 2.4 s, manifest parts 6 s
    try:
        _outage_when_committed(direct, layout, proxy, None, times)  # away until the run has ended
        with pytest.raises(Exception) as failure:
            runner.run(run)
    finally:
        retry_scale_file.write_text("1")
    print(f"outage longer than the budgets: the run failed {time.time() - times['closed']:.0f} s into it")
    message = str(failure.value)
    # The write actor's first storage call to give up ends the run, naming what it was doing and its budget:
    # the manifest part (6 s here) or the output lease's fence check before it (2 s; record/lease.py).
    assert re.search(r"(write manifest part|check the lease under s3://[^:]+/out): gave up after \d+ attempts "
                     r"over \d+ s \(retry budget (6|2) s\)", message), message[-3000:]
    assert "EndpointConnectionError" in message or "Connection" in message

    proxy.reopen()
    before = {r["id"] for r in _committed(direct, layout) if r["status"] == "ok"}
    assert before and len(before) < len(ids)
    summary = runner.run(run)
    assert summary.skipped_done == len(before) and summary.ok == len(ids) - len(before)
    assert_exactly_once_s3(direct, layout, set(ids))
