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
from latte_ray.record.storage import OutputLayout, filesystem, read_manifest, write_exclusive
from latte_ray.errors import InputError, LeaseHeld
from latte_ray.spec import SpecError, parse_pipeline_spec
from tests.conftest import write_prompts
from tests.invariants import (
    FAMILIES, assert_exactly_once, assert_made_by, cli_env, family_spec, fast_spec, kill_run, start_cli, write_spec,
)
from tests.test_liveness import fault_rules, null_spec

TERMS = leases.Terms(heartbeat_s=0.05, expiry_s=5.0)


def _until(condition, what: str, timeout: float = 300.0, proc=None, log: Path | None = None):
    """Poll `condition()` until it is truthy (its value is returned); fail after `timeout` or when `proc` ended."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            print(f"{time.strftime('%H:%M:%S')} {what}: done", flush=True)
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
    with pytest.raises(LeaseHeld) as refused:
        leases.acquire(fs, root, url, "run-b", "backfill", TERMS)
    line = str(refused.value)
    assert "\n" not in line
    for part in ("is being written by run run-a", "`latte-ray run`", "last heartbeat 0 s ago", "--wait-for-lease",
                 f"{url}/lease/000000000001.json", "taken over automatically"):
        assert part in line, (part, line)
    first.release()
    assert leases.generations(fs, leases.lease_dir(root)) == []  # it deleted the object it created ...
    if not url.startswith("s3://"):
        assert not os.path.exists(root)  # ... and the folders that made (the output is as it was found)
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
        except LeaseHeld as e:
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


def test_a_write_actor_whose_run_lost_its_lease_commits_nothing(tmp_path):
    """The write stage checks the fence before each manifest part: once another run holds the lease, the
    batch raises LeaseLost and no part is written."""
    import numpy as np

    from latte_ray.stages.write import WriteStage

    out = tmp_path / "out"
    fs, root = filesystem(str(out))
    lease = leases.acquire(fs, root, str(out), "run-a", "run", TERMS)
    stage = WriteStage(str(out), fast_spec().model_dump_json(), run_id="run-a", fence=lease.fence)

    def batch(i: str) -> dict:
        return {"id": np.array([i], object), "prompt": np.array(["p"], object), "seed": np.array([1]),
                "negative_prompt": np.array([""], object), "status": np.array(["error"], object),
                "error": np.array(["a bad row"], object)}

    stage(batch("x"))
    assert len(list((out / "manifest").glob("*.parquet"))) == 1
    _forge(fs, root, 2, "thief", heartbeat_ago=0)
    with pytest.raises(leases.LeaseLost, match="taken over by run thief"):
        stage(batch("y"))
    assert len(list((out / "manifest").glob("*.parquet"))) == 1


def test_a_frozen_holder_waking_after_its_taker_ended_is_still_fenced(store):
    """The taker's `<generation>.taken.json` mark outlives its own lease: a holder frozen past its expiry that
    wakes once the taker has ended and released finds itself taken over, and the next lease gets a new number."""
    fs, root, url = store
    frozen = leases.acquire(fs, root, url, "frozen-run", "run", TERMS)
    frozen.record.update(heartbeat_unix=time.time() - 600)  # its last heartbeat, long ago
    from latte_ray.record.storage import write_atomic

    write_atomic(fs, frozen.path, json.dumps(frozen.record).encode())
    taker = leases.acquire(fs, root, url, "taker-run", "run", TERMS)
    assert taker.generation == 2
    taker.release()
    assert leases.generations(fs, leases.lease_dir(root)) == [1]
    assert "taken over by run taker-run" in frozen.verify()
    frozen.release()  # its own object; the mark stays
    later = leases.acquire(fs, root, url, "later-run", "run", TERMS)
    assert later.generation == 2 and later.verify() is None
    later.release()


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


def test_a_holder_that_ends_between_a_takers_read_and_its_check_is_not_taken_over(tmp_path):
    """The interleaving CI once hit with a waiting taker: it read the holder's object, then the holder
    released it and ended, then the taker found the holder's process gone. That holder ended cleanly: the
    taker takes the next lease as a fresh one (generation 1, no taken-over mark, no warning)."""
    from fsspec.implementations.local import LocalFileSystem

    url = str(tmp_path / "out")
    _, root = filesystem(url)
    holder = leases.acquire(LocalFileSystem(), root, url, "run-a", "run", TERMS)

    class EndsAfterTheFirstRead(LocalFileSystem):
        """Local disk on which the holder releases right after the taker's first read of its object."""
        cachable = False
        reads = 0

        def cat_file(self, path, *args, **kwargs):
            data = super().cat_file(path, *args, **kwargs)
            if path.endswith(holder.path.rsplit("/", 1)[-1]) and self.reads == 0:
                self.reads += 1
                holder.release()
            return data

    taken_over = []
    taker = leases.acquire(EndsAfterTheFirstRead(), root, url, "run-b", "run", TERMS,
                           on_takeover=lambda h, lease: taken_over.append(h["run_id"]))
    assert taker.generation == 1 and taken_over == []
    assert not list((tmp_path / "out" / "lease").glob("*.taken.json"))
    taker.release()


