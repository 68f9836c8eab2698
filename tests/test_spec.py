"""Pipeline specs: every shipped spec validates; malformed specs fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from latte_ray.spec import PIPELINES_DIR, SpecError, load_pipeline_spec, parse_pipeline_spec
from tests.conftest import REPO

SHIPPED = sorted(p for p in PIPELINES_DIR.glob("*.yaml") if "model" in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_specs_validate(path: Path):
    spec = load_pipeline_spec(path)
    assert spec.name == path.stem
    assert len(spec.spec_hash()) == 16
    assert spec.description and "\n" not in spec.description and len(spec.description) <= 120, \
        "`latte-ray pipelines` shows each spec's one-line description"


def test_specs_are_the_checkouts_own_when_run_from_it():
    """From a source tree the built-in specs are its pipelines/ folder (a wheel carries them as
    latte_ray/pipelines, tests/test_wheel.py), so the code and specs that run come from one tree."""
    assert PIPELINES_DIR == REPO / "pipelines"
    assert len(SHIPPED) >= 3


def test_description_is_not_part_of_the_spec_hash():
    spec = load_pipeline_spec("tiny-cpu")
    raw = yaml.safe_load(spec.model_dump_json())
    raw["description"] = "another one-line description"
    assert parse_pipeline_spec(raw).spec_hash() == spec.spec_hash()


def test_production_spec_has_production_defaults():
    spec = load_pipeline_spec("latte-1-t2v-512")
    assert spec.model.source == "maxin-cn/Latte-1"
    assert spec.model.dtype in ("float16", "bfloat16") and spec.model.device == "cuda"
    assert spec.model.channels_last and spec.model.compile.enabled and spec.model.compile.vae_decode
    s = spec.sampling
    assert (s.num_inference_steps, s.guidance_scale, s.height, s.width, s.video_length) == (50, 7.5, 512, 512, 16)
    assert s.decode_chunk_size % s.video_length == 0
    assert spec.execution.num_gpus_per_actor == 1


def test_embedded_default_is_tiny_on_cpu():
    spec = load_pipeline_spec()
    assert spec.name == "tiny-cpu" and spec.model.source == "tiny" and spec.model.device == "cpu"


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"model": {"sourcee": "x"}}, "model.sourcee: unknown key"),
        ({"sampling": {"height": 100}}, "sampling"),
        ({"sampling": {"num_inference_steps": 0}}, "sampling.num_inference_steps"),
        ({"model": {"dtype": "float8"}}, "model.dtype"),
        ({"video": {"codec": "h264_nvenc"}}, "video.codec"),
        ({"execution": {"concurrency": [3, 1]}}, "execution.concurrency"),
        ({"execution": {"batch_size": -1}}, "execution.batch_size"),
        ({"colour": "blue"}, "colour: unknown key"),
    ],
)
def test_invalid_specs_name_the_field(patch, field):
    base = yaml.safe_load(load_pipeline_spec("tiny-cpu").model_dump_json())
    for section, values in patch.items():
        if isinstance(values, dict):
            base[section].update(values)
        else:
            base[section] = values
    with pytest.raises(SpecError) as err:
        parse_pipeline_spec(base, origin="test.yaml")
    assert field in str(err.value) and "test.yaml" in str(err.value)


def test_unknown_spec_name_lists_known_ones():
    with pytest.raises(SpecError, match="tiny-cpu"):
        load_pipeline_spec("no-such-pipeline")


def test_spec_hash_tracks_pixels_not_placement():
    spec = load_pipeline_spec("tiny-cpu")
    same = spec.with_overrides(batch_size=7, concurrency=(1, 4))
    assert same.spec_hash() == spec.spec_hash()
    raw = yaml.safe_load(spec.model_dump_json())
    raw["sampling"]["guidance_scale"] = 3.0
    assert parse_pipeline_spec(raw).spec_hash() != spec.spec_hash()
    raw = yaml.safe_load(spec.model_dump_json())
    raw["video"]["crf"] = 23
    assert parse_pipeline_spec(raw).spec_hash() != spec.spec_hash()


def test_new_optional_fields_leave_existing_hashes_alone():
    """Outputs are bound to their spec hash: adding `model.quantization`, TeaCache's cache fields and
    `model.compile.scope` must not change the hash of a spec that uses none (values computed before those fields existed)."""
    before = {"tiny-cpu": ("abcfd450dbb00b56", "6f2e424e8ffeb91d"),
              "tiny-cpu-lossless": ("845fd1228b512b0a", "41b5474e4d0004ce"),
              "latte-1-t2v-512": ("83e36de3b59db8c6", "e1fe823fbd4448ab")}
    for name, (plain, faster_cache) in before.items():
        spec = load_pipeline_spec(name)
        raw = yaml.safe_load(spec.model_dump_json())
        raw["model"]["revision"] = None  # latte-1-t2v-512 was pinned later, which is a new spec on purpose
        raw["model"]["compile"]["scope"] = "whole"  # ... and compiles regionally since, also on purpose
        unpinned = parse_pipeline_spec(raw)
        raw["model"]["cache"] = {"kind": "faster_cache"}
        assert (unpinned.spec_hash(), parse_pipeline_spec(raw).spec_hash()) == (plain, faster_cache), name


def test_teacache_and_quantization_specs():
    from latte_ray.spec import TEACACHE_DEFAULT_THRESHOLD, TEACACHE_LATTE_COEFFICIENTS

    def with_model(**model):
        raw = yaml.safe_load(load_pipeline_spec("tiny-cpu").model_dump_json())
        raw["model"].update(model)
        return parse_pipeline_spec(raw, origin="test.yaml")

    tea = with_model(cache={"kind": "teacache"}).model.cache
    assert (tea.threshold, tea.coefficients) == (TEACACHE_DEFAULT_THRESHOLD, TEACACHE_LATTE_COEFFICIENTS)
    hashes = {with_model(cache={"kind": "teacache", "threshold": t}).spec_hash() for t in (0.1, 0.2)}
    hashes.add(with_model(cache={"kind": "teacache", "threshold": 0.1, "coefficients": [1.0, 0.0]}).spec_hash())
    hashes |= {with_model(quantization={"kind": k}).spec_hash() for k in ("int8_weight_only", "int8_dynamic")}
    hashes.add(with_model(quantization={"kind": "int8_weight_only", "components": ["transformer", "text_encoder"]})
               .spec_hash())
    assert len(hashes) == 6 and load_pipeline_spec("tiny-cpu").spec_hash() not in hashes
    for model, field in (
        ({"cache": {"kind": "faster_cache", "threshold": 0.1}}, "cache.threshold applies to kind 'teacache' only"),
        ({"cache": {"kind": "teacache", "threshold": -1}}, "model.cache.threshold"),
        ({"quantization": {"kind": "int4"}}, "model.quantization.kind"),
        ({"quantization": {"kind": "int8_weight_only", "components": ["vae"]}}, "model.quantization.components"),
        ({"quantization": {"kind": "float8_dynamic"}}, "model.quantization.kind 'float8_dynamic' needs a CUDA GPU"),
        ({"cache": {"kind": "faster_cache"}, "compile": {"enabled": True, "fullgraph": True}},
         "model.compile.fullgraph is true with model.cache.kind 'faster_cache'"),
        *(({"cache": {"kind": kind}, "compile": {"enabled": True, "mode": mode}},
           f"model.compile.mode '{mode}' replays CUDA graphs")
          for kind in ("faster_cache", "pyramid_attention_broadcast", "teacache")
          for mode in ("reduce-overhead", "max-autotune")),
    ):
        with pytest.raises(SpecError) as err:
            with_model(**model)
        assert field in str(err.value) and "test.yaml" in str(err.value), str(err.value)
    with_model(device="auto", quantization={"kind": "float8_dynamic"})  # checked on the actor's device
