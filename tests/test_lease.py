"""One writer per output (latte_ray/record/lease.py): the output lease on local disk and on S3 (the loopback
moto server), racing takers, takeover of a dead holder, a stolen lease, and real `latte-ray` processes
started together on one output.

No test sleeps to pass: the clock is driven through the lease terms (heartbeat, expiry), a stale holder is
one whose recorded heartbeat lies in the past, and conditions are polled for with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from latte_ray.cli import app
from latte_ray.record import lease as leases
from latte_ray.record.output import open_output
from latte_ray.record.storage import filesystem, read_manifest, write_exclusive
from latte_ray.spec import SpecError, parse_pipeline_spec
from tests.conftest import write_prompts
from tests.invariants import assert_exactly_once, cli_env, fast_spec, kill_run, start_cli, write_spec

TERMS = leases.Terms(heartbeat_s=0.05, expiry_s=5.0)


def _until(condition, what: str, timeout: float = 120.0, proc=None, log: Path | None = None):
    """Poll `condition()` until it is truthy (its value is returned); fail after `timeout` or when `proc` ended."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended before {what}: {log.read_text()[-3000:] if log else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _forge(fs, root: str, generation: int, run_id: str, heartbeat_ago: float, expiry_s: float = 5.0) -> None:
    """A lease object as another run would have created it (create-only), its last heartbeat `heartbeat_ago`
    seconds in the past."""
    beat = time.time() - heartbeat_ago
    record = {"format": 1, "run_id": run_id, "command": "run", "host": "elsewhere", "pid": 1,
              "started_at": "2026-01-01T00:00:00+00:00", "heartbeat_at": f"{beat}", "heartbeat_unix": beat,
              "heartbeat_s": 1.0, "expiry_s": expiry_s}
    assert write_exclusive(fs, f"{leases.lease_dir(root)}/{generation:012d}.json", json.dumps(record).encode())


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """(fs, root, url) of an empty output prefix on local disk or on the loopback S3 server."""
    if request.param == "local":
        url = str(tmp_path / "out")
        fs, root = filesystem(url)
        return fs, root, url
    server = request.getfixturevalue("s3_server")
    bucket = server.make_bucket("lease-" + uuid.uuid4().hex[:8])
    url = f"s3://{bucket}/out"
    fs, root = filesystem(url, server.storage_options())
    return fs, root, url


# ------------------------------------------------------------------------------------------- units


def test_a_second_taker_is_refused_naming_the_holder_and_release_frees_it(store):
    fs, root, url = store
    first = leases.acquire(fs, root, url, "run-a", "run", TERMS)
    assert first.generation == 1
    with pytest.raises(SpecError) as refused:
        leases.acquire(fs, root, url, "run-b", "backfill", TERMS)
    line = str(refused.value)
    assert "\n" not in line
    for part in ("is being written by run run-a", "`latte-ray run`", "last heartbeat 0 s ago", "--wait-for-lease",
                 f"{url}/lease/000000000001.json", "taken over automatically"):
        assert part in line, (part, line)
    first.release()
    assert leases.generations(fs, leases.lease_dir(root)) == []  # it deleted the object it created
    again = leases.acquire(fs, root, url, "run-b", "backfill", TERMS)
    assert again.generation == 1 and again.verify() is None
    again.release()


def test_the_conditional_put_is_honoured(store):
    """storage.write_exclusive creates once (local: link(2); S3: PUT If-None-Match: *, which moto's server
    answers with 412 for an existing key)."""
    fs, root, _ = store
    path = f"{root}/once.json"
    assert write_exclusive(fs, path, b"first")
    assert not write_exclusive(fs, path, b"second")
    assert fs.cat_file(path) == b"first"


