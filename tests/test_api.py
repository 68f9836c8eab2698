"""The public Python API (latte_ray/api.py): a light import, load_spec with dotted overrides, run raising
LatteRayError (never SystemExit), and examples/compose.py: the processor inside a user's own Ray Data pipeline.
(The processor's bytes against a run's: tests/test_correctness.py, which has the run.)"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import latte_ray
from latte_ray.stages.encode import decode_mp4
from tests.conftest import REPO, write_prompts


def test_import_latte_ray_stays_light():
    code = ("import sys, latte_ray; latte_ray.LatteRayError; latte_ray.SpecError; "
            "heavy = {'ray', 'torch', 'diffusers', 'transformers', 'av'} & set(sys.modules); "
            "assert not heavy, heavy; assert callable(latte_ray.load_spec)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr


def test_every_public_function_documents_its_arguments_returns_and_errors():
    for name in ("load_spec", "run", "build_processor", "verify"):
        doc = getattr(latte_ray, name).__doc__
        for part in ("Args:", "Returns:", "Raises:"):
            assert part in doc, (name, part)
    assert issubclass(latte_ray.InputError, latte_ray.LatteRayError) and latte_ray.RunStalled.exit_code == 3


def test_verify_refuses_a_folder_that_is_no_output_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("not an output")
    with pytest.raises(latte_ray.InputError, match=str(tmp_path)) as error:
        latte_ray.verify(str(tmp_path))
    assert error.value.exit_code == 2
    assert not (tmp_path / "verify").exists() and not (tmp_path / "quarantine").exists()  # nothing written


def test_load_spec_applies_dotted_overrides_and_names_what_it_refuses(tmp_path):
    spec = latte_ray.load_spec("tiny-cpu", {"sampling.num_inference_steps": 4, "execution.batch_size": 2,
                                            "model.cache": {"kind": "teacache"}})
    assert (spec.sampling.num_inference_steps, spec.execution.batch_size) == (4, 2)
    assert spec.model.cache.kind == "teacache"
    assert spec.spec_hash() != latte_ray.load_spec("tiny-cpu").spec_hash()
    assert latte_ray.load_spec(spec) is spec  # a spec object, no overrides: as it is
    cases = [
        ("no-such-spec", None, "pipeline spec 'no-such-spec' not found"),
        ("tiny-cpu", {"sampling.num_inference_stepz": 4}, "sampling.num_inference_stepz: unknown key"),
        ("tiny-cpu", {"samplin.num_inference_steps": 4}, "samplin is not a spec field"),
        ("tiny-cpu", {"sampling.num_inference_steps": 0}, "sampling.num_inference_steps: Input should be greater"),
        ("tiny-cpu", {"name.first": "x"}, "name is not a section of the spec"),
    ]
    for name, overrides, message in cases:
        with pytest.raises(latte_ray.SpecError, match=message):
            latte_ray.load_spec(name, overrides)
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling: [1, 2\n")
    with pytest.raises(latte_ray.SpecError, match="not valid YAML"):
        latte_ray.load_spec(str(bad))


def test_run_raises_latte_ray_errors_with_exit_codes_never_system_exit(tmp_path):
    """Checked before Ray or any model starts: nothing runs, nothing is written but what the checks probe."""
    with pytest.raises(latte_ray.InputError) as bad_limit:
        latte_ray.run("tiny-cpu", str(tmp_path / "p.parquet"), str(tmp_path / "out"), limit=0)
    assert "limit 0" in str(bad_limit.value) and bad_limit.value.exit_code == 2
    with pytest.raises(latte_ray.LatteRayError) as missing:
        latte_ray.run("tiny-cpu", str(tmp_path / "missing.parquet"), str(tmp_path / "out"))
    assert "missing.parquet" in str(missing.value) and missing.value.exit_code == 2
    table = write_prompts(tmp_path / "p.parquet", {"prompt": ["a dog"]})
    with pytest.raises(latte_ray.InputError, match="exclude each other"):
        latte_ray.run("tiny-cpu", str(table), str(tmp_path / "out"), wait_for_lease=True, lease=False)
    assert not (tmp_path / "out" / "latte-ray.json").exists()


def test_the_compose_example_runs_the_processor_inside_a_ray_data_pipeline(ray_local, model_cache, tmp_path):
    """examples/compose.py: prompts made by a Ray Data step, the processor, a filter on a per-video statistic
    and on the row status, written with Ray Data. A subject that makes a bad prompt (a NUL character) is an
    error row the filter drops; every written video decodes to its recorded size, and its bytes are the
    ones its sha256 names."""
    from examples import compose

    subjects = ["a red fox", "a lighthouse", "bad \x00 subject"]
    out = compose.main(str(tmp_path / "kept"), "tiny-cpu", min_motion=0.0, subjects=subjects)
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["subject"] for r in rows) == ["a lighthouse", "a red fox"]
    spec = latte_ray.load_spec("tiny-cpu")
    for row in rows:
        assert row["id"] == f"compose-{subjects.index(row['subject'])}"
        assert row["prompt"] == compose.TEMPLATE.format(subject=row["subject"])
        assert hashlib.sha256(row["video"]).hexdigest() == row["sha256"]
        frames = decode_mp4(row["video"])
        assert frames.shape == (row["num_frames"], row["height"], row["width"], 3)
        assert (row["num_frames"], row["height"], row["width"]) == (
            spec.sampling.video_length, spec.sampling.height, spec.sampling.width)
        assert row["motion_score"] >= 0.0 and row["generate_seconds"] > 0
