"""The Wan family (latte_ray/model/families/wan.py) under the same contracts as Latte.

Cheap checks first (specs against the published configs in tests/data/wan/, refusals before any model loads,
the engine against diffusers' own WanPipeline.__call__ in this process), then the videos of the Wan variant of
the failures run that test_resume.py's contract tests read for every family (error rows, exactly once, resume;
the lease: test_lease.py, node loss: test_nodes.py): reference equality and byte-identical regeneration.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from latte_ray.cli import app
from latte_ray.model.configs import ModelConfigs, check_model
from latte_ray.model.families import check_supported
from latte_ray.model.families import wan
from latte_ray.spec import SpecError, load_pipeline_spec, parse_pipeline_spec
from latte_ray.stages.encode import decode_mp4, encode_mp4
from tests.conftest import write_prompts
from tests.invariants import assert_made_by, failures_run, manifest, wan_spec

DATA = Path(__file__).parent / "data" / "wan"
WAN_SPECS = ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b"]
PROMPTS = {
    "prompt": ["a red fox runs through snow", "a cat", "waves on a beach at sunset, slow motion"],
    "negative_prompt": [None, "blurry", None],
    "seed": [1, 2, 3],
}


def published(repo: str, rel: str) -> dict | None:
    path = DATA / repo.replace("/", "--") / rel
    return json.loads(path.read_text()) if path.exists() else None


# ----------------------------------------------------------------- specs and published configs


@pytest.mark.parametrize("name", WAN_SPECS)
def test_builtin_wan_specs_agree_with_the_published_configs(name):
    """Each built-in spec is pinned to a full hub commit and passes the Wan family's driver-side checks against
    the published configs we could read (tests/data/wan/SOURCE.md). A repo whose model_index.json is missing is
    checked with the published Wan 2.1 T2V one (same components)."""
    spec = load_pipeline_spec(name)
    repo = spec.model.source
    assert spec.model.family == "wan" and len(spec.model.revision) == 40
    assert (DATA / repo.replace("/", "--")).is_dir(), f"no vendored configs for {repo}"
    index = published(repo, "model_index.json") or published("Wan-AI/Wan2.1-T2V-14B-Diffusers", "model_index.json")
    transformer = published(repo, "transformer/config.json") or published(repo, "transformer_2/config.json")
    text_encoder = (published(repo, "text_encoder/config.json")
                    or published("Wan-AI/Wan2.1-T2V-14B-Diffusers", "text_encoder/config.json"))
    if transformer is None:  # 14B: its transformer config is missing; its published text encoder is checked alone
        assert text_encoder["d_model"] == 4096 and spec.sampling.max_sequence_length == 512
        return
    if name == "wan2.2-t2v-a14b":  # two experts: model_index.json (missing) holds the boundary; the pipeline reads it
        index = {**index, "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": "(model's)"}
        assert spec.sampling.guidance_scale_2 is not None
    configs = ModelConfigs("vendored", index, transformer, text_encoder,
                           extra={"vae": published(repo, "vae/config.json"), "transformer_2": transformer})
    summary = wan.check_configs(spec, configs, f"model.source {repo!r}")
    assert "a WanPipeline" in summary and f"{spec.sampling.video_length} frames" in summary
    check_supported(spec)


def test_published_and_tiny_configs_share_their_structure():
    """The tiny Wan is the published configs scaled down: the same config keys, the published VAE latent
    statistics and scheduler settings as they are."""
    from latte_ray.model import tiny_wan

    repo = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    transformer, vae = published(repo, "transformer/config.json"), published(repo, "vae/config.json")
    assert set(tiny_wan.TRANSFORMER) <= set(transformer) | {"pos_embed_seq_len"}
    assert {k: transformer[k] for k in ("in_channels", "out_channels", "qk_norm", "cross_attn_norm", "eps")} == \
        {k: tiny_wan.TRANSFORMER[k] for k in ("in_channels", "out_channels", "qk_norm", "cross_attn_norm", "eps")}
    assert list(transformer["patch_size"]) == list(tiny_wan.TRANSFORMER["patch_size"])
    assert (vae["latents_mean"], vae["latents_std"], vae["z_dim"]) == \
        (tiny_wan.LATENTS_MEAN, tiny_wan.LATENTS_STD, tiny_wan.VAE["z_dim"])
    assert vae["temperal_downsample"] == tiny_wan.VAE["temperal_downsample"]
    scheduler = published("Wan-AI/Wan2.1-VACE-14B-diffusers", "scheduler/scheduler_config.json")
    assert {k: v for k, v in scheduler.items() if not k.startswith("_")} == tiny_wan.SCHEDULER
    text_encoder = published(repo, "text_encoder/config.json")
    assert text_encoder["model_type"] == "umt5" and text_encoder["feed_forward_proj"] == \
        tiny_wan.TEXT_ENCODER["feed_forward_proj"]


@pytest.mark.parametrize("change, message", [
    ({"model": {"cache": {"kind": "teacache"}}}, "model.cache.kind 'teacache' is not supported for model.family 'wan'"),
    ({"sampling": {"scheduler": "ddim"}}, "sampling.scheduler 'ddim' is not supported for model.family 'wan'"),
    ({"sampling": {"video_length": 16}}, "sampling.video_length 16: a Wan video has 4k + 1 frames"),
    ({"sampling": {"height": 72}}, "sampling.height 72: Wan needs a multiple of 16"),
    ({"model": {"channels_last": True}}, "model.channels_last applies to Latte's 2D VAE"),
    ({"model": {"compile": {"enabled": True, "mode": "reduce-overhead"}}}, "model.compile.mode 'reduce-overhead' replays CUDA graphs"),
    ({"model": {"family": "latte", "lora": [{"source": "x/y"}]}}, "model.lora is not supported for model.family 'latte'"),
    ({"model": {"family": "latte"}, "sampling": {"guidance_scale_2": 3.0}}, "sampling.guidance_scale_2 applies to"),
])
def test_what_a_family_does_not_support_is_refused_in_one_line(change, message):
    raw = yaml.safe_load(load_pipeline_spec("tiny-cpu-wan").model_dump_json())
    for section, values in change.items():
        raw[section].update(values)
    spec = parse_pipeline_spec(raw)
    with pytest.raises(SpecError, match=re.escape(message)) as e:
        check_model(spec)  # the driver's check, before any model loads
    assert "\n" not in str(e.value)


def test_a_wan_spec_on_a_latte_model_is_refused(model_cache):
    raw = yaml.safe_load(load_pipeline_spec("tiny-cpu-wan").model_dump_json())
    raw["model"]["source"] = str(model_cache / "tiny-latte-v1")
    with pytest.raises(SpecError, match="is a LattePipeline .model_index.json., not a WanPipeline"):
        check_model(parse_pipeline_spec(raw))


def test_tiny_model_cli_builds_the_same_wan_every_time(tmp_path):
    digests = []
    for name in ("a", "b"):
        result = CliRunner().invoke(app, ["tiny-model", str(tmp_path / name), "--family", "wan"])
        assert result.exit_code == 0, result.output
        assert "tiny Wan pipeline saved" in result.output
        files = sorted(p for p in (tmp_path / name).rglob("*.safetensors"))
        assert files and not list((tmp_path / name).rglob("*.bin"))
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in files])
    assert digests[0] == digests[1]
    bad = CliRunner().invoke(app, ["tiny-model", str(tmp_path / "c"), "--family", "cogvideox"])
    assert bad.exit_code == 2 and "--family 'cogvideox'" in bad.output


def test_pipelines_lists_every_wan_spec():
    result = CliRunner().invoke(app, ["pipelines"])
    assert result.exit_code == 0
    for name in ["tiny-cpu-wan", *WAN_SPECS]:
        assert f"  {name} " in result.output


# ----------------------------------------------------------------- the engine against diffusers


@pytest.fixture(scope="module")
def engine(model_cache):
    from latte_ray.model.choose import make_engine

    return make_engine(wan_spec(), cache_dir=str(model_cache))  # the failures run's sampling


def reference(pipe, spec, prompt: str, negative: str, seed: int) -> np.ndarray:
    """diffusers' own WanPipeline.__call__ for one prompt, as uint8 frames (F, H, W, 3)."""
    s = spec.sampling
    video = pipe(prompt=prompt, negative_prompt=negative, height=s.height, width=s.width,
                 num_frames=s.video_length, num_inference_steps=s.num_inference_steps,
                 guidance_scale=s.guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
                 output_type="np", max_sequence_length=s.max_sequence_length).frames[0]
    return (video * 255).round().astype(np.uint8)