def test_racing_takers_exactly_one_wins(store):
    """Eight takers at once on a stale lease: one creates the next generation, the other seven are refused
    naming it; the dead run stays the lower generation."""
    fs, root, url = store
    _forge(fs, root, 1, "dead-run", heartbeat_ago=600)
    barrier = threading.Barrier(8)
    won, refused = [], []

    def take(i: int) -> None:
        barrier.wait()
        try:
            won.append(leases.acquire(fs, root, url, f"taker-{i}", "run", TERMS))
        except SpecError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(won) == 1 and len(refused) == 7, (won, refused)
    (lease,) = won
    assert lease.generation == 2
    assert all(f"is being written by run {lease.run_id}" in r for r in refused)
    assert leases.generations(fs, leases.lease_dir(root)) == [1, 2]
    lease.release()
    assert leases.generations(fs, leases.lease_dir(root)) == [1]  # the dead run's object is not ours to delete


def test_a_stale_holder_is_taken_over_and_its_run_marked_died(tmp_path):
    out = open_output(str(tmp_path / "out"))
    runs = tmp_path / "out" / "runs"
    runs.mkdir(parents=True)
    (runs / "dead-run.json").write_text(json.dumps({"run_id": "dead-run", "outcome": "running"}))
    _forge(out.fs, out.layout.root, 1, "dead-run", heartbeat_ago=10, expiry_s=5)
    with leases.hold_output(out, "next-run", "run", TERMS) as lease:
        assert lease.generation == 2
        record = json.loads((runs / "dead-run.json").read_text())
        assert record["outcome"] == "died" and "took the output over" in record["reason"]
        assert record["last_heartbeat_at"] and "next-run" in record["reason"]
    assert leases.generations(out.fs, leases.lease_dir(out.layout.root)) == [1]


def test_a_holder_whose_lease_was_stolen_stops(store):
    """The renewal thread of a holder sees a higher generation (a taker that judged it dead): the lease is
    lost, the fence refuses commits, and its release leaves the taker's object alone."""
    fs, root, url = store
    lost = threading.Event()
    holder = leases.acquire(fs, root, url, "slow-run", "run", TERMS)
    holder.on_lost = lambda reason: lost.set()
    holder.start()
    leases.check_fence(fs, holder.fence)  # holds: commits pass
    first_beat = holder.record["heartbeat_unix"]
    _until(lambda: holder.record["heartbeat_unix"] > first_beat, "a renewed heartbeat")
    _forge(fs, root, 2, "thief", heartbeat_ago=0)
    _until(lost.is_set, "the holder to notice")
    assert "lease lost" in holder.lost and "taken over by run thief" in holder.lost
    with pytest.raises(leases.LeaseLost, match="taken over by run thief"):
        leases.check_fence(fs, holder.fence)
    with pytest.raises(leases.LeaseLost):
        holder.check()
    holder.release()
    assert leases.generations(fs, leases.lease_dir(root)) == [2]  # its own object went; the thief's stays


def test_a_deleted_lease_object_fences_its_holder(tmp_path):
    fs, root = filesystem(str(tmp_path / "out"))
    holder = leases.acquire(fs, root, str(tmp_path / "out"), "run-a", "run", TERMS)
    fs.rm_file(holder.path)
    assert "was deleted" in holder.verify()


def test_waiting_for_the_lease_takes_it_when_the_holder_ends(tmp_path):
    fs, root = filesystem(str(tmp_path / "out"))
    url = str(tmp_path / "out")
    holder = leases.acquire(fs, root, url, "run-a", "run", TERMS).start()
    got = []
    waiter = threading.Thread(target=lambda: got.append(
        leases.acquire(fs, root, url, "run-b", "run", TERMS, leases.Policy(wait=True))))
    waiter.start()  # the lease is held: without waiting, acquire would raise and `got` stay empty
    holder.release()
    waiter.join(timeout=60)
    assert got and got[0].run_id == "run-b" and got[0].generation == 1
    got[0].release()


def test_a_store_without_create_only_writes_needs_no_lease():
    fs, root = filesystem("memory://lease-test/out")
    with pytest.raises(SpecError, match=r"memory:// storage has no create-only write .* run with --no-lease"):
        leases.acquire(fs, root, "memory://lease-test/out", "run-a", "run", TERMS)
    assert leases.acquire(fs, root, "memory://lease-test/out", "run-a", "run", TERMS, leases.Policy(take=False)) is None


