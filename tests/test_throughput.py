"""Throughput features keep contract 1: a video is a function of (prompt, negative prompt, seed, spec) alone.

- text-encode stage on (T5 on its own actor, generators load without it), at batch sizes 1 and 3, against
  diffusers' LattePipeline called for one prompt at a time (the reference helpers of test_correctness);
- torch.compile: warmed up once at load, equal to eager, and no recompile for a new prompt length or a short
  last batch (real dynamo; the aot_eager backend keeps it fast on CPU, inductor is benchmarked separately);
- cache acceleration: active (changes pixels), reset between batches, in the spec hash and the manifest.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from latte_ray import runner
from latte_ray.spec import RunSpec, parse_pipeline_spec
from latte_ray.stages.encode import decode_mp4
from latte_ray.record.storage import OutputLayout, filesystem, latest_rows, read_manifest
from tests.conftest import write_prompts
from tests.test_correctness import PROMPTS, lossless_spec, reference_frames

STEPS = 6
LONG = PROMPTS["prompt"][1]


def spec_with(batch_size: int = 1, **model_or_execution):
    """The lossless tiny spec (6 steps) with model/execution fields replaced."""
    raw = json.loads(lossless_spec(batch_size, steps=STEPS).model_dump_json())
    for key, value in model_or_execution.items():
        section = "execution" if key in raw["execution"] else "model"
        raw[section][key] = value
    return parse_pipeline_spec(raw)


def diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# ---------------------------------------------------------------------------------- text-encode stage


def run_and_decode(out, spec, prompts_path):
    summary = runner.run(RunSpec(pipeline=spec, prompts=[str(prompts_path)], output=str(out)))
    fs, root = filesystem(str(out))
    rows = latest_rows(read_manifest(fs, OutputLayout(str(out), root))).to_pylist()
    videos = {r["id"]: decode_mp4(fs.cat_file(r["video_uri"])) for r in rows if r["status"] == "ok"}
    return summary, {r["id"]: r for r in rows}, videos


@pytest.fixture(scope="module")
def text_stage_runs(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("text-stage")
    # The four reference prompts plus one bad row: at batch size 1 it is a block of error rows only.
    table = {k: [*v, None] for k, v in PROMPTS.items()}
    table["id"][-1], table["seed"][-1] = "bad", 9
    prompts = write_prompts(tmp / "prompts.parquet", table)
    return {
        b: run_and_decode(tmp / f"b{b}", spec_with(b, text_encode_stage=True), prompts) for b in (1, 3)
    }


def test_text_encode_stage_matches_single_prompt_reference(text_stage_runs, model_cache):
    from latte_ray.model.tiny import ensure_tiny_model

    model_dir = str(ensure_tiny_model(model_cache))
    spec = spec_with(1)
    for i, vid in enumerate(PROMPTS["id"]):
        ref = reference_frames(model_dir, spec, PROMPTS["prompt"][i], PROMPTS["negative_prompt"][i] or "",
                               PROMPTS["seed"][i])
        assert ref.std() > 5, "reference video is flat; the comparison would prove nothing"
        for batch, (_, _, videos) in text_stage_runs.items():
            assert diff(videos[vid], ref) <= 1, f"{vid}, text-encode stage, batch {batch}: off the reference"


def test_text_encode_stage_passes_error_rows_through(text_stage_runs):
    for batch, (summary, rows, _) in text_stage_runs.items():
        assert (summary.ok, summary.error) == (4, 1), (batch, summary.errors)
        bad = rows["bad"]
        assert bad["status"] == "error" and "prompt" in bad["error"] and bad["video_uri"] is None
        assert all(rows[v]["prompt_tokens"] > 0 for v in PROMPTS["id"])
        assert rows["long"]["prompt_tokens"] > rows["short"]["prompt_tokens"]


def test_text_encode_stage_block_of_only_error_rows(model_cache):
    """The columns a block of error rows carries have the same types and shapes as a block of good rows."""
    from latte_ray.stages.text_encode import TextEncodeStage

    stage = TextEncodeStage(spec_with(2).model_dump_json())
    base = {"id": np.array(["a", "b"], dtype=object), "negative_prompt": np.array(["", ""], dtype=object),
            "seed": np.array([1, 2]), "error": np.array(["", ""], dtype=object)}
    good = stage({**base, "prompt": np.array(["a dog", LONG], dtype=object),
                  "status": np.array(["pending", "pending"], dtype=object)})
    bad = stage({**base, "prompt": np.array(["", ""], dtype=object), "error": np.array(["x", "y"], dtype=object),
                 "status": np.array(["error", "error"], dtype=object)})
    assert set(good) == set(bad)
    for name in good:
        assert good[name].dtype == bad[name].dtype and good[name].shape == bad[name].shape, name
    assert good["prompt_embeds"].shape == (2, spec_with(2).sampling.max_sequence_length, 32)
    assert np.abs(good["prompt_embeds"]).sum() > 0 and not np.any(bad["prompt_embeds"])
    assert list(bad["status"]) == ["error", "error"] and list(bad["error"]) == ["x", "y"]
    # Ray Data turns these into Arrow columns: both blocks must give the same schema.
    from ray.data.block import BlockAccessor

    schemas = {str(BlockAccessor.batch_to_block(b).schema) for b in (good, bad)}
    assert len(schemas) == 1


# ---------------------------------------------------------------------------------- torch.compile


@pytest.fixture(scope="module")
def compiled(model_cache, tmp_path_factory):
    """An engine compiled once (batch 2) and one eager, plus inductor's cache folder as torch saw it."""
    import torch._inductor.runtime.cache_dir_utils as cache_dir_utils
    from torch._dynamo.utils import counters

    from latte_ray.model.families.latte_engine import LatteEngine

    cache_dir_utils.cache_dir()  # torch's default is now written to the environment, as after any compile
    inductor_dir = tmp_path_factory.mktemp("inductor")
    spec = spec_with(2, compile={"enabled": True, "backend": "aot_eager", "cache_dir": str(inductor_dir)})
    counters.clear()
    engine = LatteEngine(spec, cache_dir=str(model_cache))
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    return engine, LatteEngine(spec_with(2), cache_dir=str(model_cache)), graphs_after_warmup, inductor_dir


