"""The command line: help everywhere, fail-fast errors. (The no-argument demo runs from the installed wheel in
tests/test_wheel.py; bad rows becoming error rows: tests/test_bad_input.py.)"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import click
import pytest
import typer
from typer.testing import CliRunner

from latte_ray.cli import app
from latte_ray.spec import load_pipeline_spec
from tests.conftest import REPO, own_output, write_prompts

CLI = [sys.executable, "-m", "latte_ray.cli"]


def test_every_command_and_option_has_help():
    group = typer.main.get_command(app)
    assert {"run", "tiny-model"} <= set(group.commands)
    for name, command in group.commands.items():
        assert command.help, f"command {name} has no help"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts} has no help"
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"text": ["a cat"]}, "no 'prompt' column"),
        ({"prompt": [1, 2]}, "column 'prompt' has type int64"),
        (None, "not a readable Parquet file"),
    ],
)
def test_malformed_tables_fail_before_any_model_loads(tmp_path, columns, message):
    table = tmp_path / "prompts.parquet"
    if columns is None:
        table.write_text("not parquet at all")
    else:
        write_prompts(table, columns)
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    env = {**os.environ, "LATTE_RAY_CACHE": str(empty_cache), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(CLI + ["run", "--prompts", str(table), "--output", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and str(table) in proc.stderr
    assert list(empty_cache.iterdir()) == [], "a model was built or loaded for a malformed table"


def test_invalid_spec_fails_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel:\n  source: tiny\n  compile: {enabled: true, mod: fast}\n")
    result = CliRunner().invoke(app, ["run", "--pipeline", str(bad), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "model.compile.mod: unknown key" in result.output


# ----------------------------------------------------------------------- pipelines, --version, python -m


def test_pipelines_lists_every_builtin_with_its_description():
    import yaml

    from latte_ray.spec import PIPELINES_DIR

    result = CliRunner().invoke(app, ["pipelines"])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("  ")}
    shipped = {p.stem: yaml.safe_load(p.read_text()) for p in PIPELINES_DIR.glob("*.yaml")}
    assert set(listed) == set(shipped), "every shipped spec and recipe is listed, and nothing else"
    for name, raw in shipped.items():
        assert raw["description"] in listed[name], f"{name}: its description is not on its line"
    specs, recipes = own_output(result).split("synth recipes")
    assert "tiny-cpu " in specs and "latte-1-t2v-512" in specs and "synth-example" in recipes


def test_pipelines_show_prints_the_file_as_shipped(tmp_path):
    result = CliRunner().invoke(app, ["pipelines", "show", "latte-1-t2v-512"])
    assert result.exit_code == 0
    assert own_output(result) == (REPO / "pipelines" / "latte-1-t2v-512.yaml").read_text()
    copy = tmp_path / "mine.yaml"  # ready to copy, edit and use
    copy.write_text(own_output(result).replace("num_inference_steps: 50", "num_inference_steps: 30"))
    assert load_pipeline_spec(copy).sampling.num_inference_steps == 30
    missing = CliRunner().invoke(app, ["pipelines", "show", "no-such-spec"])
    assert missing.exit_code == 2
    assert "no built-in pipeline spec or recipe named 'no-such-spec'" in missing.output and "tiny-cpu" in missing.output
    assert "Traceback" not in missing.output


def test_synth_recipe_by_builtin_name():
    from latte_ray.datasets.synth import load_recipe

    recipe, text = load_recipe("synth-example")
    assert recipe.name == "synth-example" and text == (REPO / "pipelines" / "synth-example.yaml").read_text()


def test_version_names_the_checkout_commit():
    from latte_ray.versions import version

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    if head.returncode == 0:  # a checkout (CI's clean clone is one): the commit, "-dirty" with local edits
        assert own_output(result).startswith(f"latte-ray {version()} (git {head.stdout.strip()}")
    else:  # a source tree without git metadata
        assert own_output(result).strip() == f"latte-ray {version()}"
    import tomllib

    assert version() == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_python_dash_m_latte_ray_is_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "latte_ray", "pipelines"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == own_output(CliRunner().invoke(app, ["pipelines"]))


def test_fault_injection_recognises_every_driver_command_line():
    from latte_ray.faults.injection import is_driver_argv

    for argv in (["python", "-m", "latte_ray", "run"], ["/v/bin/python3", "-m", "latte_ray.cli", "run"],
                 ["/v/bin/latte-ray", "run"], ["latte-ray"]):
        assert is_driver_argv(argv), argv
    for argv in (["python", "jobs/generate.py"], ["python", "-m", "pytest"], ["ray::IDLE"], ["raylet"]):
        assert not is_driver_argv(argv), argv


# ----------------------------------------------------------------------- the progress line


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_on_a_terminal_is_redrawn_in_place():
    from latte_ray.console import Progress

    clock, term = _Clock(), _Terminal()
    progress = Progress(term, total=100, clock=clock)
    assert progress.tty
    clock.now += 30  # the model loads: no video yet, no rate, no ETA
    progress.update(0, 0)
    assert term.getvalue() == "\r\x1b[K0/100 videos (0%) · ETA - · 0 errors · 0:30 elapsed"
    progress.update(10, 0)  # the first batch: the rate counts from here (loading is not in it)
    clock.now += 20
    progress.update(30, 1)
    line = term.getvalue().rsplit("\r\x1b[K", 1)[1]
    assert line == "30/100 videos (30%) · 1.00/s · ETA 1:10 · 1 error · 0:50 elapsed"
    assert "\n" not in term.getvalue(), "a terminal gets one line, rewritten"
    progress.close()
    assert term.getvalue().endswith(line + "\n")


def test_progress_line_elsewhere_is_printed_at_most_every_30_seconds():
    from latte_ray.console import PROGRESS_INTERVAL_S, Progress

    clock, log = _Clock(), io.StringIO()
    progress = Progress(log, total=6, clock=clock)
    assert not progress.tty and PROGRESS_INTERVAL_S == 30
    for step in range(1, 7):  # a batch every 10 s
        progress.update(step, 0)
        clock.now += 10
    lines = log.getvalue().splitlines()
    assert [line.split(" ")[0] for line in lines] == ["1/6", "4/6"], lines
    clock.now += 60
    progress.update(6, 0)  # 30 s passed and the count moved
    assert log.getvalue().splitlines()[-1].startswith("6/6 videos (100%)")
    clock.now += 60
    progress.update(6, 0)
    assert len(log.getvalue().splitlines()) == 3, "an unchanged count is not printed again"


_CAPTURE_CHILD = """
import logging, os, sys
import fsspec
from latte_ray.console import Console

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
out = sys.argv[1]
console = Console()
with console.capture():
    os.write(2, b"C++ core worker line (fd 2)\\n")
    print("a library's print (fd 1)")
    logging.getLogger("ray.data").info("Running Dataset: before the output is bound")
    console.echo("run: what will run")
    console.attach_log(fsspec.filesystem("file"), out + "/runs/r1.log", out + "/runs/r1.log")
    logging.getLogger("latte_ray.scheduler").warning("re-planning from the manifest")
    os.write(1, b"an actor's forwarded output\\n")
    console.echo("latte-ray: 1 ok")
