"""Ray job entrypoint: a backfill, i.e. `latte-ray backfill` with these arguments.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/backfill.py --pipeline pipelines/latte-1-t2v-512.yaml \
            --prompts 's3://BUCKET/prompts/date=*/' --output s3://BUCKET/out

Generates whatever the manifest under --output does not hold yet for every table matched by --prompts
(see `python jobs/backfill.py --help`). infra/kuberay/*backfill.yaml run it nightly.
"""

from _entrypoint import run_cli

if __name__ == "__main__":
    run_cli("backfill")
