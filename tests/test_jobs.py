"""jobs/: the `ray job submit` entrypoints, run for real against a local Ray head and the loopback S3.

The head is a real `ray start --head` bound to 127.0.0.1 with its own temp dir and ports, started in its own
session and stopped by PID afterwards (never a bare `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import REPO, free_port, write_prompts
from latte_ray.record.storage import OutputLayout, filesystem, latest_rows, read_manifest

VENV_BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class RayHead:
    address: str        # dashboard / Jobs API: http://127.0.0.1:PORT
    temp_dir: Path      # Ray's temp dir for this head only (sessions, logs, uploaded working dirs)
    env: dict           # the environment to run the `ray` CLI with
    secret: str         # the AWS secret key the nodes hold (distinctive, to grep for)

    def submit(self, submission_id: str, entrypoint: list[str]) -> None:
        done = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", self.address, "--working-dir", ".",
             "--runtime-env", "jobs/runtime_env.yaml", "--submission-id", submission_id, "--no-wait",
             "--", *entrypoint],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=180,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def wait(self, submission_id: str, timeout: float = 400) -> tuple[str, str]:
        """(final status, driver log) of a job, polling the Jobs REST API."""
        deadline = time.monotonic() + timeout
        status = "?"
        while time.monotonic() < deadline:
            status = self._get(f"/api/jobs/{submission_id}")["status"]
            if status in TERMINAL:
                break
            time.sleep(1)
        return status, self._get(f"/api/jobs/{submission_id}/logs")["logs"]

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(self.address + path, timeout=30) as r:
            return json.load(r)


@pytest.fixture
def ray_head(model_cache, s3_server):
    """A local Ray head whose nodes hold S3 credentials in their environment, as cloud nodes get them from
    their role (no endpoint: the job passes that as a storage option), and LATTE_RAY_CACHE like infra/ sets.
    It has 2 CPUs, this machine's real size: the tiny job must be schedulable there (plan/fit.py)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="lrh", dir="/tmp"))  # short: Ray's unix sockets live under it
    dashboard = free_port()
    secret = "LrNodeS3cret-" + uuid.uuid4().hex  # moto accepts any credentials
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "AWS_"))}
    env.update({
        "RAY_AUTH_MODE": "disabled",                  # Ray 2.60 turns token auth on by default
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",     # single-node mode: bind to 127.0.0.1, not the host's IP
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is this venv's
        "LATTE_RAY_CACHE": str(model_cache),
        "AWS_ACCESS_KEY_ID": s3_server.env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": s3_server.env["AWS_DEFAULT_REGION"],
    })
    log = open(temp_dir.with_suffix(".log"), "wb")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
         "--num-cpus", "2", "--temp-dir", str(temp_dir), "--include-dashboard=true", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_jobs_api(address, head, temp_dir.with_suffix(".log"))
        yield RayHead(address=address, temp_dir=temp_dir, env=env, secret=secret)
    finally:
        _stop_head(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        temp_dir.with_suffix(".log").unlink(missing_ok=True)


def _wait_for_jobs_api(address: str, head: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            urllib.request.urlopen(address + "/api/jobs/", timeout=5).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"Ray head's Jobs API did not answer on {address}")


def _stop_head(head: subprocess.Popen) -> None:
    """Stop every process of this head: `ray start --block` is a session leader and Ray's daemons, workers
    and job drivers are in its session or below its processes. SIGTERM first (Ray drains), then SIGKILL
    after 2 s (nothing of a test's head needs to be kept)."""
    ours = {p for p in psutil.process_iter() if _sid(p) == head.pid}
    for p in list(ours):
        try:
            ours.update(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in ours:  # all at once, as `ray stop` does: no node drain to wait for
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(ours), timeout=2)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    head.wait(timeout=10)


def _sid(p: psutil.Process) -> int | None:
    try:
        return os.getsid(p.pid)
    except (ProcessLookupError, PermissionError):
        return None


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_ray_job_submit_generates_to_s3(ray_head, s3_server, tmp_path):
    bucket = s3_server.make_bucket("job-" + uuid.uuid4().hex[:8])
    options = s3_server.storage_options()
    fs, _ = filesystem(f"s3://{bucket}", options)
    table = write_prompts(tmp_path / "p.parquet", {"prompt": ["a cat surfing", "a dog skiing", "a bird diving"]})
    fs.put_file(str(table), f"{bucket}/prompts/day1.parquet")
    output = f"s3://{bucket}/out/job1"
    entrypoint = ["python", "jobs/generate.py", "--pipeline", "pipelines/tiny-cpu.yaml",
                  "--prompts", f"s3://{bucket}/prompts/", "--output", output,
                  "--storage-option", f"endpoint_url={s3_server.endpoint}", "--concurrency", "1"]

    ray_head.submit("gen-1", entrypoint)
    status, logs = ray_head.wait("gen-1")
    assert status == "SUCCEEDED", logs[-4000:]
    assert "3 ok, 0 error" in logs, logs[-2000:]

    out_fs, root = filesystem(output, options)
    layout = OutputLayout(url=output, root=root)
    rows = latest_rows(read_manifest(out_fs, layout)).to_pylist()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), rows
    for r in rows:
        data = out_fs.cat_file(r["video_uri"].removeprefix("s3://"))
        assert len(data) == r["bytes"] and hashlib.sha256(data).hexdigest() == r["sha256"]
    assert out_fs.exists(layout.record_json)
    runs = out_fs.ls(layout.runs_dir, detail=False)
    (run,) = [p for p in runs if p.endswith(".json")]
    record = json.loads(out_fs.cat_file(run))
    assert record["outcome"] == "ok"
    # The job's log is the quiet console; what Ray Data and the actors printed is in the run's log, which
    # was kept on the driver's node during the run and uploaded next to the record when the command ended.
    (run_log,) = [p for p in runs if p.endswith(".log")]
    assert record["log"] == f"{output}/runs/{run_log.rsplit('/', 1)[1]}" and f"log:      {record['log']}" in logs
    log_text = out_fs.cat_file(run_log).decode()
    assert "Starting execution of Dataset" in log_text and "Starting execution of Dataset" not in logs
    assert ray_head.secret not in log_text

    # What Ray uploaded as the working dir: the code, without the virtualenv, tests or git data.
    (pkg,) = {p.resolve() for p in ray_head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*")
              if p.is_dir()}
    names = {p.name for p in pkg.iterdir()}
    assert {"latte_ray", "jobs", "pipelines"} <= names and not {".venv", ".git", "tests", "outputs"} & names, names

    # The nodes' secret key reached boto (the job wrote) but no log: not the driver's, not any of Ray's.
    assert ray_head.secret not in logs
    leaked = [str(p) for p in ray_head.temp_dir.glob("session_2*/logs/**/*")
              if p.is_file() and ray_head.secret.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_generate_job_requires_input_and_output():
    done = subprocess.run([sys.executable, "jobs/generate.py", "--pipeline", "tiny-cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--prompts, --output required" in done.stderr


@pytest.mark.parametrize(("script", "command", "flags"), [
    ("jobs/generate.py", "run", ["--pipeline", "--prompts", "--output", "--storage-option", "--limit"]),
    ("jobs/backfill.py", "backfill", ["--pipeline", "--prompts", "--output"]),
    ("jobs/synth_dataset.py", "synth", ["--recipe", "--output"]),
])
def test_job_entrypoints_are_the_cli_commands(script, command, flags):
    """Each entrypoint is `latte-ray COMMAND` (same help, same options); no logic of its own."""
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{script} {command} [OPTIONS]" in done.stdout
    for flag in flags:
        assert flag in done.stdout, f"{script} --help lacks {flag}"


def test_runtime_env_is_valid_and_keeps_big_folders_out():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    assert {".venv/", ".git/", "outputs/", "tests/"} <= set(env["excludes"])
    assert not any(k.startswith("AWS_") for k in env.get("env_vars", {})), "no credentials in the runtime env"
