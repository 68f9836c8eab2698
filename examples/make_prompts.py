"""Regenerate examples/prompts.parquet, the demo's prompt table (a handful of prompts, one with its own id)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    ("waves", "Waves crashing on a rocky shore at sunset, cinematic.", None),
    ("dog", "A golden retriever running through a field of flowers.", 7),
    ("city", "A time-lapse of a city skyline from day to night.", None),
    ("astronaut", "An astronaut riding a horse on the moon, high detail.", 42),
    ("fire", "A campfire crackling under a starry sky.", None),
    ("koi", "Koi fish swimming in a clear pond, top-down view.", None),
]

if __name__ == "__main__":
    table = pa.table(
        {
            "id": [p[0] for p in PROMPTS],
            "prompt": [p[1] for p in PROMPTS],
            "seed": pa.array([p[2] for p in PROMPTS], pa.int64()),
        }
    )
    pq.write_table(table, Path(__file__).with_name("prompts.parquet"))
