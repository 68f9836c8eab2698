"""latte-ray as users get it, outside the checkout: the wheel built from the sources and installed into a fresh
virtualenv; an editable install; and a Ray job that ships nothing but the wheel (runtime env `py_modules`).

How the checkout is kept out, and the tests still fast:
* The wheel is built once per session from a copy of the sources (a build writes build/ and *.egg-info next to
  the sources; the checkout is left as it is).
* Each virtualenv is new, made by the base interpreter of the development venv (`python -m venv`, not the dev
  venv itself), and sees the dev venv's already installed dependencies (torch, ray, diffusers, ...) through a
  `.pth` file that names the dev venv's site-packages folder. A folder named in a `.pth` file is only appended
  to sys.path: the `.pth` files inside it are not executed, so the dev venv's editable-install finder (which
  would import latte_ray from a checkout) never runs. `test_venvs_see_no_latte_ray_but_their_own` checks this.
* Every command runs from an empty temporary folder, with PYTHONPATH, RAY_* and LATTE_RAY_* removed from its
  environment and the dev venv's bin/ taken off PATH; the tests assert where latte_ray and its specs are
  imported from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, free_port
from hubcache import LATTE_1, LATTE_1_CONFIGS, write_hub_cache
from latte_ray.record.storage import OutputLayout, filesystem, latest_rows, read_manifest
from test_jobs import RayHead, _stop_head, _wait_for_jobs_api

DEV_SITE = Path(sysconfig.get_paths()["purelib"])   # where the dev venv's dependencies live
DEV_BIN = Path(sys.executable).parent
BASE_PYTHON = Path(getattr(sys, "_base_executable", sys.executable))


def pyproject_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def clean_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell with `venv` activated: nothing that points at the checkout."""
    drop = ("PYTHON", "RAY_", "LATTE_RAY_", "VIRTUAL_ENV", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != DEV_BIN]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["VIRTUAL_ENV"] = str(venv)
    env.update(extra)
    return env


def make_venv(path: Path, with_pip: bool = False) -> Path:
    """A new virtualenv from the base interpreter that sees the dev venv's dependencies (not its latte_ray)."""
    assert Path(sys.prefix) != Path(sys.base_prefix), "the tests run in a virtualenv; its base makes the new ones"
    args = [str(BASE_PYTHON), "-m", "venv", *([] if with_pip else ["--without-pip"]), str(path)]
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    (site,) = (path / "lib").glob("python3*/site-packages")
    (site / "_latte_ray_test_dependencies.pth").write_text(f"{DEV_SITE}\n")
    return path


def run(venv: Path, args: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=clean_env(venv, **env), capture_output=True, text=True, timeout=timeout)


def site_packages(venv: Path) -> Path:
    (site,) = (venv / "lib").glob("python3*/site-packages")
    return site


def _source_copy(dest: Path) -> Path:
    """The sources as a clean clone has them (no venv, build outputs, caches or outputs)."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "outputs", "__pycache__", ".pytest_cache", ".cache"))
    return dest


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = _source_copy(root / "src")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(root / "dist"),
         str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (whl,) = (root / "dist").glob("latte_ray-*.whl")
    print(f"\nwheel {whl.name}: {whl.stat().st_size / 1024:.0f} KiB, built in {time.monotonic() - started:.1f}s")
    return whl


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory, wheel) -> Path:
    """A fresh venv with the wheel installed (`pip install --no-deps`: its dependencies are the dev venv's)."""
    venv = make_venv(tmp_path_factory.mktemp("venv") / "wheel")
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--ignore-installed", str(wheel)],
        env=clean_env(venv), cwd=venv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (venv / "bin" / "latte-ray").is_file(), "the console script was not installed"
    return venv


@pytest.fixture(scope="session")
def bare_venv(tmp_path_factory) -> Path:
    """A fresh venv with pip and every dependency but no latte_ray: the nodes of the py_modules job."""
    return make_venv(tmp_path_factory.mktemp("venv") / "bare", with_pip=True)


@pytest.fixture
def empty_dir(tmp_path) -> Path:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


# --------------------------------------------------------------------------------------------- wheel


def test_wheel_holds_the_package_its_specs_and_the_example_prompts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "latte_ray").rglob("*.py")}
    assert modules and not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    specs = {f"latte_ray/pipelines/{p.name}" for p in (REPO / "pipelines").glob("*.yaml")}
    assert {"latte_ray/pipelines/tiny-cpu.yaml", "latte_ray/pipelines/latte-1-t2v-512.yaml"} <= specs <= names
    assert "latte_ray/examples/prompts.parquet" in names
    assert not [n for n in names if n.split("/")[0] in ("tests", "jobs", "benchmarks", "infra", "pipelines")]
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert f"Version: {pyproject_version()}" in text
    assert "Requires-Dist: ray[data,default]==" in text, "the wheel pins the Ray version the image is built on"
    entry_points = zipfile.ZipFile(wheel).read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert "latte-ray = latte_ray.cli:main" in entry_points


