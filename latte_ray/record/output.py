"""An output's identity and history: the record that binds it to one pipeline spec, and one record per run.

    OUTPUT/latte-ray.json       written once, create-only, by the first run that passes every check: record
                                format, spec hash, the full spec, the run seed, when, by which latte-ray.
                                Never rewritten. It is what makes a folder a latte-ray output: status,
                                report and compact refuse a path without it.
    OUTPUT/runs/<run_id>.json   one per run: written once the run's checks have passed and before anything
                                is generated (outcome "running"), rewritten by that same run at its end (ok,
                                failed with a reason, interrupted, lost-lease). No run writes another run's
                                record, so a failed run never replaces the record of a good one; the one
                                exception: the run that takes over a dead run's lease (record/lease.py)
                                marks its record "died".

Why an output is bound to one spec: resume matches on ids, and an id does not change with the spec, so a
second spec would skip every id the first one finished (the manifest would then mix two specs), and with
--no-resume it would record its videos next to the first spec's. The run seed is bound too, because rows
without a seed (and rows without an id) take theirs from it. A run with another spec hash or run seed is
refused before any work, naming both hashes and the fields that differ.

Outputs made before this record existed (a manifest and run.json, no latte-ray.json) are adopted by a run
whose spec hash every manifest row already carries; anything else is refused.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import fsspec

from latte_ray.record.storage import (
    OUTPUT_RECORD, OutputLayout, damaged, filesystem, folder_or_damaged, is_local, read_manifest, write_atomic,
    write_exclusive,
)
from latte_ray.errors import InputError, OutputBindingError, OutputDamaged
from latte_ray.spec import PipelineSpec, hashed_fields

log = logging.getLogger(__name__)

FORMAT = 1  # latte-ray.json format; a newer one is refused rather than misread
SEED_POLICY = ("rows without a seed column get seed = hash(run_seed, id); rows without an id column get "
               "id = hash(prompt, negative_prompt, seed or run_seed)")


@dataclass(frozen=True)
class Output:
    """An output prefix: its filesystem and layout."""

    fs: fsspec.AbstractFileSystem
    layout: OutputLayout

    @property
    def url(self) -> str:
        return self.layout.url


def open_output(url: str, storage_options: dict | None = None) -> Output:
    fs, root = filesystem(url, storage_options)
    return Output(fs, OutputLayout(url=url.rstrip("/"), root=root.rstrip("/")))


# ---- reading -------------------------------------------------------------------------------------


def _read_json(out: Output, path: str, name: str) -> dict | None:
    """A JSON object under the output, None if there is none; OutputDamaged if it is not one latte-ray wrote
    (a folder, unparseable, not an object), InputError if it cannot be read at all (network, permission)."""
    try:
        data = out.fs.cat_file(path)
    except FileNotFoundError:
        return None
    except (IsADirectoryError, NotADirectoryError) as e:
        raise damaged(out.fs, path, f"not a file ({type(e).__name__})", out.url) from None
    except Exception as e:  # noqa: BLE001 - network, permission: name the URL and the cause
        raise InputError(f"output: cannot read {out.url}/{name}: {type(e).__name__}: {_first_line(e)}") from e
    return parse_json_object(out, path, data)


def parse_json_object(out: Output, path: str, data: bytes) -> dict:
    """`data` as the JSON object latte-ray wrote at `path`; OutputDamaged (naming it) when it is not one."""
    try:
        value = json.loads(data)
    except ValueError as e:
        raise damaged(out.fs, path, f"not valid JSON ({e}), so not as latte-ray wrote it", out.url) from None
    if not isinstance(value, dict):
        raise damaged(out.fs, path, f"a JSON {type(value).__name__}, not the object latte-ray wrote", out.url)
    return value


def read_record(out: Output) -> dict | None:
    """The output's latte-ray.json, or None when it has none."""
    record = _read_json(out, out.layout.record_json, OUTPUT_RECORD)
    if record is None:
        return None
    if "spec_hash" not in record or not isinstance(record.get("format"), int):
        raise damaged(out.fs, out.layout.record_json, "not a latte-ray output record (no spec_hash or format)",
                      out.url)
    if record["format"] > FORMAT:
        raise OutputDamaged(f"{out.url}/{OUTPUT_RECORD} has format {record['format']}, newer than this latte-ray "
                        f"reads ({FORMAT}); upgrade latte-ray")
    return record


