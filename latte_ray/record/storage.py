"""Storage: filesystems from URLs, the output layout, atomic writes and the manifest.

Output layout under a prefix:
    latte-ray.json              the output's record: the one pipeline spec (and run seed) it is bound to,
                                written once by its first run (latte_ray/record/output.py)
    runs/<run_id>.json          one record per run: spec, arguments (no secrets), versions, start, end, outcome
    lease/<generation>.json     the output lease: one writer per output (latte_ray/record/lease.py)
    videos/<shard>/<id>.<h>.mp4 shard = first 2 hex chars of sha256(id); h = first 32 hex chars of the
                                video's own sha256 (content-addressed: a recorded object never changes)
    manifest/part-*.parquet     one row per finished attempt: the commit record (part-compact-*: many
                                parts merged by latte_ray/record/compact.py, naming in their footer the parts they replace)

Commit protocol: a video object is written first (one PUT; on local disk temp file + rename), then the
manifest part that records it. A video without a manifest row does not count; compaction deletes it once
it is old enough. Because a video's key holds its hash, whatever writes an id again (a resume, --no-resume,
a nondeterministic kernel) either writes identical bytes under the same key or a new key: the object an
`ok` row names never changes.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import io
import os
import re
import uuid
from dataclasses import dataclass
from typing import Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from latte_ray.errors import ForeignFile, InputError, OutputDamaged
from latte_ray.faults import injection as faults

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("video_uri", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("num_frames", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("fps", pa.int32()),
        ("steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("spec_hash", pa.string()),
        ("model", pa.string()),
        ("cache", pa.string()),  # cache acceleration kind (faster_cache, ...), null when off
        ("cache_threshold", pa.float64()),  # teacache's threshold, null for other kinds and when off
        ("quantization", pa.string()),  # model.quantization.kind, null when off
        ("transformer_calls", pa.int32()),  # rows of this video through the transformer blocks, all steps
        ("prompt_tokens", pa.int32()),
        ("prompt_truncated", pa.bool_()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("generate_seconds", pa.float64()),
        # Where and when the generation ran (latte_ray/ops/fleet.py draws the fleet's utilization from them):
        # the generation actor (Ray actor id) and its node, when that actor started (its model load begins
        # then), and the generation call that made this row, from start to end. Rows of one call share it.
        ("actor", pa.string()),
        ("node", pa.string()),
        ("actor_started_at", pa.timestamp("us", tz="UTC")),
        ("busy_start", pa.timestamp("us", tz="UTC")),
        ("busy_end", pa.timestamp("us", tz="UTC")),
        ("mean_brightness", pa.float64()),
        ("motion_score", pa.float64()),
        ("blank_frames", pa.int32()),
        ("frozen_frames", pa.int32()),
        # Quality scores (latte_ray/model/clip.py), null when the run did not score; `latte-ray score` puts
        # later scores in OUTPUT/scores/ instead (latte_ray/record/scores.py), as manifest parts never change.
        ("clip_score", pa.float64()),
        ("aesthetic_score", pa.float64()),
        ("clip_prompt_truncated", pa.bool_()),  # the prompt was longer than CLIP's text window (77 tokens)
        ("scoring_hash", pa.string()),  # ScoringSpec.scoring_hash of the scorer that made the scores
        # Training tensors kept next to the video (latte_ray/record/sidecars.py), null when not kept.
        ("embeddings_uri", pa.string()),
        ("latents_uri", pa.string()),
    ]
)

_SECRET_OPTION_KEYS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                       "aws_session_token"}


def storage_options_for(url: str, options: dict | None = None) -> dict:
    """fsspec options for a URL: explicit options win, then the standard AWS environment for s3://.

    For s3:// the endpoint comes from `endpoint_url` or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, the region
    from `region` or AWS_REGION (botocore itself reads only AWS_DEFAULT_REGION), and `aws_access_key_id`-style
    names are accepted for s3fs's key/secret/token. Credentials that are not given are left to botocore's own
    chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance and pod roles). String values, as
    `--storage-option key=value` gives them, are converted to the type of the filesystem's own default
    (anon=true -> True, max_concurrency=8 -> 8).
    """
    opts = dict(options or {})
    protocol = fsspec.utils.get_protocol(url)
    if protocol in ("s3", "s3a"):
        for alias, name in _S3_ALIASES.items():
            if alias in opts:
                opts.setdefault(name, opts.pop(alias))
        client = dict(opts.pop("client_kwargs", None) or {})
        endpoint = (
            opts.pop("endpoint_url", None)
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            client["endpoint_url"] = endpoint
        region = opts.pop("region", None)
        if not region and not os.environ.get("AWS_DEFAULT_REGION"):
            region = os.environ.get("AWS_REGION")
        if region:
            client["region_name"] = region
        if client:
            opts["client_kwargs"] = client
        # A blackholed endpoint would hold each attempt for botocore's 60 s connect timeout times its own
        # retries; fail an attempt sooner and let faults/retry.py's time budget decide (tests/test_outage.py).
        # One that accepts connections and never answers waits out the read timeout instead (botocore: 60 s).
        timeouts = {"connect_timeout": float(opts.pop("connect_timeout", S3_CONNECT_TIMEOUT_S)),
                    "read_timeout": float(opts.pop("read_timeout", S3_READ_TIMEOUT_S))}
        opts["config_kwargs"] = {**timeouts, **(opts.get("config_kwargs") or {})}
    return _typed_options(protocol, opts)


S3_CONNECT_TIMEOUT_S = 10  # storage option connect_timeout
S3_READ_TIMEOUT_S = 20  # storage option read_timeout
_S3_ALIASES = {"aws_access_key_id": "key", "aws_secret_access_key": "secret", "aws_session_token": "token",
               "region_name": "region"}


def _typed_options(protocol: str, opts: dict) -> dict:
    try:
        params = inspect.signature(fsspec.get_filesystem_class(protocol).__init__).parameters
    except (ValueError, ImportError):
        return opts
    typed = {}
    for key, value in opts.items():
        default = params[key].default if key in params else None
        if isinstance(value, str) and isinstance(default, (bool, int)):
            try:
                value = _parse_bool(value) if isinstance(default, bool) else int(value)
            except ValueError:
                raise InputError(f"storage option {key!r}: expected {type(default).__name__}, got {value!r}") from None
        typed[key] = value
    return typed


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def redact_options(options: dict | None) -> dict:
    """Options with credential values replaced, for records and logs."""
    return {k: ("***" if k.lower() in _SECRET_OPTION_KEYS else v) for k, v in (options or {}).items()}


def filesystem(url: str, options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URL; an unknown scheme or a missing fsspec backend is an InputError naming
    the URL."""
    try:
        protocol = fsspec.utils.get_protocol(url)
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise InputError(f"{url!r}: unknown URL scheme {protocol!r} (use a local path, s3://, gs://, ...)") from None
    except ImportError as e:
        raise InputError(f"{url!r}: the {protocol}:// backend is not installed: {e}") from None
    options = storage_options_for(url, options)
    fs, path = fsspec.core.url_to_fs(url, **options)
    _first_contact(fs, path, url, options)
    return fs, path


