"""Write stage (CPU tasks): put each video object, then the manifest part that records the batch.

The manifest part is the commit: it is written only after every video it names is fully stored, so a
crash at any instant leaves recorded videos whole and unrecorded ones ignored (rewritten on resume).
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from latte_ray.spec import PipelineSpec
from latte_ray.storage import MANIFEST_SCHEMA, OutputLayout, filesystem, write_atomic, write_manifest_part


class WriteStage:
    def __init__(self, output_url: str, spec_json: str, storage_options: dict | None = None):
        self.fs, root = filesystem(output_url, storage_options)
        self.layout = OutputLayout(url=output_url.rstrip("/"), root=root.rstrip("/"))
        spec = PipelineSpec.model_validate_json(spec_json)
        self.constants = {
            "fps": spec.video.fps,
            "steps": spec.sampling.num_inference_steps,
            "guidance_scale": spec.sampling.guidance_scale,
            "spec_hash": spec.spec_hash(),
            "model": spec.model.source,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        status = np.array(batch["status"], dtype=object)
        uris = np.array([""] * n, dtype=object)
        for i in range(n):
            if status[i] != "encoded":
                continue
            key = self.layout.video_key(str(batch["id"][i]))
            write_atomic(self.fs, self.layout.path(key), batch["video"][i])
            uris[i] = self.layout.uri(key)
            status[i] = "ok"
        rows = self._manifest_rows(batch, status, uris)
        write_manifest_part(self.fs, self.layout, rows)
        return rows

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
        }
        for k in ("num_frames", "height", "width", "mean_brightness", "motion_score", "blank_frames", "frozen_frames"):
            columns[k] = np.where(ok, batch.get(k, [None] * n), None)
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