def read_legacy_record(out: Output) -> dict | None:
    """run.json of an output made before latte-ray.json existed (the last run's spec and seed), or None."""
    return _read_json(out, out.layout.legacy_run_json, "run.json")


def require_output(url: str, storage_options: dict | None = None) -> tuple[Output, dict]:
    """The output and its record, for the operations commands; InputError (exit 2) for a path that is not a
    latte-ray output, so that a mistyped path is an error, not an empty report. An output made before
    latte-ray.json existed counts by its run.json."""
    out = open_output(url, storage_options)
    if is_local(out.fs) and os.path.isfile(out.layout.root):
        raise InputError(f"{url}: a file, not a latte-ray output (a folder or an object-store prefix); check the path")
    record = read_record(out)
    if record is not None:
        return out, record
    legacy = read_legacy_record(out)
    if legacy is None:
        raise InputError(f"{url}: not a latte-ray output (no {OUTPUT_RECORD} there); check the path")
    return out, {"format": 0, "spec_hash": legacy.get("spec_hash"), "run_seed": int(legacy.get("seed") or 0),
                 "pipeline": legacy.get("pipeline") or {}, "created_at": None, "legacy": True}


# ---- binding --------------------------------------------------------------------------------------


def spec_diff(old: dict, new: dict) -> list[str]:
    """`field: old -> new` for every hashed field of two dumped pipeline specs that differs."""
    a, b = _flatten(hashed_fields(old)), _flatten(hashed_fields(new))
    changes = []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key, _ABSENT) != b.get(key, _ABSENT):
            changes.append(f"{key}: {_show(a.get(key, _ABSENT))} -> {_show(b.get(key, _ABSENT))}")
    return changes or ["no field differs (the spec hash was computed by another latte-ray version)"]


_ABSENT = object()


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict) and value:
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _show(value: object) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def _refuse_mismatch(out: Output, record: dict, spec: PipelineSpec, seed: int) -> None:
    """OutputBindingError if `record` binds the output to another spec hash or run seed than this run's."""
    new_hash = spec.spec_hash()
    made = f"made {record['created_at']}" if record.get("created_at") else "made by an earlier run"
    if record["spec_hash"] != new_hash:
        diff = "; ".join(spec_diff(record.get("pipeline") or {}, spec.model_dump(mode="json")))
        raise OutputBindingError(
            f"output {out.url} is bound to pipeline spec {record['spec_hash']} ({made}); this run's spec is "
            f"{new_hash}: {diff}. One output holds the videos of one spec: write this spec to a new --output"
        )
    bound_seed = record.get("run_seed")
    if bound_seed is not None and int(bound_seed) != seed:
        raise OutputBindingError(
            f"output {out.url} was made with run seed {bound_seed} (--seed); this run has --seed {seed}, which "
            f"would change the seeds and ids of rows without them. Use --seed {bound_seed} to continue this "
            f"output, or a new --output"
        )


def check_binding(out: Output, spec: PipelineSpec, seed: int) -> dict | None:
    """Refuse (OutputBindingError) a run whose spec or run seed is not the one the output is bound to. Reads only.
    Returns the output's record, or None for an output that has none yet (new, or made by an older
    version and adoptable: every manifest row has this spec's hash)."""
    record = read_record(out)
    if record is not None:
        _refuse_mismatch(out, record, spec, seed)
        return record
    try:
        hashes = read_manifest(out.fs, out.layout, columns=["spec_hash"])["spec_hash"].unique().to_pylist()
    except Exception as e:  # noqa: BLE001
        raise InputError(f"output: cannot read the manifest under {out.url}: {type(e).__name__}: {_first_line(e)}") from e
    if not hashes:
        return None
    new_hash = spec.spec_hash()
    others = sorted(str(h) for h in hashes if h != new_hash)
    if others:
        raise OutputBindingError(
            f"output {out.url} has no {OUTPUT_RECORD} (made by an older latte-ray) and its manifest holds rows "
            f"of spec hash {', '.join(others)}; this run's spec is {new_hash}. Refusing to mix specs in one "
            f"output: write this spec to a new --output"
        )
    legacy = read_legacy_record(out)
    if legacy and legacy.get("seed") is not None and int(legacy["seed"]) != seed:
        raise OutputBindingError(
            f"output {out.url} (made by an older latte-ray) was last run with --seed {legacy['seed']}; this run "
            f"has --seed {seed}. Use --seed {legacy['seed']} to continue it, or a new --output"
        )
    return None


