"""An output is bound to one spec (OUTPUT/latte-ray.json, create-only), every run leaves its own record
(OUTPUT/runs/<run_id>.json), operations commands read that history, and an error only an actor can hit
(a corrupt weight file) ends the run with its root cause in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from latte_ray import runner
from latte_ray.cli import app
from latte_ray.faults.rootcause import RunFailed
from latte_ray.record.output import RunLog, bind, check_binding, list_runs, open_output, spec_diff
from latte_ray.record.storage import write_manifest_part
from latte_ray.errors import OutputBindingError
from latte_ray.spec import RunSpec, parse_pipeline_spec
from tests.conftest import REPO, own_output, write_prompts
from tests.invariants import fast_spec, manifest, snapshot, write_spec


def _spec(source: str | None = None, **sampling):
    raw = yaml.safe_load(fast_spec().model_dump_json())
    raw["sampling"].update(sampling)
    if source:
        raw["model"]["source"] = source
    return parse_pipeline_spec(raw)


# ------------------------------------------------------------------------------------ units, no Ray


def test_the_record_is_create_only_and_names_what_differs(tmp_path):
    out = open_output(str(tmp_path / "out"))
    first = bind(out, _spec(num_inference_steps=4), 0, "test")
    data = (tmp_path / "out" / "latte-ray.json").read_bytes()
    assert first["spec_hash"] == _spec(num_inference_steps=4).spec_hash() and first["run_seed"] == 0
    assert bind(out, _spec(num_inference_steps=4), 0, "test") == first  # the same spec: the same record
    with pytest.raises(OutputBindingError) as info:
        bind(out, _spec(num_inference_steps=6, guidance_scale=3.0), 0, "test")  # as a second run starting at once
    message = str(info.value)
    assert first["spec_hash"] in message and _spec(num_inference_steps=6, guidance_scale=3.0).spec_hash() in message
    assert "sampling.guidance_scale: 7.5 -> 3.0; sampling.num_inference_steps: 4 -> 6" in message
    assert (tmp_path / "out" / "latte-ray.json").read_bytes() == data
    with pytest.raises(OutputBindingError, match="run seed 0 .* --seed 3"):
        check_binding(out, _spec(num_inference_steps=4), 3)
    # what the hash leaves out (execution, device, name) does not bind
    raw = yaml.safe_load(_spec(num_inference_steps=4).model_dump_json())
    raw.update(name="renamed")
    raw["execution"].update(batch_size=7, concurrency=[1, 3])
    raw["model"]["device"] = "cuda"
    assert check_binding(out, parse_pipeline_spec(raw), 0) == first
    assert spec_diff(raw, raw) == ["no field differs (the spec hash was computed by another latte-ray version)"]


def test_an_older_output_is_adopted_only_when_every_row_has_the_runs_spec(tmp_path):
    from tests.test_compact import _rows

    out = open_output(str(tmp_path / "out"))
    rows = _rows(["a", "b"])
    spec = fast_spec()
    same = rows.set_column(rows.schema.get_field_index("spec_hash"), "spec_hash", pa.array([spec.spec_hash()] * 2))
    write_manifest_part(out.fs, out.layout, same, name="old-1")
    (tmp_path / "out" / "run.json").write_text(json.dumps({"seed": 4, "spec_hash": spec.spec_hash()}))
    with pytest.raises(OutputBindingError, match="last run with --seed 4; this run has --seed 0"):
        check_binding(out, spec, 0)
    assert check_binding(out, spec, 4) is None  # adoptable: the run binds it
    other = rows.set_column(rows.schema.get_field_index("spec_hash"), "spec_hash", pa.array(["feedfacefeedface"] * 2))
    write_manifest_part(out.fs, out.layout, other, name="old-2")
    with pytest.raises(OutputBindingError, match="rows of spec hash feedfacefeedface"):
        check_binding(out, spec, 4)


def test_each_run_has_its_own_record_and_a_failed_one_replaces_none(tmp_path):
    out = open_output(str(tmp_path / "out"))
    good = RunLog(out, "20261101T000000-aaaaaaaa", {"spec_hash": "x"})
    good.start()
    good.finish("ok", ok=3)
    kept = (tmp_path / "out" / "runs" / "20261101T000000-aaaaaaaa.json").read_bytes()
    bad = RunLog(out, "20261102T000000-bbbbbbbb", {"spec_hash": "x"})
    bad.start()
    assert list_runs(out)[1][-1]["outcome"] == "running"
    bad.finish("failed", "generation actor failed: OSError: disk")
    assert (tmp_path / "out" / "runs" / "20261101T000000-aaaaaaaa.json").read_bytes() == kept
    total, runs = list_runs(out, last=1)
    assert total == 2 and [r["run_id"] for r in runs] == ["20261102T000000-bbbbbbbb"]
    assert runs[0]["reason"] == "generation actor failed: OSError: disk" and runs[0]["ended_at"]


def test_operations_on_a_missing_bucket_and_dry_runs_to_an_unwritable_output(s3_server, tmp_path):
    options = s3_server.storage_options()
    flags = [f"-s{k}={v}" for k, v in options.items()]
    for argv in (["status", "s3://no-such-bucket-lr/out"], ["report", "s3://no-such-bucket-lr/out"],
                 ["compact", "s3://no-such-bucket-lr/out"]):
        result = CliRunner().invoke(app, [*argv, *flags])
        assert result.exit_code == 2, result.output
        assert own_output(result).strip() == "error: s3://no-such-bucket-lr/out: not a latte-ray output (no latte-ray.json there); check the path"
    table = write_prompts(tmp_path / "p.parquet", {"prompt": ["a cat"]})
    spec = write_spec(tmp_path / "spec.yaml", fast_spec())
    result = CliRunner().invoke(app, ["run", "--dry-run", "-p", str(spec), "--prompts", str(table),
                                      "--output", "s3://no-such-bucket-lr/out", *flags])
    assert result.exit_code == 2
    assert own_output(result).strip().startswith("error: output: cannot write to s3://no-such-bucket-lr/out: "
                                            "FileNotFoundError"), result.output
    bucket = s3_server.make_bucket("dry-" + uuid.uuid4().hex[:8])
    result = CliRunner().invoke(app, ["run", "--dry-run", "-p", str(spec), "--prompts", str(table),
                                      "--output", f"s3://{bucket}/out", *flags])
    assert result.exit_code == 0 and "1 to generate" in result.output, result.output
    from latte_ray.record.storage import filesystem

    fs, _ = filesystem(f"s3://{bucket}", options)
    assert fs.find(bucket) == [], "the dry run's probe was left behind"


def test_an_offline_hub_id_fails_in_one_line_before_ray(tmp_path):
    """A real process, as a user runs it: HF_HUB_OFFLINE is read when huggingface_hub is imported."""
    spec = fast_spec()
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"source": "no-such-org/no-such-latte"})})
    table = write_prompts(tmp_path / "p.parquet", {"prompt": ["a cat"]})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "latte_ray.cli", "run", "-p", str(write_spec(tmp_path / "s.yaml", spec)),
                           "--prompts", str(table), "--output", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.source 'no-such-org/no-such-latte'") and "HF_HUB_OFFLINE" in last, last
    assert "Traceback" not in done.stderr and "local Ray" not in done.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ with Ray


def test_history_binding_and_status_across_good_refused_and_failed_runs(tmp_path, ray_local, faults_file):
    """Run 1 binds the output and records itself; a run with another spec is refused and writes nothing;
    a run that fails (a write actor raises) records its failure next to run 1's record, which stays as it
    was; status and `status --prompts` (seed from the output record) read the history, unchanged counts.
    The benchmark null engine stands in for the model: nothing here depends on the pixels."""
    spec = _spec(source="null")
    table = write_prompts(tmp_path / "in" / "a.parquet", {"prompt": ["a red kite", "a blue boat"]})  # derived ids
    out = tmp_path / "out"
    first = runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=str(out), seed=7))
    assert (first.ok, first.error) == (2, 0)
    record = json.loads((out / "latte-ray.json").read_text())
    assert record["run_seed"] == 7 and record["spec_hash"] == spec.spec_hash()
    run1 = out / "runs" / f"{first.run_id}.json"
    assert json.loads(run1.read_text())["outcome"] == "ok"

    def pending() -> int:
        result = CliRunner().invoke(app, ["status", str(out), "--prompts", str(table), "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(own_output(result))["pending"]

    assert pending() == 0  # the run seed 7 comes from latte-ray.json, not from a --seed here
    before = snapshot(out)
    with pytest.raises(OutputBindingError, match="sampling.num_inference_steps: 2 -> 3"):
        runner.run(RunSpec(pipeline=_spec(source="null", num_inference_steps=3), prompts=[str(table)],
                           output=str(out), seed=7))
    assert snapshot(out) == before  # refused before it wrote anything, its own run record included

    more = write_prompts(tmp_path / "more.parquet", {"id": ["m1", "m2"], "prompt": ["one", "two"]})
    faults_file.write_text("point=write match=*/manifest/* action=error\n")
    try:
        with pytest.raises(RunFailed) as info:
            runner.run(RunSpec(pipeline=spec, prompts=[str(more)], output=str(out), seed=7))
    finally:
        faults_file.write_text("")
    assert str(info.value).startswith("write actor failed: latte_ray.faults.injection.InjectedFault: injected "
                                      f"fault at write ({out}/manifest/part-"), info.value
    assert "\n" not in str(info.value)
    rel = str(run1.relative_to(out))
    assert snapshot(out)[rel] == before[rel]  # run 1's record: the same bytes, never rewritten
    assert (out / "latte-ray.json").read_text() == json.dumps(record, indent=2)
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2 and runs[0] == run1
    failed = json.loads(runs[1].read_text())
    assert failed["outcome"] == "failed" and failed["reason"] == str(info.value) and failed["ended_at"]
    assert pending() == 0
    text = CliRunner().invoke(app, ["status", str(out)])
    assert text.exit_code == 0, text.output
    assert f"spec: {record['spec_hash']} (tiny-cpu), run seed 7; 2 runs recorded" in text.output
    assert f"{first.run_id}  ok" in text.output
    assert "failed: write actor failed: latte_ray.faults.injection.InjectedFault" in text.output
    report = CliRunner().invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    page = (out / "report" / "index.html").read_text()
    assert "<table id='runs'>" in page and first.run_id in page and "InjectedFault" in page


@pytest.mark.parametrize("kept", [False, True], ids=["pooled", "kept-servers"])
def test_a_corrupt_weight_file_ends_the_run_in_one_line(tmp_path, model_cache, ray_local, caplog, kept):
    """Only an actor can find that a weight file is corrupt (the driver reads configs, never weights): the
    run ends with exit 1 and one line `error: generation actor failed: <Type>: <message>` (the last one of the
    console script, which disconnects from Ray first), without
    Ray Data's dump of its own stack (kept in its log file) or a Python traceback of the driver, and the run
    record says why. (The actor's own log lines, which Ray forwards to the driver, still show its trace.)
    `kept`: the model lives in a generation server kept for the run (execution.keep_model_actors, the
    production spec's): the server's constructor raised, and its client's start fails with that error."""
    from latte_ray.model.tiny import ensure_tiny_model

    model = tmp_path / "model"
    shutil.copytree(ensure_tiny_model(model_cache), model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut: the header says more than is there
    spec = fast_spec().with_overrides(keep_model_actors=kept)
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"source": str(model)})})
    table = write_prompts(tmp_path / "p.parquet", {"id": ["a", "b"], "prompt": ["a cat", "a dog"]})
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="latte_ray.scheduler"):
        result = CliRunner().invoke(app, ["run", "-p", str(write_spec(tmp_path / "s.yaml", spec)), "--prompts",
                                          str(table), "--output", str(out)])
    assert result.exit_code == 1, result.output
    assert "re-planning" not in caplog.text, "an actor whose constructor raised is not a lost node"
    # In-process, Ray's log thread (of the session's shared Ray) may still print after the command; the
    # console script disconnects from Ray before its last line (cli.main). Here: one error line, ours.
    (last,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert last.startswith("error: generation actor failed: OSError: Unable to load weights from checkpoint file"), last
    assert str(weights) in last
    assert isinstance(result.exception, SystemExit)  # typer.Exit(1), not an exception out of the command
    assert "Full stack trace" not in result.output and "Ray Core internal code" not in result.output
    (run,) = (out / "runs").iterdir()
    record = json.loads(run.read_text())
    assert record["outcome"] == "failed" and last == f"error: {record['reason']}"
    assert manifest(out) == []
