"""Dataset-grade outputs: quality scores (CLIPScore, aesthetic), T5-embedding and latent sidecars, `latte-ray
score`, export filters, training-ready shards loaded with `datasets` and `webdataset`, the dataset card and the
report's score views.

The scorer is checked against transformers' CLIPModel called directly on the same frames and text, with an
independently built head, on the tiny offline CLIP (random weights fixed by a seed, no download). One real run
on the tiny Latte (scoring on, sidecars kept) feeds the end-to-end tests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from latte_ray.cli import app
from latte_ray.model.clip import (AestheticHead, ClipScorer, ScoringSourceError,
                                  ensure_tiny_aesthetic, ensure_tiny_clip, sample_indices)
from latte_ray.record.sidecars import from_npy
from latte_ray.record.storage import OutputLayout, filesystem, read_manifest
from latte_ray.spec import RunSpec, ScoringSpec, SidecarSpec, load_pipeline_spec
from latte_ray.stages.encode import decode_mp4
from tests.conftest import REPO, write_prompts
from tests.invariants import assert_exactly_once, fast_spec

LONG = " ".join(["a small red fox runs through the green forest at sunset"] * 12)  # > 77 CLIP tokens
PROMPTS = {"cat": "a cat walks on the beach at sunset", "car": "a red car drives through the city at night",
           "fox": LONG, "zz": "zzz"}


def weights_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------ specs


def test_scoring_and_sidecars_are_not_in_the_spec_hash():
    spec = load_pipeline_spec("tiny-cpu")
    assert not spec.scoring.enabled and not spec.sidecars.embeddings and not spec.sidecars.latents  # off in tiny-cpu
    other = spec.model_copy(update={
        "scoring": ScoringSpec(enabled=True, clip_model="openai/clip-vit-large-patch14", frames=8, num_gpus=1),
        "sidecars": SidecarSpec(embeddings=True, latents=True)})
    assert other.spec_hash() == spec.spec_hash()
    assert spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"num_inference_steps": 3})}) \
        .spec_hash() != spec.spec_hash()  # the hash still sees what changes pixels
    # The scoring hash sees what changes a score, not placement or batching.
    base = ScoringSpec()
    assert ScoringSpec(batch_size=64, concurrency=(1, 4), num_gpus=1, device="cuda", enabled=True).scoring_hash() \
        == base.scoring_hash()
    for change in ({"frames": 8}, {"clip_model": "x/y"}, {"aesthetic_head": "/h"}, {"dtype": "float16"}):
        assert ScoringSpec(**change).scoring_hash() != base.scoring_hash(), change


def test_run_options_turn_scoring_and_sidecars_on_without_changing_the_videos(tmp_path):
    from latte_ray.cli import build_run_spec

    plain = build_run_spec("tiny-cpu", ["p.parquet"], str(tmp_path), None, None, None, 0, True, True, None, None)
    run = build_run_spec("tiny-cpu", ["p.parquet"], str(tmp_path), None, None, None, 0, True, True, None, None,
                         scoring="tiny-cpu", keep_embeddings=True, keep_latents=False)
    assert run.pipeline.scoring.enabled and run.pipeline.scoring.clip_model == "tiny"
    assert run.pipeline.sidecars == SidecarSpec(embeddings=True, latents=False)
    assert run.pipeline.spec_hash() == plain.pipeline.spec_hash()
    from latte_ray.runner import run_record

    record = run_record(run, [], datetime.now())
    assert record["scoring_hash"] == run.pipeline.scoring.scoring_hash() and record["pipeline"]["scoring"]["enabled"]
    assert run_record(plain, [], datetime.now())["scoring_hash"] is None


# ------------------------------------------------------------------ the tiny CLIP and head


def test_tiny_clip_is_offline_deterministic_and_safetensors_only(tmp_path):
    clip_dir, head_dir = ensure_tiny_clip(tmp_path), ensure_tiny_aesthetic(tmp_path)
    assert ensure_tiny_clip(tmp_path) == clip_dir  # built once, then found
    for folder in (clip_dir, head_dir):
        weights = [p.name for p in folder.rglob("*") if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}]
        assert weights == ["model.safetensors"], weights
    # Another process, another hash seed: the same weights and token ids.
    script = ("import json, hashlib, sys; sys.path.insert(0, %r)\n"
              "from tests.test_scoring import weights_hash, PROMPTS\n"
              "from latte_ray.model.clip import build_tiny_clip, build_tiny_aesthetic\n"
              "m, tok, _ = build_tiny_clip()\n"
              "print(json.dumps({'clip': weights_hash(m), 'head': weights_hash(build_tiny_aesthetic()),"
              " 'ids': [tok(p).input_ids for p in PROMPTS.values()]}))") % str(REPO)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONHASHSEED": "4321"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = json.loads(proc.stdout.strip().splitlines()[-1])
    from transformers import AutoTokenizer, CLIPModel

    loaded = CLIPModel.from_pretrained(clip_dir, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    assert other["clip"] == weights_hash(loaded)
    assert other["head"] == weights_hash(AestheticHead.from_folder(head_dir))
    assert other["ids"] == [tokenizer(p).input_ids for p in PROMPTS.values()]
    assert len(tokenizer(LONG).input_ids) > 77 and len(tokenizer(PROMPTS["cat"]).input_ids) == 10


def _videos() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))
    return [
        rng.integers(0, 256, (4, 48, 64, 3), dtype=np.uint8),  # not square: resize and crop are exercised
        np.stack([np.roll(ramp, 8 * i, axis=1) for i in range(4)]),
        np.stack([np.full((48, 64, 3), (30 * i, 200, 90), np.uint8) for i in range(4)]),
    ]


def _reference_scores(clip_dir: Path, head_dir: Path, videos, prompts) -> tuple[np.ndarray, np.ndarray]:
    """CLIPScore and the aesthetic head, computed with transformers' CLIPModel.forward (its normalized
    image_embeds and text_embeds) and a plain nn.Sequential loaded from the head's safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(clip_dir, use_safetensors=True).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(clip_dir), CLIPImageProcessorPil.from_pretrained(clip_dir)
    config = json.loads((head_dir / "config.json").read_text())
    layers = [torch.nn.Linear(a, b) if kind == "linear" else torch.nn.Dropout(a)
              for kind, a, *rest in config["layers"] for b in (rest or [None])]
    head = torch.nn.Sequential(*layers).eval()
    head.load_state_dict({k.removeprefix("layers."): v for k, v in load_file(head_dir / "model.safetensors").items()})
    clip, aesthetic = [], []
    with torch.no_grad():
        for frames, prompt in zip(videos, prompts):
            text = tokenizer([prompt], truncation=True, max_length=77, return_tensors="pt")
            pixels = processor(images=list(frames), return_tensors="pt")["pixel_values"]
            out = model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels)
            cos = (out.image_embeds @ out.text_embeds.T)[:, 0]
            clip.append(float((100 * cos.clamp(min=0)).mean()))
            aesthetic.append(float(head(out.image_embeds).mean()))
    return np.array(clip), np.array(aesthetic)


