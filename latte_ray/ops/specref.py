"""The spec reference (docs/spec-reference.md), rendered from the pydantic models themselves.

Every field of a pipeline spec (latte_ray/spec.py) and of a synth recipe (latte_ray/datasets/synth.py) is listed
with its dotted path, type and bounds, default and description, so the reference cannot say something the models
do not: tests/test_docs.py renders it again and fails when the committed file differs. A field without a
description is refused here, by name, because the reference would have nothing to say about it.

Regenerate with `make spec-reference` (or `python -m latte_ray.ops.specref docs/spec-reference.md`).
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from pathlib import Path

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from latte_ray.datasets.synth import Recipe
from latte_ray.spec import PipelineSpec

DOCUMENTS = (
    ("Pipeline spec", PipelineSpec, "latte_ray/spec.py",
     "A pipeline spec is a YAML file (`pipelines/*.yaml`; `latte-ray pipelines show NAME` prints a built-in one) "
     "or the `latte_ray.load_spec(name_or_path, overrides)` result. Unknown keys are errors that name the key. "
     "The spec hash, which an output is bound to, covers every field that can change a video's bytes; the "
     "`name`, `description`, `execution`, `scoring` and `sidecars` sections, `model.device`, `model.sim` and "
     "`model.compile.cache_dir` are outside it."),
    ("Synth recipe", Recipe, "latte_ray/datasets/synth.py",
     "A recipe (`latte-ray synth --recipe FILE`; `pipelines/synth-example.yaml`) crosses prompt templates with "
     "attribute lists into a prompt table, generates it with a pipeline spec and exports the videos."),
)

_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "<="),
           (annotated_types.Lt, "lt", "<"), (annotated_types.MinLen, "min_length", "length >="),
           (annotated_types.MaxLen, "max_length", "length <="))


def _section(annotation: object) -> type[BaseModel] | None:
    """The model a field holds (itself, or inside `X | None`), or None for a plain value."""
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def type_name(annotation: object) -> str:
    """A field's type as a spec author writes it: YAML words (string, integer, list, mapping, null)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping {type_name(args[0])} → {type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def bounds(field: FieldInfo) -> str:
    """The field's numeric and length bounds (`>= 1, <= 256`), as pydantic enforces them."""
    found = []
    for item in field.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(item, kind):
                found.append(f"{sign} {getattr(item, attr)}")
    return ", ".join(found)


def default_text(field: FieldInfo) -> str:
    """The default as YAML would spell it (null, true, [-1, 681]); 'required' when there is none."""
    if field.default is PydanticUndefined:
        if field.default_factory is None:
            return "required"
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(its fields' defaults)"
    else:
        value = field.default
    return "`" + json.dumps(to_jsonable_python(value), ensure_ascii=False) + "`"


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, <placeholders> shown rather than read as HTML tags."""
    text = " ".join(text.split()).replace("|", "\\|")
    return re.sub(r"<(?=[A-Za-z/!])", "&lt;", text)


def anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


def _heading(title: str, path: str) -> str:
    return f"{title} `{path}`"


def _rows(title: str, model: type[BaseModel], prefix: str, sections: list) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        section = _section(field.annotation)
        kind = type_name(field.annotation)
        if section is not None:
            if typing.get_origin(field.annotation) is list:
                path += "[]"  # a list of mappings: its items' fields are path[].field
            sections.append((path, field, section))
            link = f"#{anchor(_heading(title, path))}"
            kind = kind.replace("section", f"[section]({link})")
        elif not field.description:
            raise ValueError(f"{model.__name__}.{name} ({path}) has no description: give its Field a description, "
                             "the spec reference shows it")
        limits = bounds(field)
        if limits:
            kind += f" ({limits})"
        description = field.description or (f"See [`{path}`]({link}) below." if section is not None else "")
        rows.append(f"| `{path}` | {_cell(kind)} | {_cell(default_text(field))} | {_cell(description)} |")
    return rows


def _document(title: str, model: type[BaseModel], source: str, intro: str) -> list[str]:
    lines = [f"## {title}", "", f"{intro} Fields of `{model.__name__}` in `{source}`.", ""]
    queue = [("", None, model)]
    while queue:
        prefix, field, section = queue.pop(0)
        nested: list = []
        rows = _rows(title, section, f"{prefix}." if prefix else "", nested)
        if prefix:
            lines += [f"### {_heading(title, prefix)}", ""]
            about = section.__doc__ or (field.description if field is not None else None)
            if about:
                lines += [" ".join(about.split()), ""]
        lines += ["| field | type | default | description |", "|---|---|---|---|", *rows, ""]
        queue = nested + queue  # depth first: a section's subsections follow it
    return lines


def render(documents=DOCUMENTS) -> str:
    """docs/spec-reference.md as the models describe themselves now (`documents`: (title, model, source file,
    introduction) per part)."""
    lines = [
        "# Spec reference",
        "",
        "<!-- Generated by latte_ray/ops/specref.py from the pydantic models; do not edit by hand. "
        "Regenerate with `make spec-reference`; tests/test_docs.py fails when this file and the models differ. -->",
        "",
        "Every field of a pipeline spec and of a synth recipe: its dotted path (the keys in YAML; for a pipeline spec "
        "also the name `latte_ray.load_spec(..., overrides={...})` takes), its type and bounds, its default and what "
        "it does.",
        "",
    ]
    for title, model, source, intro in documents:
        lines += _document(title, model, source, intro)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    """Write the reference to the path given (default docs/spec-reference.md, from the repository root)."""
    out = Path(argv[0] if argv else "docs/spec-reference.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
