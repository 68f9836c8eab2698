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