def test_scores_match_transformers_clip_called_directly(model_cache):
    scorer = ClipScorer(ScoringSpec(device="cpu"), cache_dir=str(model_cache))
    clip_dir, head_dir = ensure_tiny_clip(model_cache), ensure_tiny_aesthetic(model_cache)
    videos = _videos()
    prompts = [PROMPTS["cat"], PROMPTS["car"], LONG]
    got = scorer.score(videos, prompts)
    clip, aesthetic = _reference_scores(clip_dir, head_dir, videos, prompts)
    np.testing.assert_allclose(got.clip, clip, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.aesthetic, aesthetic, rtol=1e-5, atol=1e-4)
    assert ((got.clip > 0) & (got.clip <= 100)).all()
    assert len(set(np.round(got.clip, 4))) == 3 and len(set(np.round(got.aesthetic, 4))) == 3
    assert got.truncated.tolist() == [False, False, True] and got.tokens[2] > 77
    # Scores depend on the prompt (same video) and on the video (same prompt); a batch scores like singles.
    by_prompt = scorer.score([videos[0]] * 3, prompts).clip
    assert len(set(np.round(by_prompt, 4))) == 3
    by_video = scorer.score(videos, [PROMPTS["cat"]] * 3)
    assert len(set(np.round(by_video.clip, 4))) == 3
    np.testing.assert_allclose(scorer.score(videos[1:2], prompts[1:2]).clip, got.clip[1:2], atol=1e-4)
    # What CLIP scores of a long prompt is its beginning: words past the window change nothing.
    longer = scorer.score([videos[2]], [LONG + " and then a purple whale flies over the moon"])
    np.testing.assert_allclose(longer.clip, got.clip[2:3], atol=1e-6)
    assert sample_indices(16, 4) == [0, 5, 10, 15] and sample_indices(2, 4) == [0, 1]


