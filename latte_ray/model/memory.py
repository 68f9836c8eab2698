"""Memory and FLOP figures computed from a model's configs, not guessed: what its weights take in the dtype they
load in, an estimate of what a denoise step and a VAE decode add on top, and the matmul FLOPs of one
transformer call (`transformer_flops`), which benchmarks/gpu.py divides by a measured step time.

Weights: each component is built from its config on the meta device (no memory, no weights read) with the
library that loads it (diffusers' `from_config`, transformers' `T5EncoderModel(T5Config(...))`), and every
parameter and buffer is counted at the dtype it will have after `from_pretrained(dtype=...)`. That
is the spec's dtype except where the library keeps a module in float32: transformers keeps T5's feed-forward
output projections (`wo`, `T5PreTrainedModel._keep_in_fp32_modules`) in float32 when it loads in float16,
so Latte-1's T5-XXL encoder takes ~11.5 GB in fp16, not the ~9.5 GB half its fp32 size would suggest. The
rule is read from the installed transformers (`_get_dtype_plan`), so an upgrade that changes it changes the
figure too.

Activations: an estimate derived from the architecture (docs/performance.md, "GPU memory"), checked against
the measured peak by benchmarks/gpu.py, which prints both:
- a denoise step holds, per transformer row (batch x 2 with classifier-free guidance), frames x tokens x
  hidden values a few times over: the residual stream, the normalized input, q, k and v, the attention output,
  and the feed-forward's 4 x hidden intermediate before and after its GELU (SDPA's fused kernels keep no
  tokens x tokens matrix): ~DENOISE_FACTOR x rows x frames x tokens x hidden values; with model.attention
  'default' (unfused attention) one attention layer also holds its scores and their softmax, two
  heads x tokens x tokens matrices per sequence (UNFUSED_SCORES): the spatial layers' rows x frames sequences
  of `tokens`, or the temporal layers' rows x tokens sequences of `frames`, whichever is larger;
- a VAE decode call turns decode_chunk_size latent frames into frames at full resolution; its largest
  tensors are the last up-blocks' at H x W with the widest channel count there (256 for the SD VAE), a few
  alive at once: ~VAE_FACTOR x chunk x H x W x channels values.
The two do not overlap (decode runs after the last step), so the peak is weights + the larger of the two.

Quantization (`model.quantization`): torchao's `quantize_` turns the weight of every Linear layer of the chosen
components into a tensor of its own (QUANTIZED_LINEAR: one byte per element, plus a scale per output row or
per layer); biases, norms and the rest keep their dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1e9

DENOISE_FACTOR = 14  # residual, norm, q, k, v, attention out (6 x hidden) + feed-forward 4 x hidden in and out (8)
UNFUSED_SCORES = 2  # diffusers' AttnProcessor: baddbmm scores, then their softmax, alive together
VAE_FACTOR = 4  # input, group-norm output, conv output and the skip path of a resnet at full resolution


# What torchao (the pinned release) makes of a Linear weight of (out, in) elements, per model.quantization kind:
# (the data's dtype, bytes per element; float32 bytes per output row, int8 bytes per output row (zero points),
# float32 bytes per layer). int8 kinds: Int8Tensor, int8 data with a float32 scale and an int8 zero point per
# row; float8_weight_only: Float8Tensor, PerRow by default, one float32 scale per row (those three quantized on
# the CPU and counted in tests/test_memory.py); float8_dynamic: Float8Tensor, PerTensor by default
# (torchao/float8/inference.py _normalize_granularity): one float32 scale (needs CUDA >= 8.9 to be made).
QUANTIZED_LINEAR = {
    "int8_weight_only": ("int8", 1, 4, 1, 0),
    "int8_dynamic": ("int8", 1, 4, 1, 0),
    "float8_weight_only": ("float8_e4m3fn", 1, 4, 0, 0),
    "float8_dynamic": ("float8_e4m3fn", 1, 0, 0, 4),
}


def quantized(model_spec, component: str) -> str | None:
    """The quantization kind `component` (transformer, text_encoder) loads with under `model_spec`, or None."""
    q = getattr(model_spec, "quantization", None)
    return q.kind if q is not None and component in q.components else None


@dataclass
class Weights:
    """A component's parameters and buffers at their loaded dtypes."""

    component: str
    params: int
    bytes: int
    by_dtype: dict[str, int] = field(default_factory=dict)  # bytes per dtype name

    @property
    def gb(self) -> float:
        return self.bytes / GB


