"""Score stage (actor pool, GPU or CPU: spec `scoring`): CLIPScore and aesthetic score per video.

Each actor loads one CLIP model and aesthetic head (latte_ray/model/clip.py) once, then scores batches of
sampled frames (from stages/sample_frames.py) against their prompts. A batch that raises is scored again
one row at a time, so one bad row leaves only its own scores empty (`score_error` says why) and the video
still counts: a later `latte-ray score` fills it in.
"""

from __future__ import annotations

import logging

import numpy as np

from latte_ray.spec import ScoringSpec, pool_bounds
from latte_ray.stages.declare import Context, Stage

log = logging.getLogger(__name__)


class ScoreStage:
    def __init__(self, scoring_json: str, cache_dir: str | None = None, storage_options: dict | None = None):
        from latte_ray.model.quantize import leave_torchao_unimported

        leave_torchao_unimported(None)  # the scorer is never quantized (before transformers is imported)
        from latte_ray.model.clip import ClipScorer

        self.scoring = ScoringSpec.model_validate_json(scoring_json)
        self.scoring_hash = self.scoring.scoring_hash()
        self.scorer = ClipScorer(self.scoring, cache_dir=cache_dir, storage_options=storage_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        out = {k: v for k, v in batch.items() if k not in ("score_frames", "score_shape")}
        out["clip_score"] = np.full(n, np.nan)
        out["aesthetic_score"] = np.full(n, np.nan)
        out["clip_prompt_truncated"] = np.zeros(n, dtype=bool)
        out["scoring_hash"] = np.array([None] * n, dtype=object)
        out["score_error"] = np.array(batch.get("score_error", [""] * n), dtype=object)
        todo = [i for i in range(n) if str(batch["status"][i]) == "encoded" and len(batch["score_frames"][i])]
        groups = [todo] if todo else []
        while groups:
            rows = groups.pop(0)
            try:
                videos = [np.frombuffer(batch["score_frames"][i], np.uint8).reshape(batch["score_shape"][i])
                          for i in rows]
                scores = self.scorer.score(videos, [str(batch["prompt"][i]) for i in rows])
            except Exception as e:  # noqa: BLE001 - a row that cannot be scored stays unscored
                if len(rows) > 1:
                    groups = [[i] for i in rows] + groups
                    continue
                out["score_error"][rows[0]] = f"scoring failed: {type(e).__name__}: {e}"[:2000]
                log.warning("cannot score %s: %s", batch["id"][rows[0]], e)
                continue
            for j, i in enumerate(rows):
                out["clip_score"][i] = scores.clip[j]
                out["aesthetic_score"][i] = scores.aesthetic[j]
                out["clip_prompt_truncated"][i] = scores.truncated[j]
                out["scoring_hash"][i] = self.scoring_hash
        return out


def _map_args(ctx: Context) -> dict:
    import ray

    scoring = ctx.scoring
    lo, hi = pool_bounds(scoring.concurrency)
    return {"fn": ScoreStage,
            "fn_constructor_kwargs": {"scoring_json": scoring.model_dump_json(), "cache_dir": ctx.cache_dir,
                                      "storage_options": ctx.storage_options},
            "batch_size": scoring.batch_size, "batch_format": "numpy",
            "compute": ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
            "num_cpus": scoring.num_cpus, "num_gpus": scoring.num_gpus}


SCORE_COLUMNS = ("clip_score", "aesthetic_score", "clip_prompt_truncated", "scoring_hash", "score_error")
STAGE = Stage(name="ScoreStage", label="score actor",
              reads=("id", "status", "prompt", "score_frames", "score_shape"), writes=SCORE_COLUMNS,
              drops=("score_frames", "score_shape"), map_args=_map_args)