def test_scoring_sources_fail_clearly(model_cache, tmp_path):
    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text(json.dumps({"input_dim": 32, "layers": [["linear", 32, 1]]}))
    torch.save({"layers.0.weight": torch.zeros(1, 32)}, head / "pytorch_model.bin")
    with pytest.raises(ScoringSourceError, match="safetensors only"):
        ClipScorer(ScoringSpec(device="cpu", aesthetic_head=str(head)), cache_dir=str(model_cache))
    AestheticHead(16, [["linear", 16, 1]]).save_pretrained(head)
    with pytest.raises(ScoringSourceError, match="takes 16-d embeddings"):
        ClipScorer(ScoringSpec(device="cpu", aesthetic_head=str(head)), cache_dir=str(model_cache))
    with pytest.raises(Exception, match="scoring.clip_model './nowhere': no such folder"):
        ClipScorer(ScoringSpec(device="cpu", clip_model="./nowhere"), cache_dir=str(model_cache))


def test_scoring_models_load_through_the_s3_mirror(model_cache, s3_server, tmp_path):
    """The CLIP folder and the head folder on s3://, mirrored once into the node cache: the same scores."""
    options = s3_server.storage_options()
    bucket = s3_server.make_bucket("clip-" + uuid.uuid4().hex[:8])
    fs, _ = filesystem(f"s3://{bucket}", options)
    fs.put(str(ensure_tiny_clip(model_cache)), f"{bucket}/clip", recursive=True)
    fs.put(str(ensure_tiny_aesthetic(model_cache)), f"{bucket}/head", recursive=True)
    node_cache = tmp_path / "node"
    remote = ClipScorer(ScoringSpec(device="cpu", clip_model=f"s3://{bucket}/clip/",
                                    aesthetic_head=f"s3://{bucket}/head/"), str(node_cache), options)
    local = ClipScorer(ScoringSpec(device="cpu"), cache_dir=str(model_cache))
    videos = _videos()[:2]
    np.testing.assert_array_equal(remote.score(videos, ["a cat", "a dog"]).clip, local.score(videos, ["a cat", "a dog"]).clip)
    mirrored = sorted(p.name for p in (node_cache / "models").iterdir() if p.is_dir())
    assert len(mirrored) == 2  # one copy each, nothing pickled
    assert not [p for p in (node_cache / "models").rglob("*") if p.suffix in {".bin", ".pt", ".pth"}]
    assert "testing" not in "".join(p.read_text() for p in (node_cache / "models").rglob(".latte-ray-mirror.json"))


# ------------------------------------------------------------------ a real run with scoring and sidecars


@pytest.fixture(scope="module")
def scored_run(ray_local, tmp_path_factory):
    from latte_ray import runner

    root = tmp_path_factory.mktemp("scored")
    prompts = write_prompts(root / "prompts.parquet", {"id": list(PROMPTS), "prompt": list(PROMPTS.values()),
                                                       "seed": [1, 2, 3, 4]})
    spec = fast_spec().model_copy(update={"scoring": load_pipeline_spec("tiny-cpu").scoring.model_copy(
        update={"enabled": True, "batch_size": 2}), "sidecars": SidecarSpec(embeddings=True, latents=True)})
    out = root / "out"
    summary = runner.run(RunSpec(pipeline=spec, prompts=[str(prompts)], output=str(out)))
    assert summary.ok == 4 and summary.error == 0, summary.errors
    return out, spec


