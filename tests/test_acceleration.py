"""Speed-ups keep contract 1 and say what they did.

- TeaCache (latte_ray/model/teacache.py): with threshold 0 every step is computed and the video equals the
  uncached one bit for bit; with skipping on, each video decides for itself, so batches of 1, 3 and 4 give
  the same frames; compiled, it runs a fixed set of sub-batch sizes, all compiled at load, none after;
- transformer calls: the manifest records the cache kind, threshold and each video's calls; FasterCache's
  count is checked against the rows that actually reach the transformer;
- quantized weights: int8 weight-only end to end on CPU (a real run), in the spec hash, close to but not
  equal to the unquantized video; float8 fails before any weights are read where it cannot run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from latte_ray import runner
from latte_ray.ops.compare import psnr, ssim
from latte_ray.record.storage import OutputLayout, filesystem, latest_rows, read_manifest
from latte_ray.spec import RunSpec, SpecError, load_pipeline_spec, parse_pipeline_spec
from latte_ray.stages.encode import decode_mp4
from tests.conftest import write_prompts
from tests.test_correctness import PROMPTS

STEPS = 8
IDS = PROMPTS["id"]
NEGATIVES = [n or "" for n in PROMPTS["negative_prompt"]]
# The identity polynomial (raw relative L1 change): the tiny random model's steps change its input by
# 0.1-0.3 each, outside the range Latte-1's published polynomial was fitted on. At 0.4 some videos skip a
# step that others compute (each test below checks that this still happens, so none passes vacuously).
TEACACHE = {"kind": "teacache", "threshold": 0.4, "coefficients": [1.0, 0.0]}


def spec(batch_size: int = 1, **model):
    """tiny-cpu-lossless (decoded frames equal the generated ones) at 64x64 and 8 steps."""
    raw = json.loads(load_pipeline_spec("tiny-cpu-lossless").model_dump_json())
    raw["sampling"].update(num_inference_steps=STEPS, height=64, width=64)
    raw["execution"]["batch_size"] = batch_size
    raw["model"].update(model)
    return parse_pipeline_spec(raw)


def diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def generate(engine, idx: list[int]):
    frames, _ = engine.generate([PROMPTS["prompt"][i] for i in idx], [NEGATIVES[i] for i in idx],
                                [PROMPTS["seed"][i] for i in idx])
    return frames, list(engine.last_transformer_calls)


@pytest.fixture(scope="module")
def uncached(model_cache):
    """Each prompt alone, no cache: frames and calls by id."""
    from latte_ray.model.families.latte_engine import LatteEngine

    engine = LatteEngine(spec(1), cache_dir=str(model_cache))
    out = {}
    for i, vid in enumerate(IDS):
        frames, calls = generate(engine, [i])
        out[vid] = (frames[0], calls[0])
    return out


@pytest.fixture(scope="module")
def teacache_alone(model_cache):
    """Each prompt alone (batch 1), TeaCache on."""
    from latte_ray.model.families.latte_engine import LatteEngine

    engine = LatteEngine(spec(1, cache=TEACACHE), cache_dir=str(model_cache))
    out = {}
    for i, vid in enumerate(IDS):
        frames, calls = generate(engine, [i])
        out[vid] = (frames[0], calls[0])
    return out


# ---------------------------------------------------------------------------------- TeaCache, in process


def test_uncached_video_makes_a_call_per_step_and_cfg_half(uncached):
    assert {calls for _, calls in uncached.values()} == {STEPS * 2}


def test_teacache_threshold_zero_computes_every_step_and_equals_uncached(model_cache):
    from latte_ray.model.families.latte_engine import LatteEngine

    tea = LatteEngine(spec(3, cache={"kind": "teacache", "threshold": 0.0}), cache_dir=str(model_cache))
    plain = LatteEngine(spec(3), cache_dir=str(model_cache))
    got, calls = generate(tea, [0, 1, 2])
    want, _ = generate(plain, [0, 1, 2])
    assert want.std() > 5
    assert calls == [STEPS * 2] * 3
    assert diff(got, want) == 0, "TeaCache with every step computed is not the uncached video"


def test_teacache_skips_per_video_and_is_batch_invariant(model_cache, teacache_alone, uncached):
    from latte_ray.model.families.latte_engine import LatteEngine

    engine = LatteEngine(spec(3, cache=TEACACHE), cache_dir=str(model_cache))
    for idx in ([0, 1, 2], [3, 0, 2]):
        frames, calls = generate(engine, idx)
        assert len(set(calls)) > 1, f"every video of {idx} made the same calls {calls}: no per-video decision"
        for j, i in enumerate(idx):
            alone, alone_calls = teacache_alone[IDS[i]]
            assert calls[j] == alone_calls, f"{IDS[i]}: {calls[j]} calls in a batch, {alone_calls} alone"
            assert diff(frames[j], alone) <= 1, f"{IDS[i]}: TeaCache video depends on its batch"
    runs = engine.teacache.block_runs
    assert any(k < 3 for k, _ in runs), f"no step computed only some videos of a batch: {dict(runs)}"
    for vid, (frames, calls) in teacache_alone.items():
        assert calls < STEPS * 2, f"{vid}: TeaCache skipped nothing"
        assert diff(frames, uncached[vid][0]) > 1, f"{vid}: skipping steps changed nothing"


def test_teacache_compiled_runs_fixed_sizes_warmed_at_load(model_cache, teacache_alone):
    """Batch size 4 compiles the blocks at 1, 2 and 4 videos during warm-up; mixed decisions and a short last
    batch afterwards reuse those graphs (dynamo's own counters), and the videos equal the eager ones."""
    from torch._dynamo.utils import counters

    from latte_ray.model.families.latte_engine import LatteEngine

    counters.clear()
    engine = LatteEngine(spec(4, cache=TEACACHE, compile={"enabled": True, "backend": "eager"}),
                         cache_dir=str(model_cache))
    assert {size for _, size in engine.teacache.block_runs} == {1, 2, 4}
    # dynamo converted each of embed, head and the blocks at 1, 2 and 4 videos once: no recompile (its
    # `recompiles` counter stays empty in this torch; the frame counter counts first compiles and recompiles).
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    assert graphs >= 3 and frames == 2 + 3, dict(counters["frames"])
    engine.teacache.block_runs.clear()
    full, calls = generate(engine, [0, 1, 2, 3])
    short, short_calls = generate(engine, [3, 1, 0])  # padded to 4 videos; the padding never computes
    assert counters["stats"]["unique_graphs"] == graphs, "a batch after warm-up compiled a new graph"
    assert counters["frames"]["total"] == frames, "a batch after warm-up recompiled"
    runs = engine.teacache.block_runs
    assert any(k < size for k, size in runs), f"no sub-batch was padded: {dict(runs)}"
    assert any(size < 4 for _, size in runs), f"no step ran a smaller compiled size: {dict(runs)}"
    for frames, videos_calls, idx in ((full, calls, [0, 1, 2, 3]), (short, short_calls, [3, 1, 0])):
        for j, i in enumerate(idx):
            alone, alone_calls = teacache_alone[IDS[i]]
            assert videos_calls[j] == alone_calls and diff(frames[j], alone) <= 1, IDS[i]


def test_faster_cache_calls_are_the_rows_reaching_the_transformer(model_cache):
    """FasterCache drops the unconditional half at some steps; the engine's count must be what ran."""
    from latte_ray.model.families.latte_engine import LatteEngine

    engine = LatteEngine(spec(1, cache={"kind": "faster_cache"}), cache_dir=str(model_cache))
    frames_per_row = engine.sampling.video_length
    seen = []
    hook = engine.pipe.transformer.pos_embed.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].shape[0] // frames_per_row))
    try:
        _, calls = generate(engine, [0])
    finally:
        hook.remove()
    assert len(seen) == STEPS and calls == [sum(seen)]
    assert sum(seen) < STEPS * 2, f"FasterCache skipped no unconditional half: {seen}"