def _identity_key(identity: dict | None) -> str | None:
    """What must stay the same for an output: the hub commit, a folder's or mirror's fingerprint, the tiny
    model's version (None: nothing recorded, e.g. an output made before identities were recorded)."""
    if not identity:
        return None
    # LoRA files (model.lora) are part of the weights: the same path holding another file is other weights.
    lora = "".join(f"+lora:{d['sha256']}" for d in identity.get("lora") or ())
    for key in ("commit", "fingerprint", "version"):
        if identity.get(key):
            return f"{identity.get('kind')}:{identity[key]}{lora}"
    return f"{identity.get('kind')}{lora}" if lora else identity.get("kind")


def _identity_words(identity: dict) -> str:
    kind = identity.get("kind")
    if kind == "hub":
        return f"hub commit {identity.get('commit')} (revision {identity.get('revision')})"
    if identity.get("fingerprint"):
        return f"{kind} fingerprint {identity['fingerprint']}"
    return str(_identity_key(identity))


def check_model_identity(out: Output, identity: dict | None) -> None:
    """Refuse (OutputBindingError) a run whose model source resolves to other weights than the ones this output's videos
    were made with: a hub id whose branch moved to another commit, a folder or mirror whose files changed.
    Compared with the output's record and its newest run record that has one. Reads only."""
    new = _identity_key(identity)
    if new is None:
        return
    known, where = None, None
    record = read_record(out)
    if record and record.get("model_identity"):
        known, where = record["model_identity"], OUTPUT_RECORD
    else:
        _, runs = list_runs(out)
        for past in reversed(runs):
            if past.get("model_identity"):
                known, where = past["model_identity"], f"runs/{past.get('run_id', '?')}.json"
                break
    if known is None or _identity_key(known) == new:
        return
    raise OutputBindingError(
        f"output {out.url} was made from model.source {known.get('source')!r} at {_identity_words(known)} "
        f"({where}); this run resolves it to {_identity_words(identity)}. Its videos would come from other "
        f"weights under the same spec: pin model.revision to {known.get('commit') or 'the old version'} to "
        f"continue this output, or write the new model to a new --output"
    )