def test_run_scores_every_video_and_keeps_its_embeddings_and_latents(scored_run, model_cache):
    from latte_ray.model.families.latte_engine import LatteEngine

    out, spec = scored_run
    rows = {r["id"]: r for r in assert_exactly_once(out, set(PROMPTS))}
    digest = spec.scoring.scoring_hash()
    (run_record,) = (out / "runs").glob("*.json")  # this run's record
    assert json.loads(run_record.read_text())["scoring_hash"] == digest
    assert json.loads((out / "scores" / "specs" / f"{digest}.json").read_text())["scoring"]["clip_model"] == "tiny"
    assert {r["scoring_hash"] for r in rows.values()} == {digest}
    assert {i for i, r in rows.items() if r["clip_prompt_truncated"]} == {"fox"}
    # The scores are those of the stored mp4's sampled frames (what a dataset user gets).
    scorer = ClipScorer(spec.scoring, cache_dir=str(model_cache))
    frames = [decode_mp4(Path(rows[i]["video_uri"]).read_bytes()) for i in PROMPTS]
    direct = scorer.score([f[sample_indices(len(f), spec.scoring.frames)] for f in frames], list(PROMPTS.values()))
    np.testing.assert_allclose([rows[i]["clip_score"] for i in PROMPTS], direct.clip, atol=1e-4)
    np.testing.assert_allclose([rows[i]["aesthetic_score"] for i in PROMPTS], direct.aesthetic, atol=1e-4)
    assert len({round(r["clip_score"], 4) for r in rows.values()}) == 4

    # Sidecars: content-addressed objects next to the video, named in the manifest row.
    engine = LatteEngine(spec, cache_dir=str(model_cache))
    for video_id in ("cat", "fox"):
        row = rows[video_id]
        for column in ("embeddings_uri", "latents_uri"):
            data = Path(row[column]).read_bytes()
            assert Path(row[column]).parent == Path(row["video_uri"]).parent
            assert hashlib.sha256(data).hexdigest()[:16] in Path(row[column]).name
        embeds = from_npy(Path(row["embeddings_uri"]).read_bytes())
        text = engine.encode_text([row["prompt"]], [row["negative_prompt"]])
        keep = int(text.keep[0])
        assert embeds.dtype == np.float16 and embeds.shape == (keep, text.embeds.shape[2])
        np.testing.assert_array_equal(embeds, text.embeds[0, :keep].to(torch.float16).numpy())
        assert keep == row["prompt_tokens"] and (video_id == "fox") == (keep == spec.sampling.max_sequence_length)
        # The latents are the ones the video was decoded from: decoding them gives the generated frames.
        latents = from_npy(Path(row["latents_uri"]).read_bytes())
        captured: dict = {}
        generated = engine.denoise(text, [row["seed"]], capture=captured)
        assert latents.dtype == np.float32 and latents.shape == tuple(captured["latents"].shape[1:])
        np.testing.assert_allclose(latents, captured["latents"][0].numpy(), atol=1e-4)
        with torch.no_grad():
            video = engine.pipe.decode_latents(torch.from_numpy(latents)[None], spec.sampling.video_length,
                                               decode_chunk_size=spec.sampling.decode_chunk_size)
            video = engine.pipe.video_processor.postprocess_video(video=video, output_type="pt")
        decoded = (video * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
        assert np.abs(decoded.astype(int) - generated.astype(int)).max() <= 1


def _null_scores(out: Path) -> None:
    """Test setup: an output generated without scoring (the same videos, score columns null)."""
    for part in (out / "manifest").glob("*.parquet"):
        table = pq.read_table(part)
        for column in ("clip_score", "aesthetic_score", "clip_prompt_truncated", "scoring_hash"):
            index = table.schema.get_field_index(column)
            table = table.set_column(index, table.schema.field(column), pa.nulls(table.num_rows, table.schema.field(column).type))
        pq.write_table(table, part)
    shutil.rmtree(out / "scores")


def test_score_command_fills_unscored_videos_and_resumes(scored_run, tmp_path):
    src, spec = scored_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    _null_scores(out)
    manifest_before = {p.name: p.read_bytes() for p in (out / "manifest").glob("*.parquet")}

    result = CliRunner().invoke(app, ["score", str(out), "--scoring", "tiny-cpu", "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert "3 scored, 0 failed of 3 videos" in result.output
    result = CliRunner().invoke(app, ["score", str(out), "--scoring", "tiny-cpu"])
    assert result.exit_code == 0, result.output
    assert "1 scored, 0 failed of 1 videos" in result.output, "a second run scores only what is left"
    parts = sorted((out / "scores").glob("part-*.parquet"))
    result = CliRunner().invoke(app, ["score", str(out), "--scoring", "tiny-cpu"])
    assert result.exit_code == 0 and "nothing to do" in result.output, result.output
    assert sorted((out / "scores").glob("part-*.parquet")) == parts
    assert {p.name: p.read_bytes() for p in (out / "manifest").glob("*.parquet")} == manifest_before, \
        "the manifest (the commit record) is never rewritten"

    scores = pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist()
    assert sorted(r["id"] for r in scores) == sorted(PROMPTS) and not any(r["error"] for r in scores)
    original = {r["id"]: r for r in read_manifest(*_fs(src)).to_pylist()}
    for r in scores:  # the same videos give the same scores, in a run or afterwards
        assert r["sha256"] == original[r["id"]]["sha256"] and r["scoring_hash"] == spec.scoring.scoring_hash()
        assert r["clip_score"] == pytest.approx(original[r["id"]]["clip_score"], abs=1e-4)
        assert r["aesthetic_score"] == pytest.approx(original[r["id"]]["aesthetic_score"], abs=1e-4)
        assert r["clip_prompt_truncated"] == original[r["id"]]["clip_prompt_truncated"]
    status = CliRunner().invoke(app, ["status", str(out)])
    assert f"scores: 4 of 4 ok videos scored (scoring {spec.scoring.scoring_hash()})" in status.output

    bad = CliRunner().invoke(app, ["score", str(tmp_path / "nothing-here"), "--scoring", "tiny-cpu"])
    assert bad.exit_code == 2 and "not a latte-ray output" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "nothing-here").exists()
    (tmp_path / "scoring.yaml").write_text("clip_model: ./no-such-clip\nframes: 2\n")
    bad = CliRunner().invoke(app, ["score", str(out), "--scoring", str(tmp_path / "scoring.yaml")])
    assert bad.exit_code == 2 and "scoring.clip_model './no-such-clip'" in bad.output, bad.output
    (tmp_path / "scoring.yaml").write_text("frames: 0\n")
    bad = CliRunner().invoke(app, ["score", str(out), "--scoring", str(tmp_path / "scoring.yaml")])
    assert bad.exit_code == 2 and "frames" in bad.output and "Traceback" not in bad.output, bad.output


def _fs(out: Path):
    fs, root = filesystem(str(out))
    return fs, OutputLayout(url=str(out), root=root)


# ------------------------------------------------------------------ export: filters, shards, loading, card


def test_export_filters_packs_sidecars_loads_both_ways_and_documents_itself(scored_run, tmp_path):
    import datasets
    import webdataset as wds
    import yaml

    from latte_ray.datasets.card import read_card_metadata

    src, spec = scored_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    rows = {r["id"]: r for r in read_manifest(*_fs(out)).to_pylist()}
    clip = sorted(r["clip_score"] for r in rows.values())
    threshold = round((clip[0] + clip[1]) / 2, 3)  # rejects exactly the lowest
    lowest = min(rows, key=lambda i: rows[i]["clip_score"])
    args = ["export", str(out), "--min-clip-score", str(threshold), "--min-aesthetic", "-1000",
            "--with-embeddings", "--with-latents", "--samples-per-shard", "2", "--name", "tiny-scored"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "export: 3 samples in 2 shards" in result.output and f"rejected 1: 1 clip_score < {threshold}" in result.output

    dataset = out / "dataset"
    index = pq.read_table(dataset / "index.parquet").to_pylist()
    assert len(index) == 4, "every video is in the index, rejected ones with their reason"
    rejected = [r for r in index if r["rejected_reason"]]
    assert [(r["id"], r["rejected_reason"], r["shard"]) for r in rejected] == [(lowest, f"clip_score < {threshold}", None)]

    shards = sorted(str(p) for p in (dataset / "shards").glob("*.tar"))
    samples = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False).decode()}
    assert set(samples) == set(PROMPTS) - {lowest}
    for key, sample in samples.items():
        row = rows[key]
        assert sample["json"]["scores"]["clip_score"] == row["clip_score"] >= threshold
        np.testing.assert_array_equal(sample["t5.npy"], from_npy(Path(row["embeddings_uri"]).read_bytes()))
        np.testing.assert_array_equal(sample["latents.npy"], from_npy(Path(row["latents_uri"]).read_bytes()))
        assert sample["json"]["t5"]["attention_length"] == sample["t5.npy"].shape[0] == row["prompt_tokens"]
        assert hashlib.sha256(sample["mp4"]).hexdigest() == row["sha256"]

    ds = datasets.load_dataset("webdataset", data_files={"train": str(dataset / "shards" / "*.tar")}, split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    ds = ds.cast_column("mp4", datasets.Video(decode=False))
    assert ds.num_rows == 3 and {"mp4", "json", "t5.npy", "latents.npy"} <= set(ds.column_names)
    for item in ds:
        key = item["__key__"]
        assert item["json"]["id"] == key and item["json"]["prompt"] == rows[key]["prompt"]
        np.testing.assert_array_equal(np.asarray(item["t5.npy"], np.float16), samples[key]["t5.npy"])
        assert np.asarray(item["latents.npy"]).shape == samples[key]["latents.npy"].shape
        assert hashlib.sha256(item["mp4"]["bytes"]).hexdigest() == rows[key]["sha256"]

    card = (dataset / "README.md").read_text()
    meta = read_card_metadata(card)
    assert meta["pretty_name"] == "tiny-scored" and meta["task_categories"] == ["text-to-video"]
    assert meta["configs"][0]["data_files"][0]["path"] == "shards/*.tar" and meta["size_categories"] == ["n<1K"]
    assert meta["dataset_info"]["splits"][0]["num_examples"] == 3
    info = meta["latte_ray"]
    assert info["generator"]["spec_hash"] == spec.spec_hash() and info["generator"]["model"] == "tiny"
    assert info["filters"] == {"min_clip_score": threshold, "min_aesthetic": -1000.0, "with_embeddings": True,
                               "with_latents": True}
    assert info["rejected_by_reason"] == {f"clip_score < {threshold}": 1} and info["scoring_hash"] == spec.scoring.scoring_hash()
    kept = [rows[i]["clip_score"] for i in samples]
    assert info["distributions"]["clip_score"]["min"] == pytest.approx(min(kept), abs=1e-4)
    assert info["distributions"]["clip_score"]["max"] == pytest.approx(max(kept), abs=1e-4)
    assert info["clip_prompt_truncated"] == (0 if lowest == "fox" else 1)
    assert 'load_dataset("webdataset"' in card and "wds.WebDataset" in card
    assert yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])["name"] == spec.name

    # Re-exporting the same output with the same filters gives byte-identical shards, index and card.
    before = {p.relative_to(dataset): p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    assert CliRunner().invoke(app, args).exit_code == 0
    after = {p.relative_to(dataset): p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    assert after == before


def test_export_refuses_sidecars_no_video_has_and_filters_unscored_videos_out(scored_run, tmp_path):
    src, _ = scored_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    _null_scores(out)
    for part in (out / "manifest").glob("*.parquet"):  # as if generated without sidecars
        table = pq.read_table(part)
        for column in ("embeddings_uri", "latents_uri"):
            index = table.schema.get_field_index(column)
            table = table.set_column(index, table.schema.field(column), pa.nulls(table.num_rows, pa.string()))
        pq.write_table(table, part)
    result = CliRunner().invoke(app, ["export", str(out), "--with-latents"])
    assert result.exit_code == 2 and "sidecars.latents: true" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["export", str(out), "--min-clip-score", "1"])
    assert result.exit_code == 0, result.output
    assert "export: 0 samples" in result.output and "rejected 4: 4 no clip_score" in result.output
    index = pq.read_table(out / "dataset" / "index.parquet").to_pylist()
    assert sorted(r["id"] for r in index) == sorted(PROMPTS) and {r["rejected_reason"] for r in index} == {"no clip_score"}


# ------------------------------------------------------------------ report


def test_report_shows_score_distributions_and_extremes(scored_run, tmp_path):
    from PIL import Image

    from latte_ray.ops.report import sheet_size

    src, _ = scored_run
    rows = {r["id"]: r for r in read_manifest(*_fs(src)).to_pylist()}
    dest = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(src), "--dest", str(dest), "--samples", "2", "--extremes", "1"])
    assert result.exit_code == 0, result.output
    page = (dest / "index.html").read_text()
    assert "<table id='scores'>" in page and "scores.png" in page
    for column in ("clip_score", "aesthetic_score"):
        lo = min(rows, key=lambda i: rows[i][column])
        hi = max(rows, key=lambda i: rows[i][column])
        assert f"the lowest {column} (1)" in page and f"the highest {column} (1)" in page
        values = [rows[i][column] for i in rows]
        assert f"<td>{round(min(values), 4)}</td>" in page and f"<td>{round(max(values), 4)}</td>" in page
        assert lo != hi
    sheet = Image.open(dest / "contact_sheet.png")
    assert sheet.size == sheet_size(2 + 4, headings=4)  # 2 evenly spaced, 4 extremes under 4 headings
    assert np.asarray(Image.open(dest / "scores.png").convert("L")).std() > 10


