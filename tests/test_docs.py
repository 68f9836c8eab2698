"""The README and docs/ say only what the code does: the spec reference is the models' own account, and every
file, link, command, flag and make target the pages show exists. No Ray, no model: these read files and the
CLI's declarations."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import typer.main
from pydantic import BaseModel, Field

from latte_ray.cli import app
from latte_ray.datasets.synth import Recipe
from latte_ray.ops import specref
from latte_ray.spec import PipelineSpec

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
REFERENCE = REPO / "docs" / "spec-reference.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_spec_reference_matches_the_models():
    assert REFERENCE.read_text() == specref.render(), (
        "docs/spec-reference.md differs from the pydantic models in latte_ray/spec.py and "
        "latte_ray/datasets/synth.py: regenerate it with `make spec-reference` "
        "(python -m latte_ray.ops.specref docs/spec-reference.md) and commit it")


def _paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = prefix + name
        inner = [a for a in (field.annotation, *typing.get_args(field.annotation))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if typing.get_origin(field.annotation) is list and inner:
            path += "[]"
        out.append(path)
        if inner:
            out += _paths(inner[0], path + ".")
    return out


def test_spec_reference_lists_every_field_with_its_default():
    text = specref.render()
    paths = _paths(PipelineSpec) + _paths(Recipe)
    # nested optional sections (model.cache, model.quantization) and a list of mappings (templates[]) included
    assert {"model.cache.threshold", "model.quantization.components", "model.sim.time_scale",
            "templates[].weight", "export.min_motion"} <= set(paths)
    missing = [p for p in paths if f"| `{p}` |" not in text]
    assert not missing, f"the spec reference leaves out {missing}"
    row = next(line for line in text.splitlines() if line.startswith("| `execution.lease_expiry_s` |"))
    assert "| number (> 0) | `180.0` |" in row, row
    row = next(line for line in text.splitlines() if line.startswith("| `model.cache.kind` |"))
    assert '"teacache"' in row and "| required |" in row, row


def test_spec_reference_refuses_a_field_without_a_description():
    class Inner(BaseModel):
        said: int = Field(1, description="Described.")
        unsaid: int = 2

    class Outer(BaseModel):
        inner: Inner = Field(default_factory=Inner)

    with pytest.raises(ValueError, match=r"Inner\.unsaid \(inner\.unsaid\) has no description"):
        specref.render([("Test spec", Outer, "tests/test_docs.py", "A test.")])


def test_readme_is_a_five_minute_read_with_two_quick_start_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200, f"README.md has {len(text.splitlines())} lines; move detail to docs/"
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = quick.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert commands == ["make demo", "make test"], commands
    for guide in ("docs/scale.md", "docs/output-record.md", "docs/resume-and-failures.md", "docs/datasets.md",
                  "docs/performance.md", "docs/operations.md", "docs/spec-reference.md", "docs/verify.md",
                  "docs/models.md"):
        assert f"]({guide})" in text, f"README.md does not link {guide}"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    return {specref.anchor(m.group(1).strip()) for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.M)}


def test_every_link_resolves():
    broken = []
    for page in PAGES:
        for target in _LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, fragment = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{_rel(page)}: {target}")
            elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
                broken.append(f"{_rel(page)}: {target} (no such heading)")
    assert not broken, broken


# A path of this repository in backticks: `latte_ray/faults/retry.py`, `benchmarks/README.md`, `pipelines/*.yaml`.
_PATH = re.compile(r"`((?:latte_ray|benchmarks|tests|jobs|infra|pipelines|examples|docs)/[^`\s]*)`")


def test_every_file_named_exists():
    missing = []
    for page in PAGES:
        for path in _PATH.findall(page.read_text()):
            path = path.rstrip("/").split(":")[0]
            if "<" in path:
                continue  # a pattern of names (videos/<shard>/...)
            if not (list(REPO.glob(path)) if "*" in path else (REPO / path).exists()):
                missing.append(f"{_rel(page)}: {path}")
    assert len(missing) == 0, f"named but not in the repository: {missing}"


def _options(command) -> set[str]:
    return {"--help", *(opt for p in command.params for opt in (*p.opts, *p.secondary_opts))}


def _commands() -> dict[str, set[str]]:
    """Every `latte-ray` command (and `pipelines show`) with the options it takes ("": the root's)."""
    root = typer.main.get_command(app)
    out = {"": _options(root)}
    for name, command in root.commands.items():
        out[name] = _options(command)
        for sub, subcommand in getattr(command, "commands", {}).items():
            out[f"{name} {sub}"] = _options(subcommand)
    return out


# A command line as the pages show it: in a code block, or in backticks in the text.
_INVOCATION = re.compile(r"(?:\blatte-ray|python -m latte_ray)((?:[ \t]+(?:\\\n)?[^\s`|;)]+)*)")


def _code(text: str) -> list[str]:
    """The code blocks (comments left out) and the `code spans` of a page."""
    blocks = [re.sub(r"(^|\s)#.*$", "", b, flags=re.M) for b in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)]
    return blocks + re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)


def _invocations(text: str) -> list[str]:
    return [m.group(1) for span in _code(text) for m in _INVOCATION.finditer(span) if m.group(1).strip()]


def test_every_command_and_option_shown_exists():
    commands = _commands()
    wrong = []
    shown = 0
    for page in PAGES:
        for args in _invocations(page.read_text()):
            words = args.replace("\\\n", " ").split()
            name = " ".join(words[:2]) if " ".join(words[:2]) in commands else (words[0] if words else "")
            if name not in commands:
                if words and re.fullmatch(r"[a-z][a-z-]*", words[0]):
                    wrong.append(f"{_rel(page)}: no command `latte-ray {words[0]}`")
                continue
            shown += 1
            for word in words:
                flag = word.split("=")[0]
                if flag.startswith("-") and not re.fullmatch(r"-+", flag) and flag not in commands[name]:
                    wrong.append(f"{_rel(page)}: `latte-ray {name}` has no option {flag}")
    assert shown > 30, shown
    assert not wrong, wrong


def test_every_make_target_shown_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    shown = {t for page in PAGES for span in _code(page.read_text()) for t in re.findall(r"\bmake ([a-z][a-z-]*)", span)}
    assert {"demo", "test", "spec-reference"} <= shown
    assert shown <= targets, f"make targets shown but not in the Makefile: {shown - targets}"


def test_the_readme_dataflow_names_real_modules():
    text = README.read_text()
    picture = text.split("## Dataflow", 1)[1].split("```", 2)[1]
    names = set(re.findall(r"\b((?:[a-z_]+/)*[a-z_]+\.py)\b", picture))
    folders = set(re.findall(r"\b([a-z_]+)/[:\s]", picture))
    assert {"stages/denoise.py", "lease.py", "cli.py"} <= names and {"plan", "record", "faults", "ops"} <= folders
    package = REPO / "latte_ray"
    flat = {path.relative_to(package).as_posix() for path in package.rglob("*.py")}
    # a bare name in a folder's line (plan/ ... workplan.py) is that folder's module
    missing = [n for n in names if n not in flat and not any(f"{f}/{n}" in flat for f in folders)]
    assert not missing, f"the README's dataflow names modules that latte_ray/ lacks: {missing}"
    assert all((package / f).is_dir() for f in folders), folders
