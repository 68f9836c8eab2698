"""Text-encode stage (optional, `execution.text_encode_stage`): T5 on its own actors, embeddings handed on.

Each actor loads only the tokenizer and text encoder (no transformer, no VAE). Generation actors then load
the pipeline with `text_encoder=None` and denoise from these embeddings, which frees their GPU memory for
larger batches (Latte-1's T5-XXL is ~11.5 GB in fp16, latte_ray/model/memory.py). Prompts are padded to the
spec's fixed text length with the same code the generation actors would run, so videos are unchanged.

Every row leaves with embedding columns of one fixed shape, zeros for rows that are not pending (error
rows pass through): Ray Data needs every block to carry the same column types, a block of only error
rows included.
"""

from __future__ import annotations

import logging

import numpy as np

from latte_ray.spec import PipelineSpec
from latte_ray.stages.declare import Context, Stage

log = logging.getLogger(__name__)


class TextEncodeStage:
    def __init__(self, spec_json: str, cache_dir: str | None = None, storage_options: dict | None = None):
        from latte_ray.model.quantize import leave_torchao_unimported

        self.spec = PipelineSpec.model_validate_json(spec_json)
        leave_torchao_unimported(self.spec.model.quantization)  # before diffusers/transformers are imported
        from latte_ray.model.families import make_engine  # the spec family's engine, text encoder only

        self.engine = make_engine(self.spec, cache_dir=cache_dir, storage_options=storage_options, with_denoiser=False)
        self.length = self.spec.sampling.max_sequence_length
        self.width = self.engine.pipe.text_encoder.config.d_model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        out = dict(batch)
        out["status"] = np.array(batch["status"], dtype=object)
        out["error"] = np.array(batch["error"], dtype=object)
        out["prompt_embeds"] = np.zeros((n, self.length, self.width), dtype=np.float32)
        out["negative_prompt_embeds"] = np.zeros((n, self.length, self.width), dtype=np.float32)
        out["keep"] = np.zeros(n, dtype=np.int32)
        out["prompt_tokens"] = np.zeros(n, dtype=np.int32)
        out["prompt_truncated"] = np.zeros(n, dtype=bool)

        todo = [i for i in range(n) if out["status"][i] == "pending"]
        groups = [todo] if todo else []
        while groups:
            rows = groups.pop(0)
            try:
                text = self.engine.encode_text(
                    [str(batch["prompt"][i]) for i in rows], [str(batch["negative_prompt"][i]) for i in rows]
                ).to_numpy()
            except Exception as e:  # noqa: BLE001 - one bad prompt becomes one error row
                if len(rows) > 1:
                    groups = [[i] for i in rows] + groups
                    continue
                out["status"][rows[0]] = "error"
                out["error"][rows[0]] = f"text encoding failed: {type(e).__name__}: {e}"[:2000]
                log.warning("row %s failed text encoding: %s", batch["id"][rows[0]], e)
                continue
            for name, values in text.items():
                out[name][rows] = values
        return out


TEXT_COLUMNS = ("prompt_embeds", "negative_prompt_embeds", "keep", "prompt_tokens", "prompt_truncated")


def _map_args(ctx: Context) -> dict:
    """One actor (it holds a GPU of its own per execution), batches of the generation batch size."""
    import ray

    from latte_ray.stages.denoise import restart_args

    ex = ctx.spec.execution
    return {"fn": TextEncodeStage,
            "fn_constructor_kwargs": {"spec_json": ctx.spec.model_dump_json(), "cache_dir": ctx.cache_dir,
                                      "storage_options": ctx.storage_options},
            "batch_size": ex.batch_size, "batch_format": "numpy", "compute": ray.data.ActorPoolStrategy(size=1),
            "num_cpus": ex.num_cpus_per_actor, "num_gpus": ex.num_gpus_per_actor, **restart_args(ex)}


STAGE = Stage(
    name="TextEncodeStage", label="text-encode actor",
    reads=("id", "prompt", "negative_prompt", "status", "error"), writes=("status", "error", *TEXT_COLUMNS),
    map_args=_map_args,
)
