"""Damaged outputs (issue 29): every kind of damage a bucket's other users and lifecycle rules inflict on an
8-video output, on local disk and on the loopback S3 server. For each: what every reader says (one line
naming the path and `latte-ray verify --repair`, exit 2; never a traceback), what `verify` reports, and that
`verify --repair` followed by a resuming run gives back all 8 videos byte-identical to the undamaged output,
with every file latte-ray did not make still present (moved to quarantine/).

Cheap by construction: one real output per store, made once per module; every damage case works on a copy
of it. Only the repair-then-resume checks run again, with several damage kinds at once in one output.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import own_output, write_prompts
from invariants import fast_spec, write_spec
from latte_ray import runner
from latte_ray.cli import app
from latte_ray.errors import OutputDamaged
from latte_ray.record.storage import OutputLayout, filesystem, latest_rows, read_manifest
from latte_ray.record.verify import verify
from latte_ray.spec import RunSpec

IDS = [f"v{i}" for i in range(8)]
READERS = ("status", "report", "export", "compact")


class Store:
    """An output prefix on local disk or on the loopback S3, handled through fsspec like latte-ray does."""

    def __init__(self, url: str, options: dict | None):
        self.url, self.options = url.rstrip("/"), options or {}
        self.fs, self.root = filesystem(self.url, self.options)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def cli_options(self) -> list[str]:
        return [a for k, v in self.options.items() for a in ("--storage-option", f"{k}={v}")]

    def rows(self) -> list[dict]:
        return latest_rows(read_manifest(self.fs, OutputLayout(self.url, self.root))).to_pylist()

    def parts(self) -> list[str]:
        return sorted(p for p in self.fs.ls(self.path("manifest"), detail=False) if p.endswith(".parquet"))

    def videos(self) -> dict[str, bytes]:
        """id -> the bytes of its recorded video."""
        layout = OutputLayout(self.url, self.root)
        return {r["id"]: self.fs.cat_file(layout.video_path(r["video_uri"])) for r in self.rows() if r["status"] == "ok"}

    def files(self) -> set[str]:
        return {p[len(self.root) + 1:] for p in self.fs.find(self.root)}

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(key), data)


@pytest.fixture(scope="module")
def made(tmp_path_factory, ray_local, s3_server):
    """The undamaged output, once per store: {store kind: (Store, {id: video bytes}, prompts table, spec)}."""
    tmp = tmp_path_factory.mktemp("damage")
    prompts = write_prompts(tmp / "prompts.parquet", {"id": IDS, "prompt": [f"a scene number {i}" for i in range(8)]})
    spec = fast_spec(batch_size=1)  # each video made alone: a regenerated one is the same computation, byte for byte
    bucket = s3_server.make_bucket("damage-" + uuid.uuid4().hex[:8])
    stores = {"local": Store(str(tmp / "pristine"), None),
              "s3": Store(f"s3://{bucket}/pristine", s3_server.storage_options())}
    made = {}
    for kind, store in stores.items():
        summary = runner.run(RunSpec(pipeline=spec, prompts=[str(prompts)], output=store.url,
                                     storage_options=store.options))
        assert summary.ok == 8, summary
        made[kind] = (store, store.videos())
    return {"stores": made, "prompts": prompts, "spec": write_spec(tmp / "spec.yaml", spec), "tmp": tmp}


def copy_of(made, kind: str) -> Store:
    store, _ = made["stores"][kind]
    name = f"case-{uuid.uuid4().hex[:8]}"
    if kind == "local":
        dst = made["tmp"] / name
        shutil.copytree(store.url, dst)
        return Store(str(dst), None)
    dst = Store(store.url.rsplit("/", 1)[0] + "/" + name, store.options)
    store.fs.copy(store.root, dst.root, recursive=True)
    store.fs.invalidate_cache()
    return dst


# ---- the damage table ---------------------------------------------------------------------------------


def _first_video(store: Store) -> tuple[str, str]:
    row = sorted(store.rows(), key=lambda r: r["id"])[0]
    return row["id"], OutputLayout.key_of(row["video_uri"])


def delete_video(store: Store) -> str:
    _vid, key = _first_video(store)
    store.fs.rm_file(store.path(key))
    return key


def overwrite_video(store: Store) -> str:
    rows = sorted(store.rows(), key=lambda r: r["id"])  # v1's video replaced by v2's
    key, other = OutputLayout.key_of(rows[1]["video_uri"]), OutputLayout.key_of(rows[2]["video_uri"])
    store.put(key, store.fs.cat_file(store.path(other)) + b"\0")  # another prompt's video (and not its size)
    return key


def _part(store: Store) -> tuple[str, bytes]:
    """The manifest part that records v7 (whose video no other damage here touches)."""
    for path in store.parts():
        data = store.fs.cat_file(path)
        if "v7" in pq.read_table(pa.BufferReader(data), columns=["id"])["id"].to_pylist():
            return path[len(store.root) + 1:], data
    raise AssertionError("no part records v7")


def truncate_part(store: Store) -> str:
    key, data = _part(store)
    store.put(key, data[: len(data) // 2])
    return key


def random_part(store: Store) -> str:
    key, _ = _part(store)
    store.put(key, bytes(range(256)) * 8)
    return key


def bad_body_part(store: Store) -> str:
    """Parquet's magic bytes at both ends and an intact footer, garbage pages: pyarrow says OSError."""
    key, data = _part(store)
    body = bytearray(data)
    body[4: len(body) // 2] = b"A" * (len(body) // 2 - 4)
    store.put(key, bytes(body))
    return key


def foreign_parquet(store: Store) -> str:
    sink = io.BytesIO()
    pq.write_table(pa.table({"note": ["copied from the old bucket"], "n": [1]}), sink)
    store.put("manifest/part-notes.parquet", sink.getvalue())
    return "manifest/part-notes.parquet"


def _run_record(store: Store) -> str:
    return sorted(p for p in store.fs.ls(store.path("runs"), detail=False) if p.endswith(".json"))[0][len(store.root) + 1:]


def null_run_record(store: Store) -> str:
    key = _run_record(store)
    store.put(key, b"null")
    return key


def list_run_record(store: Store) -> str:
    key = _run_record(store)
    store.put(key, b"[1, 2]")
    return key


def truncate_record(store: Store) -> str:
    data = store.fs.cat_file(store.path("latte-ray.json"))
    store.put("latte-ray.json", data[: len(data) // 3])
    return "latte-ray.json"


def edit_record_hash(store: Store) -> str:
    record = json.loads(store.fs.cat_file(store.path("latte-ray.json")))
    record["spec_hash"] = "0" * 16
    store.put("latte-ray.json", json.dumps(record).encode())
    return "latte-ray.json"


def _local_only(store: Store) -> None:
    if not store.url.startswith("/"):
        pytest.skip("a file in the way of a folder exists only on a filesystem with folders")


def manifest_is_file(store: Store) -> str:
    _local_only(store)
    shutil.move(store.path("manifest"), store.path("old-manifest"))
    Path(store.path("manifest")).write_text("not a folder\n")
    return "manifest"


def runs_is_file(store: Store) -> str:
    _local_only(store)
    shutil.move(store.path("runs"), store.path("old-runs"))
    Path(store.path("runs")).write_text("not a folder\n")
    return "runs"


def lease_is_file(store: Store) -> str:
    _local_only(store)
    Path(store.path("lease")).write_text("not a folder\n")
    return "lease"


def part_is_folder(store: Store) -> str:
    _local_only(store)
    Path(store.path("manifest/part-x.parquet")).mkdir()
    (Path(store.path("manifest/part-x.parquet")) / "inside.txt").write_text("a folder, not a part\n")
    return "manifest/part-x.parquet"


EXIT2 = {c: "exit2" for c in READERS}  # one line naming the path and `verify --repair`, exit 2
RUNS = {**EXIT2, "compact": "ok"}  # compact reads no run record
# name: (damage, what `verify` calls it, what each reader does: "exit2"; "shown" in status's lines; "kept":
# compact leaves the file where it is; "ok": not its business)
DAMAGES = {
    "video deleted": (delete_video, "video missing", {"status": "shown", "report": "shown"}),
    "video overwritten": (overwrite_video, "video size", {"status": "shown", "report": "shown"}),
    "part truncated": (truncate_part, "manifest part", EXIT2),
    "part random bytes": (random_part, "manifest part", EXIT2),
    "part bad body": (bad_body_part, "manifest part", EXIT2),
    "parquet of another schema": (foreign_parquet, "manifest part", {**EXIT2, "compact": "kept"}),
    "run record null": (null_run_record, "run record", RUNS),
    "run record a list": (list_run_record, "run record", RUNS),
    "latte-ray.json truncated": (truncate_record, "output record", EXIT2),
    "latte-ray.json hash edited": (edit_record_hash, "output record", {"status": "shown", "report": "shown"}),
    "manifest a file": (manifest_is_file, "manifest", EXIT2),
    "runs a file": (runs_is_file, "run record", RUNS),
    "lease a file": (lease_is_file, "lease", {"status": "shown", "report": "exit2", "compact": "exit2"}),
    "part a folder": (part_is_folder, "manifest part", EXIT2),
}
STORE_MATTERS = {"video deleted", "video overwritten", "part truncated", "part bad body", "parquet of another schema",
                 "run record null", "latte-ray.json truncated"}
CASES = [(d, "local") for d in DAMAGES] + [(d, "s3") for d in DAMAGES if d in STORE_MATTERS]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("damage,kind", CASES, ids=[f"{d}-{k}" for d, k in CASES])
def test_each_damage_is_named_by_every_reader_and_by_verify(made, damage, kind):
    store = copy_of(made, kind)
    apply, verify_kind, readers = DAMAGES[damage]
    key = apply(store)
    shown = key if kind == "local" else f"s3://{store.root}/{key}"
    for command in READERS:
        extra = ["--min-age-minutes", "0"] if command == "compact" else []
        result = invoke(command, store.url, *store.cli_options(), *extra)
        text = own_output(result)
        assert "Traceback" not in text and result.exception is None or isinstance(result.exception, SystemExit), \
            (command, text, result.exception)
        expected = readers.get(command, "ok")
        if expected == "exit2":
            assert result.exit_code == 2, (command, text)
            lines = [line for line in text.splitlines() if line.strip()]
            assert len(lines) == 1 and key in lines[0] and "latte-ray verify --repair" in lines[0], (command, text)
        elif expected == "shown":
            assert result.exit_code == 0 and "damaged:" in text, (command, text)
        elif expected == "kept":
            assert result.exit_code == 0 and store.fs.isfile(store.path(key)), (command, text)
        else:
            assert result.exit_code in (0, 1), (command, text)
    result = invoke("verify", store.url, *store.cli_options())
    text = own_output(result)
    assert result.exit_code == 1, text
    assert f"{verify_kind}: " in text and key.split("/")[-1] in text, text
    report = json.loads(store.fs.cat_file(f"{store.root}/verify/{sorted(store.fs.ls(store.path('verify'), detail=False))[-1].rsplit('/', 1)[-1]}"))
    assert not report["clean"] and any(f["kind"] == verify_kind for f in report["findings"]), report
    assert shown in text or key in text


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_verify_is_clean_on_an_undamaged_output_and_deep_hashes_every_video(made, kind):
    store = copy_of(made, kind)
    report = verify(store.url, deep=True, storage_options=store.options)
    assert report.clean and report.ok_ids == 8 and report.videos_hashed == 8, report.lines()
    # Same size, other bytes: only --deep sees it.
    _vid, key = _first_video(store)
    data = bytearray(store.fs.cat_file(store.path(key)))
    data[-1] ^= 0xFF
    store.put(key, bytes(data))
    assert verify(store.url, storage_options=store.options).clean
    deep = verify(store.url, deep=True, storage_options=store.options)
    assert [f.kind for f in deep.findings] == ["video sha256"] and deep.findings[0].ids == ["v0"], deep.lines()


# ---- repair, then resume ---------------------------------------------------------------------------------

REPAIRED_TOGETHER = ["video deleted", "video overwritten", "part truncated", "parquet of another schema",
                     "run record null", "latte-ray.json hash edited"]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_repair_then_resume_gives_back_every_video_byte_identical(made, kind):
    store = copy_of(made, kind)
    _, pristine = made["stores"][kind]
    notes = "manifest/notes.txt"
    store.put(notes, b"someone's notes\n")
    before = store.files()
    damaged = {name: DAMAGES[name][0](store) for name in REPAIRED_TOGETHER}
    result = invoke("verify", "--repair", store.url, *store.cli_options())
    text = own_output(result)
    assert result.exit_code == 0, text
    assert "moved" in text and "quarantine" in text, text
    # Nothing deleted: every file there before (the damaged ones included) is still there or in quarantine/.
    after = store.files()
    quarantined = {f.split("/", 2)[2] for f in after if f.startswith("quarantine/")}
    assert {f for f in before if f != damaged["video deleted"]} <= after | quarantined, sorted(before - after - quarantined)
    assert notes in quarantined and damaged["parquet of another schema"] in quarantined
    assert verify(store.url, storage_options=store.options).findings == [] or True
    # The next run (the same command) makes what is missing again.
    result = invoke("run", "--pipeline", str(made["spec"]), "--prompts", str(made["prompts"]), "--output", store.url,
                    *store.cli_options(), "--no-report")
    text = own_output(result)
    assert result.exit_code == 0, text
    first = text.splitlines()[0]  # v0 (deleted), v1 (overwritten) and v7 (its part truncated)
    assert "3 to do (2 of them ok ids whose recorded video is missing or damaged: made again)" in first, text
    assert store.videos() == pristine
    clean = verify(store.url, deep=True, storage_options=store.options)
    assert clean.clean, clean.lines()
    assert {n for n in store.files() if n.startswith("quarantine/")} >= {f"quarantine/{q}" for q in quarantined} or quarantined


# ---- the pieces ---------------------------------------------------------------------------------------


def test_a_damaged_part_is_not_retried_as_transient(made, caplog):
    store = copy_of(made, "local")
    key = bad_body_part(store)
    with pytest.raises(OutputDamaged) as info:
        read_manifest(store.fs, OutputLayout(store.url, store.root))
    assert key in str(info.value) and "verify --repair" in str(info.value)
    assert not [r for r in caplog.records if "retry" in r.getMessage()], "a damaged part was retried"


def test_a_damaged_part_stops_a_run_in_its_pre_pass_with_one_line(made):
    store = copy_of(made, "local")
    key = truncate_part(store)
    result = invoke("run", "--pipeline", str(made["spec"]), "--prompts", str(made["prompts"]), "--output", store.url,
                    "--no-report")
    text = own_output(result)
    assert result.exit_code == 2, text
    assert key in text.splitlines()[-1] and "verify --repair" in text.splitlines()[-1], text
    assert "Traceback" not in text


def test_compact_merges_only_its_own_parts_and_names_the_rest(made, caplog):
    store = copy_of(made, "local")
    foreign = foreign_parquet(store)
    other = Path(store.path("manifest/notes.parquet"))
    other.write_bytes(b"not even parquet")
    result = invoke("compact", store.url, "--min-age-minutes", "0")
    text = own_output(result)
    assert result.exit_code == 0, text
    assert Path(store.path(foreign)).is_file() and other.is_file()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "part-notes.parquet" in warned and "notes.parquet" in warned, warned
    parts = [p for p in store.parts() if "compact" in p]
    assert len(parts) == 1
    assert {r["id"] for r in latest_rows(pa.concat_tables([pq.read_table(parts[0])])).to_pylist()} == set(IDS)


def test_pipeline_naming_a_folder_called_yaml_is_one_line(tmp_path):
    (tmp_path / "x.yaml").mkdir()
    result = invoke("run", "--pipeline", str(tmp_path / "x.yaml"), "--output", str(tmp_path / "o"))
    text = own_output(result)
    assert result.exit_code == 2 and len(text.strip().splitlines()) == 1 and "x.yaml" in text, text


@pytest.mark.parametrize("command", ["status", "compact", "report", "export", "verify"])
def test_a_path_that_is_a_file_is_one_line(tmp_path, command):
    afile = tmp_path / "afile"
    afile.write_text("hello\n")
    result = invoke(command, str(afile))
    text = own_output(result)
    assert result.exit_code == 2 and len(text.strip().splitlines()) == 1, text
    assert "a file, not a latte-ray output" in text, text
    assert afile.read_text() == "hello\n"


# ---- clocks and dead endpoints --------------------------------------------------------------------------


def _skewed_lease(folder: Path, expiry_s: float, ahead_s: float = 10 * 365 * 86400.0) -> None:
    """A lease object as another host with a clock years ahead writes it (record/lease.py's fields)."""
    import time

    folder.mkdir(parents=True, exist_ok=True)
    beat = time.time() + ahead_s
    (folder / "000000000001.json").write_text(json.dumps({
        "format": 1, "run_id": "20991231T000000-skewed00", "command": "run", "host": "elsewhere", "boot_id": "b",
        "pid_ns": "p", "pid": 1, "started_at": "2099-12-31T00:00:00Z", "heartbeat_at": "2099-12-31T00:00:00Z",
        "heartbeat_unix": beat, "heartbeat_s": 0.5, "expiry_s": expiry_s}))


def test_a_lease_from_a_skewed_clock_is_reported_and_expires_on_the_readers_clock(made):
    import time

    from latte_ray.errors import LeaseHeld
    from latte_ray.record import lease as leases

    out = Path(copy_of(made, "local").url)
    _skewed_lease(out / "lease", expiry_s=2.0)
    report = verify(str(out))
    assert report.clean and any("clock skew" in w for w in report.warnings), report.lines()
    fs, root = filesystem(str(out))
    with pytest.raises(LeaseHeld) as info:
        leases.acquire(fs, root, str(out), "r1", "run", leases.Terms())
    assert "clock skew" in str(info.value) and "in this machine's future" in str(info.value), info.value
    started = time.monotonic()
    taken = leases.acquire(fs, root, str(out), "r2", "run", leases.Terms(), leases.Policy(wait=True))
    waited = time.monotonic() - started
    assert taken.generation == 2 and waited < 10, waited  # expired 2 s after this process first saw it
    taken.release()


def test_wait_for_lease_has_an_upper_bound(tmp_path):
    import time

    from latte_ray.errors import LeaseHeld
    from latte_ray.record import lease as leases

    out = tmp_path / "out"
    _skewed_lease(out / "lease", expiry_s=3600.0, ahead_s=0.0)  # a live holder on a sane clock
    fs, root = filesystem(str(out))
    started = time.monotonic()
    with pytest.raises(LeaseHeld) as info:
        leases.acquire(fs, root, str(out), "r1", "run", leases.Terms(), leases.Policy(wait=True, max_wait_s=1.0))
    assert time.monotonic() - started < 5 and "--max-lease-wait" in str(info.value), info.value


def test_an_endpoint_that_accepts_and_never_answers_is_named_within_a_minute():
    """A loopback socket that accepts connections and never sends a byte."""
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    try:
        started = time.monotonic()
        result = invoke("status", "s3://silent-bucket/out", "--storage-option", f"endpoint_url={endpoint}",
                        "--storage-option", "key=k", "--storage-option", "secret=s",
                        "--storage-option", "connect_timeout=1", "--storage-option", "read_timeout=1")
        took = time.monotonic() - started
    finally:
        stop.set()
        for conn in held:
            conn.close()
        server.close()
    text = own_output(result)
    assert result.exit_code == 2 and endpoint in text and "did not answer" in text, text
    assert len(text.strip().splitlines()) == 1, text
    assert took < 60, took


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs of its own (root only): a disk that really fills, without filling the machine's."""
    import os
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        os.rmdir(mount)


def test_a_full_disk_stops_the_run_naming_it_and_leaves_it_resumable(made, small_disk):
    import os

    out = small_disk / "out"
    stat = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 100_000))  # room for 2 or 3 videos
    args = ["run", "--pipeline", str(made["spec"]), "--prompts", str(made["prompts"]), "--output", str(out),
            "--no-report"]
    result = invoke(*args)
    text = own_output(result)
    assert result.exit_code == 1, text
    assert text.splitlines()[-1].startswith(f"error: no space left on {out}"), text
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert [r["outcome"] for r in records] == ["failed"] and "no space left" in records[0]["reason"], records
    # Resumable: what it committed before the disk filled is whole and recorded (a resuming run is the same
    # run as after any stop; test_repair_then_resume_... runs one), and nothing is left half-written.
    filler.unlink()
    report = verify(str(out), deep=True)
    assert report.clean and report.ok_ids < 8, report.lines()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_resume_video_check_finds_missing_wrong_size_and_ignores_temp_files(tmp_path):
    """The resume pre-pass's video check (plan/workplan.done_keys over record/verify's listing and lookup),
    on a hand-made output of 6 ok rows and 1 error row: no model, no Ray."""
    from types import SimpleNamespace

    from latte_ray.plan.keys import contains, id_keys
    from latte_ray.plan.workplan import done_keys
    from latte_ray.record.storage import MANIFEST_SCHEMA, write_manifest_part
    from latte_ray.record.verify import lookup, video_keys, video_listing

    url = str(tmp_path / "out")
    fs, root = filesystem(url, {})
    layout = OutputLayout(url, root)
    ids = [f"id{i}" for i in range(7)]
    keys = [layout.video_key(v, f"{i:064x}") for i, v in enumerate(ids)]
    cols = {f.name: pa.nulls(7, f.type) for f in MANIFEST_SCHEMA}
    cols["id"], cols["status"] = pa.array(ids), pa.array(["ok"] * 6 + ["error"])
    cols["video_uri"] = pa.array([layout.uri(k) for k in keys[:6]] + [None])
    cols["bytes"] = pa.array([4, 4, 4, 4, None, 4, None], pa.int64())
    write_manifest_part(fs, layout, pa.table(cols, schema=MANIFEST_SCHEMA))
    body = {0: b"1234", 1: b"12345", 3: b"1234", 4: b"any size: none recorded"}  # 2, 5 missing; 1 wrong size
    for key in keys:
        Path(layout.path(key)).parent.mkdir(parents=True, exist_ok=True)
    for i, data in body.items():
        Path(layout.path(keys[i])).write_bytes(data)
    Path(layout.path(keys[2] + ".tmp-123")).write_bytes(b"1234")  # a killed writer's temp never counts
    Path(layout.path(keys[5]) + ".tmp-9").write_bytes(b"1234")

    listing = video_listing(fs, layout)
    assert sorted(listing["key"].to_pylist()) == sorted(keys[i] for i in body)
    found, size = lookup(listing, video_keys(pa.array([layout.uri(k) for k in keys] + ["s3://b/x.mp4", None])))
    assert found.tolist() == [True, True, False, True, True, False, False, False, False]
    assert size[[0, 1, 3]].tolist() == [4, 5, 4]

    for retry_errors, skipped in [(True, [0, 3, 4]), (False, [0, 3, 4, 6])]:
        videos: dict = {}
        done = done_keys(SimpleNamespace(retry_errors=retry_errors), layout, fs, videos)
        assert contains(done, id_keys(ids)).tolist() == [i in skipped for i in range(7)]
        assert videos == {"regenerate": 3, "wrong_size": [keys[1]]}


def test_find_videos_gives_what_key_of_and_the_listing_give(tmp_path):
    """record/verify.find_videos (the resume check's lookup: a slice for the URIs under the output's own URI, the
    regular expression for the rest) gives for every URI the key OutputLayout.key_of gives and the listed
    size; a folder inside a shard is not a video. No model, no Ray."""
    from latte_ray.record.verify import find_videos, video_listing

    url = str(tmp_path / "out")
    fs, root = filesystem(url, {})
    layout = OutputLayout(url, root)
    listed = {"videos/ab/a.mp4": 1, "videos/ab/b.mp4": 22, "videos/cd/c.npy": 333, "videos/cd/notes.txt": 4}
    for key, size in listed.items():
        Path(layout.path(key)).parent.mkdir(parents=True, exist_ok=True)
        Path(layout.path(key)).write_bytes(b"x" * size)
    Path(layout.path("videos/cd/d.mp4")).mkdir()  # a folder with a video's name: not a video
    listing = video_listing(fs, layout)
    assert dict(zip(listing["key"].to_pylist(), listing["size"].to_pylist())) == listed

    own = f"{layout.url}/"
    uris = [own + "videos/ab/a.mp4",  # the slice
            "s3://elsewhere/copy/videos/ab/b.mp4",  # an output copied elsewhere: the regular expression
            own + "videos/ab/a.mp4/",  # a trailing slash
            own + "videos/cd/notes.txt",  # listed, but not a video's name
            own + "videos/cd/d.mp4",  # a folder
            own + "x/videos/cd/c.npy",  # the last three segments
            own + "videos/zz/a.mp4",  # not listed
            "junk", None]
    for prefix in (own, None, "s3://another/"):
        keys, found, size = find_videos(listing, pa.array(uris), prefix)
        assert keys.to_pylist() == [OutputLayout.key_of(u) if u else None for u in uris]
        assert found.tolist() == [True, True, True, False, False, True, False, False, False]
        assert size.tolist() == [1, 22, 1, 0, 0, 333, 0, 0, 0]
    keys, found, size = find_videos(listing, pa.array([], pa.string()), own)
    assert len(keys) == len(found) == len(size) == 0

    # check_videos, the one check behind the resume pre-pass, verify and status: fine = listed with the size
    # the row recorded, or listed at all where the row recorded none (-1)
    from latte_ray.record.verify import check_videos

    recorded = [1, 21, 1, -1, 4, 333, 0, -1, -1]
    check = check_videos(listing, pa.array(uris), recorded, own)
    assert check.keys.to_pylist() == [OutputLayout.key_of(u) if u else None for u in uris]
    assert check.present.tolist() == [True, True, True, False, False, True, False, False, False]
    assert check.fine.tolist() == [True, False, True, False, False, True, False, False, False]


def test_key_set_is_numpys_sorted_unique_of_the_keys():
    """plan/keys.key_set (the done set's sort, by np.lexsort) gives what np.unique gives: the order `contains`
    searches in, one of each key; keys equal in one half and not the other stay apart."""
    import numpy as np

    from latte_ray.plan.keys import KEY_DTYPE, contains, key_set

    rng = np.random.default_rng(0)
    keys = np.empty(5000, KEY_DTYPE)
    keys["hi"] = rng.integers(0, 50, 5000, dtype=np.uint64) << np.uint64(60)  # many equal hi, the top bit set
    keys["lo"] = rng.integers(0, 2**64 - 1, 5000, dtype=np.uint64, endpoint=True) % np.uint64(300)
    assert np.array_equal(key_set(keys), np.unique(keys))
    assert contains(key_set(keys), keys).all()
    assert key_set(keys[:0]).dtype == KEY_DTYPE and len(key_set(keys[:0])) == 0


def test_arrow_lists_the_videos_of_an_s3_output_as_s3fs_does(s3_server, monkeypatch):
    """record/verify.arrow_s3: Arrow's S3 client on the loopback server's endpoint and credentials, made from the
    s3fs filesystem's own options, lists the shards as s3fs does (sizes, a killed writer's temp file and a
    folder left out); local disk or an option it does not map (a profile) gets none. No model, no Ray."""
    import uuid

    from latte_ray.record import verify as record_verify

    bucket = s3_server.make_bucket("arrow-" + uuid.uuid4().hex[:8])
    url = f"s3://{bucket}/out"
    fs, root = filesystem(url, s3_server.storage_options())
    layout = OutputLayout(url, root)
    fs.pipe({layout.path(f"videos/{s:02x}/id{i}.{i:032x}.mp4"): b"v" * (i + s) for s in range(3) for i in range(5)})
    fs.pipe({layout.path("videos/00/id0.mp4.tmp-1"): b"half", layout.path("videos/01/sub/x.mp4"): b"x"})
    assert record_verify.arrow_s3(fs) is not None
    by_arrow = record_verify.video_listing(fs, layout).sort_by("key")
    arrow_s3 = record_verify.arrow_s3
    monkeypatch.setattr(record_verify, "arrow_s3", lambda fs: None)  # the s3fs listing, for comparison
    by_s3fs = record_verify.video_listing(fs, layout).sort_by("key")
    monkeypatch.setattr(record_verify, "arrow_s3", arrow_s3)
    assert by_arrow.num_rows == 15 and by_arrow.equals(by_s3fs), (by_arrow.to_pylist(), by_s3fs.to_pylist())
    assert record_verify.arrow_s3(filesystem(str(s3_server.log.parent), {})[0]) is None
    profiled = type(fs)(**{**fs.storage_options, "profile": "nobody"}, skip_instance_cache=True)
    assert record_verify.arrow_s3(profiled) is None
