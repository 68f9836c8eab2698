"""Decide, before anything is generated, which input rows this run generates: global dedupe and resume.

1. Key scan (Ray tasks over files or row groups, streaming each table with pyarrow): every input row goes
   through the same `prepare_rows` as in the prepare stage and is reduced to its id's 128-bit key, a
   64-bit hash of its content (prompt, negative prompt, seed) and its file's index: 28 bytes per row.
2. One reduce task sorts those keys together with the done set (ids with an ok row whose video is there,
   streamed from the manifest and checked against listings of videos/; see done_keys, made by a task of its
   own while the input is scanned) and returns small sorted key arrays:
   - skip:      ids that are done (resume): the prepare stage drops their rows;
   - conflicts: ids that appear with different content: every copy becomes an error row naming the id,
                and nothing is generated for it;
   - dups:      ids repeated with identical content: generated once.
3. Only when there are identical duplicates: Ray Data reads the files that hold them again with
   `include_row_hash` (a hash of file and position, the same in the main read) and the copy with the
   smallest row hash wins; the prepare stage drops the others.

The prepare stage receives these arrays as object refs (shared zero-copy by the actors of a node) and
looks each row up by binary search. The driver holds only refs and a few counts, never the table, the
manifest or the done set; and when nothing is left to do, no actor starts and no model loads.

Cost: one extra read of the four key columns and ~20 us of CPU per row (mostly `prepare_rows`), spread
over the scan tasks; 28 bytes per input row and 16 per done id in the reduce task; one binary search per
row in the prepare stage (13 ms per 4,096-row batch against 10^6 done ids, where pyarrow's is_in takes
176 ms); a third read only of the files that hold identical duplicates; per ok id, a listed object and its
size looked up (the video check). Figures at a million rows: benchmarks/README.md (resume_scale,
video_check). Input tables must not change during a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latte_ray.faults import injection as faults
from latte_ray.plan.keys import KEY_DTYPE, contains, content_keys, id_keys, key_set
from latte_ray.plan.prompts import prepare_rows

log = logging.getLogger(__name__)

KEY_COLUMNS = ("id", "prompt", "negative_prompt", "seed")
ROW_KEY_DTYPE = np.dtype([("row_hash", "<u8"), ("hi", "<u8"), ("lo", "<u8")])  # one physical input row
SCAN_BATCH_ROWS = 65_536
MAX_SCAN_TASKS = 64


@dataclass
class WorkPlan:
    rows: int = 0  # rows in the input
    done: int = 0  # rows whose id is already done (skipped: resume)
    duplicates: int = 0  # extra copies of identical rows (skipped: generated once)
    conflicts: int = 0  # rows of ids repeated with different content (error rows)
    todo: int = 0  # rows that go through the pipeline (conflict rows included)
    generate: int = 0  # of those, rows that need a model (neither invalid nor conflicting)
    refs: dict = field(default_factory=dict)  # PrepareStage keyword arguments: object refs of key arrays
    without_id: list[str] = field(default_factory=list)  # input files with no id column (prompts.prepare_rows)
    videos_regenerated: int = 0  # ok ids made again: their video is missing or of another size than recorded
    videos_wrong_size: list[str] = field(default_factory=list)  # keys of those of another size (moved aside)

    def line(self) -> str:
        return (f"{self.rows} input rows: {self.todo} to process, {self.done} already done, "
                f"{self.videos_regenerated} recorded videos missing or damaged (made again), "
                f"{self.duplicates} duplicate copies skipped, {self.conflicts} rows with conflicting duplicate ids")


# ---- 1. key scan ---------------------------------------------------------------------------------


def scan_keys(
    fs, units: list[tuple[int, str, int, int]], default_negative: str, run_seed: int
) -> dict[str, np.ndarray]:
    """(hi, lo, content, file, valid) for every row of the given units of work. A unit (file index, path,
    part, parts) is the row groups of one file whose index modulo `parts` is `part`, so that one large
    table is scanned by several tasks."""
    faults.point("scan", [unit[1] for unit in units])
    parts = []
    for index, path, part, n_parts in units:
        with fs.open(path, "rb") as f:
            table_file = pq.ParquetFile(f)
            columns = [c for c in KEY_COLUMNS if c in table_file.schema_arrow.names]
            groups = [g for g in range(table_file.num_row_groups) if g % n_parts == part]
            if not groups:
                continue
            for batch in table_file.iter_batches(batch_size=SCAN_BATCH_ROWS, row_groups=groups, columns=columns):
                rows = prepare_rows(pa.Table.from_batches([batch]), default_negative, run_seed)
                keys = id_keys(rows["id"])
                parts.append({
                    "hi": keys["hi"], "lo": keys["lo"],
                    "content": content_keys(rows["prompt"], rows["negative_prompt"], rows["seed"]),
                    "file": np.full(len(keys), index, np.uint32),
                    "valid": rows["status"] == "pending",
                })
    return _concat(parts)


def scan_units(files: list[str], tasks: int = MAX_SCAN_TASKS) -> list[list[tuple[int, str, int, int]]]:
    """Units of work per scan task: whole files spread over `tasks`, or each file split by row groups."""
    splits = max(1, tasks // max(1, len(files)))
    units = [(i, path, part, splits) for i, path in enumerate(files) for part in range(splits)]
    return [chunk.tolist() for chunk in np.array_split(np.array(units, dtype=object), min(len(units), tasks))
            if len(chunk)]


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    names = {"hi": np.uint64, "lo": np.uint64, "content": np.uint64, "file": np.uint32, "valid": bool}
    parts = [p for p in parts if len(p["hi"])]
    return {k: (np.concatenate([p[k] for p in parts]) if parts else np.empty(0, t)) for k, t in names.items()}


# ---- 2. reduce -----------------------------------------------------------------------------------


def reduce_keys(rows: dict[str, np.ndarray], done: np.ndarray) -> tuple[dict, dict]:
    """(key arrays for the prepare stage, counts) from every row's keys and the sorted done set."""
    n = len(rows["hi"])
    counts = {"rows": n, "done": 0, "duplicates": 0, "conflicts": 0, "todo": 0, "generate": 0}
    arrays = {"skip": np.empty(0, KEY_DTYPE), "conflicts": {"keys": np.empty(0, KEY_DTYPE),
              "copies": np.empty(0, np.uint32)}, "dups": np.empty(0, KEY_DTYPE), "dup_files": []}
    if n == 0:
        return arrays, counts
    order = np.lexsort((rows["lo"], rows["hi"]))
    hi, lo, content, files, valid = (rows[k][order] for k in ("hi", "lo", "content", "file", "valid"))
    first = np.ones(n, bool)
    first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, n))
    group = np.cumsum(first) - 1
    ids = np.empty(len(starts), KEY_DTYPE)
    ids["hi"], ids["lo"] = hi[starts], lo[starts]
    is_done = contains(done, ids)
    differ = np.minimum.reduceat(content, starts) != np.maximum.reduceat(content, starts)
    conflict = ~is_done & differ
    duplicate = ~is_done & ~differ & (sizes > 1)
    counts.update(
        done=int(sizes[is_done].sum()), duplicates=int((sizes[duplicate] - 1).sum()),
        conflicts=int(sizes[conflict].sum()),
    )
    counts["todo"] = n - counts["done"] - counts["duplicates"]
    kept = ~is_done[group] & ~conflict[group] & (~duplicate[group] | first)
    counts["generate"] = int((kept & valid).sum())
    arrays["skip"] = ids[is_done]
    arrays["conflicts"] = {"keys": ids[conflict], "copies": sizes[conflict].astype(np.uint32)}
    arrays["dups"] = ids[duplicate]
    arrays["dup_files"] = sorted(set(files[duplicate[group]].tolist()))
    return arrays, counts


