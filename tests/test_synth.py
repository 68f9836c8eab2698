"""Synthetic datasets (recipe -> prompts -> videos -> WebDataset + Parquet index), per-video stats, reports,
Prometheus metrics and dry runs. One real end-to-end synth run on the tiny model feeds the e2e tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from latte_ray.cli import app
from latte_ray.datasets.export import select_samples
from latte_ray.plan.prompts import prepare_rows
from latte_ray.spec import SpecError, load_pipeline_spec
from latte_ray.stages.encode import EncodeStage, decode_mp4, video_stats
from latte_ray.stages.write import WriteStage
from latte_ray.record.storage import OutputLayout, latest_rows, read_manifest
from latte_ray.datasets.synth import Recipe, expand, load_recipe, synth_id, synthesize
from tests.conftest import REPO, write_prompts

EXAMPLE = REPO / "pipelines" / "synth-example.yaml"


def recipe(**fields) -> Recipe:
    base = {"templates": ["a {animal} in the {place}"],
            "attributes": {"animal": ["cat", "dog"], "place": ["rain", "snow"]}}
    return Recipe.model_validate({**base, **fields})


# ------------------------------------------------------------------ expansion (unit)


def test_example_recipe_expands_to_stable_deduplicated_ids():
    rec, _ = load_recipe(str(EXAMPLE))
    table = expand(rec)
    assert table.num_rows == rec.samples == 6
    assert table.equals(expand(rec)), "the same recipe must expand to the same table"
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len({r["prompt"] for r in rows}) == 6
    templates = {rec.template_name(i): t.text for i, t in enumerate(rec.templates)}
    for r in rows:
        assert r["id"] == synth_id(r["prompt"], rec.negative_prompt, r["variant"])
        assert templates[r["template"]].format(**json.loads(r["attributes"])) == r["prompt"]
        assert r["negative_prompt"] == rec.negative_prompt
    assert {r["template"] for r in rows} == {"t0", "scenery"}
    assert Counter(r["template"] for r in rows)["scenery"] <= 2, "the scenery template has limit: 2"


def test_full_product_limits_dedup_and_variants():
    rec = recipe(templates=[
        "a {animal} in the {place}",
        {"text": "a {animal} in the {place}", "name": "same-text"},  # spells the same prompts: deduplicated
        {"text": "{place} over the {animal}", "limit": 3},
    ])
    table = expand(rec)
    assert table.num_rows == 4 + 3
    assert Counter(table["template"].to_pylist()) == {"t0": 4, "t2": 3}
    # Ids come from the content: another sampling seed gives the same ids for the same prompts.
    full = expand(rec.model_copy(update={"templates": rec.templates[:1], "seed": 99}))
    assert set(full["id"].to_pylist()) == set(table.filter(pc.equal(table["template"], "t0"))["id"].to_pylist())
    twice = expand(rec.model_copy(update={"videos_per_prompt": 2}))
    assert twice.num_rows == 14 and len(set(twice["id"].to_pylist())) == 14
    assert Counter(twice["variant"].to_pylist()) == {0: 7, 1: 7}


def test_sampling_follows_weights_and_never_repeats():
    rec = recipe(templates=["{kind} number {n}"], samples=30, seed=5,
                 attributes={"kind": {"heavy": 50, "light": 1}, "n": [str(i) for i in range(100)]})
    table = expand(rec)
    prompts = table["prompt"].to_pylist()
    assert len(prompts) == len(set(prompts)) == 30
    assert sum(p.startswith("heavy") for p in prompts) >= 24  # ~29 expected; unweighted would give ~15
    small = recipe(samples=50)  # only 4 distinct prompts exist
    assert expand(small).num_rows == 4


@pytest.mark.parametrize("patch, message", [
    ({"templates": ["a {colour} cat"]}, "placeholder {colour} is not an attribute"),
    ({"attributes": {"animal": [], "place": ["x"]}}, "attributes.animal: needs at least one value"),
    ({"attributes": {"animal": {"cat": 0}, "place": ["x"]}}, "weights must be > 0"),
    ({"sample": 3}, "sample: unknown key"),
    ({"templates": [{"text": "a {animal}", "weight": -1}]}, "templates.0.weight"),
])
def test_bad_recipes_fail_naming_the_field(tmp_path, patch, message):
    base = {"templates": ["a {animal} in the {place}"], "attributes": {"animal": ["cat"], "place": ["x"]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({**base, **patch}))
    with pytest.raises(SpecError) as err:
        load_recipe(str(path))
    assert message in str(err.value) and str(path) in str(err.value)


# ------------------------------------------------------------------ per-video stats and export filters (unit)


def test_video_stats_on_blank_frozen_and_moving_frames():
    f, h, w = 8, 32, 32
    blank = np.zeros((f, h, w, 3), np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    frozen = np.repeat(noise[None], f, axis=0)
    ramp = np.tile(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, 1, 3))
    moving = np.stack([np.roll(ramp, 4 * i, axis=1) for i in range(f)])

    s = video_stats(blank)
    assert s == {"mean_brightness": 0.0, "motion_score": 0.0, "blank_frames": f, "frozen_frames": f - 1}
    s = video_stats(frozen)
    assert s["blank_frames"] == 0 and s["frozen_frames"] == f - 1 and s["motion_score"] == 0.0
    assert abs(s["mean_brightness"] - 0.5) < 0.02
    s = video_stats(moving)
    assert s["blank_frames"] == 0 and s["frozen_frames"] == 0 and s["motion_score"] > 0.05
    grey = np.full((f, h, w, 3), 200, np.uint8)
    assert video_stats(grey)["blank_frames"] == f and abs(video_stats(grey)["mean_brightness"] - 200 / 255) < 1e-6
    one = video_stats(moving[:1])
    assert one["motion_score"] == 0.0 and one["frozen_frames"] == 0


def test_export_filters_select_on_stats():
    rows = pa.table({"id": ["a", "b", "c", "d"], "motion_score": [0.0, 0.05, 0.2, None],
                     "blank_frames": [16, 0, 1, 0]})
    kept, dropped = select_samples(rows, min_motion=0.05)
    assert kept["id"].to_pylist() == ["b", "c"] and sum(dropped.values()) == 2
    kept, _ = select_samples(rows, drop_blank=True)
    assert kept["id"].to_pylist() == ["b", "d"]
    kept, _ = select_samples(rows, min_motion=0.01, drop_blank=True)
    assert kept["id"].to_pylist() == ["b"]
    assert select_samples(rows)[0].num_rows == 4


def test_recipe_export_options_are_decided_at_generation_time(tmp_path):
    from latte_ray.datasets.synth import _dataset_spec

    rec = recipe(scoring="tiny-cpu", export={"with_embeddings": True, "min_clip_score": 20})
    spec = _dataset_spec(load_pipeline_spec("tiny-cpu"), rec, str(tmp_path / "r.yaml"), None,
                         rec.export.with_embeddings, rec.export.with_latents)
    assert spec.scoring.enabled and spec.scoring.clip_model == "tiny"
    assert spec.sidecars.embeddings and not spec.sidecars.latents
    assert spec.spec_hash() == load_pipeline_spec("tiny-cpu").spec_hash(), "the videos are the same videos"
    # Filtering on scores that nothing makes is refused before anything is generated or written.
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"templates": ["a {animal}"], "attributes": {"animal": ["cat"]},
                                "export": {"min_clip_score": 20}}))
    with pytest.raises(SpecError, match="filters on scores but nothing scores the videos"):
        synthesize(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ one real synth run


@pytest.fixture(scope="module")
def synth_out(tmp_path_factory, ray_local) -> Path:
    out = tmp_path_factory.mktemp("synth") / "dataset-run"
    summary = synthesize(str(EXAMPLE), str(out))
    assert summary.run.ok == 6 and summary.run.error == 0, summary.run.errors
    assert summary.export.samples == 6 and len(summary.export.shards) == 2  # samples_per_shard: 4
    return out


def test_synth_exports_every_sample_exactly_once(synth_out, ray_local):
    import webdataset as wds

    prompts = pq.read_table(synth_out / "prompts").to_pylist()
    by_id = {p["id"]: p for p in prompts}
    assert len(by_id) == 6

    shards = sorted(str(p) for p in (synth_out / "dataset" / "shards").glob("*.tar"))
    assert [Path(s).name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    seen = Counter()
    for sample in wds.WebDataset(shards, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert sample["__key__"] == meta["id"] and meta["id"] in by_id
        assert meta["prompt"] == by_id[meta["id"]]["prompt"]
        assert meta["attributes"] == json.loads(by_id[meta["id"]]["attributes"])
        assert set(meta["stats"]) == {"mean_brightness", "motion_score", "blank_frames", "frozen_frames"}
        assert decode_mp4(sample["mp4"]).shape == (16, 128, 128, 3)
        seen[meta["id"]] += 1
    assert seen == Counter({i: 1 for i in by_id})

    index = ray_local.data.read_parquet(str(synth_out / "dataset" / "index.parquet")).take_all()
    assert Counter(r["id"] for r in index) == Counter({i: 1 for i in by_id})
    manifest = {r["id"]: r for r in latest_rows(read_manifest(*_fs(synth_out))).to_pylist()}
    for r in index:
        assert r["key"] == r["id"] and (synth_out / "dataset" / r["shard"]).exists()
        assert r["motion_score"] == manifest[r["id"]]["motion_score"] > 0
        assert r["sha256"] == manifest[r["id"]]["sha256"] and r["template"] == by_id[r["id"]]["template"]


def test_synth_resumes_and_export_filters_on_stats(synth_out, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(synth_out, out)
    motion = sorted(r["motion_score"] for r in read_manifest(*_fs(out)).to_pylist())
    threshold = (motion[2] + motion[3]) / 2  # keeps the 3 most moving videos
    result = CliRunner().invoke(app, ["synth", "--recipe", str(EXAMPLE), "--output", str(out),
                                      "--min-motion", str(threshold)])
    assert result.exit_code == 0, result.output
    assert "0 ok, 0 error, 6 already done" in result.output, "re-running a recipe must generate nothing"
    index = pq.read_table(out / "dataset" / "index.parquet")
    kept = index.filter(pc.is_null(index["rejected_reason"]))
    rejected = index.filter(pc.is_valid(index["rejected_reason"]))
    assert index.num_rows == 6, "every video is in the index: rejected ones with their reason, and no shard"
    assert kept.num_rows == 3 and min(kept["motion_score"].to_pylist()) >= threshold
    assert set(rejected["rejected_reason"].to_pylist()) == {f"motion_score < {threshold}"}
    assert rejected["shard"].null_count == 3 and max(rejected["motion_score"].to_pylist()) < threshold
    assert f"rejected 3: 3 motion_score < {threshold}" in result.output
    assert sorted(p.name for p in (out / "dataset" / "shards").iterdir()) == ["shard-000000.tar"]
    # The same output exported with the same filters again: byte-identical shards, index and card.
    dataset = out / "dataset"
    before = {p.relative_to(dataset): p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["export", str(out), "--prompts", str(out / "prompts"), "--min-motion",
                                      str(threshold), "--samples-per-shard", "4", "--name", "synth-example"])
    assert result.exit_code == 0, result.output
    assert {p.relative_to(dataset): p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before

    # Commit an all-black video for one id through the real encode and write stages: its newest ok row wins.
    victim = index["id"][0].as_py()
    spec = load_pipeline_spec("tiny-cpu")
    row = next(r for r in pq.read_table(out / "prompts").to_pylist() if r["id"] == victim)
    batch = {"id": np.array([victim], object), "prompt": np.array([row["prompt"]], object),
             "negative_prompt": np.array([row["negative_prompt"]], object), "seed": np.array([1], np.int64),
             "status": np.array(["generated"], object), "error": np.array([""], object),
             "frames": np.array([bytes(16 * 128 * 128 * 3)], object),
             "num_frames": np.array([16]), "height": np.array([128]), "width": np.array([128])}
    WriteStage(str(out), spec.model_dump_json())(EncodeStage(spec.video.model_dump_json())(batch))

    result = CliRunner().invoke(app, ["synth", "--recipe", str(EXAMPLE), "--output", str(out), "--export-only",
                                      "--drop-blank"])
    assert result.exit_code == 0, result.output
    index = pq.read_table(out / "dataset" / "index.parquet")
    ids = index.filter(pc.is_null(index["rejected_reason"]))["id"].to_pylist()
    assert len(ids) == 5 and victim not in ids
    assert "1 with blank frames" in result.output
    assert index.filter(pc.equal(index["id"], victim))["rejected_reason"].to_pylist() == ["with blank frames"]


def _fs(out: Path):
    from latte_ray.record.storage import filesystem

    fs, root = filesystem(str(out))
    return fs, OutputLayout(url=str(out), root=root)


# ------------------------------------------------------------------ report


def test_report_renders_counts_errors_and_a_contact_sheet(synth_out, tmp_path):
    from PIL import Image

    from latte_ray.ops.report import LABEL, PAD, THUMB, sheet_size

    out = tmp_path / "run"
    shutil.copytree(synth_out, out)
    # A real error row, made by the real prepare and write code: an invalid id is echoed in the message.
    bad = prepare_rows(pa.table({"id": ["<script>alert(1)</script>"], "prompt": ["a cat"]}), "", 0)
    WriteStage(str(out), load_pipeline_spec("tiny-cpu").model_dump_json())(bad)

    dest = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(out), "--dest", str(dest), "--samples", "4"])
    assert result.exit_code == 0, result.output
    assert "6 ok, 1 error of 7 prompts" in result.output

    page = (dest / "index.html").read_text()
    assert "<tr><th>ok</th><td>6</td></tr>" in page and "<tr><th>error</th><td>1</td></tr>" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    gallery = (dest / "gallery.js").read_text()
    assert "<" not in gallery, "no text in the gallery's data can close a script element"
    rows = json.loads(gallery.removeprefix("window.LATTE_GALLERY = ").rstrip().removesuffix(";"))["rows"]
    (error,) = [r for r in rows if r["status"] == "error"]
    assert "<script>alert(1)</script>" in error["error"] and error["src"] is None
    assert len(rows) == 7 and all((dest / r["src"]).is_file() for r in rows if r["status"] == "ok")

    sheet = np.asarray(Image.open(dest / "contact_sheet.png").convert("RGB")).astype(float)
    assert sheet.shape[1::-1] == sheet_size(4) == (PAD + 3 * (THUMB + PAD), PAD + 4 * (LABEL + THUMB + PAD))
    for row in range(4):  # every thumbnail holds a decoded frame, not an empty cell
        for col in range(3):
            y, x = PAD + row * (LABEL + THUMB + PAD) + LABEL, PAD + col * (THUMB + PAD)
            assert sheet[y:y + THUMB, x:x + THUMB].std() > 10
    chart = np.asarray(Image.open(dest / "throughput.png").convert("L")).astype(float)
    assert chart.shape[1] >= 600 and chart.std() > 10


# ------------------------------------------------------------------ metrics


def test_metrics_reach_the_nodes_prometheus_endpoint(synth_out, ray_local):
    from prometheus_client.parser import text_string_to_metric_families

    manifest = read_manifest(*_fs(synth_out)).to_pylist()
    written = sum(r["bytes"] for r in manifest)
    ports = [n["MetricsExportPort"] for n in ray_local.nodes() if n["Alive"]]
    # Exported names: Ray adds the `ray_` prefix, and `_total` to counters.
    want = {("ray_latte_ray_videos_total", "ok"): 6, ("ray_latte_ray_video_bytes_written_total", None): written,
            ("ray_latte_ray_generation_seconds_count", None): 6}
    found: dict = {}
    deadline = time.monotonic() + 90  # workers push to the node's agent, which exports every few seconds
    while time.monotonic() < deadline:
        found = dict.fromkeys(want, 0.0)
        for port in ports:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    key = (s.name, s.labels.get("status"))
                    if key in found and s.labels.get("pipeline") == "tiny-cpu":
                        found[key] += s.value
        if all(found[k] >= v for k, v in want.items()):
            break
        time.sleep(2)  # poll: the export is periodic, not on demand
    for key, at_least in want.items():
        assert found[key] >= at_least, (key, found)


# ------------------------------------------------------------------ dry run


def test_dry_run_counts_and_estimates_without_loading_a_model(synth_out, tmp_path):
    """The output's own spec (an output is bound to one spec) with a production execution section (one GPU
    per actor, the published 14.6 s per video): execution is not part of the spec hash, so the output takes
    it. The run seed is the recipe's (3), as the output records. Another spec (latte-1-t2v-512) is refused
    before anything is counted."""
    import yaml

    from tests.invariants import write_spec

    raw = yaml.safe_load(load_pipeline_spec("tiny-cpu").model_dump_json())
    raw["execution"].update(num_gpus_per_actor=1, seconds_per_video=14.6)
    from latte_ray.spec import parse_pipeline_spec

    spec = write_spec(tmp_path / "gpu-estimate.yaml", parse_pipeline_spec(raw))
    new = write_prompts(tmp_path / "new.parquet", {"prompt": ["a red fox", "a blue whale", "a green owl", ""]})
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    before = sorted(p for p in synth_out.rglob("*"))
    script = (
        "import sys; from typer.testing import CliRunner; from latte_ray.cli import app\n"
        f"r = CliRunner().invoke(app, ['run', '--dry-run', '--pipeline', {str(spec)!r}, '--gpus', '4', '--seed', '3',"
        f" '--prompts', {str(synth_out / 'prompts')!r}, '--prompts', {str(new)!r}, '--output', {str(synth_out)!r}])\n"
        "print(r.output); assert r.exit_code == 0, r.output\n"
        f"r = CliRunner().invoke(app, ['run', '--dry-run', '--pipeline', 'latte-1-t2v-512', '--seed', '3',"
        f" '--prompts', {str(new)!r}, '--output', {str(synth_out)!r}])\n"
        "print('other spec:', r.exit_code, r.output)\n"
        "loaded = [m for m in ('ray', 'torch', 'diffusers', 'latte_ray.model.engine') if m in sys.modules]\n"
        "print('loaded:', loaded)\n"
    )
    env = {**os.environ, "LATTE_RAY_CACHE": str(empty_cache), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "10 rows in 2 files: 3 to generate, 6 already done, 1 invalid" in proc.stdout
    # 3 videos x 14.6 s (the published A100 figure) = 0.01217 GPU-hours; 4 GPUs: one round of 14.6 s.
    assert "3 videos x 14.6 s/video (spec) = 0.01217 GPU-hours; wall time 15 s on 4 GPUs" in proc.stdout
    assert "checked: model.source 'tiny' (the tiny model, v1): a LattePipeline, 16 frames" in proc.stdout
    assert f"other spec: 2 error: output {synth_out} is bound to pipeline spec" in proc.stdout
    assert "loaded: []" in proc.stdout
    assert list(empty_cache.iterdir()) == [], "a model was built or loaded by a dry run"
    assert sorted(p for p in synth_out.rglob("*")) == before, "a dry run wrote to the output"


# ------------------------------------------------------------------ object-store output


def test_export_and_report_on_s3(synth_out, s3_server, tmp_path, monkeypatch):
    """Shards are built locally and uploaded one by one; stale shards of a larger export are removed."""
    import uuid

    import webdataset as wds

    from latte_ray.datasets.export import export_dataset
    from latte_ray.ops.report import write_report
    from latte_ray.record.storage import filesystem

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = s3_server.storage_options()
    url = f"s3://{s3_server.make_bucket('synth-' + uuid.uuid4().hex[:8])}/ds"
    fs, root = filesystem(url, options)
    for sub in ("prompts", "videos"):
        fs.put(str(synth_out / sub), f"{root}/", recursive=True)
    for part in (synth_out / "manifest").glob("*.parquet"):  # as a run on s3:// records them: s3:// video URIs
        table = pq.read_table(part)
        uris = pc.replace_substring(table["video_uri"], str(synth_out), url)
        table = table.set_column(table.schema.get_field_index("video_uri"), "video_uri", uris)
        with fs.open(f"{root}/manifest/{part.name}", "wb") as f:
            pq.write_table(table, f)
    fs.put_file(str(synth_out / "latte-ray.json"), f"{root}/latte-ray.json")
    fs.put(str(synth_out / "runs"), f"{root}/", recursive=True)
    fs.pipe_file(f"{root}/dataset/shards/shard-000009.tar", b"left by an older export")

    summary = export_dataset(url, options, prompts_url=f"{url}/prompts/", samples_per_shard=4)
    assert summary.samples == 6 and summary.shards == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/dataset/shards")) == summary.shards
    local = tmp_path / "shards"
    fs.get(f"{root}/dataset/shards/", str(local), recursive=True)
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in local.rglob("*.tar")), shardshuffle=False)]
    index = pq.read_table(fs.open(f"{root}/dataset/index.parquet", "rb"))
    assert sorted(keys) == sorted(index["key"].to_pylist()) == sorted(pq.read_table(synth_out / "prompts")["id"].to_pylist())

    report = write_report(url, options, samples=2)
    assert report.url == f"{url}/report/index.html" and report.counts["ok"] == 6
    assert fs.size(f"{root}/report/contact_sheet.png") > 1000 and fs.exists(f"{root}/report/throughput.png")
    # The gallery links each object on the storage endpoint (path-style), with no credential in the page.
    def gallery() -> tuple[str, list[dict]]:
        text = fs.cat_file(f"{root}/report/gallery.js").decode()
        return text, json.loads(text.removeprefix("window.LATTE_GALLERY = ").rstrip().removesuffix(";"))["rows"]
    text, rows = gallery()
    assert {r["src"] for r in rows} == {f"{s3_server.endpoint}/{root}/{OutputLayout.key_of(r['uri'])}" for r in rows}
    assert "testing" not in text + fs.cat_file(f"{root}/report/index.html").decode()
    # Presigned on request: each URL serves the video's bytes until it expires; still no secret in the page.
    write_report(url, {**options, "secret": "s3cr3t-never-in-the-page"}, samples=1, presign_seconds=600)
    text, rows = gallery()
    assert "s3cr3t-never-in-the-page" not in text
    for r in rows:  # botocore signs these with SigV2 (an absolute Expires) or SigV4 (X-Amz-Expires seconds)
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(r["src"]).query))
        assert query.get("X-Amz-Expires") == "600" or abs(int(query["Expires"]) - time.time() - 600) < 300, query
    page = fs.cat_file(f"{root}/report/index.html").decode()
    assert "presigned URLs, valid until" in page
    with urllib.request.urlopen(rows[0]["src"], timeout=30) as response:
        assert response.read() == fs.cat_file(OutputLayout(url=url, root=root).video_path(rows[0]["uri"]))


def test_a_large_gallery_holds_a_sample_with_every_kind_of_row():
    """Past max_gallery rows the gallery samples: the latest error rows (at most a quarter of it), the lowest
    and highest by each score, the rest evenly spaced by id; its note says so."""
    from datetime import datetime, timedelta, timezone

    from latte_ray.ops import report

    n, t0 = 400, datetime(2026, 12, 1, tzinfo=timezone.utc)
    status = ["error" if i % 10 == 0 else "ok" for i in range(n)]
    table = pa.table({
        "id": [f"v{i:04d}" for i in range(n)], "status": status,
        "finished_at": [t0 + timedelta(seconds=i) for i in range(n)],
        "clip_score": [None if s == "error" else float((i * 37) % n) for i, s in enumerate(status)],
        "aesthetic_score": [None if s == "error" else float((i * 91) % n) for i, s in enumerate(status)],
    })
    rows, note = report.gallery_rows(table, 200)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 200 and ids == sorted(ids)
    assert note.startswith("a sample of 200 of 400 prompts: the latest 40 error rows")
    assert [r["id"] for r in rows if r["status"] == "error"] == [f"v{i:04d}" for i in range(0, n, 10)]
    ok = table.filter(pc.equal(table["status"], "ok")).to_pylist()
    for column in ("clip_score", "aesthetic_score"):
        ranked = [r["id"] for r in sorted(ok, key=lambda r: (r[column], r["id"]))]
        assert set(ranked[:12] + ranked[-12:]) <= set(ids), column  # 200 // 16 each way
    assert report.gallery_rows(table, n) == (table.sort_by("id").to_pylist(), None)
    from latte_ray.cli import MAX_GALLERY_DEFAULT

    assert MAX_GALLERY_DEFAULT == report.MAX_GALLERY, "`report --max-gallery` defaults to the report's own limit"


def test_shipped_specs_encode_videos_browsers_play():
    """The gallery plays the stored mp4 (H.264 in mp4, 4:2:0, even sizes); the lossless spec's libx264rgb
    does not play, and its report says so."""
    from latte_ray.ops.report import unplayable
    from latte_ray.stages.encode import browser_unplayable

    for name in ("tiny-cpu", "latte-1-t2v-512"):
        spec = load_pipeline_spec(name)
        assert browser_unplayable(spec.video, spec.sampling.height, spec.sampling.width) is None, name
    lossless = load_pipeline_spec("tiny-cpu-lossless")
    assert "libx264rgb is not played" in unplayable({"pipeline": lossless.model_dump(mode="json")})
    assert "odd side" in browser_unplayable(lossless.video.model_copy(update={"codec": "libx264"}), 129, 128)