def test_a_lease_folder_removed_while_a_taker_makes_it_is_made_again(tmp_path, monkeypatch):
    """The interleaving CI hit with a waiting taker: its os.makedirs of lease/ found the folder there (EEXIST),
    then the holder's release removed the empty folder before makedirs checked that it is a folder, and
    makedirs raised FileExistsError out of the taker's thread. The taker now looks again and takes the lease."""
    url = str(tmp_path / "out")
    fs, root = filesystem(url)
    folder = leases.lease_dir(root)
    os.makedirs(folder)
    real_mkdir, removed = os.mkdir, []

    def mkdir(path, *args, **kwargs):
        if os.fspath(path) == folder and not removed:
            removed.append(path)
            try:
                return real_mkdir(path, *args, **kwargs)  # EEXIST: the folder is there ...
            finally:
                os.rmdir(folder)  # ... and the holder's release removes it now
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    lease = leases.acquire(fs, root, url, "run-b", "run", TERMS)
    assert removed and lease.run_id == "run-b" and lease.generation == 1
    lease.release()
    (tmp_path / "lease-file").write_text("not a folder")  # a file where the folder belongs is still an error
    with pytest.raises(FileExistsError):
        write_exclusive(fs, str(tmp_path / "lease-file" / "00000001.json"), b"{}")


def test_a_store_without_create_only_writes_needs_no_lease():
    fs, root = filesystem("memory://lease-test/out")
    with pytest.raises(InputError, match=r"memory:// storage has no create-only write .* run with --no-lease"):
        leases.acquire(fs, root, "memory://lease-test/out", "run-a", "run", TERMS)
    assert leases.acquire(fs, root, "memory://lease-test/out", "run-a", "run", TERMS, leases.Policy(take=False)) is None


def test_lease_terms_are_checked_in_the_spec():
    raw = fast_spec().model_dump(mode="json")
    raw["execution"].update(lease_heartbeat_s=1.0, lease_expiry_s=1.0)
    with pytest.raises(SpecError, match=r"lease_expiry_s \(1\) must be at least twice"):
        parse_pipeline_spec(raw)


# ------------------------------------------------------------------------- real `latte-ray` processes
#
# The drivers join the session's Ray (RAY_ADDRESS), as `ray job submit` drivers join one cluster. The
# one-writer tests run for every model family, each family's tiny model generating (what is guarded is the
# family's output); elsewhere the null engine stands in for the model. A `hang` fault rule on one batch
# (read by every worker of the session: conftest.faults_file) holds a run mid-way for as long as the test
# needs, with its heartbeat alive, instead of timing a kill against a run's speed.


def _lease_spec(tmp_path: Path, heartbeat_s: float, expiry_s: float, family: str | None = None):
    """One actor per stage at 0.25 CPU each: a frozen holder's actors (0.75 CPU) leave room on 2 CPUs for
    the run that takes over (1 CPU with its read tasks). With `family`, that family's tiny model generates
    (the one-writer tests run for every family: tests/invariants.py FAMILIES); without, the null engine.
    Returns (the spec's file, the spec)."""
    execution = dict(lease_heartbeat_s=heartbeat_s, lease_expiry_s=expiry_s, cpu_stage_max_actors=1,
                     num_cpus_per_actor=0.25, num_cpus_per_cpu_task=0.25)
    spec = null_spec(**execution) if family is None else family_spec(family).with_overrides(**execution)
    return write_spec(tmp_path / "spec.yaml", spec), spec


def _ray_address(ray_local) -> str:
    return ray_local.get_runtime_context().gcs_address


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _started_together(args: list[str], env: dict, logs: list[Path]):
    """Two `latte-ray` drivers started at the same moment: (the holder, its log) once the other has been
    refused, exit 2, with the one-line reason naming the holder."""
    procs = [start_cli(args, env, log) for log in logs]
    try:
        _until(lambda: any(p.poll() is not None for p in procs), "one of the two runs to be refused")
        (loser,) = [i for i, p in enumerate(procs) if p.poll() is not None]
        text = logs[loser].read_text()
        assert procs[loser].returncode == 2, text[-3000:]
        refusal = _last_line(logs[loser])
        assert refusal.startswith(f"error: output {args[args.index('--output') + 1]} is being written by run "), refusal
        for part in ("`latte-ray run` on host", "last heartbeat", "--wait-for-lease", "taken over automatically"):
            assert part in refusal, (part, refusal)
        assert "Traceback" not in text
    except BaseException:
        for p in procs:
            kill_run(p)
        raise
    return procs[1 - loser], logs[1 - loser]


