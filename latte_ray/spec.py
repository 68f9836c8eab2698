"""Specs: what to generate with (PipelineSpec) and what to run (RunSpec).

Both are pydantic models with described fields; unknown keys are errors that name the key. The spec hash
covers every field that can change a video's pixels or bytes and nothing else (batch size, concurrency and
GPU placement are excluded: outputs are batch-invariant).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from latte_ray.errors import InputError, SpecError  # noqa: F401 - SpecError re-exported: latte_ray.spec.SpecError
from latte_ray.resources import pipelines_dir

PIPELINES_DIR = pipelines_dir()  # the built-in specs: pipelines/ in a checkout, latte_ray/pipelines/ in a wheel
DEFAULT_PIPELINE = "tiny-cpu"
TINY_SOURCE = "tiny"
NULL_SOURCE = "null"  # benchmark tool: an engine that returns frames instantly (latte_ray/model/null.py)
SIM_SOURCE = "sim"  # benchmark tool: null's frames after a real GPU's load, compile and batch times (model/sim.py)
STAND_IN_SOURCES = (NULL_SOURCE, SIM_SOURCE)  # no model, no torch: frames from the seed alone


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class CompileSpec(_Strict):
    """torch.compile of the transformer (and optionally the VAE decoder), once per actor and warmed up before its
    first batch; shapes are static, so no prompt recompiles."""

    enabled: bool = Field(False, description="torch.compile the transformer once per actor, then warm up.")
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode. 'default' compiles fastest; 'max-autotune-no-cudagraphs' "
        "also benchmarks kernel choices for every matmul (minutes more of cold compile, paid once per node with a "
        "shared cache_dir) for faster steps over a long run, without CUDA graphs' private memory pool: "
        "latte-1-t2v-512's choice (the reason is beside it in pipelines/latte-1-t2v-512.yaml). 'reduce-overhead' "
        "and 'max-autotune' replay CUDA graphs."
    )
    vae_decode: bool = Field(False, description="Also compile the VAE decoder.")
    fullgraph: bool = Field(False, description="Ask torch.compile for a single graph (errors on graph breaks).")
    cache_dir: str | None = Field(
        None, description="Inductor cache folder (TORCHINDUCTOR_CACHE_DIR), shared by the actors of a node and "
        "kept across runs; null: inductor/ under the model cache ($LATTE_RAY_CACHE, /cache on the infra/ nodes)."
    )
    scope: Literal["whole", "blocks"] = Field(
        "whole", description="What is compiled without a cache (TeaCache and the hook caches compile their own "
        "parts): 'whole' = the transformer's forward as one graph (each expert's, for Wan 2.2 A14B); 'blocks' = "
        "regional compilation (diffusers' compile_repeated_blocks): each repeated block on its own (Latte-1's 28 "
        "spatial and 28 temporal blocks, Wan's WanTransformerBlocks), traced once for all of them since they "
        "share their code, so a cold compile costs about one or two blocks' worth instead of the whole stack; the "
        "embedding, reshapes and output head between them run eagerly (latte_ray/model/compiling.py)."
    )
    backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="torch.compile backend; 'eager'/'aot_eager' trace with dynamo but generate no "
        "kernels (for checking graphs and recompiles cheaply)."
    )

    @property
    def uses_cuda_graphs(self) -> bool:
        """inductor's "reduce-overhead" and "max-autotune" modes replay CUDA graphs."""
        return self.enabled and self.backend == "inductor" and self.mode in CUDA_GRAPH_MODES


# TeaCache's polynomial for Latte (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video
# Diffusion Model"): maps the relative L1 change of the first block's timestep-modulated input to the change of
# the model's output. Published in ali-vilab/TeaCache, eval/teacache/experiments/latte.py (commit 7c10efc,
# `coefficients` in teacache_forward), fitted on Latte-1; its paper runs Latte at thresholds 0.1 (1.86x at
# unchanged VBench) and 0.2 (3.28x). Highest power first, as numpy.poly1d takes them.
TEACACHE_LATTE_COEFFICIENTS = (-2.46434137e03, 3.08044764e02, 8.07447667e01, -4.11385132e00, 1.11001402e-01)
TEACACHE_DEFAULT_THRESHOLD = 0.1
_TEACACHE_ONLY = ("threshold", "coefficients")


