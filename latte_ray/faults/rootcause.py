"""One line for an error that only an actor can hit (a corrupt weight file, out of memory at load).

Ray Data ends such a run with a RayActorError or RayTaskError whose text is the actor's whole traceback,
often several chained ones, under Ray's own frames: hundreds of lines with the useful one buried at the
bottom. `describe` finds the stage that failed and the original exception (type and first line of its
message), from the exception objects where Ray kept them and from the traceback text where it did not
(an actor's creation-task error reaches the driver as text only). The full chain stays in Ray's logs and is
logged at DEBUG by the runner.
"""

from __future__ import annotations

import re
from typing import Mapping

from latte_ray.errors import RunFailed  # noqa: F401 - re-exported: latte_ray.faults.rootcause.RunFailed

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The last line of a printed traceback: `module.Type: message`.
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Fault|Failure|Killed)\w*): (.+)$")
def describe(error: BaseException, stages: Mapping[str, str] | None = None) -> str:
    """`<stage> failed: <Type>: <message>` for an exception raised out of a Ray Data execution. `stages`:
    {declared stage name: what to call it} (stages/declare.labels(): the declarations, so that every stage
    a graph composes is named); a stage not in it is called `Ray Data execution`."""
    stages = stages or {}
    chain = _chain(error)
    texts = [_ANSI.sub("", str(e)) for e in chain]
    where = next((stages[name] for text in texts for name in _stage_names(text, stages)), "Ray Data execution")
    for e in reversed(chain):  # the deepest exception object that is not one of Ray's wrappers
        if not _is_ray(e) and str(e).strip():
            first = _first_line(str(e))
            notes = list(getattr(e, "__notes__", ()) or ()) or _notes_in(texts, first)
            return f"{where} failed: {_type_name(e)}: {first}" + "".join(f" ({_first_line(str(n))})" for n in notes)
    for text in texts:  # Ray kept only text: the last exception line of the traceback it carries
        found = [m for m in (_EXCEPTION_LINE.match(line.strip()) for line in text.splitlines()) if m]
        found = [m for m in found if not m.group(1).startswith("ray.")]
        if found:
            message = found[-1].group(2).strip()[:500]
            notes = "".join(f" ({n})" for n in _notes_in([text], message))
            return f"{where} failed: {found[-1].group(1)}: {message}{notes}"
    return f"{where} failed: {_type_name(error)}: {_first_line(texts[0]) if texts else ''}"


def _notes_in(texts: list[str], first: str) -> list[str]:
    """The notes (PEP 678: e.g. faults/retry.py's "gave up after ...") printed under an exception's line in
    a traceback text, for exceptions whose notes do not survive pickling (botocore's keep only kwargs)."""
    for text in texts:
        lines = text.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            if first and lines[i].rstrip().endswith(first):
                notes = []
                for line in lines[i + 1:]:
                    if not line.strip() or line.startswith((" ", "Traceback", "During handling", "The above")):
                        break
                    notes.append(line.strip())
                return notes
    return []


def _type_name(e: BaseException) -> str:
    """As a traceback prints it: builtins bare, anything else with its module."""
    module = type(e).__module__
    return type(e).__qualname__ if module in (None, "builtins") else f"{module}.{type(e).__qualname__}"


def damage_in(error: BaseException):
    """The OutputDamaged (latte_ray/errors.py) that `error` carries, however Ray wrapped it (a pre-pass task,
    a stage actor), as a plain one: its line names the damaged path; None when there is none."""
    from latte_ray.errors import OutputDamaged

    for e in reversed(_chain(error)):  # the deepest: Ray's wrapper classes carry the traceback in their text
        if isinstance(e, OutputDamaged):
            return OutputDamaged(_first_line(_ANSI.sub("", str(e.args[0] if e.args else e))))
    found = _raised_in_text(error, ("OutputDamaged", "ForeignFile"))
    return OutputDamaged(found) if found else None


def _raised_in_text(error: BaseException, names: tuple[str, ...]) -> str | None:
    """The message of the last `latte_ray.errors.<name>: message` line in the traceback texts Ray kept (an
    actor's exception reaches the driver as a UserCodeException carrying only text)."""
    pattern = re.compile(rf"^(?:latte_ray\.errors\.)?(?:{'|'.join(names)}): (.+)$")
    for e in _chain(error):
        hits = [m.group(1).strip() for m in (pattern.match(line.strip()) for line in _ANSI.sub("", str(e)).splitlines())
                if m]
        if hits:
            return hits[-1][:1000]
    return None


def no_space_in(error: BaseException, output: str):
    """An OutputFull (latte_ray/errors.py) for `error` when it carries one, or an ENOSPC/EDQUOT OSError,
    however Ray wrapped it; None otherwise."""
    import errno

    from latte_ray.errors import OutputFull

    for e in reversed(_chain(error)):
        if isinstance(e, OutputFull):
            return OutputFull(_first_line(_ANSI.sub("", str(e.args[0] if e.args else e))))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return OutputFull(f"no space left on {output}: {_first_line(str(e))}; free space (or move the output), "
                              f"then run the same command again to resume")
    found = _raised_in_text(error, ("OutputFull",))
    return OutputFull(found) if found else None


def _chain(error: BaseException) -> list[BaseException]:
    """The exception, what caused it (Ray's RayTaskError.cause included), and so on, outermost first."""
    out: list[BaseException] = []
    todo = [error]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        todo += [getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), BaseException) else None,
                 e.__cause__, e.__context__]
    return out


def _is_ray(e: BaseException) -> bool:
    module = type(e).__module__ or ""
    return module.startswith("ray.") or module == "ray" or type(e).__name__.startswith("Ray")


def _stage_names(text: str, stages: Mapping[str, str]) -> list[str]:
    return [name for name in re.findall(r"MapBatches\((\w+)\)", text) if name in stages]


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:500] if lines else ""
