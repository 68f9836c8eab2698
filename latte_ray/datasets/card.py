"""The dataset card: OUTPUT/dataset/README.md in the Hugging Face card format.

A YAML metadata block (license, task_categories, tags, size_categories, `configs` so that
`datasets.load_dataset(<the dataset folder>)` finds the shards, `dataset_info` sizes, and a `latte_ray` block
with the generator, filters, counts and score summaries for programs), then Markdown for people: what
generated the videos (model, spec and its hash, seed policy, package versions), what a sample holds, the
counts, the filters and their thresholds with what each rejected, the score distributions and what CLIP
scored, and how to load the shards with `datasets` and with `webdataset`.

Everything on the card comes from the output itself (manifest, run record, scoring records, the export's
index), so exporting the same output with the same filters writes the same card.
"""

from __future__ import annotations


import pyarrow as pa
import pyarrow.compute as pc
import yaml

from latte_ray.record.scores import distribution, read_scoring_records
from latte_ray.record.storage import OutputLayout, write_atomic

CARD = "README.md"
DISTRIBUTIONS = ("clip_score", "aesthetic_score", "motion_score", "mean_brightness")


def size_category(n: int) -> str:
    """The Hub's size_categories bucket for n examples."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    return next((label for bound, label in bounds if n < bound), "n>1B")


def read_run_record(fs, layout: OutputLayout) -> dict:
    """What generated the output: the spec, spec hash and seed it is bound to (latte-ray.json), with the
    versions of its latest run (runs/<run_id>.json); {} when it has neither."""
    from latte_ray.record.output import Output, list_runs, read_record

    out = Output(fs, layout)
    record = read_record(out) or {}
    _, runs = list_runs(out, last=1)
    latest = runs[-1] if runs else {}
    if not record and not latest:
        return {}
    return {"pipeline": record.get("pipeline") or latest.get("pipeline") or {},
            "spec_hash": record.get("spec_hash") or latest.get("spec_hash"),
            "seed": record.get("run_seed", latest.get("seed")),
            "versions": latest.get("versions") or {}}


def card_metadata(summary, index: pa.Table, run: dict, scorers: dict[str, dict], name: str,
                  license: str) -> dict:
    exported = index.filter(pc.is_null(index["rejected_reason"]))
    pipeline = run.get("pipeline") or {}
    members = ["mp4", "json"] + (["t5.npy"] if summary.filters.with_embeddings else []) \
        + (["latents.npy"] if summary.filters.with_latents else [])
    spec_hashes = list(summary.spec_hashes) or ([run["spec_hash"]] if run.get("spec_hash") else [])
    return {
        "pretty_name": name,
        "license": license,
        "task_categories": ["text-to-video"],
        "tags": ["synthetic", "video", "webdataset", "latte-ray"],
        "size_categories": [size_category(exported.num_rows)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}],
        "dataset_info": {"splits": [{"name": "train", "num_examples": exported.num_rows,
                                     "num_bytes": int(summary.bytes)}]},
        "latte_ray": {
            "generator": {"pipeline": pipeline.get("name"), "model": (pipeline.get("model") or {}).get("source"),
                          "spec_hash": spec_hashes[0] if len(spec_hashes) == 1 else spec_hashes,
                          "run_seed": run.get("seed")},
            "samples": exported.num_rows,
            "shards": len(summary.shards),
            "members": members,
            "videos_considered": index.num_rows,
            "rejected": summary.rejected,
            "rejected_by_reason": dict(sorted(summary.dropped.items())),
            "filters": summary.filters.active(),
            "scoring_hash": summary.scores.scoring_hash,
            "scoring": scorers.get(summary.scores.scoring_hash) if summary.scores.scoring_hash else None,
            "distributions": {c: distribution(exported[c].to_pylist()) for c in DISTRIBUTIONS},
            "clip_prompt_truncated": int(pc.sum(pc.fill_null(exported["clip_prompt_truncated"], False)).as_py() or 0),
        },
    }


def render_card(meta: dict, run: dict) -> str:
    info = meta["latte_ray"]
    pipeline = run.get("pipeline") or {}
    versions = run.get("versions") or {}
    sampling = pipeline.get("sampling") or {}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {meta['pretty_name']}", "",
             f"Synthetic text-to-video clips generated with latte-ray (batch Latte on Ray Data): {info['samples']} samples in {info['shards']} WebDataset shards.", "",
             "## How it was generated", "",
             "| | |", "|---|---|",
             f"| model | `{info['generator']['model']}` |",
             f"| pipeline spec | `{info['generator']['pipeline']}`, spec hash `{info['generator']['spec_hash']}` |",
             f"| sampling | {sampling.get('num_inference_steps')} steps, guidance {sampling.get('guidance_scale')}, "
             f"{sampling.get('video_length')} frames at {sampling.get('width')}x{sampling.get('height')} |",
             f"| seeds | the prompt table's `seed` column where given, else derived from the id and the run seed "
             f"({info['generator']['run_seed']}); every sample's `json` records its seed |",
             f"| videos | {(pipeline.get('video') or {}).get('codec')}, {(pipeline.get('video') or {}).get('fps')} fps |",
             f"| versions | {', '.join(f'{k} {v}' for k, v in versions.items()) or 'unknown'} |", "",
             "A video is a function of (prompt, negative prompt, seed, pipeline spec) alone; the full spec:", "",
             "```yaml", yaml.safe_dump(pipeline, sort_keys=False).rstrip() if pipeline else "# (no run record)",
             "```", "",
             "## What a sample holds", "",
             "- `mp4`: the video; `json`: id, prompt, negative prompt, seed, size, sha256, spec hash, per-video "
             "stats (`mean_brightness`, `motion_score`, `blank_frames`, `frozen_frames`) and `scores`.",
             ]
    if "t5.npy" in info["members"]:
        lines.append("- `t5.npy`: the prompt's T5 embeddings, float16 `(attention_length, dim)`: the tokens the "
                     "transformer's cross-attention attended to (pad to your length and mask the rest).")
    if "latents.npy" in info["members"]:
        lines.append("- `latents.npy`: the final denoised latents `(channels, frames, height, width)` before VAE "
                     "decode; decode with `vae.decode(latents / vae.config.scaling_factor)` per frame.")
    lines += ["", "## Counts and filters", "",
              f"{info['videos_considered']} generated videos considered, {info['samples']} exported, "
              f"{info['rejected']} rejected. Every rejected video is listed in `index.parquet` with its "
              f"`rejected_reason` (and no shard).", "",
              "| filter | threshold |", "|---|---|",
              *(f"| {k} | {v} |" for k, v in info["filters"].items()),
              *([] if info["filters"] else ["| (none) | |"]), "",
              "| rejected because | videos |", "|---|---|",
              *(f"| {k} | {v} |" for k, v in info["rejected_by_reason"].items()),
              *([] if info["rejected_by_reason"] else ["| (nothing rejected) | 0 |"]), "",
              "## Scores", ""]
    if info["scoring_hash"]:
        scoring = info["scoring"] or {}
        lines += [f"Scored with scoring `{info['scoring_hash']}`: CLIP `{scoring.get('clip_model')}`, aesthetic "
                  f"head `{scoring.get('aesthetic_head')}`, {scoring.get('frames')} evenly spaced frames per video "
                  f"of the stored mp4.",
                  "`clip_score` = mean over those frames of 100 × max(cos(CLIP image embedding, CLIP text "
                  "embedding), 0) (CLIPScore); `aesthetic_score` = mean of the LAION-style head on the "
                  "normalized image embedding. CLIP reads at most 77 tokens (start, 75 prompt tokens, end): a "
                  f"longer prompt is scored on its beginning; {info['clip_prompt_truncated']} exported samples "
                  "had their prompt cut so (`clip_prompt_truncated`).", ""]
    else:
        lines += ["No quality scores (the videos were not scored).", ""]
    lines += ["Distributions over the exported samples:", "",
              "| | count | min | p10 | p25 | median | p75 | p90 | max | mean |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for column, d in info["distributions"].items():
        if d:
            lines.append(f"| {column} | {d['count']} | {d['min']} | {d['p10']} | {d['p25']} | {d['median']} | "
                         f"{d['p75']} | {d['p90']} | {d['max']} | {d['mean']} |")
    lines += ["", "## Loading", "", "With 🤗 datasets (video decoding needs `torchcodec`; without it, read the "
              "bytes and decode with PyAV):", "", "```python",
              "from datasets import Video, load_dataset",
              "",
              'ds = load_dataset("webdataset", data_files={"train": "shards/*.tar"}, split="train")',
              'ds = ds.cast_column("mp4", Video(decode=False))  # {"bytes": ..., "path": ...}',
              'print(ds[0]["json"]["prompt"], ds[0]["json"]["scores"])',
              "```", "", "With webdataset:", "", "```python", "import webdataset as wds", "",
              f'for sample in wds.WebDataset("shards/shard-{{000000..{max(info["shards"] - 1, 0):06d}}}.tar").decode():',
              '    video_bytes, meta = sample["mp4"], sample["json"]',
              "```", "", "`index.parquet` lists every video with its shard, stats and scores (filter on "
              "`rejected_reason IS NULL` for the exported ones).", ""]
    return "\n".join(lines)


def write_card(fs, layout: OutputLayout, dest: str, summary, index: pa.Table, name: str | None = None,
               license: str = "other") -> str:
    run = read_run_record(fs, layout)
    scorers = read_scoring_records(fs, layout)
    name = name or (run.get("pipeline") or {}).get("name") or layout.url.rstrip("/").rsplit("/", 1)[-1]
    meta = card_metadata(summary, index, run, scorers, name, license)
    text = render_card(meta, run)
    path = f"{dest}/{CARD}"
    write_atomic(fs, path, text.encode())
    return path


def read_card_metadata(text: str) -> dict:
    """The YAML block at the top of a card."""
    if not text.startswith("---\n"):
        raise ValueError("a dataset card starts with a '---' YAML block")
    block = text[4:text.index("\n---\n", 4)]
    return yaml.safe_load(block)
