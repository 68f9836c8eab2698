"""Where a run reads and writes, checked in the driver before anything starts.

- Every URL has a scheme fsspec knows (`--prompts foo://x` is an error naming it, not a traceback).
- An output must persist: memory:// (gone when the process ends) and read-only schemes are refused.
- An output is a folder or prefix, not an existing file.
- An output must not lie inside an input folder or glob (or an input inside the output's manifest): the
  next run would read the output's own manifest parts as prompt tables. Inputs elsewhere under the output
  are fine: a synthetic dataset keeps its prompt table in OUTPUT/prompts/.

The rest of the driver-side checks live with what they check (record/output.py: the output's binding and
writability; model/configs.py: the model source; stages/encode.py: the video settings); `preflight` below
runs them all, in order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import fsspec

from latte_ray.record.storage import filesystem, is_local
from latte_ray.errors import InputError
from latte_ray.spec import RunSpec

NOT_PERSISTENT = {"memory": "keeps files only in this process's memory, so the videos would be gone when it ends"}
READ_ONLY = {"http", "https", "zip", "tar", "libarchive", "github", "git", "reference", "data", "jlab", "dask"}
# Parquet files latte-ray itself writes under an output, which an input must never take in as prompt tables.
OWN_TABLES = ("manifest/part-0.parquet", "dataset/index.parquet")
_GLOB = re.compile(r"[*?\[]")


def check_urls(run: RunSpec) -> None:
    """Every prompts URL and the output URL: a known scheme; the output persistent and writable in kind."""
    for url in run.prompts:
        try:
            filesystem(url, run.storage_options)
        except InputError as e:
            raise InputError(f"prompts: {e}") from None
    try:
        filesystem(run.output, run.storage_options)
    except InputError as e:
        raise InputError(f"output: {e}") from None
    protocol = fsspec.utils.get_protocol(run.output)
    if protocol in NOT_PERSISTENT:
        raise InputError(f"output {run.output!r}: {protocol}:// {NOT_PERSISTENT[protocol]}; use a local folder or "
                        f"an object store (s3://...)")
    if protocol in READ_ONLY:
        raise InputError(f"output {run.output!r}: {protocol}:// is read-only; use a local folder or an object "
                        f"store (s3://...)")


def check_output_location(run: RunSpec) -> None:
    """The output is not a file and does not overlap an input so that the input would read its tables."""
    out_fs, out_root = filesystem(run.output, run.storage_options)
    out_root = _normal(out_fs, out_root)
    if is_local(out_fs) and os.path.isfile(out_root):
        raise InputError(f"output {run.output!r} is an existing file; give a folder (it holds videos/, manifest/ "
                        f"and the run records)")
    for url in run.prompts:
        in_fs, in_path = filesystem(url, run.storage_options)
        if type(in_fs) is not type(out_fs):
            continue
        if reads_own_tables(_normal(in_fs, in_path), out_root):
            raise InputError(
                f"output {run.output!r} lies inside the input {url!r}: the input would take in the output's own "
                f"manifest parts (OUTPUT/manifest/*.parquet) as prompt tables on the next run; put the output "
                f"outside every input folder and glob"
            )


def reads_own_tables(input_path: str, output_root: str) -> bool:
    """Would resolving `input_path` (a file, a folder read recursively, or a glob whose folder matches are
    read recursively; see plan/prompts.resolve_prompt_files) take in a Parquet file latte-ray writes under
    `output_root`?"""
    input_path = input_path.rstrip("/")
    tables = [f"{output_root.rstrip('/')}/{name}" for name in OWN_TABLES]
    if _GLOB.search(input_path):
        pattern = re.compile(fsspec.utils.glob_translate(input_path))
        return any(pattern.match(p) for t in tables for p in _self_and_ancestors(t))
    return any(t == input_path or t.startswith(input_path + "/") for t in tables)


def _self_and_ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts), 0, -1) if "/".join(parts[:i])]


def _normal(fs, path: str) -> str:
    """Local paths resolved (symlinks, '..') in their fixed part, so two spellings of a folder compare equal."""
    path = path.rstrip("/") or "/"
    if not is_local(fs):
        return path
    match = _GLOB.search(path)
    if not match:
        return os.path.realpath(path)
    fixed, _, rest = path[: match.start()].rpartition("/")
    return f"{os.path.realpath(fixed or '/')}/{rest}{path[match.start():]}".replace("//", "/")


@dataclass
class Preflight:
    """What the driver-side checks found: the output (checked, not yet bound) and the input tables."""

    output: object  # record/output.Output
    in_fs: object
    files: list[str]
    without_id: list[str]
    model: str  # a line describing the model source
    model_identity: dict | None = None  # what the source resolved to (model/configs.py ModelConfigs.identity)


def preflight(run: RunSpec, tables: bool = True) -> Preflight:
    """Every check that needs neither Ray nor model weights, in the driver, cheapest first; LatteRayError (one
    line, exit 2) names the option, field, path or URL. Writes nothing but a probe it deletes again.
    `tables=False` leaves out the prompt tables (synth checks the rest before it writes its table)."""
    from latte_ray.model.configs import check_model
    from latte_ray.model.quantize import leave_torchao_unimported
    from latte_ray.plan.prompts import inspect_prompt_tables, resolve_prompt_files
    from latte_ray.record import output as outputs
    from latte_ray.stages.encode import check_video_settings

    # The model checks import diffusers, which imports peft, which imports torchao when it is installed: its
    # load failures on a machine without its kernels would stand in front of the one-line result.
    leave_torchao_unimported(run.pipeline.model.quantization)
    check_urls(run)
    check_output_location(run)
    in_fs, files, without_id = None, [], []
    if tables:
        in_fs, files = resolve_prompt_files(run.prompts, run.storage_options)
        _, without_id = inspect_prompt_tables(in_fs, files)
    sampling = run.pipeline.sampling
    check_video_settings(run.pipeline.video, sampling.height, sampling.width)
    out = outputs.open_output(run.output, run.storage_options)
    outputs.check_binding(out, run.pipeline, run.seed)
    outputs.probe_writable(out)
    if run.pipeline.model.quantization is not None:
        from latte_ray.model.quantize import check_before_run

        check_before_run(run.pipeline.model)  # float8 on a machine without float8 GPUs: refused here
    model, identity = check_model(run.pipeline, run.storage_options)
    outputs.check_model_identity(out, identity)  # the same source resolving to other weights: refused
    from latte_ray.plan.fit import check_attention_grid

    check_attention_grid(run.pipeline)  # a batch past CUDA's grid in temporal attention: refused before any GPU
    if run.pipeline.scoring.enabled:
        from latte_ray.model.clip import check_sources

        check_sources(run.pipeline.scoring, run.storage_options)
    return Preflight(output=out, in_fs=in_fs, files=files, without_id=without_id, model=model,
                     model_identity=identity)
