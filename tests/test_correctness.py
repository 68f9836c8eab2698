"""Contract 1: a video is a function of (prompt, negative prompt, seed, spec) alone.

Runs the real job (local Ray, tiny model, lossless codec) at batch sizes 1 and 3 over the same prompts and
compares the decoded videos with each other and with diffusers' LattePipeline called for one prompt at a time.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import yaml

from latte_ray import runner
from latte_ray.spec import RunSpec, load_pipeline_spec, parse_pipeline_spec
from latte_ray.stages.encode import decode_mp4
from latte_ray.record.storage import OutputLayout, filesystem, latest_rows, read_manifest
from tests.conftest import write_prompts

PROMPTS = {
    "id": ["short", "long", "neg", "unicode"],
    "prompt": [
        "a dog",
        "A golden retriever running through a field of flowers at sunset, cinematic, high detail, slow motion",
        "waves on a beach",
        "ein Hund läuft 🐕 im Park",
    ],
    "negative_prompt": [None, None, "blurry, low quality", None],
    "seed": [1, 2, 3, 2**40],
}


def lossless_spec(batch_size: int, steps: int = 6):
    raw = yaml.safe_load(load_pipeline_spec("tiny-cpu-lossless").model_dump_json())
    raw["sampling"]["num_inference_steps"] = steps
    raw["execution"]["batch_size"] = batch_size
    return parse_pipeline_spec(raw)


def run_job(tmp_path, name: str, batch_size: int, prompts_path):
    out = tmp_path / name
    spec = RunSpec(pipeline=lossless_spec(batch_size), prompts=[str(prompts_path)], output=str(out))
    summary = runner.run(spec)
    assert summary.ok == len(PROMPTS["id"]) and summary.error == 0, summary.errors
    fs, root = filesystem(str(out))
    rows = latest_rows(read_manifest(fs, OutputLayout(str(out), root)))
    videos = {}
    for row in rows.to_pylist():
        data = fs.cat_file(row["video_uri"])
        assert len(data) == row["bytes"]
        videos[row["id"]] = (decode_mp4(data), row["sha256"])
    return videos, rows


def reference_frames(model_dir: str, spec, prompt: str, negative: str, seed: int) -> np.ndarray:
    from diffusers import LattePipeline

    pipe = LattePipeline.from_pretrained(model_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    s = spec.sampling
    frames = pipe(
        prompt=prompt, negative_prompt=negative, num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale, height=s.height, width=s.width, video_length=s.video_length,
        output_type="np", clean_caption=False, mask_feature=s.mask_feature,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).frames[0]
    return (frames * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("correctness")
    prompts = write_prompts(tmp / "prompts.parquet", PROMPTS)
    return {
        "b1": run_job(tmp, "b1", 1, prompts),
        "b3": run_job(tmp, "b3", 3, prompts),
    }


def test_the_processor_makes_the_bytes_a_run_writes(runs):
    """latte_ray.build_processor over the same prompts, seeds and spec, inside a Ray Data pipeline in this
    session's Ray: every row's mp4 bytes are the bytes the batch-1 run stored, byte for byte; a bad row is an
    error row, and every input row has its output row. This is also the rerun check: a second execution of the
    same rows and spec (other actors, other batching of the rows around them) stores the same bytes."""
    import ray

    import latte_ray

    _, rows = runs["b1"]
    items = [dict(zip(PROMPTS, values)) for values in zip(*PROMPTS.values())]
    items.append({"id": "empty", "prompt": " ", "negative_prompt": None, "seed": 5})
    got = {r["id"]: r for r in latte_ray.build_processor(lossless_spec(1))(ray.data.from_items(items)).take_all()}
    assert set(got) == {*PROMPTS["id"], "empty"}
    assert got["empty"]["status"] == "error" and "prompt is empty" in got["empty"]["error"]
    assert got["empty"]["sha256"] is None
    fs, _ = filesystem(rows["video_uri"][0].as_py())
    for row in rows.to_pylist():
        mine = got[row["id"]]
        assert mine["status"] == "ok" and mine["error"] is None, mine["error"]
        assert mine["video"] == fs.cat_file(row["video_uri"]), f"{row['id']}: other bytes than the run's"
        assert (mine["sha256"], mine["seed"], mine["prompt"]) == (row["sha256"], row["seed"], row["prompt"])
        assert (mine["num_frames"], mine["height"], mine["width"], mine["fps"]) == (
            row["num_frames"], row["height"], row["width"], row["fps"])
        assert mine["generate_seconds"] > 0


def test_batched_videos_match_single_prompt_reference(runs, model_cache):
    from latte_ray.model.tiny import ensure_tiny_model

    spec = lossless_spec(1)
    model_dir = str(ensure_tiny_model(model_cache))
    b1, _ = runs["b1"]
    b3, _ = runs["b3"]
    for i, vid in enumerate(PROMPTS["id"]):
        negative = PROMPTS["negative_prompt"][i] or ""
        ref = reference_frames(model_dir, spec, PROMPTS["prompt"][i], negative, PROMPTS["seed"][i])
        assert ref.std() > 5, "reference video is flat; the comparison would prove nothing"
        for name, videos in (("batch 1", b1), ("batch 3", b3)):
            got = videos[vid][0]
            assert got.shape == ref.shape
            diff = np.abs(got.astype(int) - ref.astype(int)).max()
            assert diff <= 1, f"{vid} at {name} differs from the reference by {diff} levels"


def test_stock_batched_pipeline_would_differ(model_cache):
    """The guard above matters: stock LattePipeline on a batch changes the videos by far more than 1 level."""
    from diffusers import LattePipeline

    from latte_ray.model.tiny import ensure_tiny_model

    spec = lossless_spec(1)
    s = spec.sampling
    pipe = LattePipeline.from_pretrained(str(ensure_tiny_model(model_cache)), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    batched = pipe(
        prompt=PROMPTS["prompt"][:2], num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
        height=s.height, width=s.width, video_length=s.video_length, output_type="np", clean_caption=False,
        generator=[torch.Generator("cpu").manual_seed(x) for x in PROMPTS["seed"][:2]],
    ).frames
    single = reference_frames(str(ensure_tiny_model(model_cache)), spec, PROMPTS["prompt"][0], "", PROMPTS["seed"][0])
    assert np.abs((batched[0] * 255).round().astype(int) - single.astype(int)).max() > 10


def test_manifest_rows_are_complete(runs):
    _, rows = runs["b1"]
    required = ["id", "prompt", "negative_prompt", "seed", "status", "error", "video_uri", "sha256", "bytes",
                "num_frames", "height", "width", "fps", "steps", "guidance_scale", "spec_hash", "model",
                "started_at", "finished_at", "generate_seconds"]
    assert set(required) <= set(rows.column_names)
    for row in rows.to_pylist():
        assert row["status"] == "ok" and row["error"] is None
        assert (row["num_frames"], row["height"], row["width"]) == (16, 128, 128)
        assert row["steps"] == 6 and row["fps"] == 8 and row["model"] == "tiny"
        assert row["finished_at"] >= row["started_at"] and row["generate_seconds"] > 0
        # content-addressed: videos/<shard>/<id>.<first 32 hex chars of the video's sha256>.mp4
        assert row["video_uri"].endswith(f"/{row['id']}.{row['sha256'][:32]}.mp4") and "/videos/" in row["video_uri"]
    neg = [r for r in rows.to_pylist() if r["id"] == "neg"][0]
    assert neg["negative_prompt"] == "blurry, low quality"