def test_lease_terms_are_checked_in_the_spec():
    raw = fast_spec().model_dump(mode="json")
    raw["execution"].update(lease_heartbeat_s=1.0, lease_expiry_s=1.0)
    with pytest.raises(SpecError, match=r"lease_expiry_s \(1\) must be at least twice"):
        parse_pipeline_spec(raw)


# ------------------------------------------------------------------------- real `latte-ray` processes


def _lease_spec(tmp_path: Path, heartbeat_s: float, expiry_s: float, steps: int = 10) -> Path:
    """tiny-cpu, 10 steps at 64x64 (~0.3 s a video: a run lasts long enough to be caught mid-way), with
    short lease terms so that an expiry passes within the test."""
    spec = fast_spec(batch_size=2, num_inference_steps=steps).with_overrides(
        lease_heartbeat_s=heartbeat_s, lease_expiry_s=expiry_s)
    return write_spec(tmp_path / "spec.yaml", spec)


def _ray_address(ray_local) -> str:
    """The session's Ray: the CLI drivers join it, as `ray job submit` drivers join one cluster."""
    return ray_local.get_runtime_context().gcs_address


def _parts(out: Path) -> int:
    return len(list((out / "manifest").glob("*.parquet"))) if (out / "manifest").exists() else 0


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}


def test_two_runs_at_once_one_is_refused_and_a_killed_holder_is_taken_over(tmp_path, model_cache, ray_local):
    """Two `latte-ray run` on one local output at the same moment: one generates, the other exits 2 in one
    line naming the holder. The holder is SIGKILLed mid-run; `status` said `running (heartbeat Ns ago)` and
    now says `died`; the next run (--wait-for-lease) waits out the expiry, takes the output over and
    finishes it: every id exactly once."""
    ids = [f"lease-{i:02d}" for i in range(16)]
    table = write_prompts(tmp_path / "p.parquet", {"id": ids, "prompt": [f"a lighthouse {i}" for i in ids]})
    out = tmp_path / "out"
    args = ["run", "--pipeline", str(_lease_spec(tmp_path, 0.2, 2.0)), "--prompts", str(table),
            "--output", str(out)]
    env = cli_env(model_cache, RAY_ADDRESS=_ray_address(ray_local))
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [start_cli(args, env, log) for log in logs]
    try:
        _until(lambda: any(p.poll() is not None for p in procs), "one run to be refused")
        (loser,) = [i for i, p in enumerate(procs) if p.poll() is not None]
        holder, holder_log = procs[1 - loser], logs[1 - loser]
        assert procs[loser].returncode == 2, logs[loser].read_text()[-3000:]
        refusal = _last_line(logs[loser])
        assert refusal.startswith(f"error: output {out} is being written by run "), refusal
        assert "last heartbeat" in refusal and "--wait-for-lease" in refusal and "host" in refusal
        assert "Traceback" not in logs[loser].read_text()
        _until(lambda: _parts(out) >= 1, "the holder's first commit", proc=holder, log=holder_log)
        running = CliRunner().invoke(app, ["status", str(out)])
        assert running.exit_code == 0 and "running (heartbeat " in running.output, running.output
        kill_run(holder)
    finally:
        for p in procs:
            kill_run(p)
    (dead_id,) = _records(out)  # the refused run left no record
    committed = {r["id"] for r in read_manifest(*_fs_layout(out)).to_pylist() if r["status"] == "ok"}
    assert 0 < len(committed) < len(ids), "the holder was not killed mid-run"
    dead = CliRunner().invoke(app, ["status", str(out)])
    assert f"{dead_id}  died (last heartbeat " in dead.output, dead.output

    taker = CliRunner().invoke(app, args + ["--wait-for-lease"])
    assert taker.exit_code == 0, taker.output
    assert f"{len(ids) - len(committed)} ok, 0 error, {len(committed)} already done" in taker.output
    assert_exactly_once(out, set(ids))
    records = _records(out)
    assert records[dead_id]["outcome"] == "died" and records[dead_id]["last_heartbeat_at"]
    after = CliRunner().invoke(app, ["status", str(out)])
    assert f"{dead_id}  died: its lease expired (last heartbeat" in after.output, after.output
    assert [p.name for p in (out / "lease").iterdir()] == ["000000000001.json"]  # the dead run's, left alone


