"""Write stage (CPU tasks): put each video object, then the manifest part that records the batch.

The manifest part is the commit: it is written only after every video it names is fully stored, so a
crash at any instant leaves recorded videos whole and unrecorded ones ignored (rewritten on resume, and
deleted by `latte-ray compact` once old enough). A video's key holds the first 128 bits of its sha256
(storage.OutputLayout.video_key), so writing an id again never changes an object an `ok` row names: the
same bytes go to the same key, other bytes (a nondeterministic kernel, a perturbed retry) to a new one.
Storage writes are retried with backoff; a video that still cannot be stored becomes an error row. The
part's name is a hash of the run and the batch's ids, so a batch that Ray retries (its writer died after
committing) replaces its own part rather than recording its ids twice. Before each commit the stage checks
that its run still holds the output's lease (record/lease.py `fence`): a run whose lease was taken over
by another commits nothing more (LeaseLost fails the execution, and the run ends with the reason).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from latte_ray.errors import OutputFull
from latte_ray.faults import injection as faults
from latte_ray.faults import retry
from latte_ray.metrics import StageMetrics
from latte_ray.spec import PipelineSpec
from latte_ray.record.lease import check_fence
from latte_ray.record.scores import manifest_score_columns
from latte_ray.record.storage import MANIFEST_SCHEMA, OutputLayout, filesystem, write_atomic, write_manifest_part
from latte_ray.stages.declare import Context, Stage

PUT_CONCURRENCY = 8  # video uploads in flight per write actor


class WriteStage:
    def __init__(self, output_url: str, spec_json: str, storage_options: dict | None = None, run_id: str = "",
                 fence: dict | None = None):
        self.run_id = run_id
        self.fence = fence  # None: a run without a lease (--no-lease)
        self.uploads = ThreadPoolExecutor(max_workers=PUT_CONCURRENCY)  # one per actor, for every batch
        self.fs, root = filesystem(output_url, storage_options)
        self.layout = OutputLayout(url=output_url.rstrip("/"), root=root.rstrip("/"))
        spec = PipelineSpec.model_validate_json(spec_json)
        self.metrics = StageMetrics(spec.name)
        self.constants = {
            "fps": spec.video.fps,
            "steps": spec.sampling.num_inference_steps,
            "guidance_scale": spec.sampling.guidance_scale,
            "spec_hash": spec.spec_hash(),
            "model": spec.model.source,
            "cache": spec.model.cache.kind if spec.model.cache else None,
            "cache_threshold": spec.model.cache.threshold if spec.model.cache else None,
            "quantization": spec.model.quantization.kind if spec.model.quantization else None,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        status = np.array(batch["status"], dtype=object)
        batch = {**batch, "error": np.array(batch["error"], dtype=object)}
        uris = np.array([""] * n, dtype=object)
        todo = [i for i in range(n) if status[i] == "encoded"]
        # Uploads are latency-bound (one PUT each), so a batch's videos (and their sidecars) go up
        # concurrently; the manifest part still waits for all of them.
        results = list(self.uploads.map(lambda i: self._put_row(batch, i), todo))
        for i, (uri, error, sidecar_uris) in zip(todo, results):
            if error:
                status[i], batch["error"][i] = "error", error
            else:
                status[i], uris[i] = "ok", uri
                for column, value in sidecar_uris.items():
                    batch.setdefault(column, np.array([None] * n, dtype=object))[i] = value
        rows = self._manifest_rows(batch, status, uris)
        name = self._part_name(batch["id"])
        check_fence(self.fs, self.fence)
        try:
            retry.call(lambda: write_manifest_part(self.fs, self.layout, rows, name), "write manifest part",
                       retry.MANIFEST)
        except OSError as e:
            if retry.no_space(e):
                raise OutputFull(f"no space left on {self.layout.url}: writing a manifest part failed ({e}); free "
                                 f"space (or move the output), then run the same command again to resume") from None
            raise
        self.metrics.committed(status, sum(len(batch["video"][i]) for i in range(n) if status[i] == "ok"))
        return rows

    def _put_row(self, batch: dict[str, np.ndarray], i: int) -> tuple[str, str, dict[str, str]]:
        """The row's video and its sidecars (latte_ray/record/sidecars.py): (uri, error, sidecar uris)."""
        from latte_ray.record.sidecars import URI_COLUMNS, put_sidecars

        video_id = str(batch["id"][i])
        uri, error = self._put_video(video_id, batch["video"][i], str(batch["sha256"][i]))
        blobs = {c: batch[c][i] for c in URI_COLUMNS if c in batch}
        if error or not blobs:
            return uri, error, {}
        sidecar_uris, error = put_sidecars(self.fs, self.layout, video_id, blobs)
        return uri, error, sidecar_uris

    def _put_video(self, video_id: str, data: bytes, sha256: str) -> tuple[str, str]:
        """(uri, "") once the video is stored whole, or ("", error) when it cannot be stored."""
        key = self.layout.video_key(video_id, sha256)
        path = self.layout.path(key)
        try:
            retry.call(lambda: write_atomic(self.fs, path, data), f"write {path}", retry.VIDEO)
        except Exception as e:  # noqa: BLE001 - one unstorable video is an error row, not a failed run
            if retry.no_space(e):  # ... but a full disk fails every row after it: the run stops here
                raise OutputFull(f"no space left on {self.layout.url}: writing {path} failed ({e}); free space "
                                 f"(or move the output), then run the same command again to resume") from None
            notes = "".join(f" ({note})" for note in getattr(e, "__notes__", []))
            return "", f"storing the video failed: {type(e).__name__}: {e}{notes}"[:2000]
        faults.point("after_video", video_id)
        return self.layout.uri(key), ""

    def _part_name(self, ids) -> str | None:
        if not self.run_id:
            return None
        joined = "\0".join([self.run_id, *map(str, ids)])
        return hashlib.sha256(joined.encode()).hexdigest()[:32]

    def _manifest_rows(self, batch: dict[str, np.ndarray], status: np.ndarray, uris: np.ndarray) -> pa.Table:
        n = len(status)
        finished = datetime.now(timezone.utc)
        ok = status == "ok"
        columns = {
            "id": batch["id"], "prompt": batch["prompt"], "negative_prompt": batch["negative_prompt"],
            "seed": batch["seed"], "status": status,
            "error": np.where(ok, None, batch["error"]), "video_uri": np.where(ok, uris, None),
            "sha256": np.where(ok, batch.get("sha256", [None] * n), None),
            "bytes": np.where(ok, batch.get("bytes", np.zeros(n)), None),
            "prompt_tokens": batch.get("prompt_tokens"), "prompt_truncated": batch.get("prompt_truncated"),
            "started_at": batch.get("started_at"), "generate_seconds": batch.get("generate_seconds"),
            **{k: batch.get(k) for k in ("actor", "node", "actor_started_at", "busy_start", "busy_end")},
            "transformer_calls": np.where(ok, batch.get("transformer_calls", [None] * n), None),
        }
        for k in ("num_frames", "height", "width", "mean_brightness", "motion_score", "blank_frames", "frozen_frames",
                  "embeddings_uri", "latents_uri"):
            columns[k] = np.where(ok, batch.get(k, [None] * n), None)
        columns.update(manifest_score_columns(batch, ok))
        arrays = []
        for field in MANIFEST_SCHEMA:
            if field.name == "finished_at":
                arrays.append(pa.array([finished] * n, field.type))
            elif field.name in self.constants:
                arrays.append(pa.array([self.constants[field.name]] * n, field.type))
            elif columns.get(field.name) is None:
                arrays.append(pa.nulls(n, field.type))
            elif pa.types.is_timestamp(field.type):
                stamps = np.asarray(columns[field.name]).astype("datetime64[us]")
                arrays.append(pa.array(stamps).cast(field.type))
            else:
                arrays.append(pa.array(list(columns[field.name]), field.type, from_pandas=True))
        return pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)


def _reads(ctx: Context) -> tuple[str, ...]:
    """The rows' identity and outcome; the encoded videos when the graph generates (a plan with nothing to
    generate writes only error rows)."""
    video = ("video", "sha256", "bytes") if ctx.extra.get("generates", True) else ()
    return ("id", "prompt", "negative_prompt", "seed", "status", "error", *video)


def _map_args(ctx: Context) -> dict:
    return {"fn": WriteStage,
            "fn_constructor_kwargs": {"output_url": ctx.output, "spec_json": ctx.spec.model_dump_json(),
                                      "storage_options": ctx.storage_options, "run_id": ctx.run_id,
                                      "fence": ctx.fence},
            "batch_format": "numpy", "compute": ctx.cpu_pool(), "num_cpus": ctx.cpu_task_cpus}


STAGE = Stage(name="WriteStage", label="write actor", reads=_reads, writes=tuple(MANIFEST_SCHEMA.names),
              replaces=True, map_args=_map_args)
