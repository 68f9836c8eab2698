"""Write-scores stage (CPU, `latte-ray score` only): the scores of a batch as one part under OUTPUT/scores/.

A run that scores puts its scores in the manifest rows it commits (stages/write.py); scores made later cannot
go there (manifest parts never change), so they go into score parts keyed by (id, sha256 of the video
scored, scoring hash): latte_ray/record/scores.py. The part's name is a hash of the scoring run and the
batch's ids, so a batch that Ray retries replaces its own part. Rows that could not be scored are written
too, with their error, and are tried again by the next `latte-ray score`.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from latte_ray.faults import retry
from latte_ray.record.lease import check_fence
from latte_ray.record.scores import SCORE_SCHEMA, write_score_part
from latte_ray.record.storage import OutputLayout, filesystem
from latte_ray.stages.declare import Context, Stage


class WriteScoresStage:
    def __init__(self, output_url: str, storage_options: dict | None = None, run_id: str = "",
                 scoring_hash: str = "", fence: dict | None = None):
        self.fs, root = filesystem(output_url, storage_options)
        self.layout = OutputLayout(url=output_url.rstrip("/"), root=root.rstrip("/"))
        self.run_id = run_id
        self.scoring_hash = scoring_hash
        self.fence = fence  # the output lease this scoring run holds (record/lease.py); None: --no-lease

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        scored = ~np.isnan(np.asarray(batch["clip_score"], dtype=np.float64))
        errors = [None if ok else (str(e) or "not scored") for ok, e in zip(scored, batch["score_error"])]
        rows = pa.table({
            "id": pa.array([str(x) for x in batch["id"]], pa.string()),
            "sha256": pa.array([str(x) for x in batch["sha256"]], pa.string()),
            "scoring_hash": pa.array([self.scoring_hash] * n, pa.string()),
            "clip_score": pa.array(np.asarray(batch["clip_score"], np.float64), pa.float64(), mask=~scored),
            "aesthetic_score": pa.array(np.asarray(batch["aesthetic_score"], np.float64), pa.float64(), mask=~scored),
            "clip_prompt_truncated": pa.array(np.asarray(batch["clip_prompt_truncated"], bool), pa.bool_(),
                                              mask=~scored),
            "error": pa.array(errors, pa.string()),
            "scored_at": pa.array([datetime.now(timezone.utc)] * n, SCORE_SCHEMA.field("scored_at").type),
        }, schema=SCORE_SCHEMA)
        name = hashlib.sha256("\0".join([self.run_id, *map(str, batch["id"])]).encode()).hexdigest()[:32]
        check_fence(self.fs, self.fence)  # a run whose lease was taken over commits nothing more
        retry.call(lambda: write_score_part(self.fs, self.layout, rows, name), "write score part", retry.MANIFEST)
        return rows


def _map_args(ctx: Context) -> dict:
    return {"fn": WriteScoresStage,
            "fn_constructor_kwargs": {"output_url": ctx.output, "storage_options": ctx.storage_options,
                                      "run_id": ctx.run_id, "scoring_hash": ctx.extra["scoring_hash"],
                                      "fence": ctx.fence},
            "batch_format": "numpy", "compute": ctx.cpu_pool(), "num_cpus": ctx.cpu_task_cpus}


STAGE = Stage(name="WriteScoresStage", label="write-scores actor",
              reads=("id", "sha256", "clip_score", "aesthetic_score", "clip_prompt_truncated", "score_error"),
              writes=tuple(SCORE_SCHEMA.names), replaces=True, map_args=_map_args)