def test_engine_batch_of_one_is_the_stock_pipeline_and_batch_of_three_within_one_level(engine):
    spec, ids = engine.spec, range(3)
    prompts = [PROMPTS["prompt"][i] for i in ids]
    negatives = [PROMPTS["negative_prompt"][i] or "" for i in ids]
    seeds = [PROMPTS["seed"][i] for i in ids]
    batched, text = engine.generate(prompts, negatives, seeds)
    assert batched.shape == (3, 17, 64, 64, 3) and batched.dtype == np.uint8
    assert engine.last_transformer_calls == [2 * 6] * 3  # 6 steps, two calls each with CFG
    for i in ids:
        alone, _ = engine.generate([prompts[i]], [negatives[i]], [seeds[i]])
        ref = reference(engine.pipe, spec, prompts[i], negatives[i], seeds[i])
        assert np.array_equal(alone[0], ref), f"row {i}: a batch of one differs from WanPipeline.__call__"
        diff = np.abs(batched[i].astype(np.int16) - ref).max()
        assert diff <= 1, f"row {i}: batched video {diff} levels from the reference"
    assert text.tokens[1] < text.tokens[2] and not any(text.truncated)
    assert len({hashlib.sha256(v.tobytes()).hexdigest() for v in batched}) == 3

    # The text-encode stage's path: UMT5 in an actor of its own (no transformer, no VAE), the embeddings through
    # the stage's numpy columns, then the denoiser: the same videos; the latents kept for the sidecars.
    from latte_ray.model.choose import make_engine
    from latte_ray.model.engine import TextBatch

    encoder = make_engine(spec, cache_dir=engine.cache_dir, with_denoiser=False)
    assert encoder.pipe.transformer is None and encoder.pipe.vae is None
    columns = encoder.encode_text(prompts, negatives).to_numpy()
    assert columns["prompt_embeds"].shape == (3, spec.sampling.max_sequence_length, 32)
    assert not columns["prompt_embeds"][1, int(columns["keep"][1]):].any()  # zeros after the prompt's tokens
    capture = {}
    staged = engine.denoise(TextBatch.from_numpy(columns, engine.device, engine.dtype), seeds, capture=capture)
    assert np.array_equal(staged, batched)
    assert capture["latents"].shape == (3, 16, 5, 8, 8)  # 17 frames -> 5 latent frames, 64 px -> 8


