"""The production path against the real Latte-1: its published configs (tests/data/latte-1/) and a
Latte-1-shaped model (tests/latte1.py) loaded by hub id from a local Hugging Face cache, as a user who has
the model cached runs it.

What CPU forces on the production spec here, and nothing else: `model.device: cpu`; float32 (float16 on CPU
runs, but is emulated: one 2-step video took minutes, not seconds; the tiny model runs both half dtypes in
test_half_dtypes_on_cpu); 32x32 frames instead of 512x512 and 2 steps instead of 50 (the VAE decode of 16
real-width frames dominates); compile off (inductor's C++ compile of the real-width blocks on 2 cores would
cost more than the rest of the file); one actor on CPUs instead of GPUs. 16 frames, batch 2, the pinned
revision, the pinned revision's DDIM (`fixed_small`, beside a transformer that predicts a learned sigma),
Latte-1's tokenizer files and four-shard T5 layout, TeaCache with its published Latte-1 coefficients and the
text-encode stage are as shipped or as a user turns them on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from hubcache import (LATTE_1, LATTE_1_COMMIT, LATTE_1_CONFIGS, LATTE_1_DATA, LATTE_1_DDIM, LATTE_1_LEARNED_RANGE,
                      LATTE_1_SCHEDULERS, latte_1_file, write_hub_cache)
from latte_ray.errors import OutputBindingError
from latte_ray.spec import TEACACHE_LATTE_COEFFICIENTS, SpecError, load_pipeline_spec, parse_pipeline_spec

PROMPT, SEED = "a golden retriever running on a beach at sunset", 7


def production(**sampling) -> dict:
    raw = yaml.safe_load(load_pipeline_spec("latte-1-t2v-512").model_dump_json())
    raw["model"].update(device="cpu", dtype="float32")
    raw["model"]["compile"]["enabled"] = False
    raw["sampling"].update(height=32, width=32, num_inference_steps=2, **sampling)
    raw["execution"].update(concurrency=[1, 1], num_gpus_per_actor=0, num_cpus_per_actor=0.5,
                            cpu_stage_max_actors=1)
    return raw


# ---- the published configs ---------------------------------------------------------------------------------


def test_vendored_configs_are_the_published_files():
    """Sizes the hub shows for the files (SOURCE.md gives each one's source and whether its text is exact or
    rebuilt to that size); the transformer's config has no video_length; at the pin the scheduler is DDIM
    fixed_small beside a transformer with a learned sigma."""
    sizes = {"transformer/config.json": 503, "text_encoder/config.json": 780, "vae/config.json": 627,
             "versions/model_index@2d6e87c667469e2210f58516cb4f47061e214441.json": 423,
             LATTE_1_DDIM: 414, LATTE_1_LEARNED_RANGE: 421,
             LATTE_1_SCHEDULERS["dpm-solver++ (b873980c, first upload)"]: 655,
             "tokenizer/tokenizer_config.json": 20517, "tokenizer/special_tokens_map.json": 2543,
             "tokenizer/added_tokens.json": 2593, "text_encoder/model.safetensors.index.json": 19886}
    source = (LATTE_1_DATA / "SOURCE.md").read_text()
    for rel, size in sizes.items():
        assert len(latte_1_file(rel)) == size, rel
        assert f"`{rel}`" in source, f"{rel} has no source line"
    transformer = json.loads(latte_1_file("transformer/config.json"))
    assert "video_length" not in transformer and transformer["out_channels"] == 2 * transformer["in_channels"]
    scheduler = json.loads(latte_1_file(LATTE_1_DDIM))
    assert (scheduler["_class_name"], scheduler["variance_type"]) == ("DDIMScheduler", "fixed_small")
    index = json.loads(latte_1_file("text_encoder/model.safetensors.index.json"))
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]


def test_latte1_shaped_tokenizer_and_t5_are_in_the_published_layout(latte1_hub):
    """The test model's tokenizer/ is Latte-1's JSON files beside the offline vocabulary's spiece.model, read by
    T5Tokenizer.from_pretrained as the real one is: the same ids as latte-ray's offline tokenizer, the
    <extra_id_N> where the published files put them. Its text_encoder/ is the published index's four shard
    files, every tensor under a name the published index gives, and every shard holds tensors."""
    from safetensors import safe_open
    from transformers import T5Tokenizer

    from latte_ray.model.tiny import build_tiny_tokenizer

    snapshot = latte1_hub / "models--maxin-cn--Latte-1" / "snapshots" / LATTE_1_COMMIT
    files = sorted(p.name for p in (snapshot / "tokenizer").iterdir())
    assert files == ["added_tokens.json", "special_tokens_map.json", "spiece.model", "tokenizer_config.json"]
    for name in files[:2] + files[3:]:
        assert (snapshot / "tokenizer" / name).read_bytes() == latte_1_file(f"tokenizer/{name}")
    loaded = T5Tokenizer.from_pretrained(LATTE_1, subfolder="tokenizer", revision=LATTE_1_COMMIT)
    offline = build_tiny_tokenizer()
    for text in (PROMPT, "waves crashing on rocks", "Zebra's 4K drone shot, ☃ x  y", ""):
        assert loaded(text)["input_ids"] == offline(text)["input_ids"], text
    published = json.loads(latte_1_file("tokenizer/added_tokens.json"))
    assert {t: loaded.convert_tokens_to_ids(t) for t in published} == published
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id, len(loaded)) == (0, 1, 2, 32100)

    ours = json.loads((snapshot / "text_encoder" / "model.safetensors.index.json").read_text())
    theirs = json.loads(latte_1_file("text_encoder/model.safetensors.index.json"))
    assert set(ours["weight_map"]) <= set(theirs["weight_map"]) and list(ours) == list(theirs) == ["metadata", "weight_map"]
    shards = sorted(set(ours["weight_map"].values()))
    assert shards == sorted(set(theirs["weight_map"].values()))
    for shard in shards:
        with safe_open(str(snapshot / "text_encoder" / shard), "pt") as f:
            keys = set(f.keys())
        assert keys and keys == {k for k, v in ours["weight_map"].items() if v == shard}, shard


def test_checks_read_configs_as_diffusers_loads_them():
    """resolve_config gives what diffusers builds from the published file (meta device: no weights): the
    missing video_length becomes the class default, 16."""
    import torch
    from diffusers import LatteTransformer3DModel

    from latte_ray.model.configs import resolve_config

    raw = json.loads(latte_1_file("transformer/config.json"))
    resolved = resolve_config(json.loads(latte_1_file("model_index.json")), "transformer", raw)
    with torch.device("meta"):
        built = LatteTransformer3DModel.from_config(raw)
    assert resolved["video_length"] == built.config.video_length == 16
    assert {k: v for k, v in built.config.items() if not k.startswith("_")} == resolved


def _hub_with(tmp_path: Path, **replace: bytes) -> Path:
    files = {**LATTE_1_CONFIGS, **replace}
    return write_hub_cache(tmp_path / "hub", LATTE_1, files)


def _check(hub: Path, raw: dict) -> tuple[str, dict]:
    """check_model against a hub cache (huggingface_hub's cache folder passed by its env var, as users do)."""
    import huggingface_hub.constants as constants

    from latte_ray.model.configs import check_model

    old = constants.HF_HUB_CACHE
    constants.HF_HUB_CACHE = str(hub)
    try:
        return check_model(parse_pipeline_spec(raw))
    finally:
        constants.HF_HUB_CACHE = old


def test_production_spec_passes_preflight_on_published_configs(tmp_path):
    line, identity = _check(_hub_with(tmp_path), yaml.safe_load(load_pipeline_spec("latte-1-t2v-512").model_dump_json()))
    assert "16 frames, text width 4096" in line and LATTE_1_COMMIT[:12] in line
    assert identity == {"kind": "hub", "source": LATTE_1, "revision": LATTE_1_COMMIT, "commit": LATTE_1_COMMIT}


@pytest.mark.parametrize("rel,change,words", [
    ("transformer/config.json", {"video_length": 24}, ["sampling.video_length is 16", "24-frame"]),
    ("text_encoder/config.json", {"d_model": 2048}, ["text_encoder d_model 2048", "caption_channels 4096"]),
])
def test_a_genuinely_wrong_config_is_still_refused(tmp_path, rel, change, words):
    wrong = json.dumps({**json.loads(latte_1_file(rel)), **change}).encode()
    with pytest.raises(SpecError) as refused:
        _check(_hub_with(tmp_path, **{rel: wrong}), yaml.safe_load(load_pipeline_spec("latte-1-t2v-512").model_dump_json()))
    message = str(refused.value)
    assert "\n" not in message and all(w in message for w in words), message


# ---- the Latte-1-shaped model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(latte1_hub):
    """The production spec's engine on the Latte-1-shaped model, loaded by hub id (offline), batch 1."""
    from latte_ray.model.families.latte_engine import LatteEngine

    raw = production()
    raw["execution"]["batch_size"] = 1
    return LatteEngine(parse_pipeline_spec(raw))


def _scheduler(rel: str, **changes):
    import diffusers

    config = json.loads(latte_1_file(rel))
    return getattr(diffusers, config["_class_name"]).from_config({**config, **changes})


def test_pinned_scheduler_video_is_diffusers_own_pipeline_video(engine):
    """At the pinned revision Latte-1's scheduler is DDIM with variance_type fixed_small while its transformer
    predicts a learned sigma (out 8 = 2 x in 4): the engine takes the noise half, as diffusers' own LattePipeline
    does for fixed_small, and its video is the stock pipeline's on the same folder, prompt and seed (within one
    uint8 level). The engine decides the split from the model, not the scheduler's spelling: the earlier
    published DDIM (learned_range, with which the stock pipeline keeps all 8 channels and fails at the first
    step) gives the same video, and the first upload's DPM-Solver++ runs too."""
    import torch
    from diffusers import LattePipeline

    assert engine.pipe.transformer.config.out_channels == 8 and engine.pipe.transformer.config.video_length == 16
    assert type(engine.pipe.scheduler).__name__ == "DDIMScheduler"
    assert engine.pipe.scheduler.config.variance_type == "fixed_small", "the pinned hub file is what was loaded"
    assert type(engine.pipe.tokenizer).__name__ == "T5Tokenizer" and len(engine.pipe.tokenizer) == 32100
    shipped = engine.generate([PROMPT], [""], [SEED])[0][0]
    assert shipped.shape == (16, 32, 32, 3) and shipped.std() > 5

    s = engine.sampling
    # dtype given, as the engine gives it: transformers 5 would otherwise load T5 in the float16 its published
    # config names (torch_dtype) beside a float32 VAE and transformer.
    stock = LattePipeline.from_pretrained(LATTE_1, revision=LATTE_1_COMMIT, use_safetensors=True, dtype=torch.float32)
    stock.set_progress_bar_config(disable=True)
    assert stock.scheduler.config.variance_type == "fixed_small"
    call = dict(prompt=PROMPT, negative_prompt="", num_inference_steps=s.num_inference_steps, height=s.height,
                width=s.width, guidance_scale=s.guidance_scale, video_length=s.video_length, output_type="np",
                clean_caption=False, mask_feature=s.mask_feature)
    reference = (stock(**call, generator=torch.Generator("cpu").manual_seed(SEED)).frames[0] * 255).round()
    assert np.abs(reference.astype(int) - shipped.astype(int)).max() <= 1
    stock.scheduler = _scheduler(LATTE_1_LEARNED_RANGE)
    with pytest.raises(RuntimeError, match="must match the size"):
        stock(**call, generator=torch.Generator("cpu").manual_seed(SEED))

    videos = {}
    for name, scheduler in (("learned_range", _scheduler(LATTE_1_LEARNED_RANGE)),
                            ("dpm++", _scheduler(LATTE_1_SCHEDULERS["dpm-solver++ (b873980c, first upload)"]))):
        engine.pipe.scheduler = scheduler
        try:
            videos[name] = engine.generate([PROMPT], [""], [SEED])[0][0]
        finally:
            engine.pipe.scheduler = _scheduler(LATTE_1_DDIM)
    assert np.array_equal(videos["learned_range"], shipped), "DDIM's step reads no variance_type"
    assert videos["dpm++"].shape == shipped.shape and np.abs(videos["dpm++"].astype(int) - shipped).max() > 0


def test_production_spec_end_to_end_on_the_latte1_shaped_model(latte1_hub, ray_local, tmp_path):
    """The production spec through the real job: hub id at the pinned commit, 16 frames, batch 2, the text-encode
    stage, TeaCache with the published coefficients; the run record keeps the commit it resolved."""
    from latte_ray import runner
    from latte_ray.record.storage import OutputLayout, filesystem, latest_rows, read_manifest
    from latte_ray.spec import RunSpec
    from latte_ray.stages.encode import decode_mp4
    from tests.conftest import write_prompts

    raw = production()
    raw["model"]["cache"] = {"kind": "teacache"}
    raw["execution"]["text_encode_stage"] = True
    spec = parse_pipeline_spec(raw)
    assert spec.execution.batch_size == 2 and spec.model.cache.coefficients == TEACACHE_LATTE_COEFFICIENTS
    prompts = write_prompts(tmp_path / "prompts.parquet", {"prompt": [PROMPT, "waves crashing on rocks"],
                                                           "seed": [SEED, 8]})
    out = tmp_path / "out"
    summary = runner.run(RunSpec(pipeline=spec, prompts=[str(prompts)], output=str(out)))
    assert (summary.ok, summary.error) == (2, 0), summary.errors
    fs, root = filesystem(str(out))
    rows = latest_rows(read_manifest(fs, OutputLayout(str(out), root))).to_pylist()
    for row in rows:
        frames = decode_mp4(fs.cat_file(row["video_uri"]))
        assert frames.shape == (16, 32, 32, 3) and row["model"] == LATTE_1
    record = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert record["model_identity"]["commit"] == LATTE_1_COMMIT
    assert json.loads((out / "latte-ray.json").read_text())["model_identity"]["commit"] == LATTE_1_COMMIT


def test_a_resume_that_resolves_another_commit_is_refused(tmp_path):
    """An unpinned hub id follows `main`: once the branch moves, the same spec would make other videos into the
    same output. The driver refuses that in one line, before Ray starts."""
    import huggingface_hub.constants as constants

    from latte_ray import runner
    from latte_ray.record import output as outputs
    from latte_ray.spec import RunSpec
    from tests.conftest import write_prompts

    raw = yaml.safe_load(load_pipeline_spec("latte-1-t2v-512").model_dump_json())
    raw["model"]["revision"] = None
    spec = parse_pipeline_spec(raw)
    hub = _hub_with(tmp_path)
    prompts = write_prompts(tmp_path / "prompts.parquet", {"prompt": ["a dog"]})
    run = RunSpec(pipeline=spec, prompts=[str(prompts)], output=str(tmp_path / "out"))
    old = constants.HF_HUB_CACHE
    constants.HF_HUB_CACHE = str(hub)
    try:
        first = runner.preflight(run)
        assert first.model_identity["commit"] == LATTE_1_COMMIT  # main -> the pinned commit, in this cache
        outputs.bind(first.output, spec, run.seed, "test", model_identity=first.model_identity)
        assert runner.preflight(run).model_identity == first.model_identity  # the same commit: fine
        moved = "1" * 40  # main moves on (the same files at a new commit, as a README edit would do)
        write_hub_cache(hub, LATTE_1, LATTE_1_CONFIGS, commit=moved)
        with pytest.raises(OutputBindingError) as refused:
            runner.preflight(run)
    finally:
        constants.HF_HUB_CACHE = old
    message = str(refused.value)
    assert "\n" not in message and LATTE_1_COMMIT in message and moved in message and "model.revision" in message


# ---- production dtypes on CPU (tiny model) ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes_on_cpu(model_cache, dtype):
    """The engine in the production dtypes, so a dtype mismatch between latents, text embeddings (also as they
    come back from the text-encode stage, through numpy), the attention mask and the VAE fails here."""
    import torch

    from latte_ray.model.engine import TextBatch
    from latte_ray.model.families.latte_engine import LatteEngine

    raw = yaml.safe_load(load_pipeline_spec("tiny-cpu").model_dump_json())
    raw["model"]["dtype"] = dtype
    raw["sampling"].update(num_inference_steps=2, height=64, width=64)  # float16 on CPU is emulated: slow
    raw["execution"]["batch_size"] = 2
    engine = LatteEngine(parse_pipeline_spec(raw), cache_dir=str(model_cache))
    assert engine.pipe.transformer.dtype == getattr(torch, dtype) and engine.pipe.vae.dtype == getattr(torch, dtype)
    text = engine.encode_text(["a dog", "a cat on a wall"], ["", "blurry"])
    assert text.embeds.dtype == getattr(torch, dtype)
    direct = engine.denoise(text, [1, 2])
    staged = engine.denoise(TextBatch.from_numpy(text.to_numpy(), engine.device, engine.dtype), [1, 2])
    assert direct.shape == (2, 16, 64, 64, 3) and direct.dtype == np.uint8 and direct.std() > 5
    assert np.abs(direct.astype(int) - staged.astype(int)).max() <= 1


def test_a_model_folder_whose_files_changed_is_refused(tmp_path):
    """A local folder (or s3:// mirror) has no commit: its fingerprint (paths, sizes, ETags, config bytes) is
    recorded instead, and a folder whose files changed under the same path is refused for the old output."""
    from latte_ray import runner
    from latte_ray.record import output as outputs
    from latte_ray.spec import RunSpec
    from tests.conftest import write_prompts

    folder = tmp_path / "latte-1"
    for rel in ("model_index.json", "transformer/config.json", "text_encoder/config.json", "vae/config.json"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(latte_1_file(rel))
    for component in ("transformer", "vae", "text_encoder"):
        (folder / component / "model.safetensors").write_bytes(b"\0" * 8)  # listed, never read by the driver
    raw = yaml.safe_load(load_pipeline_spec("latte-1-t2v-512").model_dump_json())
    raw["model"].update(source=str(folder), revision=None)
    spec = parse_pipeline_spec(raw)
    prompts = write_prompts(tmp_path / "prompts.parquet", {"prompt": ["a dog"]})
    run = RunSpec(pipeline=spec, prompts=[str(prompts)], output=str(tmp_path / "out"))
    first = runner.preflight(run)
    assert first.model_identity["kind"] == "folder" and len(first.model_identity["fingerprint"]) == 32
    outputs.bind(first.output, spec, run.seed, "test", model_identity=first.model_identity)
    (folder / "transformer" / "model.safetensors").write_bytes(b"\0" * 16)  # new weights, same path
    with pytest.raises(OutputBindingError) as refused:
        runner.preflight(run)
    message = str(refused.value)
    assert "\n" not in message and first.model_identity["fingerprint"] in message and "new --output" in message


# ---- CUDA's grid limit in temporal attention ---------------------------------------------------------------


def test_temporal_attention_sequences_are_what_the_transformer_makes():
    """The count the grid check uses is the batch of sequences LatteTransformer3DModel's forward hands its
    temporal blocks: captured from a real (small) model's first temporal attention call."""
    import torch
    from diffusers import LatteTransformer3DModel

    from latte_ray.plan.fit import temporal_attention_sequences

    cfg = {**_public_config("transformer/config.json"), "num_layers": 1, "num_attention_heads": 2,
           "attention_head_dim": 8, "caption_channels": 16, "cross_attention_dim": 16, "sample_size": 8}
    model = LatteTransformer3DModel.from_config(cfg).eval()
    seen = []
    model.temporal_transformer_blocks[0].attn1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    raw = production()
    raw["sampling"].update(height=96, width=64, guidance_scale=7.5)
    sampling = parse_pipeline_spec(raw).sampling
    batch, latent_h, latent_w = 3, 96 // 8, 64 // 8
    with torch.no_grad():
        model(torch.zeros(2 * batch, 4, 16, latent_h, latent_w), encoder_hidden_states=torch.zeros(2 * batch, 3, 16),
              timestep=torch.ones(2 * batch, dtype=torch.long), return_dict=False)
    assert seen == [temporal_attention_sequences(batch, sampling, cfg["patch_size"], 8)] == [2 * 3 * 6 * 4]


def _public_config(rel: str) -> dict:
    return {k: v for k, v in json.loads(latte_1_file(rel)).items() if not k.startswith("_")}


def test_a_batch_past_cudas_grid_is_refused_before_ray_starts(tmp_path):
    """Latte-1 at 512x512 with guidance: 2 x 32 x (512/8/2)^2 = 65,536 sequences at batch 32, one past 65,535.
    The driver's preflight reads the patch and VAE scale from the published configs and refuses it in one
    line naming the largest batch that fits (31); batch 31 passes."""
    import huggingface_hub.constants as constants

    from latte_ray import runner
    from latte_ray.spec import RunSpec
    from tests.conftest import write_prompts

    hub = _hub_with(tmp_path)
    prompts = write_prompts(tmp_path / "prompts.parquet", {"prompt": ["a dog"]})
    old = constants.HF_HUB_CACHE
    constants.HF_HUB_CACHE = str(hub)
    try:
        for batch, refused in ((32, True), (31, False)):
            raw = yaml.safe_load(load_pipeline_spec("latte-1-t2v-512").model_dump_json())
            raw["execution"]["batch_size"] = batch
            run = RunSpec(pipeline=parse_pipeline_spec(raw), prompts=[str(prompts)], output=str(tmp_path / f"out{batch}"))
            if not refused:
                runner.preflight(run)
                continue
            with pytest.raises(SpecError) as error:
                runner.preflight(run)
            message = str(error.value)
            assert "\n" not in message and "65,536" in message and "execution.batch_size: 31" in message, message
            assert not (tmp_path / f"out{batch}").exists() or not any((tmp_path / f"out{batch}").iterdir())
    finally:
        constants.HF_HUB_CACHE = old
