"""Object storage end to end against a real S3 HTTP endpoint on loopback (moto's standalone server).

Covers: credentials from the AWS environment and from storage options (s3fs and the pyarrow wrapper the
runner reads Parquet with), a full run whose prompts, model weights, videos, manifest and records all live
on s3://, secrets never recorded or logged, and the once-per-node model mirror.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO, write_prompts
from latte_ray.cli import parse_storage_options
from latte_ray.model.loading import MIRROR_RECORD, ModelSourceError, load_pipeline, mirror_to_local
from latte_ray.plan.prompts import check_prompt_schema, resolve_prompt_files
from latte_ray.plan.prompts import _arrow_filesystem
from latte_ray.runner import run as run_generation
from latte_ray.errors import InputError
from latte_ray.spec import ModelSpec, RunSpec, load_pipeline_spec, parse_pipeline_spec
from latte_ray.record.storage import OutputLayout, filesystem, latest_rows, read_manifest


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_dir(model_cache) -> Path:
    from latte_ray.model.tiny import ensure_tiny_model

    return ensure_tiny_model(model_cache)


@pytest.fixture(scope="module")
def s3_model(s3_server, tiny_dir) -> str:
    """The tiny model's save_pretrained folder uploaded to the loopback S3; returns its URL."""
    bucket = s3_server.make_bucket("models-" + uuid.uuid4().hex[:8])
    fs, _ = filesystem(f"s3://{bucket}", s3_server.storage_options())
    fs.put(str(tiny_dir), f"{bucket}/models/tiny", recursive=True)
    return f"s3://{bucket}/models/tiny/"


# ------------------------------------------------------------------------------------------- credentials


def test_credentials_from_the_aws_environment(s3_server, tmp_path, monkeypatch):
    """No options at all: endpoint, keys and region come from the standard AWS variables, for s3fs
    listing/reading and for the pyarrow filesystem the runner hands to ray.data.read_parquet."""
    bucket = s3_server.make_bucket("env-" + uuid.uuid4().hex[:8])
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    table = write_prompts(tmp_path / "p.parquet", {"prompt": ["a red fox", "a blue whale"]})

    fs, root = filesystem(f"s3://{bucket}/prompts/")
    fs.put_file(str(table), f"{root}/p.parquet")
    in_fs, files = resolve_prompt_files([f"s3://{bucket}/prompts/"])
    assert files == [f"{bucket}/prompts/p.parquet"]
    assert check_prompt_schema(in_fs, files).names == ["prompt"]
    read = pq.read_table(files[0], filesystem=_arrow_filesystem(in_fs))
    assert read.column("prompt").to_pylist() == ["a red fox", "a blue whale"]


def test_credentials_from_storage_options(s3_server, tmp_path, monkeypatch):
    """`--storage-option key=value` strings alone (no AWS env) reach s3fs, typed and with AWS-style aliases."""
    bucket = s3_server.make_bucket("opt-" + uuid.uuid4().hex[:8])
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    options = parse_storage_options([
        f"endpoint_url={s3_server.endpoint}", "aws_access_key_id=opt-key", "aws_secret_access_key=opt-secret",
        "use_ssl=false", "max_concurrency=4",
    ])
    fs, root = filesystem(f"s3://{bucket}/x", options)
    assert (fs.key, fs.secret, fs.use_ssl, fs.max_concurrency) == ("opt-key", "opt-secret", False, 4)
    fs.pipe_file(root, b"hello")
    assert fs.cat_file(root) == b"hello"
    with pytest.raises(InputError, match="use_ssl"):
        filesystem(f"s3://{bucket}/x", {**options, "use_ssl": "maybe"})


def test_missing_prompt_bucket_fails_before_ray_and_hides_the_secret(s3_server):
    secret = "hidden-" + uuid.uuid4().hex
    with pytest.raises(InputError) as err:
        resolve_prompt_files(["s3://no-such-bucket-lr/p.parquet"], s3_server.storage_options(secret=secret))
    assert "s3://no-such-bucket-lr/p.parquet" in str(err.value)
    assert secret not in str(err.value)


