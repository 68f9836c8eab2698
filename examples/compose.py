"""latte-ray's processor inside your own Ray Data pipeline.

    prompts made upstream by Ray Data (templates x subjects here; an LLM through ray.data.llm fits the same place)
    -> latte_ray.build_processor(spec): one row per prompt with its mp4 bytes and per-video statistics
    -> a downstream filter on a per-video statistic (motion_score: mean frame-to-frame change, 0-1)
    -> written with Ray Data (Parquet: one row per kept video, its bytes included)

Nothing runs until the write: the processor is lazy, like any Ray Data operation, and runs in this
process's Ray. It takes no output lease and keeps no resume record: what to keep and where is the
pipeline's business (`latte-ray run` is the command that owns an output).

    python examples/compose.py OUTPUT_DIR [--pipeline tiny-cpu] [--min-motion 0.01]
"""

from __future__ import annotations

import argparse

import ray

import latte_ray

SUBJECTS = ["a red fox in the snow", "a lighthouse in a storm", "a paper boat on a river", "a hot air balloon"]
TEMPLATE = "{subject}, at dusk, slow camera pan"
# The share of a CPU each of this pipeline's own tasks asks for (the processor's take the spec's
# execution.num_cpus_per_cpu_task): the generation actors hold their CPUs while the pipeline runs, and on a
# small machine a task asking for a whole CPU could wait behind them for ever.
TASK_CPUS = 0.25
KEPT_COLUMNS = ["id", "prompt", "subject", "seed", "video", "sha256", "num_frames", "height", "width", "fps",
                "motion_score", "generate_seconds"]


def make_prompt(row: dict) -> dict:
    """The upstream step: a prompt per subject (the subject column rides along through the processor)."""
    return {"id": f"compose-{row['n']}", "prompt": TEMPLATE.format(subject=row["subject"]),
            "subject": row["subject"]}


def main(output: str, pipeline="tiny-cpu", min_motion: float = 0.0, subjects: list[str] = SUBJECTS,
         seed: int = 0) -> str:
    """Generate a video per subject, keep those with at least `min_motion` motion, write them to `output`
    (a folder or fsspec URL) as Parquet; returns `output`."""
    prompts = ray.data.from_items([{"n": n, "subject": s} for n, s in enumerate(subjects)])
    prompts = prompts.map(make_prompt, num_cpus=TASK_CPUS)
    processor = latte_ray.build_processor(latte_ray.load_spec(pipeline), seed=seed)
    videos = processor(prompts)
    kept = videos.filter(lambda row: row["status"] == "ok" and row["motion_score"] >= min_motion,
                         num_cpus=TASK_CPUS)
    kept.select_columns(KEPT_COLUMNS).write_parquet(output, ray_remote_args={"num_cpus": TASK_CPUS})
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="where the Parquet files go (a folder or an fsspec URL)")
    parser.add_argument("--pipeline", default="tiny-cpu", help="a built-in spec name or a YAML path")
    parser.add_argument("--min-motion", type=float, default=0.0, help="keep videos with at least this motion_score")
    args = parser.parse_args()
    main(args.output, args.pipeline, args.min_motion)
    print(f"videos written to {args.output}")