_ANSWERED: set[str] = set()  # endpoints this process has had an answer from


def _first_contact(fs: fsspec.AbstractFileSystem, path: str, url: str, options: dict) -> None:
    """The first request to a remote endpoint in this process, under a wall-clock deadline, so that an
    endpoint that accepts connections and never answers is reported in one line naming it within a minute,
    instead of after every layer's retries of every read timeout (s3fs's, botocore's, ours: minutes)."""
    if is_local(fs):
        return
    config = options.get("config_kwargs") or {}
    endpoint = (options.get("client_kwargs") or {}).get("endpoint_url") or f"the {fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]}:// service's default endpoint"
    if endpoint in _ANSWERED:
        return
    deadline = float(config.get("connect_timeout", S3_CONNECT_TIMEOUT_S)) + 2 * float(
        config.get("read_timeout", S3_READ_TIMEOUT_S)) + 2
    import threading

    answered = threading.Event()

    def probe() -> None:
        try:
            fs.exists(path)
        except Exception:  # noqa: BLE001 - an answer, even an error: the callers meet it themselves
            pass
        answered.set()

    threading.Thread(target=probe, name="latte-ray-first-contact", daemon=True).start()
    if not answered.wait(deadline):
        raise InputError(f"{url}: the storage endpoint {endpoint} did not answer within {deadline:.0f} s "
                         f"(connect timeout {config.get('connect_timeout')} s, read timeout "
                         f"{config.get('read_timeout')} s; storage options connect_timeout and read_timeout set "
                         f"them): check the endpoint URL and the network")
    _ANSWERED.add(endpoint)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


OUTPUT_RECORD = "latte-ray.json"
VIDEO_DIGEST_CHARS = 32  # hex chars of a video's sha256 in its key: 128 bits


def shard_of(video_id: str) -> str:
    return hashlib.sha256(video_id.encode()).hexdigest()[:2]


