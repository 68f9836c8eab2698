"""Denoise stage (GPU actors): each actor loads one engine in __init__, then turns batches into frames.

It only generates: frames leave as raw uint8 bytes for the CPU encode stage. A batch that raises is
retried one row at a time, so one bad prompt becomes one error row and its neighbours still finish. A
batch whose earlier attempt killed the process is also run one row at a time, and a row that killed it
MAX_CRASHES times becomes an error row (latte_ray/faults/crashes.py). Each generation call has a deadline
(execution.batch_deadline_s): a call that hangs ends its own process, which counts as such a death
(latte_ray/faults/deadline.py).

Every row carries where and when it was generated: the actor and node, when the actor started (its model
load begins then) and its generation call's start and end, so any run's manifest shows where its GPUs
waited (latte_ray/ops/fleet.py, `latte-ray report`).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from datetime import datetime, timezone

import numpy as np

from latte_ray.faults import injection as faults
from latte_ray.faults.crashes import MAX_CRASHES, CrashLedger, crash_message
from latte_ray.faults.deadline import batch_deadline, deadline
from latte_ray.metrics import StageMetrics
from latte_ray.spec import PipelineSpec, pool_bounds
from latte_ray.stages.declare import Context, Stage

log = logging.getLogger(__name__)


class DenoiseStage:
    def __init__(self, spec_json: str, cache_dir: str | None = None, storage_options: dict | None = None,
                 run_id: str = ""):
        from latte_ray.model.quantize import leave_torchao_unimported

        self.started_at = _now()  # before the model loads: the load is part of this actor's time
        self.actor, self.node = _placement()
        self.spec = PipelineSpec.model_validate_json(spec_json)
        leave_torchao_unimported(self.spec.model.quantization)  # before diffusers/transformers are imported
        from latte_ray.model.choose import make_engine

        self.text_encoded = self.spec.execution.text_encode_stage
        self.sidecars = self.spec.sidecars  # training tensors to hand on (latte_ray/record/sidecars.py)
        self.metrics = StageMetrics(self.spec.name)
        self.crashes = CrashLedger(run_id or f"spec-{self.spec.spec_hash()}")  # one ledger per run
        self.engine = make_engine(
            self.spec, cache_dir=cache_dir, storage_options=storage_options, with_text_encoder=not self.text_encoded
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        s = self.spec.sampling
        out = {k: v for k, v in batch.items() if k not in ("prompt_embeds", "negative_prompt_embeds", "keep")}
        out["frames"] = np.array([b""] * n, dtype=object)
        # Copies: columns from the text-encode stage arrive as read-only views of Arrow buffers.
        out["prompt_tokens"] = np.array(batch.get("prompt_tokens", np.zeros(n)), dtype=np.int32)
        out["prompt_truncated"] = np.array(batch.get("prompt_truncated", np.zeros(n)), dtype=bool)
        out["started_at"] = np.full(n, _now(), dtype="datetime64[us]")
        out["generate_seconds"] = np.zeros(n, dtype=np.float64)
        out["transformer_calls"] = np.zeros(n, dtype=np.int32)
        out["actor"] = np.array([self.actor] * n, dtype=object)
        out["node"] = np.array([self.node] * n, dtype=object)
        out["actor_started_at"] = np.full(n, self.started_at, dtype="datetime64[us]")
        out["busy_start"] = np.full(n, np.datetime64("NaT"), dtype="datetime64[us]")
        out["busy_end"] = np.full(n, np.datetime64("NaT"), dtype="datetime64[us]")
        out["status"] = np.array(batch["status"], dtype=object)
        out["error"] = np.array(batch["error"], dtype=object)
        for column in self._sidecar_columns():
            out[column] = np.array([b""] * n, dtype=object)

        todo = [i for i in range(n) if out["status"][i] == "pending"]
        ids = [str(x) for x in batch["id"]]
        crashed = self.crashes.begin(ids)  # > 0: earlier attempts at this batch died with their process
        faults.point("denoise", ids)
        groups = ([[i] for i in todo] if crashed else [todo]) if todo else []
        while groups:
            rows = groups.pop(0)
            # A row's own ledger entry (apart from a batch of one's, so that one death is not counted twice).
            watched = [ids[rows[0]], "#row"] if crashed and len(rows) == 1 else None
            if watched and (died := self.crashes.begin(watched)) >= MAX_CRASHES:
                out["status"][rows[0]] = "error"
                out["error"][rows[0]] = crash_message(died, self.crashes.reasons(watched))
                self.crashes.end(watched)
                log.warning("row %s killed its worker %d times", ids[rows[0]], died)
                continue
            started, busy_start = time.perf_counter(), _now()
            seconds = batch_deadline(self.spec, len(rows))
            try:
                # A hung call ends this process; the ledger entry of this attempt (row or batch) says why.
                why = f"ran past its {seconds or 0:.0f} s deadline"
                with deadline(seconds, f"generation of {', '.join(ids[i] for i in rows)[:200]}",
                              partial(self.crashes.note, watched or ids, why)):
                    frames, text, kept = self._generate(batch, rows)
                calls = list(self.engine.last_transformer_calls)
            except Exception as e:  # noqa: BLE001 - any failure becomes data, not a crashed run
                if len(rows) > 1:
                    groups = [[i] for i in rows] + groups
                    continue
                out["status"][rows[0]] = "error"
                out["error"][rows[0]] = f"generation failed: {type(e).__name__}: {e}"[:2000]
                log.warning("row %s failed: %s", batch["id"][rows[0]], e)
                continue
            finally:
                if watched:
                    self.crashes.end(watched)
                out["busy_start"][rows], out["busy_end"][rows] = busy_start, _now()  # failed calls count too
            per_video = (time.perf_counter() - started) / len(rows)
            self.metrics.generated(per_video, len(rows))
            for j, i in enumerate(rows):
                if faults.point("frames", ids[i]):  # tests: a nondeterministic kernel's other bytes
                    faults.perturb(frames[j])
                out["frames"][i] = frames[j].tobytes()
                out["prompt_tokens"][i] = text.tokens[j]
                out["prompt_truncated"][i] = text.truncated[j]
                for column, data in self._sidecars(text, kept, j).items():
                    out[column][i] = data
                out["generate_seconds"][i] = per_video
                out["transformer_calls"][i] = calls[j]
                out["status"][i] = "generated"
        self.crashes.end(ids)
        out["num_frames"] = np.full(n, s.video_length, dtype=np.int32)
        out["height"] = np.full(n, s.height, dtype=np.int32)
        out["width"] = np.full(n, s.width, dtype=np.int32)
        return out

    def _generate(self, batch: dict[str, np.ndarray], rows: list[int]):
        faults.point("generate", [str(batch["id"][i]) for i in rows])
        seeds = [int(batch["seed"][i]) for i in rows]
        kept = {"capture": {}} if self.sidecars.latents else {}
        if self.text_encoded:
            from latte_ray.model.engine import TextBatch

            sub = {k: batch[k][rows] for k in ("prompt_embeds", "negative_prompt_embeds", "keep",
                                                "prompt_tokens", "prompt_truncated")}
            text = TextBatch.from_numpy(sub, self.engine.device, self.engine.dtype)
            frames = self.engine.denoise(text, seeds, **kept)
        else:
            prompts = [str(batch["prompt"][i]) for i in rows]
            negatives = [str(batch["negative_prompt"][i]) for i in rows]
            frames, text = self.engine.generate(prompts, negatives, seeds, **kept)
        return frames, text, kept.get("capture", {})

    def _sidecar_columns(self) -> list[str]:
        from latte_ray.record.sidecars import EMBEDDINGS, LATENTS

        return [c for c, on in ((EMBEDDINGS, self.sidecars.embeddings), (LATENTS, self.sidecars.latents)) if on]

    def _sidecars(self, text, kept: dict, j: int) -> dict[str, bytes]:
        """Row j's sidecars as .npy bytes: tensors the generation computed anyway, copied to the CPU (~64 us per
        video for the tiny model on a CPU; benchmarks/sidecars.py).

        Embeddings: the prompt's T5 output in the rows the transformer's cross-attention attended to
        (`keep`: its tokens with mask_feature, else the padded length), as float16; the masked padding rows
        were never seen. Latents: as the VAE received them (bfloat16 goes out as float32, which is exact)."""
        if not (self.sidecars.embeddings or self.sidecars.latents):
            return {}  # no torch import here: the stand-in engines (null, sim) run without it
        import torch

        from latte_ray.record.sidecars import EMBEDDINGS, LATENTS, to_npy

        out = {}
        if self.sidecars.embeddings:
            length = int(text.keep[j])
            out[EMBEDDINGS] = to_npy(text.embeds[j, :length].to(torch.float16).cpu().numpy())
        if self.sidecars.latents:
            latents = kept["latents"][j]
            latents = latents.float() if latents.dtype == torch.bfloat16 else latents
            out[LATENTS] = to_npy(latents.numpy())
        return out


def _placement() -> tuple[str | None, str | None]:
    """(actor id, node id) of this process; None outside a Ray actor (a stage called in-process)."""
    import ray

    if not ray.is_initialized():
        return None, None
    ctx = ray.get_runtime_context()
    return ctx.get_actor_id(), ctx.get_node_id()


def _now() -> np.datetime64:
    return np.datetime64(datetime.now(timezone.utc).replace(tzinfo=None), "us")


def restart_args(ex) -> dict:
    """Actor restart options for the model stages. Ray Data's own default for actor pools is what we want
    (restart without limit, retry the batch; a row that keeps killing its actor is stopped by
    crashes.CrashLedger), and passing it through `**ray_remote_args` is deprecated, so only a
    non-default `execution.max_restarts` is passed on."""
    if ex.max_restarts == -1:
        return {}
    return {"max_restarts": ex.max_restarts, "max_task_retries": -1 if ex.max_restarts else 0}


def reads(ctx: Context) -> tuple[str, ...]:
    """The prompts, or their embeddings when a text-encode stage ran before (execution.text_encode_stage)."""
    from latte_ray.stages.text_encode import TEXT_COLUMNS

    text = TEXT_COLUMNS if ctx.spec.execution.text_encode_stage else ("prompt", "negative_prompt")
    return ("id", "seed", "status", "error", *text)


def writes(ctx: Context) -> tuple[str, ...]:
    """Raw frames and where, when and how they were made; the sidecar columns the spec keeps."""
    from latte_ray.record.sidecars import EMBEDDINGS, LATENTS

    sidecars = ctx.spec.sidecars
    kept = tuple(c for c, on in ((EMBEDDINGS, sidecars.embeddings), (LATENTS, sidecars.latents)) if on)
    return ("status", "error", "frames", "prompt_tokens", "prompt_truncated", "started_at", "generate_seconds",
            "transformer_calls", "actor", "node", "actor_started_at", "busy_start", "busy_end", "num_frames",
            "height", "width", *kept)


DROPS = ("prompt_embeds", "negative_prompt_embeds", "keep")


def _map_args(ctx: Context) -> dict:
    """A pool of generation actors; every actor the cluster can hold starts at once (plan/fit.py says why)."""
    import ray

    from latte_ray.plan.fit import initial_pool_size

    ex = ctx.spec.execution
    lo, hi = pool_bounds(ex.concurrency)
    return {"fn": DenoiseStage,
            "fn_constructor_kwargs": {"spec_json": ctx.spec.model_dump_json(), "cache_dir": ctx.cache_dir,
                                      "storage_options": ctx.storage_options, "run_id": ctx.run_id},
            "batch_size": ex.batch_size, "batch_format": "numpy",
            "compute": ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, initial_size=initial_pool_size(ctx.spec)),
            "num_cpus": ex.num_cpus_per_actor, "num_gpus": ex.num_gpus_per_actor, **restart_args(ex)}


STAGE = Stage(name="DenoiseStage", label="generation actor", reads=reads, writes=writes, drops=DROPS,
              map_args=_map_args)