def test_venvs_see_no_latte_ray_but_their_own(bare_venv, wheel_venv, empty_dir):
    """The `.pth` trick shares the dependencies, not the dev venv's editable latte_ray."""
    probe = ("import importlib.util as u; spec = u.find_spec('latte_ray'); print(spec.origin if spec else None); "
             "assert all(u.find_spec(m) for m in ('torch', 'ray', 'diffusers', 'av', 's3fs')), 'dependencies'")
    bare = run(bare_venv, ["python", "-c", probe], empty_dir)
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.split() == ["None"], "latte_ray leaks into a venv through the dependencies' folder"
    installed = run(wheel_venv, ["python", "-c", probe], empty_dir)
    assert installed.returncode == 0, installed.stderr
    assert Path(installed.stdout.split()[0]).is_relative_to(site_packages(wheel_venv))


def test_installed_wheel_finds_its_files_in_site_packages(wheel_venv, empty_dir):
    probe = """
import importlib.resources, json, sys, latte_ray
from latte_ray import resources, versions, spec, cli
print(json.dumps({
    "package": latte_ray.__file__, "version": latte_ray.__version__, "path": sys.path,
    "pipelines_resource": str(importlib.resources.files("latte_ray.pipelines")),
    "pipelines_dir": str(spec.PIPELINES_DIR), "examples": str(cli.EXAMPLE_PROMPTS),
    "source_tree": resources.source_tree() and str(resources.source_tree()), "provenance": versions.provenance(),
}))
"""
    done = run(wheel_venv, ["python", "-c", probe], empty_dir)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    site = site_packages(wheel_venv)
    assert Path(got["package"]) == site / "latte_ray" / "__init__.py"
    assert Path(got["pipelines_resource"]) == Path(got["pipelines_dir"]) == site / "latte_ray" / "pipelines"
    assert Path(got["examples"]) == site / "latte_ray" / "examples" / "prompts.parquet"
    assert got["source_tree"] is None
    # Nothing of the checkout is on the path: the only entry under it may be the dev venv's site-packages
    # (the dependencies, through our .pth; when the checkout holds its .venv, as in CI), which has no
    # latte_ray of its own (the editable install's finder is in a .pth that a plain path line never runs).
    inside = [p for p in got["path"] if p and Path(p).resolve().is_relative_to(REPO)]
    assert [Path(p).resolve() for p in inside] in ([], [DEV_SITE.resolve()]), got["path"]
    assert not (DEV_SITE / "latte_ray").exists()
    assert got["version"] == pyproject_version()
    assert got["provenance"] == {"latte-ray": pyproject_version(), "latte-ray-commit": None}