# ------------------------------------------------------------------------------------------ full run


@pytest.mark.slow
def test_full_run_on_s3(ray_local, s3_server, s3_model, tiny_dir, tmp_path, capfd):
    """Prompts, weights, videos, manifest and run records all on s3://; every video read back and checked
    against its manifest row; a distinctive secret appears nowhere in the records or logs."""
    key_id = "LRKEY" + uuid.uuid4().hex[:12].upper()
    secret = "LrS3cr3t-" + uuid.uuid4().hex
    options = s3_server.storage_options(key=key_id, secret=secret)
    bucket = s3_server.make_bucket("run-" + uuid.uuid4().hex[:8])
    fs, _ = filesystem(f"s3://{bucket}", options)
    prompts = write_prompts(tmp_path / "prompts.parquet", {
        "id": ["fox", "whale", "owl"], "prompt": ["a red fox running", "a whale in the sea", "an owl at night"],
    })
    fs.put_file(str(prompts), f"{bucket}/in/prompts.parquet")

    raw = load_pipeline_spec("tiny-cpu").model_dump(mode="json")
    raw["model"]["source"] = s3_model
    spec = parse_pipeline_spec(raw)
    node_cache = tmp_path / "node-cache"
    output = f"s3://{bucket}/out/run1"
    summary = run_generation(RunSpec(
        pipeline=spec, prompts=[f"s3://{bucket}/in/"], output=output, storage_options=options,
        cache_dir=str(node_cache),
    ))
    assert (summary.ok, summary.error) == (3, 0), summary.errors

    # The weights came through the mirror: one copy in the node cache, recorded without credentials.
    (mirrored,) = [p for p in (node_cache / "models").iterdir() if p.is_dir()]
    assert {k: v for k, v in local_files(mirrored).items() if k != MIRROR_RECORD} == local_files(tiny_dir)
    mirror_record = (mirrored / MIRROR_RECORD).read_text()

    out_fs, root = filesystem(output, options)
    layout = OutputLayout(url=output, root=root)
    rows = latest_rows(read_manifest(out_fs, layout))
    assert sorted(rows["id"].to_pylist()) == ["fox", "owl", "whale"]
    for row in rows.to_pylist():
        assert row["status"] == "ok", row
        assert row["video_uri"] == f"{output}/{layout.video_key(row['id'], row['sha256'])}"
        data = out_fs.cat_file(row["video_uri"].removeprefix("s3://"))
        assert len(data) == row["bytes"] and sha256(data) == row["sha256"], row["id"]
        assert row["model"] == s3_model

    (run_path,) = out_fs.ls(layout.runs_dir, detail=False)
    record_text = out_fs.cat_file(run_path).decode() + out_fs.cat_file(layout.record_json).decode()
    record = json.loads(out_fs.cat_file(run_path))
    assert record["output"] == output and record["storage_option_keys"] == sorted(options)
    assert record["outcome"] == "ok" and record["run_id"] == summary.run_id

    # The secret and key id: not in the run or output records, no manifest row, not the driver's output, not
    # Ray's logs.
    manifest_text = json.dumps(read_manifest(out_fs, layout).to_pylist(), default=str)
    captured = capfd.readouterr()
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    log_files = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert log_files, f"no Ray logs under {session}"
    for needle in (secret, key_id):
        assert needle not in record_text and needle not in mirror_record
        assert needle not in manifest_text
        assert needle not in captured.out and needle not in captured.err
        leaked = [str(p) for p in log_files if needle.encode() in p.read_bytes()]
        assert not leaked, f"{needle[:6]}... found in Ray logs: {leaked}"


# --------------------------------------------------------------------------------------- model mirror