def test_default_attention_loads_and_matches_sdpa(model_cache, uncached):
    """model.attention 'default' (diffusers' unfused AttnProcessor on every layer of a LatteTransformer3DModel,
    which has no set_attn_processor) loads, really switches every attention layer, and gives each video within
    one uint8 level of the SDPA one (the same math, rounded differently); it is its own spec hash."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from latte_ray.model.families.latte_engine import LatteEngine

    engine = LatteEngine(spec(1, attention="default"), cache_dir=str(model_cache))
    layers = [m for m in engine.transformer.modules() if isinstance(m, Attention)]
    assert layers and {type(m.processor) for m in layers} == {AttnProcessor}
    for i, vid in enumerate(IDS[:3]):
        frames, _ = generate(engine, [i])
        assert diff(frames[0], uncached[vid][0]) <= 1, vid
    assert spec(1, attention="default").spec_hash() != spec(1).spec_hash() == spec(1, attention="sdpa").spec_hash()


def test_wan_default_attention_is_the_math_backend_and_matches_sdpa():
    """Wan's layers dispatch through diffusers' attention backends: 'default' sets '_native_math' on each expert
    (a real WanTransformer3DModel from the tiny Wan config), gives the SDPA output to float rounding, and leaves
    diffusers' process-wide default backend as it was, so an 'sdpa' model built afterwards still runs SDPA."""
    import torch
    from diffusers import WanTransformer3DModel
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from latte_ray.model.families import check_supported
    from latte_ray.model.families.wan_engine import use_math_attention
    from latte_ray.model.tiny_wan import TEXT_DIM, TRANSFORMER

    raw = json.loads(spec(1).model_dump_json())
    raw["model"].update(family="wan", attention="default")
    raw["sampling"].update(video_length=5, height=32, width=32)
    check_supported(parse_pipeline_spec(raw))  # accepted before any model loads

    torch.manual_seed(0)
    sdpa = WanTransformer3DModel.from_config(TRANSFORMER).eval()
    math = WanTransformer3DModel.from_config(TRANSFORMER).eval()
    math.load_state_dict(sdpa.state_dict())
    before = _AttentionBackendRegistry.get_active_backend()[0]
    use_math_attention([math])

    def backends(model):
        return {layer.processor._attention_backend for layer in model.modules() if hasattr(layer, "processor")}

    assert backends(math) == {AttentionBackendName._NATIVE_MATH} and backends(sdpa) == {None}
    assert _AttentionBackendRegistry.get_active_backend()[0] == before
    latents, text = torch.randn(2, 16, 2, 8, 8), torch.randn(2, 7, TEXT_DIM)
    with torch.no_grad():
        want, got = (m(latents, torch.tensor([500, 20]), text, return_dict=False)[0] for m in (sdpa, math))
    assert want.abs().mean() > 0.1 and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