def _fs_layout(out: Path):
    from latte_ray.record.storage import OutputLayout

    fs, root = filesystem(str(out))
    return fs, OutputLayout(str(out), root)


def test_two_runs_at_once_on_s3_one_waits_and_then_has_nothing_to_do(tmp_path, model_cache, ray_local, s3_server):
    """The same on an s3:// output (the lease object created with a conditional PUT): both started with
    --wait-for-lease; one generates every id, the other waits for it and then finds nothing to do."""
    bucket = s3_server.make_bucket("lease-" + uuid.uuid4().hex[:8])
    url = f"s3://{bucket}/out"
    ids = [f"s3-lease-{i}" for i in range(6)]
    table = write_prompts(tmp_path / "p.parquet", {"id": ids, "prompt": [f"a harbour {i}" for i in ids]})
    args = ["run", "--pipeline", str(_lease_spec(tmp_path, 0.5, 10.0, steps=2)), "--prompts", str(table),
            "--output", url, "--wait-for-lease"]
    env = cli_env(model_cache, RAY_ADDRESS=_ray_address(ray_local), **s3_server.env)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_cli(args, env, log) for log in logs]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            kill_run(p)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], [t[-3000:] for t in texts]
    generated = [t for t in texts if f"{len(ids)} ok, 0 error, 0 already done" in t]
    waited = [t for t in texts if f"0 ok, 0 error, {len(ids)} already done" in t]
    assert len(generated) == 1 and len(waited) == 1, [t[-2000:] for t in texts]
    assert f"waiting for the lease on {url}" in waited[0]
    fs, root = filesystem(url, s3_server.storage_options())
    from latte_ray.record.storage import OutputLayout

    rows = read_manifest(fs, OutputLayout(url, root)).to_pylist()
    assert Counter(r["id"] for r in rows) == Counter(ids) and {r["status"] for r in rows} == {"ok"}
    assert leases.generations(fs, leases.lease_dir(root)) == []  # both released theirs


def test_a_holder_whose_lease_is_stolen_stops_committing(tmp_path, model_cache, ray_local):
    """Mid-run another run takes the lease (here: the next generation created as a taker would after judging
    the holder dead): the holder's write actors refuse to commit, and it exits 1 in one line."""
    ids = [f"stolen-{i:02d}" for i in range(24)]
    table = write_prompts(tmp_path / "p.parquet", {"id": ids, "prompt": [f"a windmill {i}" for i in ids]})
    out = tmp_path / "out"
    args = ["run", "--pipeline", str(_lease_spec(tmp_path, 0.2, 30.0)), "--prompts", str(table),
            "--output", str(out)]
    log = tmp_path / "holder.log"
    proc = start_cli(args, cli_env(model_cache, RAY_ADDRESS=_ray_address(ray_local)), log)
    try:
        _until(lambda: _parts(out) >= 1, "the holder's first commit", proc=proc, log=log)
        fs, root = filesystem(str(out))
        _forge(fs, root, 2, "thief", heartbeat_ago=0, expiry_s=30)
        at_steal = _parts(out)
        code = proc.wait(timeout=300)
    finally:
        kill_run(proc)
    assert code == 1, log.read_text()[-3000:]
    line = _last_line(log)
    assert line.startswith(f"error: lease lost: output {out} was taken over by run thief"), line
    (record,) = _records(out).values()
    assert record["outcome"] == "lost-lease" and "thief" in record["reason"]
    # At most the commits already past their fence check when the lease was taken (one per write actor).
    assert _parts(out) - at_steal <= fast_spec().execution.cpu_stage_max_actors
    assert len({r["id"] for r in read_manifest(*_fs_layout(out)).to_pylist()}) < len(ids)
    assert [p.name for p in (out / "lease").iterdir()] == ["000000000002.json"]  # its own went, the thief's stays