# ------------------------------------------------- the videos of a real run (test_resume.py's failures run)
#
# The Wan variant of the failures run (tests/invariants.py failures_run) made its videos on local Ray at batch 1,
# with a worker that died once and had its batch retried; its error rows, exactly once and resume are
# test_resume.py's tests for every family. Here: its videos against diffusers' own pipeline and this process.

CHECKED = ["row-1", "row-2", "die-once"]  # a negative prompt; non-ASCII and a seed of its own; its worker died


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory, ray_local, faults_file):
    run = failures_run("wan", tmp_path_factory, faults_file)
    assert run.spec.execution.batch_size == 1  # each recorded video is a function of its row alone
    assert_made_by(run.out, "wan", run.spec)
    return run


def _videos(out: Path) -> dict[str, tuple[bytes, dict]]:
    rows = [r for r in manifest(out) if r["status"] == "ok"]
    return {r["id"]: (Path(r["video_uri"].removeprefix("file://")).read_bytes(), r) for r in rows}


def test_wan_run_videos_equal_the_stock_pipeline_within_one_level(wan_run, engine):
    videos = _videos(wan_run.out)
    rows = {vid: videos[vid][1] for vid in CHECKED}
    assert (rows["row-1"]["negative_prompt"], rows["row-2"]["prompt"], rows["row-2"]["seed"]) == \
        ("blurry", "ein Hund läuft 🐕 im Park", 2**40)  # what the table held, as the run read it
    for vid, row in rows.items():
        frames = decode_mp4(videos[vid][0])
        ref = reference(engine.pipe, wan_run.spec, row["prompt"], row["negative_prompt"] or "", row["seed"])
        assert frames.shape == ref.shape
        assert np.abs(frames.astype(np.int16) - ref).max() <= 1, vid