def _record_ids(out: Path) -> list[str]:
    return sorted(p.stem for p in (out / "runs").glob("*.json"))


def _committed(out: Path) -> set[str]:
    fs, root = filesystem(str(out))
    return {r["id"] for r in read_manifest(fs, OutputLayout(str(out), root), ["id", "status"]).to_pylist()
            if r["status"] == "ok"}


def _status(out, *options: str) -> str:
    result = CliRunner().invoke(app, ["status", str(out), *options])
    assert result.exit_code == 0, result.output
    return result.output


# Batches of 2 in input order, one generation actor: the first run commits two batches, then its generation
# call hangs on lease-hold (the rule fires once in all), with its driver and heartbeat alive.
LOCAL_IDS = ["a-0", "a-1", "a-2", "a-3", "lease-hold", "a-4", "a-5", "a-6"]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_writer_per_local_output(tmp_path, model_cache, ray_local, faults_file, family):
    """Two `latte-ray run` on one output at the same moment: one generates, the other exits 2 naming it, and
    `status` shows the holder `running (heartbeat Ns ago)`. The holder's driver is then frozen (SIGSTOP:
    alive, but no heartbeat, as a driver cut off from storage or stuck would be): once its heartbeat is older
    than the expiry `status` calls it `died`, and the next run takes the output over, marks it `died` and
    finishes: every id exactly once. Thawed, the old holder finds its lease taken and exits 1 in one line,
    committing nothing more."""
    table = write_prompts(tmp_path / "p.parquet", {"id": LOCAL_IDS, "prompt": [f"a lighthouse {i}" for i in LOCAL_IDS]})
    out = tmp_path / "out"
    spec_file, spec = _lease_spec(tmp_path, 0.2, 2.0, family)
    args = ["run", "--pipeline", str(spec_file), "--prompts", str(table), "--output", str(out)]
    env = cli_env(model_cache, RAY_ADDRESS=_ray_address(ray_local))
    with fault_rules(faults_file, "point=generate match=lease-hold action=hang times=1"):
        holder, log = _started_together(args, env, [tmp_path / "first.log", tmp_path / "second.log"])
        try:
            _until(lambda: _committed(out) == set(LOCAL_IDS[:4]), "the first run's commits", proc=holder, log=log)
            (first,) = _record_ids(out)  # the refused run left no record
            assert f"{first}  running (heartbeat " in _status(out)
            os.kill(holder.pid, signal.SIGSTOP)
            _until(lambda: f"{first}  died (last heartbeat " in _status(out), "status to call the frozen run died")
            assert "its lease expired" in _status(out)

            taker = CliRunner().invoke(app, args)
            assert taker.exit_code == 0, taker.output
            assert "4 ok, 0 error, 4 already done" in taker.output
            assert_exactly_once(out, set(LOCAL_IDS))
            (second,) = set(_record_ids(out)) - {first}
            died = json.loads((out / "runs" / f"{first}.json").read_text())
            assert died["outcome"] == "died" and died["last_heartbeat_at"] and second in died["reason"]

            os.kill(holder.pid, signal.SIGCONT)
            code = holder.wait(timeout=120)
        finally:
            os.kill(holder.pid, signal.SIGCONT) if holder.poll() is None else None
            kill_run(holder)
    assert code == 1, log.read_text()[-3000:]
    line = _last_line(log)
    assert line.startswith(f"error: lease lost: output {out} was taken over by run {second}"), line
    assert_exactly_once(out, set(LOCAL_IDS))  # it committed nothing more
    record = json.loads((out / "runs" / f"{first}.json").read_text())
    assert record["outcome"] == "lost-lease"  # it was alive after all: its own end replaces `died`
    assert f"{first}  lost-lease: lease lost" in _status(out)
    # Each run deleted its own lease object, and only it; the taker's mark on the first run's generation stays.
    assert sorted(p.name for p in (out / "lease").glob("*.json")) == ["000000000001.taken.json"]
    assert_made_by(out, family, spec)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_writer_per_s3_output(tmp_path, model_cache, ray_local, faults_file, s3_server, family):
    """The same on an s3:// output (lease objects created with a conditional PUT): two runs at once, one
    refused; the holder SIGKILLed once under way; the next run on this host sees its process gone, takes the
    output over at once and finishes: every id exactly once, the killed run recorded `died`."""
    bucket = s3_server.make_bucket("lease-" + uuid.uuid4().hex[:8])
    url = f"s3://{bucket}/out"
    ids = ["s-0", "s-1", "s3-hold", "s-2", "s-3"]
    table = write_prompts(tmp_path / "p.parquet", {"id": ids, "prompt": [f"a harbour {i}" for i in ids]})
    options = [f"--storage-option={k}={v}" for k, v in s3_server.storage_options().items()]
    spec_file, spec = _lease_spec(tmp_path, 0.2, 60.0, family)
    args = ["run", "--pipeline", str(spec_file), "--prompts", str(table), "--output", url, *options]
    fs, root = filesystem(url, s3_server.storage_options())
    layout = OutputLayout(url, root)
    ok = lambda: {r["id"] for r in read_manifest(fs, layout, ["id", "status"]).to_pylist() if r["status"] == "ok"}  # noqa: E731
    with fault_rules(faults_file, "point=generate match=s3-hold action=hang times=1"):
        holder, log = _started_together(args, cli_env(model_cache, RAY_ADDRESS=_ray_address(ray_local)),
                                        [tmp_path / "a.log", tmp_path / "b.log"])
        try:  # killed as soon as it is under way (its run record written), wherever it has got to
            _until(lambda: "running (heartbeat " in CliRunner().invoke(app, ["status", url, *options]).output,
                   "the holder to be running",
                   proc=holder, log=log)
        finally:
            kill_run(holder)
    assert "died (last heartbeat " in _status(url, *options)  # long before its 60 s expiry
    fs.invalidate_cache()
    before = ok()
    taker = CliRunner().invoke(app, args)  # the hang rule is cleared: it finishes whatever is left
    assert taker.exit_code == 0, taker.output
    assert f"{len(ids) - len(before)} ok, 0 error, {len(before)} already done" in taker.output
    fs.invalidate_cache()  # the listings above went through this s3fs instance
    rows = read_manifest(fs, layout).to_pylist()
    assert Counter(r["id"] for r in rows) == Counter(ids) and {r["status"] for r in rows} == {"ok"}
    runs = {r["outcome"]: r for r in (json.loads(fs.cat_file(p)) for p in fs.ls(layout.runs_dir, detail=False,
                                                                                   refresh=True))}
    assert sorted(runs) == ["died", "ok"] and "its process on this host is gone" in runs["died"]["reason"]
    assert leases.generations(fs, leases.lease_dir(root)) == [1]  # the dead run's; the taker released its own
    assert_made_by(url, family, spec, s3_server.storage_options())


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, model_cache, ray_local, faults_file):
    """SIGTERM, what `ray job stop` and Kubernetes send, to a `latte-ray run` under way (its generation call
    hanging, so it cannot have finished): it stops taking work, records the run `interrupted`, releases its
    lease and exits 130 within 30 s, as on Ctrl-C, with no traceback (Ray's own driver handler called sys.exit from
    wherever the driver was, which left the record `running` and aborted the process, exit 134)."""
    out = tmp_path / "out"
    ids = ["sigterm-hold", "t-0", "t-1", "t-2"]
    table = write_prompts(tmp_path / "p.parquet", {"id": ids, "prompt": [f"a lighthouse {i}" for i in ids]})
    args = ["run", "--pipeline", str(_lease_spec(tmp_path, 0.2, 60.0)[0]), "--prompts", str(table), "--output",
            str(out), "--no-report"]
    log = tmp_path / "run.log"
    with fault_rules(faults_file, "point=generate match=sigterm-hold action=hang times=1") as state:
        proc = start_cli(args, cli_env(model_cache, RAY_ADDRESS=_ray_address(ray_local)), log)
        try:
            _until(lambda: state.is_dir() and any(state.iterdir()), "the generation call to hang", proc=proc,
                   log=log)
            (run_id,) = _record_ids(out)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        finally:
            kill_run(proc)
    text = log.read_text()
    assert code == 130, text[-3000:]  # as on Ctrl-C (typer's exit code for an interrupted command)
    assert "Traceback" not in text, text[-3000:]
    record = json.loads((out / "runs" / f"{run_id}.json").read_text())
    assert record["outcome"] == "interrupted", record
    assert not list((out / "lease").glob("*.json")), "the run's lease object was not released"
    assert f"{run_id}  interrupted" in _status(out)