class CacheSpec(_Strict):
    """Cache acceleration: reuse work across denoising steps (changes pixels, so it is in the spec hash)."""

    kind: Literal["faster_cache", "pyramid_attention_broadcast", "teacache"] = Field(
        ..., description="faster_cache / pyramid_attention_broadcast: diffusers cache hooks applied with "
        "transformer.enable_cache (reuse attention outputs); teacache: skip the whole stack of transformer blocks "
        "for a video at a step where its timestep-modulated input changed little since the last computed step, "
        "reusing that video's cached residual (latte_ray/model/teacache.py; decided per video).",
    )
    spatial_attention_block_skip_range: int = Field(2, ge=1, description="Reuse spatial attention every N steps.")
    spatial_attention_timestep_skip_range: tuple[int, int] = Field(
        (-1, 681), description="Timestep window in which attention outputs are reused."
    )
    attention_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="faster_cache only: weight of the extrapolated attention output."
    )
    threshold: float | None = Field(
        None, ge=0.0, description=f"teacache only (default {TEACACHE_DEFAULT_THRESHOLD}): a video skips a step "
        "while its accumulated rescaled input change stays below this; 0 computes every step (Latte-1: 0.1 ~1.86x "
        "at unchanged VBench, 0.2 ~3.28x at a small loss, per the TeaCache paper).",
    )
    coefficients: tuple[float, ...] | None = Field(
        None, min_length=1, description="teacache only: polynomial (highest power first) rescaling the relative "
        "L1 input change; default: TeaCache's published fit for Latte-1. A model of another size or training "
        "needs its own fit (benchmarks/acceleration.py --fit prints one).",
    )

    @model_validator(mode="before")
    @classmethod
    def _teacache_defaults(cls, data: object) -> object:
        """teacache gets its defaults written in (so run records show the polynomial used); the other kinds
        must not set teacache's fields."""
        if not isinstance(data, dict):
            return data
        if data.get("kind") == "teacache":
            data = dict(data)
            if data.get("threshold") is None:
                data["threshold"] = TEACACHE_DEFAULT_THRESHOLD
            if data.get("coefficients") is None:
                data["coefficients"] = TEACACHE_LATTE_COEFFICIENTS
        else:
            for name in _TEACACHE_ONLY:
                if data.get(name) is not None:
                    raise ValueError(f"cache.{name} applies to kind 'teacache' only, not {data.get('kind')!r}")
        return data


QUANTIZATION_KINDS = {
    # kind -> (torchao config class, needs float8 hardware: CUDA compute capability >= 8.9)
    "int8_weight_only": ("Int8WeightOnlyConfig", False),
    "int8_dynamic": ("Int8DynamicActivationInt8WeightConfig", False),
    "float8_weight_only": ("Float8WeightOnlyConfig", True),
    "float8_dynamic": ("Float8DynamicActivationFloat8WeightConfig", True),
}
FLOAT8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have float8 tensor cores


class QuantizationSpec(_Strict):
    """Low-precision weights (torchao), applied once at load; weights still load as safetensors."""

    kind: Literal[tuple(QUANTIZATION_KINDS)] = Field(  # type: ignore[valid-type]
        ..., description="torchao quantization of the Linear weights, applied once at load (torchao.quantize_): "
        "int8_weight_only (CPU and CUDA; halves weight memory vs fp16), int8_dynamic (int8 weights and "
        "activations), float8_weight_only / float8_dynamic (CUDA compute capability >= 8.9: Ada, Hopper).",
    )
    components: tuple[Literal["transformer", "text_encoder"], ...] = Field(
        ("transformer",), min_length=1, description="Which models to quantize: the transformer (every expert: Wan "
        "2.2 A14B's transformer_2 too), and optionally the T5 text encoder (Latte-1's is ~11.5 GB in fp16: "
        "transformers keeps its wo layers in fp32).",
    )

    @field_validator("components")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"components must not repeat, got {list(v)}")
        return v

    @property
    def needs_float8(self) -> bool:
        return QUANTIZATION_KINDS[self.kind][1]

    def refusal(self, but: str, instead: str) -> str:
        """The one-line refusal of a float8 kind where it cannot run (`but`: why here; `instead`: what to use)."""
        need = ".".join(map(str, FLOAT8_MIN_CAPABILITY))
        return (f"model.quantization.kind {self.kind!r} needs a CUDA GPU with compute capability >= {need} "
                f"(Ada, Hopper), but {but}; use {instead}")