def bind(out: Output, spec: PipelineSpec, seed: int, version: str, model_identity: dict | None = None) -> dict:
    """Create the output's record if it has none (create-only: when two runs start at once, one writes it
    and the other is checked against it). Call after every check has passed, before generation."""
    record = {
        "format": FORMAT,
        "spec_hash": spec.spec_hash(),
        "run_seed": seed,
        "seed_policy": SEED_POLICY,
        "pipeline": spec.model_dump(mode="json"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "latte_ray_version": version,
        "model_identity": model_identity,
    }
    try:
        created = write_exclusive(out.fs, out.layout.record_json, json.dumps(record, indent=2).encode())
    except Exception as e:  # noqa: BLE001
        raise InputError(f"output: cannot write {out.url}/{OUTPUT_RECORD}: {type(e).__name__}: {_first_line(e)}") from e
    if created:
        log.info("output %s bound to spec %s (run seed %d)", out.url, record["spec_hash"], seed)
        return record
    existing = read_record(out)
    if existing is None:  # cannot be: create-only write found something there
        raise OutputDamaged(f"output: {out.url}/{OUTPUT_RECORD} exists but cannot be read back")
    _refuse_mismatch(out, existing, spec, seed)
    return existing


# ---- run history ----------------------------------------------------------------------------------


class RunLog:
    """One run's record, OUTPUT/runs/<run_id>.json: written at the start (outcome "running") and at the end."""

    def __init__(self, out: Output, run_id: str, record: dict):
        self.out = out
        self.path = f"{out.layout.runs_dir}/{run_id}.json"
        self.record = {**record, "run_id": run_id, "outcome": "running", "ended_at": None, "reason": None}

    def start(self) -> None:
        try:
            self._write()
        except Exception as e:  # noqa: BLE001
            raise InputError(f"output: cannot write {self.out.url}/runs/: {type(e).__name__}: {_first_line(e)}") from e

    def finish(self, outcome: str, reason: str | None = None, **counts: object) -> None:
        """Record how the run ended. A storage failure here is logged, not raised: it must not hide the
        run's own result."""
        self.record.update(outcome=outcome, reason=reason, counts=counts or self.record.get("counts"),
                           ended_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        try:
            self._write()
        except Exception as e:  # noqa: BLE001
            log.warning("could not record the end of run %s in %s: %s", self.record["run_id"], self.path, e)

    def _write(self) -> None:
        write_atomic(self.out.fs, self.path, json.dumps(self.record, indent=2, default=str).encode())


def new_run_id(started: datetime | None = None) -> str:
    """A run id: its UTC start time (so that run records sort in start order) and 8 random hex digits."""
    return f"{started or datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def mark_died(out: Output, run_id: str, last_heartbeat: str, found_by: str, why: str = "its lease expired") -> bool:
    """Record that run `run_id` died (`why`: its lease expired, or its process is gone; last heartbeat
    `last_heartbeat`) and run `found_by` took the output over. Only a record still `running` is changed (False otherwise, or when the run left
    none: it died before its checks passed); a failure is logged, not raised."""
    path = f"{out.layout.runs_dir}/{run_id}.json"
    try:
        record = json.loads(out.fs.cat_file(path))
        if record.get("outcome") != "running":
            return False
        record.update(outcome="died", last_heartbeat_at=last_heartbeat,
                      reason=f"{why} (last heartbeat {last_heartbeat}); run {found_by} took the output over")
        write_atomic(out.fs, path, json.dumps(record, indent=2, default=str).encode())
        return True
    except FileNotFoundError:
        return False
    except Exception as e:  # noqa: BLE001
        log.warning("could not mark run %s died in %s: %s: %s", run_id, path, type(e).__name__, e)
        return False


def list_runs(out: Output, last: int | None = None) -> tuple[int, list[dict]]:
    """(how many runs are recorded, the records of the last `last` of them, oldest first). Run ids start
    with their UTC start time, so their names sort in start order. OutputDamaged when runs/ is a file or a
    record read is not the JSON object latte-ray wrote."""
    if not folder_or_damaged(out.fs, out.layout.runs_dir, "runs"):
        return 0, []
    try:
        names = sorted(p for p in out.fs.ls(out.layout.runs_dir, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return 0, []
    chosen = names[-last:] if last else names
    records = []
    for path in chosen:
        try:
            data = out.fs.cat_file(path)
        except (IsADirectoryError, NotADirectoryError):
            raise damaged(out.fs, path, "a folder where a run record belongs", out.url) from None
        records.append(parse_json_object(out, path, data))
    return len(names), records


def run_line(record: dict, liveness: str | None = None) -> str:
    """One run as a line for status and report; `liveness` (from its lease, ops/status.py) replaces the
    outcome of a run whose record says `running`."""
    counts = record.get("counts") or {}
    done = ", ".join(f"{v} {k}" for k, v in counts.items() if v) if counts else ""
    outcome = record.get("outcome", "?")
    if outcome == "running":
        outcome = liveness or "running (no end recorded: still running, or killed)"
    reason = f": {record['reason']}" if record.get("reason") else ""
    return (f"{record.get('run_id', '?')}  {outcome}{reason}"
            f"{f' ({done})' if done else ''}; spec {record.get('spec_hash', '?')}")


# ---- writability ----------------------------------------------------------------------------------


def probe_writable(out: Output) -> None:
    """Write and delete a small object under the output, so that a read-only or unreachable output fails
    before any work. Removes only what it created: the probe, and on local disk the folders it made."""
    path = f"{out.layout.root}/.latte-ray-probe-{uuid.uuid4().hex}"
    made: list[str] = []
    if is_local(out.fs):
        folder = out.layout.root
        while folder and not os.path.exists(folder):
            made.append(folder)
            folder = os.path.dirname(folder)
    try:
        write_atomic(out.fs, path, b"latte-ray write probe\n")
        out.fs.rm_file(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"output: cannot write to {out.url}: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        if is_local(out.fs):
            if os.path.exists(path):
                os.unlink(path)
            for folder in made:  # deepest first
                try:
                    os.rmdir(folder)
                except OSError:
                    pass


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:500] if text else ""
