"""A corpus of bad input: each case gets a clear error naming the row (file and id) or the field, good rows
next to bad ones are unaffected, and no id can write outside the output prefix.

Table-level cases go through runner.run and fail before any Ray work or model load. All row-level cases
sit in one mixed input (two tables, read as one dataset) that goes through one real run; then each case
is checked on the manifest.
"""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from latte_ray import runner
from latte_ray.plan.prompts import MAX_PROMPT_CHARS, check_prompt_schema, derive_id, resolve_prompt_files
from latte_ray.errors import InputError
from latte_ray.spec import RunSpec
from tests.conftest import own_output, write_prompts
from tests.invariants import assert_exactly_once, fast_spec, manifest

# ------------------------------------------------------------------------------- table-level cases


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(columns: dict, schema: pa.Schema | None = None):
    def make(tmp: Path) -> tuple[list[str], str]:
        path = write_prompts(tmp / "t.parquet", columns, schema)
        return [str(path)], str(path)
    return make


def _bytes(data: bytes, name: str = "t.parquet"):
    def make(tmp: Path) -> tuple[list[str], str]:
        (tmp / name).write_bytes(data)
        return [str(tmp / name)], str(tmp / name)
    return make


def _truncated(tmp: Path) -> tuple[list[str], str]:
    whole = tmp / "whole.parquet"
    write_prompts(whole, {"prompt": [f"prompt {i}" for i in range(1000)]})
    data = whole.read_bytes()
    whole.unlink()
    (tmp / "t.parquet").write_bytes(data[: len(data) // 2])
    return [str(tmp / "t.parquet")], str(tmp / "t.parquet")


def _good_and_bad(tmp: Path) -> tuple[list[str], str]:
    write_prompts(tmp / "in" / "a-good.parquet", {"prompt": ["fine"]})
    write_prompts(tmp / "in" / "b-bad.parquet", {"text": ["no prompt column"]})
    return [str(tmp / "in")], str(tmp / "in" / "b-bad.parquet")


def _mixed_seed_signedness(tmp: Path) -> tuple[list[str], str]:
    write_prompts(tmp / "in" / "a.parquet", {"prompt": ["x"], "seed": pa.array([-1], pa.int64())})
    write_prompts(tmp / "in" / "b.parquet", {"prompt": ["y"], "seed": pa.array([2**64 - 1], pa.uint64())})
    return [str(tmp / "in")], str(tmp / "in" / "b.parquet")


def _conflicting_schemas(tmp: Path) -> tuple[list[str], str]:
    write_prompts(tmp / "in" / "a.parquet", {"id": pa.array([1], pa.int64()), "prompt": ["x"]})
    write_prompts(tmp / "in" / "b.parquet", {"id": ["one"], "prompt": ["y"]})
    return [str(tmp / "in")], "id"


def _missing(tmp: Path) -> tuple[list[str], str]:
    return [str(tmp / "nope" / "prompts.parquet")], str(tmp / "nope" / "prompts.parquet")


def _empty_glob(tmp: Path) -> tuple[list[str], str]:
    return [str(tmp / "date=*" / "*.parquet")], str(tmp / "date=*")


def _folder_without_tables(tmp: Path) -> tuple[list[str], str]:
    (tmp / "in").mkdir()
    (tmp / "in" / "notes.txt").write_text("hello")
    return [str(tmp / "in")], str(tmp / "in")


def _unreachable(tmp: Path) -> tuple[list[str], str]:
    return [f"s3://bucket-{_closed_port()}/prompts/"], "cannot list"


TABLE_CASES = {
    "no prompt column": (_table({"text": ["a cat"]}), "no 'prompt' column"),
    "prompt int64": (_table({"prompt": [1, 2]}), "column 'prompt' has type int64"),
    "prompt float": (_table({"prompt": [1.5]}), "column 'prompt' has type double"),
    "prompt bool": (_table({"prompt": [True]}), "column 'prompt' has type bool"),
    "prompt list": (_table({"prompt": [["a", "b"]]}), "column 'prompt' has type list<element: string>"),
    "prompt struct": (_table({"prompt": [{"text": "a"}]}), "column 'prompt' has type struct<text: string>"),
    "seed string": (_table({"prompt": ["a"], "seed": ["42"]}), "column 'seed' has type string; expected integer"),
    "seed float": (_table({"prompt": ["a"], "seed": [4.2]}), "column 'seed' has type double"),
    "id float": (_table({"prompt": ["a"], "id": [1.5]}), "column 'id' has type double"),
    "id list": (_table({"prompt": ["a"], "id": [["x"]]}), "column 'id' has type list<element: string>"),
    "negative int": (_table({"prompt": ["a"], "negative_prompt": [3]}), "column 'negative_prompt' has type int64"),
    "csv, not parquet": (_bytes(b"id,prompt\n1,a cat\n"), "not a readable Parquet file"),
    "empty file": (_bytes(b""), "not a readable Parquet file"),
    "parquet magic, garbage inside": (_bytes(b"PAR1" + b"\x00garbage" * 20 + b"PAR1"), "not a readable Parquet file"),
    "truncated parquet": (_truncated, "not a readable Parquet file"),
    "one bad table among good ones": (_good_and_bad, "no 'prompt' column"),
    "seed int64 in one table, uint64 in another": (_mixed_seed_signedness, "values above 2**63-1 could not be read"),
    "id int in one table, string in another": (_conflicting_schemas, "schemas conflict"),
    "nonexistent path": (_missing, "does not exist"),
    "glob matching nothing": (_empty_glob, "no Parquet files"),
    "folder without tables": (_folder_without_tables, "no Parquet files"),
    "unreachable s3 endpoint": (_unreachable, "EndpointConnectionError"),
}


@pytest.mark.parametrize("case", TABLE_CASES)
def test_malformed_tables_fail_before_any_work_naming_the_file_or_field(case, tmp_path, monkeypatch):
    make, named = TABLE_CASES[case]
    urls, name = make(tmp_path)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore: fail a refused connection at once
    options = {"endpoint_url": f"http://127.0.0.1:{_closed_port()}", "key": "k", "secret": "s"}
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        runner.run(RunSpec(pipeline=fast_spec(), prompts=urls, output=str(out),
                           storage_options=options if urls[0].startswith("s3://") else {}))
    message = str(info.value)
    assert named in message and name in message, message
    assert not out.exists()  # nothing written, no Ray started for it


def test_unreachable_output_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    table = write_prompts(tmp_path / "t.parquet", {"prompt": ["a"]})
    options = {"endpoint_url": f"http://127.0.0.1:{_closed_port()}", "key": "k", "secret": "s"}
    with pytest.raises(InputError, match=r"output: cannot read s3://bucket/out/latte-ray.json: EndpointConnectionError"):
        runner.run(RunSpec(pipeline=fast_spec(), prompts=[str(table)], output="s3://bucket/out",
                           storage_options=options))


def test_dictionary_encoded_prompts_are_accepted(tmp_path):
    table = write_prompts(tmp_path / "t.parquet", {"prompt": pa.array(["a", "b", "a"]).dictionary_encode()})
    schema = check_prompt_schema(*resolve_prompt_files([str(table)]))
    assert pa.types.is_dictionary(schema.field("prompt").type)


def test_an_empty_table_finishes_with_nothing_done(tmp_path, ray_local):
    empty = pa.array([], pa.string())
    table = write_prompts(tmp_path / "t.parquet", {"id": empty, "prompt": empty})
    summary = runner.run(RunSpec(pipeline=fast_spec(), prompts=[str(table)], output=str(tmp_path / "out")))
    assert (summary.ok, summary.error, summary.skipped_done) == (0, 0, 0)
    assert manifest(tmp_path / "out") == []


def test_negative_seeds_are_error_rows(tmp_path, ray_local):
    """Only error rows: written without loading a model."""
    table = write_prompts(tmp_path / "neg.parquet", {"id": ["neg-1", "neg-min"], "prompt": ["a", "b"],
                                                     "seed": pa.array([-1, -2**63], pa.int64())})
    summary = runner.run(RunSpec(pipeline=fast_spec(), prompts=[str(table)], output=str(tmp_path / "out")))
    assert (summary.ok, summary.error) == (0, 2)
    rows = {r["id"]: r["error"] for r in manifest(tmp_path / "out")}
    assert f"{table}: row id=neg-1: seed -1 out of range [0, 2**63-1]" in rows["neg-1"]
    assert f"seed {-2**63} out of range" in rows["neg-min"]


# --------------------------------------------------------------------------------- row-level cases

LONG = "a very long prompt about a cat " * 3400  # ~100,000 characters
# key -> (id, prompt, negative prompt, seed, expected status, expected error text). Keys are unique prompts
# or ids, so that rows whose id is invalid (recorded under a derived id) can be found by their prompt.
TEXT_ROWS = {
    "good": ("good", "a red balloon", None, 1, "ok", None),
    "null prompt": ("null-prompt", None, None, 2, "error", "prompt is null"),
    "empty prompt": ("empty-prompt", "", None, 3, "error", "prompt is empty"),
    "whitespace prompt": ("blank-prompt", " \t\n\u3000 ", None, 4, "error", "prompt is empty"),
    "100k-char prompt": ("long-prompt", LONG, None, 5, "ok", None),
    "control characters": ("control", "a cat\x07 in\x1b[31m red\x1b[0m\r\nlight\x7f", None, 6, "ok", None),
    "NUL in prompt": ("nul-prompt", "a\x00b", None, 7, "error", "prompt contains a NUL character"),
    "emoji": ("emoji", "🐱🚀 a cat astronaut 🔥", None, 8, "ok", None),
    "right-to-left": ("rtl", "قطة تركب دراجة في الحديقة", None, 9, "ok", None),
    "bidi override": ("bidi", "\u202eevil override\u202c of text direction", None, 10, "ok", None),
    "CJK": ("cjk", "一只猫在月球上跳舞", None, 11, "ok", None),
    "100k-char negative prompt": ("long-negative", "a dog", LONG, 12, "ok", None),
    "id with slash": ("a/b", "case: id with slash", None, 13, "error", "id 'a/b' is invalid"),
    "id ..": ("..", "case: id dotdot", None, 14, "error", "id '..' is invalid"),
    "id path traversal": ("../../escape", "case: id traversal", None, 15, "error", "id '../../escape' is invalid"),
    "id with NUL": ("a\x00b", "case: id nul", None, 16, "error", "id 'a\\x00b' is invalid"),
    "id of 129 chars": ("x" * 129, "case: id too long", None, 17, "error", "is invalid: need 1-128 characters"),
    "id of 128 chars": ("y" * 128, "case: id 128", None, 18, "ok", None),
    "empty id": ("", "case: id empty", None, 19, "error", "id '' is invalid"),
    "null id": (None, "case: id null", None, 20, "error", "id is null"),
    "id with space": ("a b", "case: id space", None, 21, "error", "id 'a b' is invalid"),
    "non-ASCII id": ("café", "case: id unicode", None, 22, "error", "id 'café' is invalid"),
    "seed 2**63-1": ("seed-max", "a max seed", None, 2**63 - 1, "ok", None),
    "seed 2**63": ("seed-over", "an overflowing seed", None, 2**63, "error", f"seed {2**63} out of range"),
    "seed 2**64-1": ("seed-top", "the largest uint64", None, 2**64 - 1, "error", f"seed {2**64 - 1} out of range"),
    "null seed": ("seed-null", "a derived seed", None, None, "ok", None),
    "identical duplicate": ("dup-same", "the same row twice", None, 30, "ok", None),
    "duplicate id, different prompts": ("dup-diff", "first version", None, 31, "error",
                                        "id 'dup-diff' appears 2 times in the input with different prompt"),
    "identical duplicate across tables": ("dup-cross", "in both tables", None, 32, "ok", None),
}
EXTRA_TEXT_ROWS = [("dup-same", "the same row twice", None, 30), ("dup-diff", "second version", None, 31)]
BYTES_ROWS = {  # a second table whose prompt columns are binary: the bytes must be UTF-8
    "binary prompt": ("bytes-good", b"a blue kite", None, 40, "ok", None),
    "invalid UTF-8 prompt": ("bad-utf8", b"\xff\xfe bad", None, 41, "error", "prompt is not valid UTF-8"),
    "invalid UTF-8 negative": ("bad-utf8-neg", b"fine", b"\xc3\x28", 42, "error",
                               "negative_prompt is not valid UTF-8"),
}
EXTRA_BYTES_ROWS = [("dup-cross", b"in both tables", None, 32)]
NO_ID_ROWS = {  # a third table with no id column, read together with the two that have one
    "table without an id column": (None, "case: a table without ids", None, 50, "ok", None),
}
EXTRA_NO_ID_ROWS = [(None, "case: a table without ids", None, 50)]  # an identical copy: generated once
ROW_CASES = {**TEXT_ROWS, **BYTES_ROWS, **NO_ID_ROWS}


def _columns(rows: list[tuple], binary: bool) -> dict:
    text = pa.binary() if binary else pa.string()
    return {
        "id": pa.array([r[0] for r in rows], pa.string()),
        "prompt": pa.array([r[1] for r in rows], text),
        "negative_prompt": pa.array([r[2] for r in rows], text),
        "seed": pa.array([r[3] for r in rows], pa.uint64()),
    }


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("bad-input")
    text_rows = [r[:4] for r in TEXT_ROWS.values()] + EXTRA_TEXT_ROWS
    bytes_rows = [r[:4] for r in BYTES_ROWS.values()] + EXTRA_BYTES_ROWS
    write_prompts(tmp / "in" / "text.parquet", _columns(text_rows, binary=False))
    write_prompts(tmp / "in" / "bytes.parquet", _columns(bytes_rows, binary=True))
    no_id = _columns([r[:4] for r in NO_ID_ROWS.values()] + EXTRA_NO_ID_ROWS, binary=False)
    write_prompts(tmp / "in" / "no-id.parquet", {k: v for k, v in no_id.items() if k != "id"})
    out = tmp / "nested" / "deeper" / "out"
    summary = runner.run(RunSpec(pipeline=fast_spec(batch_size=3), prompts=[str(tmp / "in")], output=str(out)))
    rows = manifest(out)
    by_key: dict[str, list[dict]] = {}
    for key, (vid, prompt, *_rest) in ROW_CASES.items():
        text = prompt.decode("utf-8", "replace") if isinstance(prompt, bytes) else prompt
        by_key[key] = [r for r in rows if r["id"] == vid or (text and text.startswith("case:") and r["prompt"] == text)]
    return tmp, out, summary, rows, by_key


@pytest.mark.parametrize("case", ROW_CASES)
def test_each_bad_row_is_an_error_row_naming_it_and_good_rows_finish(case, mixed_run):
    tmp, out, _summary, _rows, by_key = mixed_run
    vid, _prompt, _negative, _seed, status, error = ROW_CASES[case]
    rows = by_key[case]
    assert rows, f"no manifest row for {case}"
    assert {r["status"] for r in rows} == {status}, rows
    if status == "ok":
        assert len(rows) == 1  # generated once, duplicates included
        assert Path(rows[0]["video_uri"]).is_file() and not rows[0]["error"]
    else:
        for row in rows:
            assert error in row["error"], row["error"]
            table = "bytes.parquet" if case in BYTES_ROWS else "text.parquet"
            assert f"in/{table}: row id=" in row["error"]  # names the file and the row
            assert not row["video_uri"]


def test_rows_of_a_table_without_ids_get_derived_ids_next_to_tables_with_ids(mixed_run):
    """Read as one dataset, the id-less table's rows have a null id; they still take the id derived from
    their content, exactly as when that table is read alone (the pre-pass reads each file alone)."""
    _tmp, _out, _summary, _rows, by_key = mixed_run
    _vid, prompt, _negative, seed, *_ = NO_ID_ROWS["table without an id column"]
    (row,) = by_key["table without an id column"]
    assert row["id"] == derive_id(prompt, fast_spec().sampling.negative_prompt, seed, 0)


def test_the_mixed_run_is_exactly_once_and_stays_inside_its_prefix(mixed_run):
    tmp, out, summary, rows, _by_key = mixed_run
    ok_ids = {r["id"] for r in rows if r["status"] == "ok"}
    assert summary.ok == len(ok_ids) == sum(1 for c in ROW_CASES.values() if c[4] == "ok")
    assert summary.duplicates == 3  # dup-same, dup-cross and the id-less copy: one extra copy each
    assert_exactly_once(out, ok_ids, errors={r["id"] for r in rows if r["status"] == "error"})
    assert Counter(r["id"] for r in rows)["dup-diff"] == 2
    # nothing outside the output prefix: the only entries on the way to it are the folders leading to it
    assert sorted(p.name for p in (tmp / "nested").rglob("*") if out not in (p, *p.parents)) == ["deeper"]
    assert {p.name for p in out.iterdir()} == {"latte-ray.json", "runs", "videos", "manifest"}


def test_a_100k_character_prompt_is_truncated_and_the_manifest_says_so(mixed_run):
    (row,) = mixed_run[4]["100k-char prompt"]
    assert row["status"] == "ok" and row["prompt_truncated"] is True
    assert row["prompt_tokens"] == fast_spec().sampling.max_sequence_length
    # the manifest keeps the prompt as generated: cut at MAX_PROMPT_CHARS (the tokenizer keeps far fewer)
    assert row["prompt"] == LONG[:MAX_PROMPT_CHARS]
    (short,) = mixed_run[4]["good"]
    assert short["prompt_truncated"] is False and 0 < short["prompt_tokens"] < 20


# ------------------------------------------------------------ setup-level cases: the command line, no Ray
#
# Each case is a command a user could type with one mistake in it. Every one must end before Ray starts
# (these tests never start one) with exit code 2 and a single `error:` line that names the option, field,
# path or URL at fault, and must leave everything under the test's folder exactly as it was: nothing
# created (not even the output folder), nothing changed, nothing deleted.

import json  # noqa: E402

import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from latte_ray.cli import app  # noqa: E402
from latte_ray.record.output import bind, open_output  # noqa: E402
from latte_ray.record.storage import OutputLayout, write_manifest_part  # noqa: E402
from latte_ray.spec import parse_pipeline_spec  # noqa: E402
from tests.invariants import snapshot, write_spec  # noqa: E402


def _prompts(tmp: Path) -> str:
    return str(write_prompts(tmp / "in" / "p.parquet", {"id": ["a", "b"], "prompt": ["a cat", "a dog"]}))


def _spec(tmp: Path, name: str = "spec.yaml", **sections) -> str:
    """fast_spec with some fields changed: _spec(tmp, video={"pix_fmt": "x"}, model={"source": "..."})."""
    raw = yaml.safe_load(fast_spec().model_dump_json())
    for section, fields in sections.items():
        raw[section].update(fields)
    return str(write_spec(tmp / name, parse_pipeline_spec(raw)))


def _run(tmp: Path, *extra: str, spec: str | None = None, output: str | None = None) -> list[str]:
    return ["run", "--pipeline", spec or _spec(tmp), "--prompts", _prompts(tmp),
            "--output", output or str(tmp / "out"), *extra]


def _model_folder(tmp: Path, index: dict | None = None, transformer: dict | None = None,
                  text_encoder: dict | None = None, weights: str = ".safetensors") -> str:
    """A save_pretrained folder holding Latte-1's published configs (tests/data/latte-1/) with `index`,
    `transformer` and `text_encoder` changes, and empty weight files (the driver lists weights, it never reads
    them)."""
    from hubcache import latte_1_file

    folder = tmp / "model"
    changes = {"model_index.json": index, "transformer/config.json": transformer,
               "text_encoder/config.json": text_encoder, "vae/config.json": None}
    for rel, change in changes.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps({**json.loads(latte_1_file(rel)), **(change or {})}))
    for component in ("transformer", "vae", "text_encoder"):
        (folder / component / f"model{weights}").write_bytes(b"")
    return str(folder)


def _bound_output(tmp: Path, seed: int = 0, **sampling) -> str:
    """An output bound (latte-ray.json, as its first run writes it) to fast_spec with `sampling` changes."""
    out = tmp / "out"
    raw = yaml.safe_load(fast_spec().model_dump_json())
    raw["sampling"].update(sampling)
    bind(open_output(str(out)), parse_pipeline_spec(raw), seed, "test")
    return str(out)


def _legacy_output(tmp: Path) -> str:
    """An output of an older latte-ray: a manifest (rows of another spec hash) and no latte-ray.json."""
    from tests.test_compact import _rows

    out = tmp / "out"
    fs, root = open_output(str(out)).fs, str(out)
    rows = _rows(["x1", "x2"])
    rows = rows.set_column(rows.schema.get_field_index("spec_hash"), "spec_hash", pa.array(["0123456789abcdef"] * 2))
    write_manifest_part(fs, OutputLayout(str(out), root), rows, name="old")
    return str(out)


def _marked_folder_with_extra_file(tmp: Path) -> tuple[str, str]:
    folder = tmp / "tiny"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / ".latte-ray-tiny-model").write_text(json.dumps({"tiny_model_version": "v1", "files": ["model_index.json"]}))
    (folder / "notes.txt").write_text("mine")
    return str(folder), "notes.txt"