# Latte-1 on one 80 GB A100 with torch.compile: 14.6 s per video (diffusers docs, Latte's page; DESIGN.md).
LATTE1_SECONDS_PER_VIDEO = 14.6


class SimSpec(_Strict):
    """The simulated engine's timings (`model.source: sim`, latte_ray/model/sim.py): what a real GPU actor
    spends, slept instead of computed, so a benchmark can schedule a fleet of logical GPUs on a few CPUs."""

    load_s: float = Field(90.0, ge=0.0, description="Seconds from actor start to a loaded pipeline: Latte-1's "
                          "~20 GB of fp16 weights (T5 XXL, transformer, VAE) read from the node-local cache and "
                          "moved to the GPU.")
    compile_s: float = Field(150.0, ge=0.0, description="Seconds of torch.compile warm-up after the load, spent "
                             "only when model.compile.enabled (the production spec compiles the transformer and "
                             "the VAE decoder with max-autotune-no-cudagraphs).")
    batch_s_fixed: float = Field(0.0, ge=0.0, description="Seconds per generation call whatever its size "
                                 "(launch and sync overhead).")
    batch_s_per_video: float = Field(LATTE1_SECONDS_PER_VIDEO, ge=0.0, description="Seconds per video in a "
                                     "call: default Latte-1's published 14.6 s on an 80 GB A100 with "
                                     "torch.compile (16 frames, 512x512, 50 steps).")
    time_scale: float = Field(1.0, gt=0.0, le=1.0, description="Real seconds slept per simulated second (0.01: a "
                              "simulated second takes 10 ms). Benchmarks scale a run down with it; manifests "
                              "then record real (scaled) seconds.")

    def batch_seconds(self, videos: int) -> float:
        """Simulated seconds of one generation call of `videos` videos."""
        return self.batch_s_fixed + self.batch_s_per_video * videos


MODEL_FAMILIES = ("latte", "wan")  # latte_ray/model/families/: one module per family