def test_installed_cli_version_and_pipelines(wheel_venv, empty_dir):
    cli = str(wheel_venv / "bin" / "latte-ray")
    version = run(wheel_venv, [cli, "--version"], empty_dir)
    assert version.returncode == 0 and version.stdout.strip() == f"latte-ray {pyproject_version()}", version
    listing = run(wheel_venv, [cli, "pipelines"], empty_dir)
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.splitlines() if line.startswith("  ")}
    assert {"tiny-cpu", "tiny-cpu-lossless", "latte-1-t2v-512", "synth-example"} <= set(lines), listing.stdout
    assert "Production" in lines["latte-1-t2v-512"], "each spec comes with its one-line description"
    shown = run(wheel_venv, [cli, "pipelines", "show", "latte-1-t2v-512"], empty_dir)
    assert shown.returncode == 0 and shown.stdout == (REPO / "pipelines" / "latte-1-t2v-512.yaml").read_text()
    module = run(wheel_venv, ["python", "-m", "latte_ray", "--version"], empty_dir)
    assert module.returncode == 0 and module.stdout == version.stdout


def test_installed_dry_run_by_name(wheel_venv, empty_dir, tmp_path):
    """A dry run checks the model source's configs, as a run does: with no hub here, they come from the local
    hub cache, as for a user who has Latte-1 cached (HF_HUB_OFFLINE=1)."""
    hub = write_hub_cache(tmp_path / "hub", LATTE_1, LATTE_1_CONFIGS)
    done = run(wheel_venv, [str(wheel_venv / "bin" / "latte-ray"), "run", "--dry-run", "--pipeline",
                            "latte-1-t2v-512"], empty_dir, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dry run (latte-1-t2v-512): 6 rows in 1 file: 6 to generate" in done.stdout, done.stdout
    assert list(empty_dir.iterdir()) == [], "a dry run writes nothing"


def test_installed_demo_runs_end_to_end(wheel_venv, empty_dir, tmp_path):
    """`latte-ray run` with no arguments, as a new user types it (the README's first command runs the same
    console script from the editable install): tiny spec, shipped prompts, local Ray; the tiny model is built
    from the installed package into an empty cache. Another Ray runs on the machine (`ray start --head`, its
    address in the temp folder's ray_current_cluster): the run starts its own Ray (address="local", which
    never reads that file, so a stale one left by a dead Ray is ignored the same way) and leaves the other
    one alone."""
    import tempfile

    from latte_ray.faults import injection as faults
    from latte_ray.spec import load_pipeline_spec

    cache = tmp_path / "cache"
    ray_tmp = Path(tempfile.mkdtemp(prefix="lrd", dir=os.environ.get("TMPDIR", "/tmp")))  # short: sockets
    other = subprocess.Popen(
        [str(DEV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "1", "--port", str(free_port()),
         "--include-dashboard=false", "--disable-usage-stats", "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port())],
        env=clean_env(wheel_venv, TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled"), cwd=empty_dir,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (ray_tmp / "ray" / "ray_current_cluster").exists():
            assert other.poll() is None and time.monotonic() < deadline, "the other Ray head did not start"
            time.sleep(0.2)
        started = time.monotonic()
        done = run(wheel_venv, [str(wheel_venv / "bin" / "latte-ray"), "run"], empty_dir, timeout=600,
                   LATTE_RAY_CACHE=str(cache), TMPDIR=str(ray_tmp))
        print(f"\nlatte-ray run from the wheel: {time.monotonic() - started:.0f}s")
        assert other.poll() is None, "the other Ray was disturbed"
    finally:
        faults.kill_session(other.pid)
        other.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "6 ok, 0 error" in done.stdout, done.stdout
    out = empty_dir / "outputs" / "demo"
    videos = sorted((out / "videos").rglob("*.mp4"))
    assert len(videos) == 6 and all(v.stat().st_size > 1000 for v in videos)
    assert (cache / "tiny-latte-v1").is_dir()
    binding = json.loads((out / "latte-ray.json").read_text())
    assert binding["spec_hash"] == load_pipeline_spec("tiny-cpu").spec_hash() and binding["run_seed"] == 0
    (record_path,) = (out / "runs").glob("*.json")
    assert f"runs/{record_path.name}" in done.stdout
    _assert_quiet_console(done, out, record_path.stem)
    record = _run_record(out)
    assert record["outcome"] == "ok"
    assert record["versions"]["latte-ray"] == pyproject_version()
    assert record["versions"]["latte-ray-commit"] is None, "an installed wheel has no commit"


def _assert_quiet_console(done: subprocess.CompletedProcess, out: Path, run_id: str) -> None:
    """What a newcomer reads (stdout is a pipe here, not a terminal): the line saying what will run, a
    progress line at most every 30 s, the summary naming real files; nothing on stderr. Ray Data's progress
    blocks, Ray's notices and the actors' output are in the run's log file, and no actor imported torchao
    (the spec asks for no quantization)."""
    from latte_ray.console import PROGRESS_INTERVAL_S

    lines = done.stdout.splitlines()
    print(f"\nthe demo's console: {len(lines)} lines on stdout, {len(done.stderr.splitlines())} on stderr")
    assert done.stderr == "", done.stderr[-3000:]
    assert lines[0].startswith("run: tiny-cpu (spec ") and "6 to do, 0 already done; cluster: 1 node" in lines[0]
    assert lines[0].endswith(f"log: outputs/demo/runs/{run_id}.log")
    progress = [line for line in lines if " videos (" in line and " elapsed" in line]
    summary = lines[1 + len(progress):]
    assert lines[1:1 + len(progress)] == progress and summary[0].startswith("latte-ray: 6 ok, 0 error")
    seconds = float(summary[0].split("; ", 1)[1].split("s ", 1)[0])
    assert len(progress) <= seconds // PROGRESS_INTERVAL_S + 1
    named = [line.removeprefix("videos:").split()[0] for line in summary if line.startswith(("videos:", " " * 10))]
    assert len(named) == 3 and all((out.parent.parent / path).is_file() for path in named), summary
    assert f"log:      outputs/demo/runs/{run_id}.log" in summary
    assert summary[-1] == "report:   open outputs/demo/report/index.html"
    assert (out / "report" / "index.html").is_file() and (out / "report" / "gallery.js").is_file()
    text = (out / "runs" / f"{run_id}.log").read_text()
    for moved in ("======= Running Dataset", "Token authentication is enabled", "MapWorker(MapBatches(DenoiseStage))"):
        assert moved in text and moved not in done.stdout, moved
    assert "torchao" not in text


def _run_record(out: Path) -> dict:
    """The run's record: OUTPUT/run.json, or the newest OUTPUT/runs/<run_id>.json (one record per run)."""
    records = sorted((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime) or [out / "run.json"]
    return json.loads(records[-1].read_text())


# ------------------------------------------------------------------------------------------ editable


def test_editable_install_reads_the_source_folders(tmp_path, empty_dir):
    """`pip install -e`: importlib.resources maps latte_ray.pipelines to the tree's pipelines/ (edits show at
    once), and a git checkout reports its commit."""
    src = _source_copy(tmp_path / "src")
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "sources"]):
        subprocess.run(git + args, check=True, capture_output=True, timeout=60)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    venv = make_venv(tmp_path / "venv")
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--ignore-installed", "-e", str(src)], env=clean_env(venv), cwd=empty_dir, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    probe = ("import importlib.resources, json, latte_ray; from latte_ray import spec, versions; print(json.dumps("
             "[latte_ray.__file__, str(importlib.resources.files('latte_ray.pipelines')), str(spec.PIPELINES_DIR), "
             "versions.provenance()]))")
    got = run(venv, ["python", "-c", probe], empty_dir)
    assert got.returncode == 0, got.stderr
    package, resource, pipelines, provenance = json.loads(got.stdout)
    assert Path(package) == src / "latte_ray" / "__init__.py"
    assert Path(resource) == Path(pipelines) == src / "pipelines"
    assert provenance == {"latte-ray": pyproject_version(), "latte-ray-commit": commit}

    spec_file = src / "pipelines" / "tiny-cpu.yaml"
    spec_file.write_text(spec_file.read_text().replace('description: "', 'description: "EDITED '))
    shown = run(venv, ["latte-ray", "pipelines"], empty_dir)
    assert shown.returncode == 0 and "EDITED The embedded default" in shown.stdout, shown.stdout + shown.stderr
    dirty = run(venv, ["latte-ray", "--version"], empty_dir)
    assert dirty.stdout.strip() == f"latte-ray {pyproject_version()} (git {commit}-dirty)"


def test_commit_is_null_without_git(tmp_path):
    """No git on PATH: the checkout's run records get a null commit, and nothing fails."""
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", "from latte_ray import versions; print(versions.provenance())"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr({"latte-ray": pyproject_version(), "latte-ray-commit": None})


# ----------------------------------------------------------------------------------- job, wheel only


@pytest.fixture
def wheel_only_head(bare_venv, model_cache, tmp_path):
    """A real local Ray head whose nodes have every dependency but no latte_ray (the bare venv): only a job's
    runtime env can bring it. PIP_NO_DEPS=1 on the node, as infra/ sets it, makes Ray's
    `pip install <wheel> --target` install the wheel alone."""
    import tempfile

    temp_dir = Path(tempfile.mkdtemp(prefix="lrw", dir="/tmp"))  # short: Ray's unix sockets live under it
    dashboard = free_port()
    env = clean_env(bare_venv, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                    PIP_NO_DEPS="1", LATTE_RAY_CACHE=str(model_cache))
    log_path = temp_dir.with_suffix(".log")
    log = open(log_path, "wb")
    head = subprocess.Popen(
        [str(bare_venv / "bin" / "python"), "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--node-ip-address", "127.0.0.1", "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "2", "--temp-dir", str(temp_dir),
         "--include-dashboard=true", "--disable-usage-stats"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_jobs_api(address, head, log_path)
        yield RayHead(address=address, temp_dir=temp_dir, env=env, secret="")
    finally:
        _stop_head(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        log_path.unlink(missing_ok=True)


@pytest.mark.slow
def test_ray_job_runs_from_the_wheel_alone(wheel_only_head, bare_venv, wheel, empty_dir, tmp_path):
    """A team's laptop against a shared cluster: `ray job submit` from an empty folder, shipping only the wheel
    (`py_modules`), entrypoint `python -m latte_ray run`; the built-in spec and prompts come from the wheel."""
    head = wheel_only_head
    output = tmp_path / "out"
    runtime_env = json.dumps({"py_modules": [str(wheel)]})
    started = time.monotonic()
    submit = run(bare_venv, [
        "python", "-m", "ray.scripts.scripts", "job", "submit", "--address", head.address,
        "--submission-id", "wheel-1", "--no-wait", "--runtime-env-json", runtime_env,
        "--", "python", "-m", "latte_ray", "run", "--pipeline", "tiny-cpu", "--output", str(output),
    ], empty_dir, timeout=180, RAY_AUTH_MODE="disabled")
    assert submit.returncode == 0, submit.stdout + submit.stderr
    status, logs = head.wait("wheel-1", timeout=360)
    print(f"\npy_modules job: {status} after {time.monotonic() - started:.0f}s")
    assert status == "SUCCEEDED", logs[-5000:]
    assert "6 ok, 0 error" in logs, logs[-3000:]

    fs, root = filesystem(str(output), {})
    rows = latest_rows(read_manifest(fs, OutputLayout(url=str(output), root=root))).to_pylist()
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows), rows
    for r in rows:
        data = fs.cat_file(r["video_uri"].removeprefix("file://"))
        assert len(data) == r["bytes"] and hashlib.sha256(data).hexdigest() == r["sha256"]
    record = _run_record(output)
    assert record["versions"]["latte-ray"] == pyproject_version()
    assert record["versions"]["latte-ray-commit"] is None, "the job ran the wheel, not a source tree"

    # Ray installed the wheel alone into the job's py_modules folder: latte_ray with its specs, no torch & co.
    installs = [p.parent for p in head.temp_dir.glob("session_2*/runtime_resources/py_modules_files/*/latte_ray")]
    assert len(installs) == 1, installs
    assert (installs[0] / "latte_ray" / "pipelines" / "tiny-cpu.yaml").is_file()
    assert not [p.name for p in installs[0].iterdir() if p.name.split("-")[0] in ("torch", "ray", "diffusers")]
    assert list(empty_dir.iterdir()) == [], "submitting writes nothing into the folder it runs from"