def _count(component: str, model, default_dtype, keep_fp32, quantization: str | None = None) -> Weights:
    """Sum `model`'s parameters (`keep_fp32(name)` ones in float32, others in default_dtype) and buffers. Buffers
    keep the dtype they are built with: from_pretrained casts what it loads, and the buffers a model makes in its
    __init__ (Latte's sin-cos position embeddings) stay float32 (tests/test_memory.py loads and compares). With
    `quantization` (a model.quantization kind), Linear weights are counted as torchao holds them."""
    import torch

    out = Weights(component, 0, 0)

    def add(dtype_name: str, size: int) -> None:
        out.bytes += size
        out.by_dtype[dtype_name] = out.by_dtype.get(dtype_name, 0) + size

    linear = {f"{name}.weight": m.out_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)} if quantization else {}
    params = {name for name, _ in model.named_parameters()}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        out.params += tensor.numel() if name in params else 0
        if name in linear:
            data, per_element, scale_row, zero_row, per_layer = QUANTIZED_LINEAR[quantization]
            add(data, tensor.numel() * per_element)
            add("float32", linear[name] * scale_row + per_layer)
            if zero_row:
                add("int8", linear[name] * zero_row)
            continue
        dtype = tensor.dtype
        if name in params and tensor.is_floating_point():
            dtype = torch.float32 if keep_fp32(name) else default_dtype
        add(str(dtype).removeprefix("torch."), tensor.numel() * dtype.itemsize)
    return out


def diffusers_weights(component: str, config: dict, dtype, quantization: str | None = None) -> Weights:
    """A diffusers model (`config["_class_name"]`: LatteTransformer3DModel, AutoencoderKL, ...) built with
    `from_config` on the meta device. diffusers keeps a class's `_keep_in_fp32_modules` (Wan's rope, norms,
    time embedder, modulation) in float32 whatever dtype it loads in (`load_model_dict_into_meta`); Latte's
    classes keep none."""
    import diffusers
    import torch

    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(config)
    kept = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    return _count(component, model, dtype, lambda name: bool(kept & set(name.split("."))), quantization)


def t5_encoder_weights(config: dict, dtype, component: str = "text_encoder", quantization: str | None = None
                       ) -> Weights:
    """transformers' T5EncoderModel from its config on the meta device, with the dtype plan its
    `from_pretrained(dtype=...)` applies (`wo` in float32 for float16)."""
    import re

    import torch
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**{k: v for k, v in config.items() if not k.startswith("_")}))
    plan = model._get_dtype_plan(dtype)  # {module name pattern: torch.float32}
    kept = [re.compile(rf"(^|\.){re.escape(p)}(\.|$)") for p, d in plan.items() if d == torch.float32]
    return _count(component, model, dtype, lambda name: any(k.search(name) for k in kept), quantization)


def pipeline_weights(transformer: dict, text_encoder: dict | None, vae: dict, dtype, model_spec=None
                     ) -> list[Weights]:
    """Every weighted component of a LattePipeline from its configs (text_encoder None: not loaded, as in a
    generation actor behind a text-encode stage), quantized as `model_spec` (a ModelSpec) asks."""
    out = [diffusers_weights("transformer", transformer, dtype, quantized(model_spec, "transformer")),
           diffusers_weights("vae", vae, dtype)]
    if text_encoder is not None:
        out.insert(0, t5_encoder_weights(text_encoder, dtype, quantization=quantized(model_spec, "text_encoder")))
    return out


@dataclass
class Activations:
    """Estimated activation bytes of one denoise step and one VAE decode call (see the module docstring)."""

    denoise: int
    vae_decode: int

    @property
    def peak(self) -> int:
        return max(self.denoise, self.vae_decode)


