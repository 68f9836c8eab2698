"""One error hierarchy: every error latte-ray raises on purpose is a LatteRayError with the exit code the CLI
and the job entrypoints end with, so that a library caller catches one base class and a command maps any of
them to one line and one code in one place.

Exit codes: 2 bad input caught before any work (a spec, a prompt table, an option, an output bound to another
spec or damaged, an output another live run holds); 1 a run that failed (its root cause in one line); 3 a run
the progress watchdog stopped (resume with the same command).
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_STALLED = 3


class LatteRayError(Exception):
    """Base of every error latte-ray raises on purpose; `exit_code` is what a command exits with."""

    exit_code: int = EXIT_FAILED


class SpecError(LatteRayError, ValueError):
    """A malformed pipeline or run spec (a field, a value, a name or a spec file); raised before any model loads."""

    exit_code = EXIT_BAD_INPUT


class InputError(LatteRayError, ValueError):
    """Bad input other than the spec: a prompt table, a command-line option, a path or URL that cannot be used;
    raised before any model loads."""

    exit_code = EXIT_BAD_INPUT


class OutputBindingError(LatteRayError):
    """An output that this run may not write: bound to another spec, or not made by latte-ray."""

    exit_code = EXIT_BAD_INPUT


class OutputDamaged(LatteRayError):
    """A file of an output's record that cannot be read as latte-ray wrote it (truncated, foreign, of another
    schema, a folder where a file belongs); the message names the path and what to do (`latte-ray verify
    --repair`). A permanent error: never retried as a transient one."""

    exit_code = EXIT_BAD_INPUT


class ForeignFile(OutputDamaged):
    """A file in an output's record folder that latte-ray did not write (another schema): `compact` leaves it
    where it is and names it; readers refuse it like any damage; `verify --repair` moves it aside."""


class LeaseHeld(LatteRayError):
    """The output's lease is held by another live run (wait with --wait-for-lease, or use another output)."""

    exit_code = EXIT_BAD_INPUT


class RunFailed(LatteRayError, RuntimeError):
    """A run that could not finish, with its root cause in one line (the CLI prints it and exits 1)."""

    exit_code = EXIT_FAILED


class OutputFull(RunFailed):
    """The output's storage has no space left (ENOSPC, a quota): the run stops there, with its record's end
    written; the same command resumes it once there is space. The message starts `no space left on OUTPUT`."""


class LeaseLost(RunFailed):
    """This run's lease was taken over (or its object deleted, or not renewed within its expiry): it commits
    nothing more. The message is the one-line reason (the CLI exits 1)."""


class RunStalled(LatteRayError, RuntimeError):
    """The run made no progress for two stall timeouts; the message is the one-line reason (exit 3)."""

    exit_code = EXIT_STALLED


class StageGraphError(LatteRayError, ValueError):
    """Declared stages composed so that one reads a column nothing upstream produces (latte_ray/stages/
    declare.py); found before anything executes, in one line naming the stage and the column."""

    exit_code = EXIT_BAD_INPUT


class PlanDoesNotFit(LatteRayError):
    """A plan that can never be scheduled on this cluster (no autoscaler can add what it lacks), or that
    asks for hardware this machine lacks; refused before any actor starts, naming the numbers."""

    exit_code = EXIT_BAD_INPUT


class ModelSourceError(LatteRayError, RuntimeError):
    """A model (or LoRA, or scoring model) source that cannot be loaded where it is loaded: a missing folder,
    a partial mirror, a file of the wrong size. Raised on a node; a run reports it as its root cause (exit 1)."""

    exit_code = EXIT_FAILED


class QuantizationUnsupported(LatteRayError, RuntimeError):
    """The spec's quantization kind cannot run on this device (the message says why, in one line)."""

    exit_code = EXIT_BAD_INPUT