def test_compiled_engine_warms_up_at_load_never_recompiles_and_matches_eager(compiled):
    from torch._dynamo.utils import counters

    engine, eager, graphs_after_warmup, _ = compiled
    assert graphs_after_warmup >= 1, "warm-up at load compiled nothing"
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    prompts, negatives, seeds = [LONG, "a dog"], ["", "blurry, low quality"], [2, 3]
    short, _ = engine.generate(["a dog"], ["blurry, low quality"], [3])  # a short last batch, padded to 2
    full, _ = engine.generate(prompts, negatives, seeds)  # prompt lengths unlike the warm-up's
    assert counters["stats"]["unique_graphs"] == graphs, "a batch after warm-up compiled a new graph"
    assert counters["frames"]["total"] == frames, "a batch after warm-up recompiled"
    want, _ = eager.generate(prompts, negatives, seeds)
    assert want.std() > 5 and diff(full, want) <= 1, "compiled differs from eager"
    assert diff(short[0], want[1]) <= 1, "padding a short batch changed its video"


def test_compile_cache_dir_from_spec_is_what_inductor_reads(compiled):
    from torch._inductor.codecache import CacheBase, FxGraphCache

    _, _, _, inductor_dir = compiled
    assert FxGraphCache._get_tmp_dir().startswith(str(inductor_dir))
    assert str(CacheBase.get_local_cache_path()).startswith(str(inductor_dir))


class DynamoCompiles:
    """Counts what dynamo compiles while it is open: frames converted (a first compile or a recompile of a
    function each), and the times it gave up on a function at its recompile limit (after which that function
    runs eagerly for good: the silent degradation this guards against). dynamo's `counters["recompiles"]` is
    not filled by this torch, so the frame counter and dynamo's own warning are what is counted."""

    def __enter__(self):
        import logging

        import torch._dynamo
        from torch._dynamo.utils import counters

        # Start from dynamo's state in a fresh model actor: the recompile limit counts per code object over the
        # whole process, and earlier tests in this one compiled the same transformer code (seen in a full run:
        # the limit hit before this engine's first compile, and nothing compiled at all).
        torch._dynamo.reset()
        self.counters, self.limit_hits = counters, []
        self._start = counters["frames"]["total"]
        hits = self.limit_hits

        class Hits(logging.Handler):
            def emit(self, record):
                if "hit config.recompile_limit" in record.getMessage():
                    hits.append(record.getMessage().splitlines()[0])

        self._handler, self._logger = Hits(), logging.getLogger("torch._dynamo.convert_frame")
        self._logger.addHandler(self._handler)
        return self

    @property
    def frames(self) -> int:
        return self.counters["frames"]["total"] - self._start

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)