print("after: " + console.log_location)
refused = Console()
with refused.capture():
    print("noise of a run refused before its output was bound")
    early = refused.log_local
print("refused: " + str(refused.log_location) + " " + str(os.path.exists(early)))
loud = Console(verbose=True)  # --verbose: nothing is captured
with loud.capture():
    os.write(2, b"verbose: Ray's line on stderr\\n")
    loud.echo("verbose: our line")
print("verbose log: " + str(loud.log_location))
"""


def test_console_capture_moves_everything_else_to_the_log(tmp_path):
    """A real process (the capture works on file descriptors 1 and 2): the console gets only its own lines
    (and latte-ray's warnings); what anything else writes, before and after the output is bound, is in
    OUTPUT/runs/<run_id>.log; a command refused before binding keeps no log; --verbose captures nothing."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _CAPTURE_CHILD, str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "verbose: Ray's line on stderr\n", "--verbose leaves everything on the console"
    assert done.stdout.splitlines() == ["run: what will run", "warning: re-planning from the manifest",
                                        "latte-ray: 1 ok", f"after: {out}/runs/r1.log", "refused: None False",
                                        "verbose: our line", "verbose log: None"]
    log = (out / "runs" / "r1.log").read_text()
    for line in ("C++ core worker line (fd 2)", "a library's print (fd 1)", "Running Dataset: before the output",
                 "re-planning from the manifest", "an actor's forwarded output"):
        assert line in log, line
    assert "what will run" not in log and "refused before" not in log


def test_own_output_drops_the_lines_ray_forwards_and_keeps_the_commands_own():
    """The lines CI saw land inside a CliRunner capture (verbatim prefixes), and lines of our own that look alike."""
    from types import SimpleNamespace

    forwarded = ["(pid=gcs_server) [2026-12-05 10:01:02,345 E 123 123] gcs_actor_manager.cc:1: Failed to kill actor\n",
                 "\x1b[36m(MapWorker(MapBatches(WriteStage)) pid=2382)\x1b[0m check the lease under s3://b/out failed\n",
                 "\x1b[33m(raylet)\x1b[0m [2026-12-05] A worker died or was killed\n",
                 "(GenerationServer pid=77, ip=10.0.0.2) loaded\n"]
    own = ["error: output: cannot write to s3://no-such-bucket-lr/out: FileNotFoundError\n",
           "  (pid=3) is not a forwarded line unless it starts the line\n"]
    result = SimpleNamespace(output="".join([forwarded[0], own[0], *forwarded[1:], own[1]]))
    assert own_output(result) == "".join(own)
