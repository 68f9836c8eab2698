"""Ray job entrypoint: one generation run, i.e. `latte-ray run` with these arguments.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/generate.py --pipeline pipelines/latte-1-t2v-512.yaml \
            --prompts s3://BUCKET/prompts/ --output s3://BUCKET/out/latte-1-t2v-512

Options (see `python jobs/generate.py --help`): --pipeline, --prompts (repeatable; required), --output
(required), --storage-option key=value (repeatable), --batch-size, --concurrency N|MIN,MAX, --seed,
--no-resume, --no-retry-errors, --limit, --cache-dir. Inside a Ray job the driver joins the job's cluster.
Submitting the same command again resumes: ids with an ok manifest row are skipped. Keep credentials out
of the arguments (Ray stores the entrypoint in the job's metadata): give nodes an IAM role or AWS_* env.
"""

from _entrypoint import run_cli

if __name__ == "__main__":
    run_cli("run", required=("--prompts", "--output"))