@pytest.mark.parametrize("kind", ["faster_cache", "pyramid_attention_broadcast"])
def test_compile_with_hook_cache_compiles_once_and_matches_eager(kind, model_cache):
    """FasterCache/PAB decide per step in Python; compiled, they must not recompile per step (before: every
    step, until dynamo's limit, then eager). Warm-up compiles a few graphs, a batch after it none, and the
    video is the eager cached one."""
    from latte_ray.model.families.latte_engine import LatteEngine

    cached = {"kind": kind}
    with DynamoCompiles() as compiles:
        engine = LatteEngine(spec_with(1, cache=cached, compile={"enabled": True, "backend": "eager"}),
                             cache_dir=str(model_cache))
        warmed = compiles.frames
        video, _ = engine.generate([LONG], ["blurry"], [4])
    assert 1 <= warmed <= 6, f"{kind}: warm-up compiled {warmed} frames; a per-step recompile compiles dozens"
    assert compiles.frames == warmed, f"{kind}: a batch after warm-up compiled {compiles.frames - warmed} frames"
    assert not compiles.limit_hits, compiles.limit_hits
    eager, _ = LatteEngine(spec_with(1, cache=cached), cache_dir=str(model_cache)).generate([LONG], ["blurry"], [4])
    assert eager.std() > 5 and diff(video, eager) <= 1, f"{kind}: compiled differs from eager"


def test_regional_compile_compiles_the_blocks_once_and_matches_eager(compiled, model_cache):
    """model.compile.scope: blocks (diffusers' compile_repeated_blocks): every spatial and temporal block is
    compiled in place and the top module is not; warm-up compiles a few graphs, a batch after it none, no
    block falls back to eager at dynamo's recompile limit, and the video is the eager engine's."""
    from latte_ray.model.families.latte_engine import LatteEngine

    _, eager, _, _ = compiled
    with DynamoCompiles() as compiles:
        engine = LatteEngine(spec_with(2, compile={"enabled": True, "backend": "aot_eager", "scope": "blocks"}),
                             cache_dir=str(model_cache))
        warmed = compiles.frames
        prompts, negatives, seeds = [LONG, "a dog"], ["", "blurry, low quality"], [2, 3]
        video, _ = engine.generate(prompts, negatives, seeds)
    t = engine.pipe.transformer
    blocks = [*t.transformer_blocks, *t.temporal_transformer_blocks]
    assert engine.transformer is t and t._compiled_call_impl is None, "scope blocks compiled the whole model"
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert 1 <= warmed <= len(blocks) + 2 and compiles.frames == warmed, (warmed, compiles.frames)
    assert not compiles.limit_hits, compiles.limit_hits
    want, _ = eager.generate(prompts, negatives, seeds)
    assert want.std() > 5 and diff(video, want) <= 1, "regionally compiled differs from eager"


def test_compile_threads_follow_the_nodes_cores(monkeypatch):
    """Inductor's compile workers: the node's usable cores shared by the generation actors it holds (its GPUs
    per actor), not the actor's CPU share: a 16-core one-GPU node compiles with 16, an 8-GPU one gives each of
    its 8 actors 2; set where inductor and its worker subprocesses read it."""
    import torch._inductor.config as inductor_config

    from latte_ray.model.compiling import node_compile_threads, set_compile_threads, usable_cores

    assert node_compile_threads(1, cores=16, gpus=1) == 16
    assert node_compile_threads(1, cores=16, gpus=None) == 16
    assert node_compile_threads(1, cores=16, gpus=8) == 2 and node_compile_threads(2, cores=16, gpus=8) == 4
    assert node_compile_threads(0.5, cores=4, gpus=4) == 1 and node_compile_threads(1, cores=96, gpus=1) == 32
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(inductor_config, "compile_threads", inductor_config.compile_threads)
    assert set_compile_threads(16) == 16
    assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "16" and inductor_config.compile_threads == 16


def test_compile_cache_defaults_to_the_model_cache_volume(monkeypatch, tmp_path):
    """Unset, inductor's cache goes under the model cache ($LATTE_RAY_CACHE = /cache on the infra/ nodes);
    the production spec leaves it unset, so its kernels land on that volume."""
    from latte_ray.model.engine import inductor_cache_dir
    from latte_ray.spec import load_pipeline_spec

    monkeypatch.setenv("LATTE_RAY_CACHE", "/cache")
    prod = load_pipeline_spec("latte-1-t2v-512").model.compile
    assert inductor_cache_dir(prod.cache_dir) == "/cache/inductor"
    assert inductor_cache_dir(None, str(tmp_path)) == str(tmp_path / "inductor")
    assert inductor_cache_dir("/elsewhere", str(tmp_path)) == "/elsewhere"