def done_keys(run, layout, out_fs, videos: dict | None = None) -> np.ndarray:
    """Sorted keys of the ids resume skips: ok ids whose video is there with its recorded size, plus errored
    ids when errors are not retried.

    Streams the manifest part by part (in parallel), keeping 16 bytes per id; see done_ids. Whether a video
    is there comes from listings of the videos/ shards (record/verify.video_listing: one LIST per shard page,
    a (key, size) table), never one request per video. The listing needs nothing from the manifest, so it
    runs while the parts are read: its LISTs wait on the store and its stats run outside the GIL, while the
    manifest side is mostly Python hashing ids under it. The ok rows' video_uri and bytes come in the same
    read as their ids and are looked up in the listing all at once (record/verify.check_videos), so the check
    adds no Python work per row. `videos`, when given, receives the count of ok ids made again because their
    video is missing or of another size ("regenerate"), and the keys of the objects of another size
    ("wrong_size", which the run moves aside before it writes them again).
    """
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.compute as pc

    from latte_ray.faults import retry
    from latte_ray.record.storage import manifest_files, read_part
    from latte_ray.record.verify import check_videos, video_listing

    def part_keys(path: str) -> tuple[np.ndarray, np.ndarray, pa.ChunkedArray, np.ndarray]:
        table = retry.call(lambda: read_part(out_fs, path, ["id", "status", "video_uri", "bytes"]), f"read {path}",
                           retry.READ)
        keys = id_keys(table["id"].to_pylist())
        ok = pc.equal(table["status"], "ok").fill_null(False)
        ok_rows = table if pc.all(ok).as_py() else table.filter(ok)  # most parts: all ok, no copy of the URIs
        return keys, ok.to_numpy(), ok_rows["video_uri"], ok_rows["bytes"].fill_null(-1).to_numpy()

    files = retry.call(lambda: manifest_files(out_fs, layout), f"list {layout.manifest_dir}", retry.READ)
    if not files:
        return np.empty(0, KEY_DTYPE)
    with ThreadPoolExecutor(max_workers=1) as lister:
        listing = lister.submit(video_listing, out_fs, layout)
        with ThreadPoolExecutor(max_workers=16) as pool:
            parts = list(pool.map(part_keys, files))
        listing = listing.result()
    # every part's ok rows looked up at once: one hash table of the listing, not one per part
    # (the parts' own chunks: pa.chunked_array of ChunkedArrays would convert every string through Python)
    uris = pa.chunked_array([chunk for p in parts for chunk in p[2].chunks], pa.string())
    check = check_videos(listing, uris, np.concatenate([p[3] for p in parts]), f"{layout.url}/")
    fine = check.fine
    done, unfit, start = [], [], 0
    for keys, ok, _, recorded in parts:
        there = np.ones(len(keys), bool)
        there[ok] = fine[start:start + len(recorded)]
        start += len(recorded)
        done.append(keys[there & ok if run.retry_errors else there])
        unfit.append(keys[ok & ~there])
    done = key_set(np.concatenate(done))
    if videos is not None:  # ok ids none of whose rows' videos is fine (a second sort of every ok id avoided)
        videos["regenerate"] = int((~contains(done, key_set(np.concatenate(unfit)))).sum())
        videos["wrong_size"] = sorted(set(check.keys.filter(pa.array(check.present & ~fine)).to_pylist()))
    return done


