"""latte-ray: batch text-to-video generation with Latte on Ray Data.

The public API, imported on first use so that `import latte_ray` stays light (no Ray, torch or diffusers):

    spec = latte_ray.load_spec("tiny-cpu", {"sampling.num_inference_steps": 4})
    summary = latte_ray.run(spec, "prompts.parquet", "s3://bucket/out/")       # what `latte-ray run` does
    videos = latte_ray.build_processor(spec)(ray.data.from_items([{"prompt": "a red fox"}]))
    report = latte_ray.verify("s3://bucket/out/", deep=True)                   # what `latte-ray verify` does

Errors raised on purpose are `latte_ray.LatteRayError` subclasses with the CLI's exit code (latte_ray/errors.py).
"""

_API = {"load_spec", "run", "build_processor", "verify"}
_ERRORS = {"LatteRayError", "SpecError", "InputError", "OutputBindingError", "OutputDamaged", "LeaseHeld",
           "RunFailed", "LeaseLost", "RunStalled", "StageGraphError", "PlanDoesNotFit", "ModelSourceError",
           "QuantizationUnsupported"}

__all__ = sorted(_API | _ERRORS | {"RunSummary", "__version__"})


def __getattr__(name: str):
    if name == "__version__":  # computed on first use (latte_ray.versions: pyproject.toml's version)
        from latte_ray.versions import version

        return version()
    if name in _API:
        from latte_ray import api

        return getattr(api, name)
    if name in _ERRORS:
        from latte_ray import errors

        return getattr(errors, name)
    if name == "RunSummary":
        from latte_ray.runner import RunSummary

        return RunSummary
    raise AttributeError(f"module 'latte_ray' has no attribute {name!r}")