# ---------------------------------------------------------------------------------- real runs: manifest


def run_and_decode(out, pipeline, prompts_path):
    summary = runner.run(RunSpec(pipeline=pipeline, prompts=[str(prompts_path)], output=str(out)))
    assert summary.error == 0 and summary.ok == len(IDS), summary.errors
    fs, root = filesystem(str(out))
    rows = {r["id"]: r for r in latest_rows(read_manifest(fs, OutputLayout(str(out), root))).to_pylist()}
    return rows, {vid: decode_mp4(fs.cat_file(r["video_uri"])) for vid, r in rows.items()}


@pytest.fixture(scope="module")
def prompts_path(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("accel") / "prompts.parquet", PROMPTS)


def test_teacache_run_records_kind_threshold_and_calls(ray_local, tmp_path, prompts_path, teacache_alone):
    pipeline = spec(3, cache=TEACACHE)
    rows, videos = run_and_decode(tmp_path / "out", pipeline, prompts_path)
    for vid, row in rows.items():
        alone, alone_calls = teacache_alone[vid]
        assert (row["cache"], row["cache_threshold"], row["quantization"]) == ("teacache", 0.4, None)
        assert row["transformer_calls"] == alone_calls, vid
        assert row["spec_hash"] == pipeline.spec_hash() != spec(3).spec_hash()
        assert diff(videos[vid], alone) <= 1, f"{vid}: the run's video differs from the video generated alone"


def test_int8_weight_only_end_to_end_on_cpu(ray_local, tmp_path, prompts_path, uncached):
    quantized = spec(2, quantization={"kind": "int8_weight_only", "components": ["transformer", "text_encoder"]})
    assert quantized.spec_hash() != spec(2).spec_hash()
    rows, videos = run_and_decode(tmp_path / "out", quantized, prompts_path)
    worst = min(psnr(videos[vid], uncached[vid][0]) for vid in IDS)
    for vid, row in rows.items():
        assert (row["quantization"], row["cache"], row["cache_threshold"]) == ("int8_weight_only", None, None)
        assert row["transformer_calls"] == STEPS * 2 and row["spec_hash"] == quantized.spec_hash()
        assert diff(videos[vid], uncached[vid][0]) > 1, f"{vid}: int8 weights changed nothing (not applied?)"
    assert worst > 30, f"int8 weight-only video far from the float one: worst PSNR {worst:.1f} dB"