def done_ids(run, layout, out_fs) -> "pa.Array":
    """Ids to skip on resume: those with an ok row, plus errored ids unless errors are retried.

    Resume is an anti-join against our own manifest, not Ray Data's `CheckpointConfig`. What Ray 2.60's
    `ray.data.checkpoint` offers (read in ray/data/checkpoint and ray/data/_internal/planner/planner.py):
    - it is only honoured when the plan ends in a `Write` (ds.write_*) or `streaming_split`; our plan ends
      in map_batches iterated by the driver, so the planner would warn and silently disable it;
    - it filters at the read, on an id column of the input, but our ids are often derived in the prepare
      stage (hash of prompt, negative prompt and seed), so there is no input column to filter on;
    - it keeps its own checkpoint files (deleted on success by default) next to the manifest, which must
      exist anyway as the commit record: two records of "done" can only disagree, and "done" is not even
      the same thing (a row that ended in an error row is finished for Ray but retried by us);
    - it loads every checkpointed id into one block and sorts it as a numpy array of strings, which is
      what we do too, more compactly.
    The run itself uses the key form of this set (`done_keys`: 128-bit keys, 16 bytes per id,
    built in a Ray task so the driver never holds it, and looked up by binary search), and so does
    `run --dry-run`; this string form is what benchmarks/resume_scale.py compares it with.
    """
    import pyarrow.compute as pc

    from latte_ray.record.storage import read_manifest

    rows = read_manifest(out_fs, layout, columns=["id", "status"])
    if rows.num_rows == 0:
        return pa.array([], pa.string())
    if run.retry_errors:
        rows = rows.filter(pc.equal(rows["status"], "ok"))
    return pc.unique(rows["id"])


def _done_task(run) -> tuple[np.ndarray, dict]:
    """The done set and what the video check found (done_keys), for the reduce task. A task of its own, started
    with the scan tasks: it reads only the output, so the manifest read and the video listing run while the
    input is scanned instead of after it."""
    from latte_ray.record.storage import OutputLayout, filesystem

    videos = {"regenerate": 0, "wrong_size": []}
    if not run.resume:
        return np.empty(0, KEY_DTYPE), videos
    out_fs, root = filesystem(run.output, run.storage_options)
    done = done_keys(run, OutputLayout(url=run.output.rstrip("/"), root=root.rstrip("/")), out_fs, videos)
    return done, videos


