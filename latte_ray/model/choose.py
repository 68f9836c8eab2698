"""Which engine a spec gets, decided without importing torch: the stand-ins (`null`, `sim`) never load it,
so a fleet of simulated GPU actors costs a process each and no torch import."""

from __future__ import annotations

from latte_ray.spec import NULL_SOURCE, SIM_SOURCE, PipelineSpec


def make_engine(spec: PipelineSpec, **kwargs):
    """The spec's engine: its model family's (latte_ray/model/families/), or a benchmark stand-in: NullEngine (`model.source: null`) or
    SimEngine (`model.source: sim`)."""
    if spec.model.source == NULL_SOURCE:
        from latte_ray.model.null import NullEngine

        return NullEngine(spec)
    if spec.model.source == SIM_SOURCE:
        from latte_ray.model.sim import SimEngine

        return SimEngine(spec)
    from latte_ray.model.families import make_engine as family_engine

    return family_engine(spec, **kwargs)