_MIRROR_CHILD = textwrap.dedent("""
    import hashlib, json, logging, sys, time
    from pathlib import Path
    from latte_ray.model.loading import mirror_to_local

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    url, cache, options, ready, go = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
    ready.touch()
    while not go.exists():  # start barrier: both processes call mirror_to_local at the same moment
        time.sleep(0.005)
    path = mirror_to_local(url, cache, options)
    files = {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(path.rglob("*")) if p.is_file()}
    print(json.dumps({"path": str(path), "files": files}))
""")


def test_two_processes_mirror_one_copy(s3_server, s3_model, tiny_dir, tmp_path):
    """Two processes mirror the same URL into one node cache at once: one download, both read it whole."""
    cache = tmp_path / "cache"
    before = {rel: s3_server.requests("GET", f"/models/tiny/{rel}") for rel in local_files(tiny_dir)}
    procs = []
    for i in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _MIRROR_CHILD, s3_model, str(cache), json.dumps(s3_server.storage_options()),
             str(tmp_path / f"ready{i}"), str(tmp_path / "go")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        ))
    try:
        for i in range(2):  # both children imported everything and wait at the barrier
            while not (tmp_path / f"ready{i}").exists():
                assert procs[i].poll() is None, procs[i].communicate()[1]
                time.sleep(0.01)
        (tmp_path / "go").touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            results.append({**json.loads(out.strip().splitlines()[-1]), "log": err})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    assert results[0]["path"] == results[1]["path"]
    assert sum("mirrored s3://" in r["log"] for r in results) == 1, [r["log"] for r in results]
    expected = local_files(tiny_dir)
    for r in results:
        assert {k: v for k, v in r["files"].items() if k != MIRROR_RECORD} == expected
    gets = {rel: s3_server.requests("GET", f"/models/tiny/{rel}") - before[rel] for rel in expected}
    assert gets == {rel: 1 for rel in expected}, "each file must be downloaded exactly once"
    record = json.loads((Path(results[0]["path"]) / MIRROR_RECORD).read_text())
    assert record["source"] == s3_model and record["pid"] in {p.pid for p in procs}
    assert "testing" not in json.dumps(record)
    assert [p.name for p in (cache / "models").iterdir() if ".tmp-" in p.name] == []


def test_mirror_without_model_index_fails_clearly(s3_server, tmp_path):
    bucket = s3_server.make_bucket("empty-" + uuid.uuid4().hex[:8])
    fs, _ = filesystem(f"s3://{bucket}", s3_server.storage_options())
    fs.pipe_file(f"{bucket}/models/broken/vae/config.json", b"{}")
    with pytest.raises(ModelSourceError, match="model_index.json"):
        mirror_to_local(f"s3://{bucket}/models/broken/", tmp_path, s3_server.storage_options())
    assert [p for p in (tmp_path / "models").iterdir() if p.is_dir()] == []


def test_mirror_local_folder_and_from_pretrained_agree(s3_server, s3_model, tiny_dir, tmp_path):
    """from_pretrained on the mirrored copy and on the local folder source give the same weights."""
    import torch

    from_s3 = load_pipeline(ModelSpec(source=s3_model), cache_dir=str(tmp_path), storage_options=s3_server.storage_options())
    from_dir = load_pipeline(ModelSpec(source=str(tiny_dir)))
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(from_s3, name).state_dict(), getattr(from_dir, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_missing_local_model_folder_fails_clearly(tmp_path):
    with pytest.raises(ModelSourceError, match="no such folder"):
        load_pipeline(ModelSpec(source=str(tmp_path / "nowhere")))


def test_hub_id_offline_fails_clearly():
    code = textwrap.dedent("""
        from latte_ray.model.loading import ModelSourceError, load_pipeline
        from latte_ray.spec import ModelSpec
        try:
            load_pipeline(ModelSpec(source="no-such-org/no-such-latte"))
        except ModelSourceError as e:
            print("ERROR:", e)
        else:
            raise SystemExit("loaded a model that does not exist")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    message = done.stdout.split("ERROR:", 1)[1]
    assert "'no-such-org/no-such-latte'" in message and "Hugging Face Hub id" in message
    assert "HF_HUB_OFFLINE" in message