# ------------------------------------------------------------------ the gallery, in a real browser

CHROMIUM = "/usr/bin/chromium"  # Debian's chromium package (the Makefile's test target installs it)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_report_gallery_in_chromium_plays_sorts_and_shows_errors(scored_run, tmp_path):
    """The report of a real scored run, plus a real error row (made by the real prepare and write code), opened
    from its folder in headless Chromium (one browser session): a card's <video> loads the stored mp4 by its
    relative path and reports the duration frames/fps; sorting by CLIP score puts the cards in score order;
    the status filter shows the error row with its message. The screenshot stays in the test's temp folder."""
    from playwright.sync_api import sync_playwright

    from latte_ray.plan.prompts import prepare_rows
    from latte_ray.record.storage import latest_rows
    from latte_ray.stages.write import WriteStage

    src, spec = scored_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    WriteStage(str(out), spec.model_dump_json())(prepare_rows(pa.table({"id": ["bad id!"], "prompt": ["x"]}), "", 0))
    rows = {r["id"]: r for r in latest_rows(read_manifest(*_fs(out))).to_pylist()}
    (bad,) = [i for i, r in rows.items() if r["status"] == "error"]
    assert len(rows) == 5 and "'bad id!' is invalid" in rows[bad]["error"]
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert f"open {out}/report/index.html" in result.output

    ok_ids = [i for i, r in rows.items() if r["status"] == "ok"]
    by_clip = sorted(ok_ids, key=lambda i: -rows[i]["clip_score"])
    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto((out / "report" / "index.html").as_uri())
            cards = lambda: page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")  # noqa: E731
            assert cards() == sorted(rows), "the gallery opens sorted by id, every prompt on it"
            assert page.evaluate("""() => document.createElement('video')
                                     .canPlayType('video/mp4; codecs="avc1.64000a"')""") == "probably"
            page.wait_for_function("() => [...document.querySelectorAll('video')].every(v => v.readyState >= 1)",
                                   timeout=30_000)
            videos = page.eval_on_selector_all("video", """vs => vs.map(v => ({id: v.closest('.card').dataset.id,
                src: v.getAttribute('src'), duration: v.duration, width: v.videoWidth, error: v.error && v.error.code}))""")
            assert sorted(v["id"] for v in videos) == sorted(ok_ids), "one playable video per ok row, none for errors"
            for v in videos:
                assert v["error"] is None and v["width"] == spec.sampling.width
                assert v["duration"] == pytest.approx(spec.sampling.video_length / spec.video.fps, abs=0.5 / spec.video.fps)
                assert (out / "report" / v["src"]).resolve() == Path(rows[v["id"]]["video_uri"].replace(str(src), str(out))).resolve()

            page.select_option("#sort", "clip-desc")
            assert cards()[:len(by_clip)] == by_clip and cards()[-1] == bad, "unscored rows sort last"
            page.select_option("#sort", "clip-asc")
            assert cards()[:len(by_clip)] == by_clip[::-1]
            page.select_option("#status", "error")
            assert cards() == [bad]
            assert page.text_content(".card.error .message") == rows[bad]["error"]
            page.select_option("#status", "all")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
