"""`latte-ray status`: where an output stands, read from its manifest and records (no Ray, no model).

Counts are per id (storage.latest_rows: an id is ok if any attempt succeeded, else its latest attempt
counts), so retries and crashed-and-resumed attempts are never counted twice. With the input tables
(`--prompts`) it also counts the ids that have no row yet (pending). Throughput is ok videos per second
of generation wall time, where generation wall time is the union of the rows' [started_at, finished_at]
intervals, so gaps between runs (a crash, a night without nodes) do not dilute it. It also shows the spec
the output is bound to and its last runs (OUTPUT/runs/), and refuses a path that is not an output.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.compute as pc

from latte_ray.errors import OutputDamaged
from latte_ray.plan.keys import contains, id_keys, key_set
from latte_ray.record.output import list_runs, require_output, run_line
from latte_ray.record.scores import SCORE_COLUMNS, attach_scores
from latte_ray.record.storage import latest_rows, read_manifest

RECENT_SECONDS = 600.0
RUNS_SHOWN = 5
_PREFIX = re.compile(r"^.*?row id=[^:]*: ")
_NUMBER = re.compile(r"\d+")


@dataclass
class Status:
    output: str
    ok: int = 0
    error: int = 0
    pending: int | None = None  # input ids without a manifest row; None without --prompts
    input_ids: int | None = None
    input_files: int | None = None
    attempts: int = 0  # manifest rows (every attempt)
    top_errors: list[tuple[str, int]] = field(default_factory=list)
    busy_seconds: float = 0.0
    videos_per_second: float = 0.0
    recent_videos_per_second: float = 0.0  # over the last RECENT_SECONDS of the manifest
    first_started: str | None = None
    last_finished: str | None = None
    eta_seconds: float | None = None
    scored: int = 0  # ok videos with quality scores (of the scorer that scored most; record/scores.py)
    scoring_hash: str | None = None
    scorers: dict[str, int] = field(default_factory=dict)  # every scoring hash -> ok videos it scored
    spec_hash: str | None = None  # the spec the output is bound to
    pipeline: str | None = None
    run_seed: int | None = None
    runs: int = 0  # runs recorded under OUTPUT/runs/
    videos_missing: int = 0  # ok ids whose video object is not there (from the videos/ listings)
    videos_wrong_size: int = 0  # ok ids whose video object has another size than recorded
    damaged_ids: list[str] = field(default_factory=list)  # the first of those ids
    record_disagrees: str | None = None  # latte-ray.json and the rows (or the spec it holds) disagree
    lease_damaged: str | None = None  # the lease folder or an object in it is not as latte-ray wrote it
    last_runs: list[dict] = field(default_factory=list)  # the last RUNS_SHOWN run records, oldest first

    def lines(self) -> list[str]:
        total = f" of {self.input_ids} input ids ({self.input_files} files)" if self.input_ids is not None else ""
        pending = f", {self.pending} pending" if self.pending is not None else ""
        out = [f"{self.output}: {self.ok} ok, {self.error} error{pending}{total}; {self.attempts} manifest rows",
               f"spec: {self.spec_hash} ({self.pipeline}), run seed {self.run_seed}; {self.runs} runs recorded"]
        if self.last_runs:
            out.append(f"last {len(self.last_runs)} runs:")
            out += [f"  {run_line(r, r.get('liveness'))}" for r in self.last_runs]
        if self.ok:
            out.append(
                f"throughput: {self.videos_per_second:.3g} videos/s over {self.busy_seconds:.0f} s of generation "
                f"({self.first_started} .. {self.last_finished}); last {RECENT_SECONDS / 60:.0f} min: "
                f"{self.recent_videos_per_second:.3g} videos/s"
            )
        if self.scoring_hash:
            others = "".join(f", {h}: {n}" for h, n in sorted(self.scorers.items()) if h != self.scoring_hash)
            out.append(f"scores: {self.scored} of {self.ok} ok videos scored (scoring {self.scoring_hash}{others})")
        if self.eta_seconds is not None:
            out.append(f"eta: {self.eta_seconds / 3600:.2f} h for the pending ids at the overall rate")
        if self.videos_missing or self.videos_wrong_size:
            out.append(f"damaged: {self.videos_missing} recorded videos missing, {self.videos_wrong_size} of another "
                       f"size than recorded (ids {', '.join(self.damaged_ids)}"
                       f"{', ...' if self.videos_missing + self.videos_wrong_size > len(self.damaged_ids) else ''}); "
                       f"the next run makes them again (`latte-ray verify {self.output}` lists them)")
        if self.record_disagrees:
            out.append(f"damaged: {self.record_disagrees}; run `latte-ray verify --repair {self.output}`")
        if self.lease_damaged:
            out.append(f"damaged: {self.lease_damaged}")
        if self.top_errors:
            out.append("most common errors:")
            out += [f"  {count:>7}  {message}" for message, count in self.top_errors]
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def error_kind(message: str | None, video_id: str) -> str:
    """An error message without its file, row and id, numbers folded, so that like errors group."""
    text = _PREFIX.sub("", message or "(no message)")
    text = text.replace(repr(video_id), "<id>").replace(video_id, "<id>") if video_id else text
    return _NUMBER.sub("N", text)[:300]


def status(output: str, storage_options: dict | None = None, prompts: list[str] | None = None,
           run_seed: int | None = None, default_negative: str | None = None, top: int = 5) -> Status:
    """`run_seed` and `default_negative` (both enter derived ids, for --prompts) default to the output's
    record: the ones it is bound to, not whatever the latest run (perhaps a failed one) used."""
    out, record = require_output(output, storage_options)
    fs, layout = out.fs, out.layout
    pipeline = record.get("pipeline") or {}
    if run_seed is None:
        run_seed = int(record.get("run_seed") or 0)
    if default_negative is None:
        default_negative = (pipeline.get("sampling") or {}).get("negative_prompt") or ""
    manifest = read_manifest(fs, layout, columns=["id", "status", "error", "started_at", "finished_at", "sha256",
                                                  "video_uri", "bytes", "spec_hash", *SCORE_COLUMNS])
    result = Status(output=output, attempts=manifest.num_rows, spec_hash=record.get("spec_hash"),
                    pipeline=pipeline.get("name"), run_seed=run_seed)
    result.runs, runs = list_runs(out, last=RUNS_SHOWN)
    result.last_runs = [{k: r.get(k) for k in ("run_id", "started_at", "ended_at", "outcome", "reason", "counts",
                                               "spec_hash", "seed", "last_heartbeat_at")} for r in runs]
    try:
        held = lease_holders(out)
    except OutputDamaged as e:  # shown; status still says the rest (writers refuse the output until repaired)
        held, result.lease_damaged = None, str(e)
    for r, full in zip(result.last_runs, runs):
        r["liveness"] = liveness(full, held) if r["outcome"] == "running" else None
    latest = latest_rows(manifest)
    ok_mask = pc.equal(latest["status"], "ok").to_numpy(zero_copy_only=False)
    ids = latest["id"].to_pylist()
    if prompts:
        wanted = _input_ids(prompts, storage_options, run_seed, default_negative, result)
        present = contains(wanted, id_keys(ids))
        ok_mask, ids = ok_mask[present], [i for i, p in zip(ids, present) if p]
        errors = [e for e, p in zip(latest["error"].to_pylist(), present) if p]
        result.pending = int(len(wanted) - len(ids))
    else:
        errors = latest["error"].to_pylist()
    result.ok = int(ok_mask.sum())
    result.error = int(len(ids) - result.ok)
    kinds = Counter(error_kind(e, i) for e, i, ok in zip(errors, ids, ok_mask) if not ok)
    result.top_errors = kinds.most_common(top)
    _throughput(manifest, result)
    _scores(fs, layout, latest, result)
    _damage(fs, layout, latest, manifest, record, result)
    return result


SHOWN_IDS = 5


def _damage(fs, layout, latest, manifest, record: dict, result: Status) -> None:
    found = damage(fs, layout, latest, manifest, record)
    result.videos_missing, result.videos_wrong_size = found["videos_missing"], found["videos_wrong_size"]
    result.damaged_ids, result.record_disagrees = found["damaged_ids"], found["record_disagrees"]


def damage(fs, layout, latest, manifest, record: dict) -> dict:
    """Ok ids whose video is missing or of another size (one listing per videos/ shard, record/verify.py),
    and a record that disagrees with its rows or with the spec it holds; for status and the report.
    `latest` needs id, status, video_uri, bytes; `manifest` spec_hash."""
    from latte_ray.record.verify import check_videos, spec_hash_of, video_listing

    found = {"videos_missing": 0, "videos_wrong_size": 0, "damaged_ids": [], "record_disagrees": None}
    ok = latest.filter(pc.equal(latest["status"], "ok"))
    if ok.num_rows:
        check = check_videos(video_listing(fs, layout), ok["video_uri"], ok["bytes"].fill_null(-1).to_numpy(),
                             f"{layout.url}/")
        found["videos_missing"] = int((~check.present).sum())
        found["videos_wrong_size"] = int((check.present & ~check.fine).sum())
        found["damaged_ids"] = ok["id"].take(np.flatnonzero(~check.fine)[:SHOWN_IDS]).to_pylist()
    bound = record.get("spec_hash")
    own = spec_hash_of(record.get("pipeline"))
    if bound and own and own != bound:
        found["record_disagrees"] = (f"latte-ray.json binds spec {bound}, but the spec it holds hashes to {own} "
                                     f"(edited?)")
    elif bound and manifest.num_rows:
        other = int(pc.sum(pc.not_equal(manifest["spec_hash"], bound)).as_py() or 0)
        if other:
            found["record_disagrees"] = (f"latte-ray.json binds spec {bound}, but {other} of {manifest.num_rows} "
                                         f"manifest rows were made with another spec")
    return found


def lease_holders(out) -> dict[str, dict] | None:
    """run id -> its lease object (record/lease.py); None when the lease folder cannot be read."""
    from latte_ray.record.lease import holders

    try:
        return holders(out.fs, out.layout.root)
    except OutputDamaged:
        raise
    except Exception:  # noqa: BLE001 - status still shows the rest
        return None


def liveness(record: dict, held: dict[str, dict] | None, now: float | None = None) -> str | None:
    """What a run whose record says `running` is: `running (heartbeat Ns ago)` while its lease is live,
    `died (...)` when its lease expired or is gone; None when it cannot tell (no lease: --no-lease, or a run
    of a latte-ray before the lease)."""
    from latte_ray.record.lease import gone_here, heartbeat_age, is_live

    if held is None or record.get("lease") is None:
        return None
    holder = held.get(record.get("run_id"))
    if holder is None:
        return "died (no end recorded and its lease is gone)"
    from latte_ray.record.lease import ahead_s, skewed

    age = heartbeat_age(holder, now)
    if is_live(holder, now) and skewed(holder, now):
        return (f"running? (its heartbeat is {ahead_s(holder, now):.0f}s in this machine's future: clock skew between "
                f"its host {holder.get('host')} and this one)")
    if is_live(holder, now):
        return f"running (heartbeat {age:.0f}s ago)"
    why = "its process on this host is gone" if gone_here(holder) else "its lease expired"
    return (f"died (last heartbeat {age:.0f}s ago, {holder.get('heartbeat_at')}; {why}, the next writing run "
            f"takes the output over)")


def _scores(fs, layout, latest, result: Status) -> None:
    """How many ok videos have scores (manifest columns or OUTPUT/scores/ parts), by scorer."""
    ok = latest.filter(pc.equal(latest["status"], "ok"))
    _, selection = attach_scores(fs, layout, ok)
    result.scoring_hash, result.scored, result.scorers = selection.scoring_hash, selection.scored, selection.available


def _input_ids(prompts, storage_options, run_seed, default_negative, result: Status) -> np.ndarray:
    from latte_ray.plan.prompts import check_prompt_schema, resolve_prompt_files
    from latte_ray.plan.workplan import scan_keys

    in_fs, files = resolve_prompt_files(prompts, storage_options)
    check_prompt_schema(in_fs, files)
    scanned = scan_keys(in_fs, [(i, path, 0, 1) for i, path in enumerate(files)], default_negative, run_seed)
    keys = np.empty(len(scanned["hi"]), dtype=id_keys([]).dtype)
    keys["hi"], keys["lo"] = scanned["hi"], scanned["lo"]
    wanted = key_set(keys)
    result.input_ids, result.input_files = int(len(wanted)), len(files)
    return wanted


def _throughput(manifest, result: Status) -> None:
    ok = manifest.filter(pc.equal(manifest["status"], "ok"))
    ok = ok.filter(pc.and_(pc.is_valid(ok["started_at"]), pc.is_valid(ok["finished_at"])))
    if ok.num_rows == 0:
        return
    start = ok["started_at"].cast("int64").to_numpy() / 1e6
    end = ok["finished_at"].cast("int64").to_numpy() / 1e6
    order = np.argsort(start)
    busy, cur_start, cur_end = 0.0, start[order[0]], end[order[0]]
    for s, e in zip(start[order[1:]], end[order[1:]]):
        if s > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    busy += cur_end - cur_start
    ids_ok = len(set(ok["id"].to_pylist()))
    result.busy_seconds = float(busy)
    result.videos_per_second = ids_ok / busy if busy > 0 else 0.0
    last = end.max()
    recent = end >= last - RECENT_SECONDS
    window = min(RECENT_SECONDS, last - start[recent].min())
    result.recent_videos_per_second = float(recent.sum() / window) if window > 0 else 0.0
    result.first_started = ok["started_at"][int(order[0])].as_py().isoformat(timespec="seconds")
    result.last_finished = ok["finished_at"][int(np.argmax(end))].as_py().isoformat(timespec="seconds")
    if result.pending and result.videos_per_second:
        result.eta_seconds = result.pending / result.videos_per_second