def test_cuda_graph_outputs_are_cloned_before_they_are_kept():
    """A CUDA graph replays into the same buffers: what the wrapper returns must not alias them."""
    import torch

    from latte_ray.model.engine import CudaGraphOutputs

    buffer = torch.zeros(3)

    def replay(x):
        buffer.copy_(x)
        return (buffer,)

    wrapped = CudaGraphOutputs(replay, "test")
    first = wrapped(torch.ones(3))[0]
    second = wrapped(torch.full((3,), 2.0))[0]
    assert first.tolist() == [1.0] * 3 and second.tolist() == [2.0] * 3


# ---------------------------------------------------------------------------------- cache acceleration


@pytest.fixture(scope="module")
def plain_engine(model_cache):
    from latte_ray.model.families.latte_engine import LatteEngine

    return LatteEngine(spec_with(1), cache_dir=str(model_cache))


@pytest.mark.parametrize("kind", ["faster_cache", "pyramid_attention_broadcast"])
def test_cache_is_active_and_reset_between_batches(kind, plain_engine, model_cache):
    from latte_ray.model.families.latte_engine import LatteEngine

    engine = LatteEngine(spec_with(1, cache={"kind": kind}), cache_dir=str(model_cache))
    assert engine.pipe.transformer.is_cache_enabled
    first, _ = engine.generate(["a dog"], [""], [1])
    between, _ = engine.generate([LONG, "waves"], ["", "blurry"], [2, 3])
    again, _ = engine.generate(["a dog"], [""], [1])
    assert diff(first, again) == 0, "a cached video depends on the batch generated before it"
    uncached, _ = plain_engine.generate(["a dog"], [""], [1])
    assert diff(first, uncached) > 1, "the cache changed nothing: it is not active"
    batched, _ = engine.generate(["a dog", LONG], ["", ""], [1, 2])
    assert diff(batched[:1], first) <= 1 and diff(batched[1:], between[:1]) <= 1, "cached output not batch-invariant"


def test_cache_is_in_spec_hash_and_manifest(tmp_path):
    from latte_ray.stages.write import WriteStage

    off = spec_with(1)
    fast = spec_with(1, cache={"kind": "faster_cache"})
    pab = spec_with(1, cache={"kind": "pyramid_attention_broadcast"})
    assert len({off.spec_hash(), fast.spec_hash(), pab.spec_hash()}) == 3
    assert spec_with(1, cache={"kind": "faster_cache", "attention_weight": 0.3}).spec_hash() != fast.spec_hash()
    n = 1
    batch = {"id": np.array(["v"], dtype=object), "prompt": np.array(["p"], dtype=object),
             "negative_prompt": np.array([""], dtype=object), "seed": np.array([1]),
             "status": np.array(["error"], dtype=object), "error": np.array(["boom"], dtype=object),
             "prompt_tokens": np.zeros(n, np.int32), "prompt_truncated": np.zeros(n, bool)}
    for spec, want in ((off, None), (fast, "faster_cache")):
        out = tmp_path / (want or "off")
        rows = WriteStage(str(out), spec.model_dump_json())(dict(batch))
        fs, root = filesystem(str(out))
        stored = read_manifest(fs, OutputLayout(str(out), root))
        assert stored["cache"].to_pylist() == [want] == rows["cache"].to_pylist()
        assert stored["spec_hash"].to_pylist() == [spec.spec_hash()]


def test_manifest_parts_without_cache_column_still_read(tmp_path):
    """Parts written before the `cache` column existed (every other column of the manifest's schema, as
    latte-ray wrote them then) read back with nulls there."""
    import pyarrow.parquet as pq

    from latte_ray.record.storage import MANIFEST_SCHEMA

    layout = OutputLayout(str(tmp_path), str(tmp_path))
    (tmp_path / "manifest").mkdir()
    old = pa.schema([f for f in MANIFEST_SCHEMA if f.name != "cache"])
    row = {f.name: None for f in old} | {"id": "x", "status": "ok"}
    pq.write_table(pa.Table.from_pylist([row], schema=old), tmp_path / "manifest" / "part-old.parquet")
    got = read_manifest(filesystem(str(tmp_path))[0], layout, columns=["id", "status", "cache"])
    assert got.to_pylist() == [{"id": "x", "status": "ok", "cache": None}]


# ---------------------------------------------------------------------------------- benchmark tool


def test_null_engine_frames_have_the_spec_shape_and_depend_on_seed():
    from latte_ray.model.engine import make_engine
    from latte_ray.model.null import NullEngine

    spec = spec_with(1, source="null")
    engine = make_engine(spec)
    assert isinstance(engine, NullEngine)
    frames, text = engine.generate(["a b c", "d"], ["", ""], [1, 2])
    s = spec.sampling
    assert frames.shape == (2, s.video_length, s.height, s.width, 3) and frames.dtype == np.uint8
    assert diff(frames[0], frames[1]) > 0 and text.tokens == [3, 1]