def activations(transformer: dict, vae: dict, sampling, batch_size: int, dtype,
                unfused_attention: bool = False) -> Activations:
    """The estimate for `batch_size` videos at the spec's sampling settings (frames, height, width, guidance,
    decode_chunk_size), from the transformer's and VAE's configs; `unfused_attention`: model.attention
    'default', whose layers hold their score matrices."""
    itemsize = _itemsize(dtype)
    rows = batch_size * (2 if sampling.guidance_scale > 1.0 else 1)
    hidden = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    down = 2 ** (len(vae["block_out_channels"]) - 1)  # the VAE's spatial downsampling: 8 for the SD VAE
    patch = transformer.get("patch_size", 2)
    tokens = (sampling.height // down // patch) * (sampling.width // down // patch)
    denoise = DENOISE_FACTOR * rows * sampling.video_length * tokens * hidden * itemsize
    if unfused_attention:
        frames, heads = sampling.video_length, transformer["num_attention_heads"]
        denoise += UNFUSED_SCORES * rows * heads * max(frames * tokens**2, tokens * frames**2) * itemsize
    # The decoder's blocks run in reversed(block_out_channels); the last two reach full resolution (the one before
    # the last upsamples into it), so the widest tensor there has block_out_channels[1] channels (256 for SD's).
    channels = max(vae["block_out_channels"][:2])
    frames = min(sampling.decode_chunk_size, batch_size * sampling.video_length)
    vae_decode = VAE_FACTOR * frames * sampling.height * sampling.width * channels * itemsize
    return Activations(denoise=denoise, vae_decode=vae_decode)


def transformer_flops(transformer: dict, sampling, rows: int, text_tokens: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one LatteTransformer3DModel call on `rows` latent videos (2 x batch
    with classifier-free guidance) with `text_tokens` text tokens, from its config and the sampling size.

    Per layer, a spatial block runs over each of F frames' N = (H/8/p) x (W/8/p) tokens of width d: self-attention
    (q, k, v, out projections 8Nd^2; scores and weighted sum 4N^2 d), cross-attention to L text tokens (q and out
    4Nd^2, k and v 4Ld^2, scores and sum 4NLd) and the feed-forward (d -> 4d -> d: 16Nd^2); a temporal block runs
    over each of the N token positions' F frames: self-attention (8Fd^2 + 4F^2 d) and feed-forward (16Fd^2).
    Outside the blocks: the patch embedding (a p x p convolution from the latent channels), the caption
    projection (caption_channels -> d -> d, on L tokens), the timestep MLP and the output projection
    (d -> p^2 x out channels). Elementwise work (norms, GELU, softmax, modulation) is not counted: it is
    memory-bound and small next to the matmuls. tests/test_memory.py checks the sum against torch's own
    FlopCounterMode on a real transformer."""
    d = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    p = transformer.get("patch_size") or 2
    down = 8  # the SD VAE's spatial downsampling (LattePipeline: 2 ** (len(block_out_channels) - 1))
    n = (sampling.height // down // p) * (sampling.width // down // p)
    f, text = sampling.video_length, text_tokens
    spatial = f * (28 * n * d * d + 4 * n * n * d + 4 * text * d * d + 4 * n * text * d)
    temporal = n * (24 * f * d * d + 4 * f * f * d)
    blocks = transformer["num_layers"] * (spatial + temporal)
    embed = 2 * f * n * transformer["in_channels"] * p * p * d
    caption = 2 * text * (transformer["caption_channels"] * d + d * d)
    head = 2 * f * n * d * p * p * transformer["out_channels"]
    timestep = 2 * (256 * d + d * d + d * 6 * d)  # sinusoid 256 -> d -> d, then d -> 6d (adaLN-single)
    return rows * (blocks + embed + caption + head + timestep)


def _itemsize(dtype) -> int:
    import torch

    return (dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)).itemsize


@dataclass
class MemoryPlan:
    weights: list[Weights]
    activations: Activations

    @property
    def weights_bytes(self) -> int:
        return sum(w.bytes for w in self.weights)

    @property
    def peak(self) -> int:
        return self.weights_bytes + self.activations.peak

    def line(self) -> str:
        parts = ", ".join(f"{w.component} {w.gb:.2f}" for w in self.weights)
        a = self.activations
        return (f"GPU memory per generation actor (computed from the model's configs): weights "
                f"{self.weights_bytes / GB:.1f} GB ({parts}) + activations ~{a.peak / GB:.1f} GB (estimate: "
                f"denoise step {a.denoise / GB:.1f}, VAE decode {a.vae_decode / GB:.1f}) = ~{self.peak / GB:.1f} GB")


def memory_plan(spec, transformer: dict, text_encoder: dict | None, vae: dict) -> MemoryPlan:
    """Weights and activation estimate of one generation actor of `spec` (its dtype, batch and sampling; T5
    left out when a text-encode stage runs it)."""
    import torch

    dtype = getattr(torch, spec.model.dtype)
    encoder = None if spec.execution.text_encode_stage else text_encoder
    return MemoryPlan(
        weights=pipeline_weights(transformer, encoder, vae, dtype, spec.model),
        activations=activations(transformer, vae, spec.sampling, spec.execution.batch_size, dtype,
                                unfused_attention=spec.model.attention == "default"),
    )


def source_configs(model) -> tuple[dict, dict, dict]:
    """(transformer, text_encoder, vae) configs of a hub id or local folder, read by the libraries' own config
    loaders (what from_pretrained reads first; a hub id honours model.revision and HF_HUB_OFFLINE)."""
    from diffusers import AutoencoderKL, LatteTransformer3DModel
    from transformers import T5Config

    import os

    kwargs = {"revision": model.revision} if model.revision else {}
    source = model.source
    if os.path.isdir(os.path.expanduser(source.removeprefix("file://"))):
        source = os.path.expanduser(source.removeprefix("file://"))
    transformer = LatteTransformer3DModel.load_config(source, subfolder="transformer", **kwargs)
    vae = AutoencoderKL.load_config(source, subfolder="vae", **kwargs)
    text_encoder = T5Config.from_pretrained(source, subfolder="text_encoder", **kwargs).to_dict()
    return dict(transformer), text_encoder, dict(vae)


def dry_run_line(spec) -> str:
    """The dry run's memory line for `spec`'s source (a hub id or a local folder; other sources say why not)."""
    from latte_ray.model.configs import source_kind

    kind = source_kind(spec.model.source)
    if kind not in ("hub", "local"):
        return f"GPU memory: not computed for a {kind} model.source (a hub id or a local folder is read)"
    try:
        transformer, text_encoder, vae = source_configs(spec.model)
        return memory_plan(spec, transformer, text_encoder, vae).line()
    except Exception as e:  # noqa: BLE001 - an estimate; the run's own checks already passed
        return f"GPU memory: not computed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