SETUP_CASES = {
    # command-line overrides: the same validation as a spec file
    "--concurrency 0": (lambda t: _run(t, "--concurrency", "0"), ["--concurrency 0", "concurrency must be >= 1"]),
    "--concurrency 3,1": (lambda t: _run(t, "--concurrency", "3,1"), ["--concurrency 3,1", "min <= max"]),
    "--concurrency two": (lambda t: _run(t, "--concurrency", "two"), ["--concurrency 'two'", "N or MIN,MAX"]),
    "--batch-size 0": (lambda t: _run(t, "--batch-size", "0"), ["--batch-size 0", "greater than or equal to 1"]),
    "--limit 0": (lambda t: _run(t, "--limit", "0"), ["--limit 0", "greater than or equal to 1"]),
    "--seed -1": (lambda t: _run(t, "--seed", "-1"), ["--seed -1", "greater than or equal to 0"]),
    "--storage-option without =": (lambda t: _run(t, "-s", "endpoint_url"), ["--storage-option 'endpoint_url'"]),
    # URLs
    "--prompts foo://x": (lambda t: ["run", "--prompts", "foo://x", "--output", str(t / "out")],
                          ["prompts: 'foo://x'", "unknown URL scheme 'foo'"]),
    "--output foo://x": (lambda t: _run(t, output="foo://x"), ["output: 'foo://x'", "unknown URL scheme 'foo'"]),
    "--output memory://": (lambda t: _run(t, output="memory://runs/out"), ["output 'memory://runs/out'", "memory://"]),
    "--output https://": (lambda t: _run(t, output="https://example.com/out"), ["https:// is read-only"]),
    # where the output is
    "output inside the input folder": (lambda t: ["run", "--pipeline", _spec(t), "--prompts", str(Path(_prompts(t)).parent),
                                                  "--output", str(t / "in" / "out")],
                                       ["in/out'", "lies inside the input", "manifest parts"]),
    "output equal to the input folder": (lambda t: ["run", "--pipeline", _spec(t), "--prompts", str(Path(_prompts(t)).parent),
                                                    "--output", str(t / "in")], ["/in'", "lies inside the input"]),
    "output under an input glob": (lambda t: ["run", "--pipeline", _spec(t), "--prompts", _prompts(t),
                                              "--prompts", str(t / "data" / "*" / ""), "--output", str(t / "data" / "run1")],
                                   ["data/run1", "data/*"]),
    "input is the output's manifest": (lambda t: ["run", "--pipeline", _spec(t), "--prompts", _prompts(t),
                                                  "--prompts", str(t / "out" / "manifest"), "--output", str(t / "out")],
                                       ["out/manifest", "lies inside the input"]),
    "output is an existing file": (lambda t: _run(t, output=_prompts(t)), ["p.parquet' is an existing file"]),
    # video settings: encoded once in the driver
    "video.pix_fmt unknown": (lambda t: _run(t, spec=_spec(t, video={"pix_fmt": "yuv999p"})),
                              ["video.pix_fmt 'yuv999p'", "not a pixel format"]),
    "video.pix_fmt the codec cannot write": (lambda t: _run(t, spec=_spec(t, video={"pix_fmt": "rgb24"})),
                                             ["video.pix_fmt 'rgb24'", "libx264 encoder cannot write it"]),
    "video.preset unknown": (lambda t: _run(t, spec=_spec(t, video={"preset": "fastest"})),
                             ["video.preset 'fastest'", "libx264"]),
    # the model source's configs against the spec
    "sampling.video_length the model lacks": (lambda t: _run(t, spec=_spec(t, sampling={"video_length": 8})),
                                              ["sampling.video_length is 8", "16-frame", "model.source 'tiny'"]),
    "model folder without model_index.json": (
        lambda t: _run(t, spec=_spec(t, model={"source": str(t / "in")})), ["model.source", "/in'", "no model_index.json"]),
    "model folder that does not exist": (
        lambda t: _run(t, spec=_spec(t, model={"source": str(t / "nowhere")})), ["/nowhere'", "no such folder"]),
    "model with pickled weights only": (
        lambda t: _run(t, spec=_spec(t, model={"source": _model_folder(t, weights=".bin")})),
        ["model.source", "transformer/ has no .safetensors weights"]),
    "model whose text encoder width differs": (
        lambda t: _run(t, spec=_spec(t, model={"source": _model_folder(t, text_encoder={"d_model": 64})})),
        ["text_encoder d_model 64", "caption_channels 4096"]),
    "model that is not a Latte pipeline": (
        lambda t: _run(t, spec=_spec(t, model={"source": _model_folder(t, index={"_class_name": "StableDiffusionPipeline"})})),
        ["is a StableDiffusionPipeline", "not a LattePipeline"]),
    "model with another frame count": (
        lambda t: _run(t, spec=_spec(t, model={"source": _model_folder(t, transformer={"video_length": 24})})),
        ["sampling.video_length is 16", "24-frame"]),
    # an output bound to one spec and seed
    "another spec on a bound output": (
        lambda t: _run(t, output=_bound_output(t, num_inference_steps=4)),
        ["is bound to pipeline spec", "sampling.num_inference_steps: 4 -> 2", "new --output"]),
    "another run seed on a bound output": (
        lambda t: _run(t, "--seed", "5", output=_bound_output(t)), ["run seed 0", "--seed 5", "--seed 0"]),
    "older output with rows of another spec": (
        lambda t: _run(t, output=_legacy_output(t)), ["no latte-ray.json", "spec hash 0123456789abcdef", "new --output"]),
    # operations commands on what is not an output
    "status on a missing path": (lambda t: ["status", str(t / "typo")], ["/typo: not a latte-ray output"]),
    "status on a folder that is not an output": (lambda t: ["status", str(Path(_prompts(t)).parent)],
                                                 ["/in: not a latte-ray output"]),
    "report on a missing path": (lambda t: ["report", str(t / "typo")], ["/typo: not a latte-ray output"]),
    "report --dest an existing file": (lambda t: ["report", _bound_output(t), "--dest", _prompts(t)],
                                       ["--dest", "p.parquet' is an existing file"]),
    "compact on a missing path": (lambda t: ["compact", str(t / "typo")], ["/typo: not a latte-ray output"]),
    "status --prompts on a missing path": (lambda t: ["status", str(t / "typo"), "--prompts", _prompts(t)],
                                           ["/typo: not a latte-ray output"]),
    # tiny-model never replaces what it did not write
    "tiny-model on the current folder": (lambda t: ["tiny-model", "."], ["tiny-model:", "no .latte-ray-tiny-model"]),
    "tiny-model on a regular file": (lambda t: ["tiny-model", _prompts(t)], ["p.parquet exists and is not a folder"]),
    "tiny-model on a tiny model with a file added": (lambda t: ["tiny-model", _marked_folder_with_extra_file(t)[0]],
                                                     ["holds files the tiny model did not write", "notes.txt"]),
    # dry runs check what a run checks
    "dry run with another spec on a bound output": (
        lambda t: _run(t, "--dry-run", output=_bound_output(t, num_inference_steps=4)), ["is bound to pipeline spec"]),
    "dry run with a bad pix_fmt": (lambda t: _run(t, "--dry-run", spec=_spec(t, video={"pix_fmt": "nope"})),
                                   ["video.pix_fmt 'nope'"]),
    # object stores that cannot be reached (botocore: one attempt, see the test)
    "dry run to an unreachable s3 output": (
        lambda t: _run(t, "--dry-run", *_unreachable_s3(), output="s3://bucket/out"),
        ["output: cannot read s3://bucket/out/latte-ray.json", "EndpointConnectionError"]),
    "model mirror on an unreachable s3 endpoint": (
        lambda t: _run(t, *_unreachable_s3(), spec=_spec(t, model={"source": "s3://models/tiny/"})),
        ["model.source 's3://models/tiny/'", "cannot list it", "EndpointConnectionError"]),
}


