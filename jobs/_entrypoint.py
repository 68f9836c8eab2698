"""Shared start of the `ray job submit` entrypoints: run one `latte-ray` command with this process's arguments.

The entrypoints are thin on purpose: all logic lives in the `latte-ray` CLI (latte_ray/cli.py), so a job
behaves exactly like the same command run by hand, exit status included (0 ok, 1 failed rows or a crash,
2 bad input or a plan the cluster cannot run, 3 stalled: stopped by the progress watchdog).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# `python jobs/x.py` puts jobs/ first on sys.path; put the job's working_dir (the uploaded checkout) before
# any installed latte_ray, so the driver runs the same code as the workers, which get working_dir on their path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latte_ray.cli import STANDALONE, app  # noqa: E402


def run_cli(command: str, required: tuple[str, ...] = ()) -> None:
    """`latte-ray COMMAND ARGS...`; exits with the command's status. `required` flags must be given."""
    args = sys.argv[1:]
    prog = f"python {Path(sys.argv[0]).as_posix()}"
    missing = [flag for flag in required if not any(a == flag or a.startswith(flag + "=") for a in args)]
    if missing and "--help" not in args:
        print(f"{prog}: {', '.join(missing)} required (a job has no sensible default input or output)",
              file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    STANDALONE["stop_ray_before_failing"] = True  # the job's driver process: its failure line comes last
    app(args=[command, *args], prog_name=prog)