def _reduce_task(run, done: tuple[np.ndarray, dict], *scans: dict) -> tuple[np.ndarray, dict, np.ndarray, dict]:
    done, videos = done
    arrays, counts = reduce_keys(_concat(list(scans)), done)
    counts["dup_files"] = arrays["dup_files"]
    counts["videos_regenerated"] = videos["regenerate"]
    counts["videos_wrong_size"] = videos["wrong_size"]
    return arrays["skip"], arrays["conflicts"], arrays["dups"], counts


# ---- 3. winners among identical duplicates -------------------------------------------------------


def copy_hashes(batch: pa.Table, dups: np.ndarray, default_negative: str, run_seed: int,
                without_id: list[str] = ()) -> dict[str, np.ndarray]:
    """(row_hash, hi, lo) of the rows of `batch` whose id is one of `dups`."""
    if not isinstance(dups, np.ndarray):  # an object ref
        import ray

        dups = ray.get(dups)
    rows = prepare_rows(batch, default_negative, run_seed, frozenset(without_id))
    keys = id_keys(rows["id"])
    hit = contains(dups, keys)
    return {"row_hash": batch["row_hash"].to_numpy()[hit].astype(np.uint64), "hi": keys["hi"][hit],
            "lo": keys["lo"][hit]}


def _winners_task(*blocks: pa.Table) -> np.ndarray:
    """Sorted row keys of the copy that is generated: the smallest row hash of each duplicated id."""
    blocks = [{name: b[name].to_numpy().astype(np.uint64) for name in ("row_hash", "hi", "lo")}
              for b in blocks if b.num_rows]
    if not blocks:
        return np.empty(0, ROW_KEY_DTYPE)
    keys = np.empty(sum(len(b["row_hash"]) for b in blocks), ROW_KEY_DTYPE)
    for name in ("row_hash", "hi", "lo"):
        keys[name] = np.concatenate([b[name] for b in blocks])
    keys = keys[np.lexsort((keys["row_hash"], keys["lo"], keys["hi"]))]
    first = np.ones(len(keys), bool)
    first[1:] = (keys["hi"][1:] != keys["hi"][:-1]) | (keys["lo"][1:] != keys["lo"][:-1])
    return np.sort(keys[first])


# ---- the plan ------------------------------------------------------------------------------------


def plan_work(run, in_fs, files: list[str], read_input, without_id: list[str] = ()) -> WorkPlan:
    """Scan the input, reduce with the done set, and pick duplicate winners (see the module docstring).

    `read_input(files)` must be the Ray Data read of the main pass (same paths, `include_row_hash`);
    `without_id`: the files with no `id` column (prompts.inspect_prompt_tables).
    """
    import ray

    ex = run.pipeline.execution
    negative, seed = run.pipeline.sampling.negative_prompt, run.seed
    cpu = ex.num_cpus_per_cpu_task
    scan = ray.remote(scan_keys).options(num_cpus=cpu)
    tasks = min(MAX_SCAN_TASKS, max(1, int(ray.cluster_resources().get("CPU", 1))))
    done = ray.remote(_done_task).options(num_cpus=cpu).remote(run)
    scans = [scan.remote(in_fs, units, negative, seed) for units in scan_units(files, tasks)]
    reduce = ray.remote(_reduce_task).options(num_returns=4, num_cpus=cpu)
    skip_ref, conflicts_ref, dups_ref, counts_ref = reduce.remote(run, done, *scans)
    counts = ray.get(counts_ref)
    dup_files = counts.pop("dup_files")
    plan = WorkPlan(**counts, without_id=list(without_id))
    if counts["done"]:
        plan.refs["skip"] = skip_ref
    if counts["conflicts"]:
        plan.refs["conflicts"] = conflicts_ref
    if counts["duplicates"]:
        ds = read_input([files[i] for i in dup_files])
        ds = ds.map_batches(copy_hashes, fn_kwargs={"dups": dups_ref, "default_negative": negative, "run_seed": seed,
                                                      "without_id": list(without_id)},
                            batch_format="pyarrow", num_cpus=cpu)
        plan.refs["dups"] = dups_ref
        # to_arrow_refs hands on the blocks themselves; to_numpy_refs would convert them in 1-CPU tasks.
        plan.refs["winners"] = ray.remote(_winners_task).options(num_cpus=cpu).remote(*ds.to_arrow_refs())
    log.info("work plan: %s", plan.line())
    return plan