def _unreachable_s3() -> list[str]:
    return ["-s", f"endpoint_url=http://127.0.0.1:{_closed_port()}", "-s", "key=k", "-s", "secret=s"]


@pytest.mark.parametrize("case", SETUP_CASES)
def test_setup_mistakes_fail_in_one_line_before_ray_and_touch_nothing(case, tmp_path, monkeypatch):
    def no_ray():
        raise AssertionError("Ray was started for a mistake the driver can catch")

    monkeypatch.setattr(runner, "init_ray", no_ray)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore: fail a refused connection at once
    make, named = SETUP_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("a user's file")
    monkeypatch.chdir(work)
    argv = make(work)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, argv)
    message = own_output(result).strip()
    assert result.exit_code == 2, (result.exit_code, message, result.exception)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    for part in named:
        assert part in message, (part, message)
    assert snapshot(tmp_path) == before, "something was written, changed or deleted"


def test_a_dry_run_counts_what_the_real_run_did(mixed_run, tmp_path):
    """The mixed input (bad rows, identical duplicates, conflicting ids, a table without ids) counted by
    `run --dry-run` into a new output gives the real run's numbers; against the real run's output, nothing
    is left to generate. Neither dry run writes anything."""
    tmp, out, summary, _rows, _by_key = mixed_run
    spec = str(write_spec(tmp_path / "spec.yaml", fast_spec(batch_size=3)))
    total = len(TEXT_ROWS) + len(EXTRA_TEXT_ROWS) + len(BYTES_ROWS) + len(EXTRA_BYTES_ROWS) + 2 * len(NO_ID_ROWS)
    conflicting = 2  # the two rows of dup-diff
    before = snapshot(out)
    fresh = CliRunner().invoke(app, ["run", "--dry-run", "-p", spec, "--prompts", str(tmp / "in"),
                                     "--output", str(tmp_path / "new")])
    assert fresh.exit_code == 0, fresh.output
    assert (f"{total} rows in 3 files: {summary.ok} to generate, 0 already done, {summary.error - conflicting} invalid "
            f"and {conflicting} with conflicting duplicate ids (recorded as error rows), {summary.duplicates} "
            f"duplicate copies skipped") in fresh.output, fresh.output
    assert not (tmp_path / "new").exists()
    done = CliRunner().invoke(app, ["run", "--dry-run", "-p", spec, "--prompts", str(tmp / "in"), "--output", str(out)])
    assert done.exit_code == 0, done.output
    assert f"0 to generate, {summary.ok + summary.duplicates} already done" in done.output, done.output
    assert snapshot(out) == before
