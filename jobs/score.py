"""Ray job entrypoint: score an existing output, i.e. `latte-ray score OUTPUT --scoring SPEC`.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/score.py s3://BUCKET/out/latte-1-t2v-512 --scoring pipelines/latte-1-t2v-512.yaml

Scores the ok videos that have no score from this scorer yet (CLIPScore and aesthetic score) into
OUTPUT/scores/; submitting it again resumes, and scores nothing once every video is scored.
"""

from _entrypoint import run_cli

if __name__ == "__main__":
    run_cli("score", required=("--scoring",))