@dataclass(frozen=True)
class OutputLayout:
    """Paths under an output prefix; `root` is the filesystem path, `url` what users see."""

    url: str
    root: str

    @classmethod
    def at(cls, url: str, fs: fsspec.AbstractFileSystem, root: str) -> "OutputLayout":
        return cls(url=url.rstrip("/"), root=root.rstrip("/"))

    @property
    def record_json(self) -> str:
        """The output's record (latte_ray/record/output.py)."""
        return f"{self.root}/{OUTPUT_RECORD}"

    @property
    def legacy_run_json(self) -> str:
        """Where latte-ray before 0.2 kept its (single, overwritten) run record."""
        return f"{self.root}/run.json"

    @property
    def runs_dir(self) -> str:
        return f"{self.root}/runs"

    @property
    def manifest_dir(self) -> str:
        return f"{self.root}/manifest"

    @property
    def videos_dir(self) -> str:
        return f"{self.root}/videos"

    def video_key(self, video_id: str, sha256: str) -> str:
        """Content-addressed: the id (to find it by eye) and the first 128 bits of the video's sha256."""
        return f"videos/{shard_of(video_id)}/{video_id}.{sha256[:VIDEO_DIGEST_CHARS]}.mp4"

    @staticmethod
    def key_of(video_uri: str) -> str | None:
        """The key (videos/<shard>/<name>) that a manifest row's video_uri (or a sidecar's uri) names, relative
        to the output, so that an output copied or moved elsewhere still finds its videos; None for a URI of
        another shape."""
        parts = video_uri.rstrip("/").split("/")
        if len(parts) < 3 or parts[-3] != "videos" or not parts[-1].endswith((".mp4", ".npy")):
            return None
        return "/".join(parts[-3:])

    def video_path(self, video_uri: str) -> str:
        """Filesystem path of the object a row's video_uri names, under this output's root."""
        key = self.key_of(video_uri)
        if key is None:
            raise ValueError(f"{video_uri!r} is not a latte-ray video URI (.../videos/<shard>/<name>.mp4)")
        return self.path(key)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def uri(self, key: str) -> str:
        return f"{self.url}/{key}"


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `data` appear at `path` whole or not at all.

    Object stores publish an object only when its PUT (or multipart upload) completes. On local disk
    the bytes go to a temp name in the same folder, are fsynced, and are renamed into place.
    """
    faults.point("write", path)
    parent = path.rsplit("/", 1)[0]
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                half = len(data) // 2
                f.write(data[:half])
                f.flush()
                faults.point("mid_write", path)
                f.write(data[half:])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):  # a failed write leaves nothing behind (a killed process leaves its temp)
                os.unlink(tmp)
            raise
        return
    fs.pipe_file(path, data)


def write_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` with `data` whole, only if nothing is there yet; False (and nothing written) if something
    is. Local disk: a temp file hard-linked to the final name (link(2) fails if the name exists). S3: a
    conditional PUT (If-None-Match: *). Other stores: a check, then a write (not atomic against a concurrent
    writer)."""
    faults.point("write", path)
    if is_local(fs):
        parent = path.rsplit("/", 1)[0]
        try:
            os.makedirs(parent, exist_ok=True)
        except FileExistsError:
            if os.path.lexists(parent):  # a file where the folder belongs
                raise
            # os.makedirs found the folder there (EEXIST), then it was removed before makedirs checked that it
            # is a folder: a run releasing its lease removes its empty lease/ folder. Gone: the caller looks again.
            raise FileNotFoundError(errno.ENOENT, "removed while it was being made", parent) from None
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: exclusive create, then the bytes
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            return True
        except FileExistsError:
            return False
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if "s3" in ((fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except Exception as e:  # noqa: BLE001 - a store without conditional writes answers 501/400
            if "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)


def manifest_part_bytes(rows: pa.Table, metadata: dict[bytes, bytes] | None = None) -> bytes:
    sink = io.BytesIO()
    table = rows.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_manifest_part(
    fs: fsspec.AbstractFileSystem, layout: OutputLayout, rows: pa.Table, name: str | None = None
) -> str:
    """Write one manifest part. A retried batch passes the same `name`, so it replaces its part instead
    of adding a second copy of its rows."""
    path = f"{layout.manifest_dir}/part-{name or uuid.uuid4().hex}.parquet"
    write_atomic(fs, path, manifest_part_bytes(rows))
    return path


COMPACT_PREFIX = "part-compact-"
REPLACES_KEY = b"latte_ray.replaces"  # a compacted part's footer: JSON list of the part names it replaces


# What latte-ray names a manifest part: part-<32 hex> (a batch), part-compact-<32 hex> (compaction); older
# versions and tests name batches part-<word>. Anything else under manifest/ was not made by latte-ray.
OWN_PART = re.compile(r"part-[A-Za-z0-9_-]{1,64}\.parquet")
# Columns every manifest part latte-ray ever wrote has (later columns read as nulls when absent).
MANIFEST_REQUIRED = ("id", "prompt", "seed", "status", "error", "video_uri", "sha256", "bytes", "spec_hash")


def shown(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as users see it: the local path, or the store's URL (s3://bucket/key)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def output_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The output prefix a record file belongs to, for the `latte-ray verify --repair OUTPUT` hint."""
    for folder in ("/manifest/", "/runs/", "/lease/", "/scores/", "/videos/"):
        if folder in path:
            return shown(fs, path.rsplit(folder, 1)[0])
    return shown(fs, path.rsplit("/", 1)[0])


def damaged(fs: fsspec.AbstractFileSystem, path: str, what: str, output: str | None = None,
            kind: type[OutputDamaged] = OutputDamaged) -> OutputDamaged:
    """The one-line error for a record file latte-ray cannot read as it wrote it."""
    return kind(f"{shown(fs, path)}: {what}; run `latte-ray verify --repair "
                         f"{output or output_of(fs, path)}` to move it aside (the next run makes what it "
                         f"recorded again)")


def folder_or_damaged(fs: fsspec.AbstractFileSystem, path: str, what: str) -> bool:
    """True when `path` is a folder (or an object-store prefix), False when nothing is there; OutputDamaged
    when a file stands where latte-ray keeps its folder `what` (manifest/, runs/, lease/)."""
    if not is_local(fs):
        fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:  # local: a file stands on the way to it
        raise damaged(fs, path, f"a file is in the way of the {what} folder") from None
    if info.get("type") != "directory":
        raise damaged(fs, path, f"a file where the {what} folder belongs")
    return True


def manifest_files(fs: fsspec.AbstractFileSystem, layout: OutputLayout) -> list[str]:
    """The live manifest parts: every part, less those a compacted part replaces (latte_ray/record/compact.py;
    left behind only when compaction stopped between writing the compacted part and deleting them)."""
    return live_parts(fs, manifest_listing(fs, layout))[0]


def manifest_listing(fs: fsspec.AbstractFileSystem, layout: OutputLayout) -> list[dict]:
    """fsspec `ls` details of every part file under manifest/ (live or replaced); OutputDamaged when manifest/
    is a file or a part is a folder."""
    if not folder_or_damaged(fs, layout.manifest_dir, "manifest"):
        return []
    # Fresh: s3fs would answer from its listing cache, blind to parts other processes wrote since.
    listing = fs.ls(layout.manifest_dir, detail=True) if is_local(fs) else \
        fs.ls(layout.manifest_dir, detail=True, refresh=True)
    entries = sorted((e for e in listing if e["name"].endswith(".parquet")), key=lambda e: e["name"])
    for entry in entries:
        if entry.get("type") == "directory":
            raise damaged(fs, entry["name"], "a folder where a manifest part belongs")
    return entries


def live_parts(fs: fsspec.AbstractFileSystem, listing: list[dict]) -> tuple[list[str], set[str]]:
    """(live part paths, names of the replaced ones) from a manifest listing."""
    import json

    replaced: set[str] = set()
    for entry in listing:
        if part_name(entry["name"]).startswith(COMPACT_PREFIX):
            metadata = read_part_schema(fs, entry["name"]).metadata or {}
            try:
                replaced.update(json.loads(metadata.get(REPLACES_KEY, b"[]")))
            except ValueError:
                raise damaged(fs, entry["name"], "its list of replaced parts is not JSON") from None
    live = [e["name"] for e in listing if part_name(e["name"]) not in replaced]
    return live, replaced


def part_name(path: str) -> str:
    """A manifest part's file name, which is what compacted parts record."""
    return path.rsplit("/", 1)[-1]


def read_manifest(
    fs: fsspec.AbstractFileSystem, layout: OutputLayout, columns: Iterable[str] | None = None
) -> pa.Table:
    """All manifest rows (every attempt). Use `latest_rows` for one row per id."""
    cols = list(columns) if columns else MANIFEST_SCHEMA.names
    return read_parts(fs, manifest_files(fs, layout), cols)


def read_parts(fs: fsspec.AbstractFileSystem, paths: list[str], columns: list[str],
               schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    """Manifest parts (or other parts of `schema`) read concurrently (each read retried on transient errors),
    as one table."""
    from concurrent.futures import ThreadPoolExecutor

    from latte_ray.faults import retry

    def read(path: str) -> pa.Table:
        return retry.call(lambda: read_part(fs, path, columns, schema), f"read {path}", retry.READ)

    if not paths:
        return pa.schema([schema.field(c) for c in columns]).empty_table()
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        return pa.concat_tables(list(pool.map(read, paths)))


def _part_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """A part's bytes: transport errors propagate (retried by the caller); a folder or a vanished file is
    damage, since the listing named a part there."""
    try:
        return fs.cat_file(path)
    except (IsADirectoryError, NotADirectoryError):
        raise damaged(fs, path, "a folder where a manifest part belongs") from None


def parse_part(fs: fsspec.AbstractFileSystem, path: str, data: bytes,
               schema: pa.Schema = MANIFEST_SCHEMA) -> pq.ParquetFile:
    """The part's bytes as a Parquet file of `schema`; OutputDamaged (permanent) when they are not one.

    Parsed from memory, so that every error here is about the bytes, never the transport: pyarrow reports a
    bad body as a plain OSError, which retry.is_transient would otherwise take for a network error."""
    try:
        part = pq.ParquetFile(pa.BufferReader(data))
        names = part.schema_arrow.names
    except Exception as e:  # noqa: BLE001 - any parse error: the bytes are not a Parquet file
        raise damaged(fs, path, f"not a readable Parquet file ({type(e).__name__}: {_first_line(e)})") from None
    foreign = [n for n in names if n not in schema.names]
    missing = [n for n in (MANIFEST_REQUIRED if schema is MANIFEST_SCHEMA else ()) if n not in names]
    wrong = [n for n in names if n in schema.names
             and not _castable(part.schema_arrow.field(n).type, schema.field(n).type)]
    if foreign or missing or wrong:
        what = "; ".join(x for x in (
            f"columns latte-ray does not write: {', '.join(foreign[:5])}" if foreign else "",
            f"no {', '.join(missing[:5])} column" if missing else "",
            f"wrong type of {', '.join(wrong[:5])}" if wrong else "") if x)
        raise damaged(fs, path, f"a Parquet file of another schema ({what})", kind=ForeignFile)
    return part


def _castable(found: pa.DataType, wanted: pa.DataType) -> bool:
    return found == wanted or (pa.types.is_null(found)) or (
        pa.types.is_timestamp(found) and pa.types.is_timestamp(wanted)) or (
        pa.types.is_integer(found) and pa.types.is_integer(wanted)) or (
        pa.types.is_floating(found) and pa.types.is_floating(wanted)) or (
        pa.types.is_string(found) or pa.types.is_large_string(found)) and (
        pa.types.is_string(wanted) or pa.types.is_large_string(wanted))


def read_part_schema(fs: fsspec.AbstractFileSystem, path: str, schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Schema:
    """A part's schema (with its footer metadata), checked; OutputDamaged when it is not one of ours."""
    return parse_part(fs, path, _part_bytes(fs, path), schema).schema_arrow


def read_part(fs: fsspec.AbstractFileSystem, path: str, columns: list[str],
              schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    """One manifest part as `columns` of MANIFEST_SCHEMA; a column added after it was written reads as nulls.
    OutputDamaged (never retried) when its bytes are not a Parquet file of this schema."""
    part = parse_part(fs, path, _part_bytes(fs, path), schema)
    fields = pa.schema([schema.field(c) for c in columns])
    present = [c for c in columns if c in part.schema_arrow.names]
    try:
        table = part.read(columns=present)
    except Exception as e:  # noqa: BLE001 - the footer parsed, a page did not
        raise damaged(fs, path, f"not a readable Parquet file ({type(e).__name__}: {_first_line(e)})") from None
    for c in columns:
        if c not in present:
            table = table.append_column(fields.field(c), pa.nulls(table.num_rows, fields.field(c).type))
    return table.select(columns).cast(fields)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def latest_rows(manifest: pa.Table) -> pa.Table:
    """One row per id: its ok row if it has one, else its latest attempt."""
    if manifest.num_rows == 0:
        return manifest
    import pyarrow.compute as pc

    is_ok = pc.equal(manifest["status"], "ok").cast(pa.int8())
    order = manifest.append_column("_ok", is_ok).append_column(
        "_i", pa.array(range(manifest.num_rows), pa.int64())
    )
    order = order.sort_by([("id", "ascending"), ("_ok", "descending"), ("finished_at", "descending")])
    ids = order["id"].to_pylist()
    keep = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    return order.take(pa.array(keep, pa.int64())).drop_columns(["_ok", "_i"])