def test_quantize_pipeline_quantizes_the_named_components(model_cache):
    from latte_ray.model.loading import load_pipeline
    from latte_ray.model.quantize import quantize_pipeline

    quantized = spec(1, quantization={"kind": "int8_weight_only"})
    pipe = load_pipeline(quantized.model, str(model_cache))
    done = quantize_pipeline(pipe, quantized.model.quantization)
    assert set(done) == {"transformer"} and done["transformer"] > 0
    assert "Int8" in type(pipe.transformer.proj_out.weight).__name__
    assert type(pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Parameter"


def test_float8_fails_before_any_weights_load(tmp_path, prompts_path, monkeypatch):
    from typer.testing import CliRunner

    from latte_ray.cli import app
    from latte_ray.model.families.latte_engine import LatteEngine
    from latte_ray.model.quantize import QuantizationUnsupported
    from tests.invariants import write_spec

    with pytest.raises(SpecError, match="model.quantization.kind 'float8_dynamic' needs a CUDA GPU"):
        spec(1, quantization={"kind": "float8_dynamic"})
    # device auto resolves to this machine's CPU: the engine refuses before reading the (missing) model.
    on_auto = spec(1, device="auto", source="/no/such/model", quantization={"kind": "float8_weight_only"})
    with pytest.raises(QuantizationUnsupported, match="compute capability >= 8.9.*runs on cpu"):
        LatteEngine(on_auto)
    # A run whose actors would start on this machine is refused before Ray starts or anything is written.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = write_spec(tmp_path / "f8.yaml", spec(1, device="auto", quantization={"kind": "float8_dynamic"}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--pipeline", str(path), "--prompts", str(prompts_path),
                                      "--output", str(out)])
    assert result.exit_code == 2, result.output
    assert "float8_dynamic' needs a CUDA GPU" in result.output and "Traceback" not in result.output
    assert not out.exists()


# ---------------------------------------------------------------------------------- quality-gate metrics


def test_psnr_and_ssim_on_known_cases():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    b = a.astype(int) + 1
    b[b > 255] = 254
    assert psnr(a, b.astype(np.uint8)) == pytest.approx(10 * np.log10(255**2), abs=0.05)
    # Flat frames: SSIM reduces to its luminance term (2*mx*my + C1) / (mx^2 + my^2 + C1).
    c1 = (0.01 * 255) ** 2
    flat = lambda v: np.full((1, 16, 16, 3), v, np.uint8)  # noqa: E731
    assert ssim(flat(100), flat(110)) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1))
    noisy = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(a, noisy) < 0.99 and ssim(a, noisy) == pytest.approx(ssim(noisy, a))
    assert ssim(a, 255 - a) < 0  # inverted structure: negative covariance


def test_quality_gate_compares_candidates_with_the_baseline(model_cache):
    """ops/compare.py end to end on the tiny model: TeaCache at threshold 0 is the baseline (inf dB, no CLIP
    change, every call), int8 weight-only is close but not equal, TeaCache skipping makes fewer calls; the
    CLIP column comes from the scoring stage's own scorer (tiny random CLIP here)."""
    from latte_ray.model.families.latte_engine import LatteEngine
    from latte_ray.ops.compare import Candidate, markdown, run_candidates, summarize
    from latte_ray.spec import ScoringSpec

    zero = dict(TEACACHE, threshold=0.0)
    candidates = [Candidate("baseline", spec(2)), Candidate("teacache:0", spec(2, cache=zero)),
                  Candidate("teacache:0.4", spec(2, cache=TEACACHE)),
                  Candidate("int8", spec(2, quantization={"kind": "int8_weight_only"}))]
    prompts, seeds = list(PROMPTS["prompt"][:4]), list(PROMPTS["seed"][:4])
    run_candidates(candidates, prompts, seeds, cache_dir=str(model_cache), make_engine=LatteEngine)
    rows = {r.name: r for r in summarize(candidates, prompts, ScoringSpec())}
    assert rows["baseline"].psnr_all == float("inf") and rows["baseline"].clip_delta == 0.0
    assert rows["teacache:0"].psnr_all == float("inf") and rows["teacache:0"].calls_ratio == 1.0
    assert rows["teacache:0"].clip_delta == 0.0
    assert rows["teacache:0.4"].calls_ratio > 1.0 and rows["teacache:0.4"].psnr_all < float("inf")
    assert 25 < rows["int8"].psnr_all < float("inf") and rows["int8"].calls_ratio == 1.0
    assert rows["int8"].clip_delta is not None and np.isfinite(rows["int8"].clip_delta)
    assert len({r.spec_hash for r in rows.values()}) == 4
    table = markdown(list(rows.values()))
    assert table.count("\n") == 5 and "inf (equal)" in table