class LoraSpec(_Strict):
    """One LoRA fused into the model once per actor, before compile (diffusers' load_lora_weights + fuse_lora)."""

    source: str = Field(..., description="Where the LoRA is: a hub id (with `revision`), a local folder or file, or "
                        "an fsspec URL of a folder or a .safetensors object (s3://bucket/loras/style/).")
    weight_name: str | None = Field(None, description="The .safetensors file in the folder or hub repo (null: the "
                                    "source is the file itself, or its folder holds exactly one .safetensors).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when source is a hub id.")
    scale: float = Field(1.0, ge=-10.0, le=10.0, description="LoRA scale fused into the weights (lora_scale of "
                         "fuse_lora): changing it changes every video, and the spec hash.")
    component: Literal["transformer", "transformer_2"] | None = Field(
        None, description="The denoiser it is fused into: 'transformer', or 'transformer_2' (Wan 2.2 A14B's "
        "low-noise expert; diffusers' load_lora_weights(..., load_into_transformer_2=True)). null: the transformer "
        "of a one-transformer model; a model with two experts needs it named (A14B LoRAs come as a high-noise "
        "and a low-noise file: one entry each).",
    )

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model.lora source must not be empty")
        return v

    @field_validator("weight_name")
    @classmethod
    def _safetensors_only(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(".safetensors"):
            raise ValueError(f"weight_name {v!r}: LoRA weights load as .safetensors only")
        return v


class ModelSpec(_Strict):
    """Which model to load and how: source, revision, dtype, device, compile, cache acceleration, quantization."""

    family: Literal[MODEL_FAMILIES] = Field(  # type: ignore[valid-type]
        "latte", description="The model family (latte_ray/model/families/): 'latte' (Latte-1, LattePipeline) or "
        "'wan' (Wan 2.1 / 2.2 text-to-video, WanPipeline). The source must hold that family's pipeline; what a "
        "family does not support (a cache kind, a text-encode stage, ...) is refused before any model loads.",
    )
    lora: tuple[LoraSpec, ...] = Field(
        (), description="LoRA weights fused into the model at load, in order (each {source, weight_name, revision, "
        "scale}); part of the spec hash. Empty: none.",
    )
    source: str = Field(
        TINY_SOURCE,
        description="'tiny' (offline random-weight model, built on first use), a hub id, a local folder, "
        "or an fsspec URL of a save_pretrained folder (e.g. s3://bucket/models/latte-1/). 'null' is a "
        "benchmark tool: no model, frames returned instantly, to measure the data plane alone. 'sim' is "
        "another: null's frames after sleeping a real GPU's load, compile and batch times (model.sim), to "
        "measure how a fleet of GPU actors is kept busy.",
    )
    sim: SimSpec | None = Field(None, description="model.source 'sim' only: its timings (null: the defaults). "
                                "Not in the spec hash: they change no pixel.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when source is a hub id.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weights and compute dtype.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks cuda when one is visible.")
    channels_last: bool = Field(False, description="Put the VAE in channels_last memory format.")
    attention: Literal["sdpa", "default"] = Field(
        "sdpa",
        description="How every attention layer of the transformer computes softmax(QK^T/sqrt(d))V. 'sdpa': "
        "torch.nn.functional.scaled_dot_product_attention, whose fused kernels (flash, memory-efficient, cuDNN "
        "on CUDA) never hold the full score matrix; diffusers' own choice. 'default': the plain, unfused math - "
        "the whole score matrix in memory, no fused kernel (Latte: diffusers' AttnProcessor on each layer, "
        "batched matmul, softmax, matmul; Wan: diffusers' attention backend '_native_math', torch's math SDPA); "
        "slower and heavier, a reference or a way round a misbehaving fused kernel. Both compute the same function "
        "and differ only in floating-point rounding; part of the spec hash.",
    )
    compile: CompileSpec = Field(default_factory=CompileSpec)
    cache: CacheSpec | None = Field(None, description="Optional cache acceleration; off when null.")
    quantization: QuantizationSpec | None = Field(
        None, description="Optional low-precision weights (torchao), applied at load; off when null."
    )

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model.source must not be empty")
        return v

    @model_validator(mode="after")
    def _compile_with_cache(self) -> "ModelSpec":
        """FasterCache/PAB hooks run outside the compiled blocks (acceleration.compile_under_hooks): there is
        no single graph to ask for."""
        c, cache = self.compile, self.cache
        if c.uses_cuda_graphs and cache is not None:
            raise ValueError(
                f"model.compile.mode {c.mode!r} replays CUDA graphs, which overwrite their outputs at the next "
                f"call, and model.cache.kind {cache.kind!r} keeps outputs across steps; use model.compile.mode "
                "max-autotune-no-cudagraphs (or default) with a cache"
            )
        if c.enabled and c.fullgraph and cache is not None and cache.kind != "teacache":
            raise ValueError(
                f"model.compile.fullgraph is true with model.cache.kind {cache.kind!r}, whose hooks run outside "
                "the compiled graphs (graph breaks by design); set model.compile.fullgraph: false, or use "
                "model.cache.kind teacache"
            )
        return self

    @model_validator(mode="after")
    def _sim_only_for_sim(self) -> "ModelSpec":
        if self.sim is not None and self.source != SIM_SOURCE:
            raise ValueError(f"model.sim applies to model.source {SIM_SOURCE!r} only, not {self.source!r}")
        return self

    @property
    def sim_timing(self) -> SimSpec:
        return self.sim or SimSpec()

    @model_validator(mode="after")
    def _float8_needs_cuda(self) -> "ModelSpec":
        q = self.quantization
        if q is not None and q.needs_float8 and self.device == "cpu":
            raise ValueError(q.refusal("model.device is 'cpu'", "int8_weight_only on CPU"))
        return self


class SamplingSpec(_Strict):
    """The diffusion call: steps, guidance, frame size and count, scheduler, text length, VAE decode chunks."""

    num_inference_steps: int = Field(50, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0, description="Classifier-free guidance scale.")
    height: int = Field(512, ge=8, le=4096, description="Frame height in pixels (multiple of 8).")
    width: int = Field(512, ge=8, le=4096, description="Frame width in pixels (multiple of 8).")
    video_length: int = Field(16, ge=1, le=256, description="Frames per video; must equal the model's.")
    negative_prompt: str = Field("", description="Default negative prompt for rows without one.")
    scheduler: Literal["ddim", "ddpm", "dpm++", "euler", "pndm"] | None = Field(
        None, description="Override the model's scheduler (null keeps the one it was saved with)."
    )
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta.")
    guidance_scale_2: float | None = Field(
        None, ge=0.0, le=50.0, description="Wan 2.2 A14B only: guidance scale of the low-noise expert "
        "(transformer_2, used below the model's boundary_ratio); null: guidance_scale, as WanPipeline does.",
    )
    max_sequence_length: int = Field(120, ge=1, le=512, description="Text tokens; prompts are padded to it.")
    mask_feature: bool = Field(True, description="Attend only to a prompt's own tokens (Latte's default).")
    clean_caption: bool = Field(False, description="diffusers caption cleaning (needs bs4 and ftfy).")
    decode_chunk_size: int = Field(16, ge=1, description="Frames per VAE decode call.")
    enable_temporal_attentions: bool = Field(True, description="Latte temporal attention blocks.")

    @model_validator(mode="after")
    def _multiple_of_8(self) -> "SamplingSpec":
        for name in ("height", "width"):
            if getattr(self, name) % 8:
                raise ValueError(f"sampling.{name} must be a multiple of 8, got {getattr(self, name)}")
        return self


class VideoSpec(_Strict):
    """How frames become an mp4 (PyAV, in memory, in the CPU encode stage)."""

    fps: int = Field(8, ge=1, le=120, description="Frames per second of the mp4.")
    codec: Literal["libx264", "libx264rgb", "libx265", "libvpx-vp9", "mpeg4"] = Field(
        "libx264", description="Encoder; libx264rgb with crf 0 is lossless (bit-exact round trip)."
    )
    crf: int = Field(18, ge=0, le=63, description="Constant rate factor (0 = lossless for x264).")
    pix_fmt: str | None = Field(None, description="Pixel format; default yuv420p, rgb24 for libx264rgb.")
    preset: str = Field("medium", description="x264/x265 preset.")

    @property
    def resolved_pix_fmt(self) -> str:
        if self.pix_fmt:
            return self.pix_fmt
        return "rgb24" if self.codec == "libx264rgb" else "yuv420p"


class _LeaseTerms(_Strict):
    """The output lease's terms (latte_ray/record/lease.py: one writer per output), for every section that
    configures a writing command: a run's `execution`, a scoring run's `scoring`."""

    _section: ClassVar[str] = "execution"

    lease_heartbeat_s: float = Field(
        30.0, gt=0, description="How often the driver renews its output lease's heartbeat "
        "(latte_ray/record/lease.py: one writer per output).",
    )
    lease_expiry_s: float = Field(
        180.0, gt=0, description="After how long without a heartbeat the output lease counts as dead and the "
        "next writing run takes it over (and marks the dead run's record `died`). At least twice "
        "lease_heartbeat_s; longer than the longest pause a live driver can have (storage outage, GC).",
    )

    @model_validator(mode="after")
    def _lease_expiry_covers_heartbeats(self):
        if self.lease_expiry_s < 2 * self.lease_heartbeat_s:
            raise ValueError(f"{self._section}.lease_expiry_s ({self.lease_expiry_s:g}) must be at least twice "
                             f"{self._section}.lease_heartbeat_s ({self.lease_heartbeat_s:g})")
        return self


class ExecutionSpec(_LeaseTerms):
    """Placement, batching, rounds, timeouts and the output lease: how a run is executed, never what it makes
    (not in the spec hash)."""

    batch_size: int = Field(1, ge=1, le=256, description="Prompts per generation call (batch-invariant).")
    concurrency: int | tuple[int, int] = Field(
        1, description="Generation actors: a fixed size or (min, max) for an autoscaling pool."
    )
    num_gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs each generation actor holds.")
    num_cpus_per_actor: float = Field(0.25, gt=0.0, description="CPUs each generation actor holds (fractional ok).")
    num_cpus_per_cpu_task: float = Field(0.25, gt=0.0, description="CPUs each encode/write task holds.")
    cpu_stage_max_actors: int = Field(4, ge=1, description="Most actors in each CPU stage's autoscaling pool.")
    text_encode_stage: bool = Field(False, description="Run T5 in its own actor stage; generators skip it.")
    max_restarts: int = Field(-1, description="Ray restarts of a crashed actor (-1 = unlimited).")
    round_rows: int = Field(
        100_000, ge=1, description="Most rows one Ray Data execution takes on. A larger run is split into "
        "rounds by a hash of the id, each with fresh actor pools (one model load per round, unless "
        "keep_model_actors), because Ray Data "
        "keeps some bookkeeping per block in the driver for the life of an execution.",
    )
    keep_model_actors: bool = Field(
        False, description="Keep the generation actors, with their loaded models, for the whole run: every "
        "round (and a re-plan after a lost node) reuses them instead of loading the model again on every GPU; "
        "a batch goes to whichever loaded actor has a free slot, actors start mid-round as nodes join, and two "
        "rounds overlap so that a round change leaves no GPU idle (latte_ray/fleet/servers.py). Off: each "
        "round's actor pool loads its own, and rounds run one after another.",
    )
    sustained_tflops: float | None = Field(
        None, gt=0, description="Dense TFLOP/s one generation actor sustains, for `run --dry-run` estimates from "
        "the model family's FLOP figures (Wan: latte_ray/model/families/wan_figures.py) when seconds_per_video is "
        "null and the output has no finished videos to measure. Not in the spec hash.",
    )
    seconds_per_video: float | None = Field(
        None, gt=0, description="Seconds one actor takes per video on its device, for `run --dry-run` "
        "estimates and the default stall timeout and batch deadline (null: estimate from the output's "
        "manifest when it has finished videos; 60 s for the timeouts).",
    )
    stall_timeout_s: float | Literal["auto"] | None = Field(
        "auto", description="Progress watchdog (latte_ray/faults/watchdog.py): when no manifest row has "
        "been committed for this long the driver logs a diagnosis (operators, pending resources, dead or "
        "restarting actors), and after as long again the run fails with exit code 3. The number is the "
        "steady timeout (the pre-pass, and while a generation actor works); 'auto': max(600, 10 x "
        "seconds_per_video x batch_size). While a round starts and whenever no generation actor is running "
        "(being created or restarted), a start-up allowance is added: model load (120 s for tiny/null, "
        "the scaled model.sim load + compile for sim, at least 120 s; 1200 s otherwise) + compile warm-up (when model.compile.enabled: 900 s with inductor, 120 s with "
        "eager/aot_eager). null: off.",
    )
    batch_deadline_s: float | Literal["auto"] | None = Field(
        "auto", description="Most seconds one generation call may take before it ends its own worker "
        "process (Ray restarts the actor and retries the batch; a row that keeps doing it becomes an error "
        "row, latte_ray/faults/crashes.py). 'auto': max(120, 10 x seconds_per_video x rows in the call). "
        "null: off.",
    )

    @field_validator("concurrency")
    @classmethod
    def _concurrency(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        return check_concurrency(v)

    @field_validator("stall_timeout_s", "batch_deadline_s")
    @classmethod
    def _positive_seconds(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, (int, float)) and v <= 0:
            raise ValueError(f"must be a positive number of seconds, 'auto' or null, got {v}")
        return v


def pool_bounds(v: int | tuple[int, int]) -> tuple[int, int]:
    """(min, max) of an actor pool's `concurrency`: N is (N, N)."""
    return (v, v) if isinstance(v, int) else (v[0], v[1])


def check_concurrency(v: int | tuple[int, int]) -> int | tuple[int, int]:
    """An actor pool size: N, or (min, max) for an autoscaling pool."""
    lo, hi = pool_bounds(v)
    if lo < 1 or hi < lo:
        raise ValueError(f"concurrency must be >= 1 or (min, max) with 1 <= min <= max, got {v}")
    return v


class ScoringSpec(_LeaseTerms):
    """Per-video quality scores (latte_ray/model/clip.py): CLIPScore and a LAION-style aesthetic score."""

    _section: ClassVar[str] = "scoring"

    enabled: bool = Field(False, description="Score every new video in the run (an actor pool after encoding). "
                          "`latte-ray score OUTPUT --scoring SPEC` scores an existing output whatever this says.")
    clip_model: str = Field(
        TINY_SOURCE, description="CLIP model: 'tiny' (offline random weights), a hub id "
        "(openai/clip-vit-large-patch14), a local save_pretrained folder, or an fsspec URL of one (mirrored once "
        "per node, like model.source). Safetensors only.",
    )
    clip_revision: str | None = Field(None, description="Hub revision when clip_model is a hub id.")
    aesthetic_head: str = Field(
        TINY_SOURCE, description="Aesthetic predictor head on the CLIP image embedding (LAION form: linear or "
        "MLP): 'tiny', a hub id, a local folder or an fsspec URL holding config.json + model.safetensors.",
    )
    aesthetic_revision: str | None = Field(None, description="Hub revision when aesthetic_head is a hub id.")
    frames: int = Field(4, ge=1, le=256, description="Frames per video scored (evenly spaced, first and last "
                        "included); the scores are means over them.")
    batch_size: int = Field(8, ge=1, le=1024, description="Videos per scoring call.")
    concurrency: int | tuple[int, int] = Field(1, description="Scoring actors: N or (min, max).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs each scoring actor holds (fractional ok).")
    num_cpus: float = Field(0.25, gt=0.0, description="CPUs each scoring actor holds (fractional ok).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="CLIP weights and compute dtype.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks cuda when one is visible.")

    @field_validator("concurrency")
    @classmethod
    def _concurrency(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        return check_concurrency(v)

    def scoring_hash(self) -> str:
        """Hash of what determines a score (models, frames, dtype), not placement or batch size."""
        payload = self.model_dump(mode="json", include={"clip_model", "clip_revision", "aesthetic_head",
                                                          "aesthetic_revision", "frames", "dtype"})
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class SidecarSpec(_Strict):
    """Training data kept next to each video (latte_ray/record/sidecars.py), made in the generation stage from
    tensors it computes anyway: no extra model call. Decided at generation time; export packs what is there."""

    embeddings: bool = Field(False, description="Keep the prompt's T5 embeddings (fp16, the attended tokens the "
                             "transformer saw) as videos/<shard>/<id>.t5.<sha>.npy.")
    latents: bool = Field(False, description="Keep the final denoised latents (before VAE decode, the dtype "
                          "the model ran in) as videos/<shard>/<id>.latents.<sha>.npy.")


class PipelineSpec(_Strict):
    """What to generate with: a model, its sampling and video settings, and how to run it."""

    name: str = Field("unnamed", description="Human-readable name, recorded in the output and run records.")
    description: str = Field("", description="One line on what the spec is for (`latte-ray pipelines` lists it).")
    model: ModelSpec = Field(default_factory=ModelSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    video: VideoSpec = Field(default_factory=VideoSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    scoring: ScoringSpec = Field(default_factory=ScoringSpec, description="Quality scores (not in the spec hash).")
    sidecars: SidecarSpec = Field(default_factory=SidecarSpec, description="Training tensors kept per video "
                                  "(not in the spec hash).")

    def spec_hash(self) -> str:
        """Hash of everything that determines a video's bytes (not batch size, concurrency or placement;
        not scoring or sidecars, which add data next to a video and never change it)."""
        blob = json.dumps(hashed_fields(self.model_dump(mode="json")), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def with_overrides(self, **execution: object) -> "PipelineSpec":
        """A copy with execution fields replaced (None values are ignored)."""
        changes = {k: v for k, v in execution.items() if v is not None}
        if not changes:
            return self
        merged = {**self.execution.model_dump(), **changes}
        return self.model_copy(update={"execution": ExecutionSpec.model_validate(merged)})


def hashed_fields(raw: dict) -> dict:
    """The part of a dumped pipeline spec that the spec hash covers: everything but the name, the description,
    the execution, scoring and sidecars sections, the device, the simulated engine's timings and the compile
    cache folder. Works on a plain
    dict, so that a spec recorded by another version can be compared field by field (latte_ray/record/output.py)."""
    payload = json.loads(json.dumps(raw))
    for key in ("name", "description", "execution", "scoring", "sidecars"):
        payload.pop(key, None)
    model = payload.get("model") or {}
    model.pop("device", None)
    model.pop("sim", None)  # the simulated engine's timings: when its frames come, not what they are
    (model.get("compile") or {}).pop("cache_dir", None)
    # Fields added after outputs already existed enter the hash only when set, so the hash of a spec
    # that does not use them (and so the binding of its existing outputs) is unchanged.
    if model.get("quantization") is None:
        model.pop("quantization", None)
    if (model.get("compile") or {}).get("scope") == "whole":
        model["compile"].pop("scope", None)
    if model.get("family") == "latte":
        model.pop("family", None)
    if not model.get("lora"):
        model.pop("lora", None)
    for lora in model.get("lora") or ():
        if lora.get("component") is None:
            lora.pop("component", None)
    sampling = payload.get("sampling") or {}
    if sampling.get("guidance_scale_2") is None:
        sampling.pop("guidance_scale_2", None)
    if model.get("cache") is not None:
        for name in _TEACACHE_ONLY:
            if model["cache"].get(name) is None:
                model["cache"].pop(name, None)
    return payload


def resolve_pipeline_path(name_or_path: str | Path) -> Path:
    """A spec file path, or the name of a built-in one ('tiny-cpu' -> pipelines/tiny-cpu.yaml, shipped in the
    package)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = PIPELINES_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml"))
    raise SpecError(f"pipeline spec {str(name_or_path)!r} not found (a .yaml path or one of {known})")


def load_pipeline_spec(name_or_path: str | Path = DEFAULT_PIPELINE) -> PipelineSpec:
    path = resolve_pipeline_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from e
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot be read as a pipeline spec ({type(e).__name__}: a YAML file is "
                        f"expected)") from None
    return parse_pipeline_spec(raw, origin=str(path))


def parse_pipeline_spec(raw: object, origin: str = "spec") -> PipelineSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: a pipeline spec must be a mapping, got {type(raw).__name__}")
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{origin}: invalid pipeline spec:\n{_format_errors(e)}") from None


def _format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  - {field}: {msg}")
    return "\n".join(lines)


def option_error(e: ValidationError, options: dict[str, tuple[str, object]]) -> InputError:
    """One line per invalid field for settings given on the command line: `options` maps a field name to
    (the option that set it, the value given), so the message names the option, as a spec file's names
    the key."""
    lines = []
    for err in e.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        if field in options:
            flag, value = options[field]
            lines.append(f"{flag} {value}: {msg}")
        else:
            lines.append(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {msg}")
    return InputError("; ".join(lines))


class RunSpec(_Strict):
    """One run: which prompts, which pipeline, where the outputs go."""

    pipeline: PipelineSpec
    prompts: list[str] = Field(..., min_length=1, description="Prompt table URLs: files, folders or globs.")
    output: str = Field(..., description="Output prefix (fsspec URL or local path).")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="fsspec options (endpoint_url, key, secret, ...); never recorded."
    )
    seed: int = Field(0, ge=0, description="Run seed; rows without a seed derive theirs from it and their id.")
    resume: bool = Field(True, description="Skip ids that already have an ok manifest row.")
    retry_errors: bool = Field(True, description="On resume, generate ids whose last row is an error again.")
    limit: int | None = Field(None, ge=1, description="Generate at most this many rows (for smoke tests).")
    cache_dir: str | None = Field(None, description="Node-local cache for models (default ~/.cache/latte-ray).")