def test_wan_regenerated_in_another_process_is_byte_identical(wan_run, engine):
    """The same prompt, seed and spec (batch 1, one torch thread as in a Ray actor), generated in this process
    and encoded: the bytes the run recorded."""
    assert engine.spec.sampling == wan_run.spec.sampling
    videos = _videos(wan_run.out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for vid in ["row-1", "row-2"]:
            row = videos[vid][1]
            frames, _ = engine.generate([row["prompt"]], [row["negative_prompt"] or ""], [row["seed"]])
            data = encode_mp4(frames[0], wan_run.spec.video)
            assert hashlib.sha256(data).hexdigest() == row["sha256"], vid
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------- FLOP and memory figures


def test_flop_model_matches_the_architecture_count_for_the_published_1_3b():
    """torch's FlopCounterMode on the meta-built 1.3B transformer at 81 x 480 x 832 agrees with the count from
    its shapes: 2 x params x tokens for the projections (cross-attention's k and v see the 512 text tokens,
    not the video's), 4 x tokens^2 x width per layer for self-attention, 4 x tokens x 512 x width for
    cross-attention."""
    from latte_ray.model.families.wan_figures import figures

    repo = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    t = published(repo, "transformer/config.json")
    spec = load_pipeline_spec("wan2.1-t2v-1.3b")
    f = figures(spec, t, None, None)  # transformer only (the VAE's and T5's meta passes cost seconds more)
    width, layers, text = t["num_attention_heads"] * t["attention_head_dim"], t["num_layers"], 512
    tokens = ((81 - 1) // 4 + 1) * (480 // 16) * (832 // 16)
    block = width * width * 8 + 2 * width * t["ffn_dim"]  # self q,k,v,o + cross q,k,v,o + feed-forward in/out
    linear = 2 * tokens * block * layers - 2 * 2 * width * width * (tokens - text) * layers
    attention = (4 * tokens * tokens * width + 4 * tokens * text * width) * layers
    assert f.transformer_per_forward == pytest.approx(linear + attention, rel=0.02)
    assert f.forwards_per_video == 50 * 2 and f.transformer == 100 * f.transformer_per_forward
    assert f.vae_decode is None and f.t5 == 0 and f.per_video == f.transformer
    assert "VAE decode n/a (no VAE config)" in f.flops_line()


def test_dry_run_prints_wan_flops_and_estimates_from_sustained_tflops(tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", {"prompt": ["a cat", "a dog"]})
    raw = yaml.safe_load(load_pipeline_spec("tiny-cpu-wan").model_dump_json())
    raw["execution"].update(seconds_per_video=None, sustained_tflops=0.001)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", "--pipeline", str(spec), "--prompts", str(prompts),
                                      "--output", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "compute per video (Wan FLOP model, from the model's configs): " in result.output
    assert "s/video (Wan FLOP model: " in result.output and "at 0.001 TFLOP/s sustained" in result.output
