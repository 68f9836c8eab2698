"""Ray job entrypoint: build a synthetic video dataset, i.e. `latte-ray synth` with these arguments.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/synth_dataset.py --recipe RECIPE --output s3://BUCKET/datasets/NAME

See `python jobs/synth_dataset.py --help` for the options.
"""

from _entrypoint import run_cli

if __name__ == "__main__":
    run_cli("synth")
