"""The GPU fleet (issue 18): the simulated engine, per-actor busy intervals in the manifest, and the fleet
chart of `latte-ray report`.

- `model.source: sim` sleeps the spec's load, compile and per-call times (scaled) and returns the null
  engine's frames; its timings are not in the spec hash, belong to `sim` only, and neither it nor the denoise
  stage that hosts it imports torch;
- a real Ray run with the sim engine records, per row, the actor, node, actor start and its call's interval,
  and the report draws them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from latte_ray.model.null import NullEngine
from latte_ray.model.sim import SimEngine
from latte_ray.ops import fleet
from latte_ray.spec import SimSpec, SpecError, load_pipeline_spec, parse_pipeline_spec


def sim_spec(compile_on: bool = True, **sim) -> object:
    raw = json.loads(load_pipeline_spec("latte-1-t2v-512").model_dump_json())
    raw["model"].update(source="sim", sim=sim or None)
    raw["model"]["compile"]["enabled"] = compile_on
    raw["sampling"].update(height=16, width=16, video_length=4)  # the encode stage's real work, small
    return parse_pipeline_spec(raw)


def test_sim_engine_sleeps_the_specs_times_and_returns_the_null_frames():
    slept: list[float] = []
    spec = sim_spec(load_s=100, compile_s=50, batch_s_fixed=1.0, batch_s_per_video=10.0, time_scale=0.01)
    engine = SimEngine(spec, sleep=slept.append)
    assert slept == [pytest.approx(1.5)]  # (load + compile) x scale, once, in the constructor
    frames, text = engine.generate(["a b", "c"], ["", ""], [3, 4])
    assert len(slept) == 2 and 0 < slept[1] <= 0.21 and engine.batch_seconds(2) == pytest.approx(0.21)
    assert np.array_equal(frames, NullEngine(spec).denoise(None, [3, 4])) and text.tokens == [2, 1]
    assert frames.shape == (2, 4, 16, 16, 3)

    slept.clear()
    SimEngine(sim_spec(compile_on=False, load_s=100, compile_s=50, time_scale=0.5), sleep=slept.append)
    assert slept == [pytest.approx(50.0)]  # no compile warm-up when the spec does not compile
    default = SimSpec()  # Latte-1's published 14.6 s per video on an A100, a few minutes to load and compile
    assert default.batch_seconds(2) == pytest.approx(29.2) and 120 <= default.load_s + default.compile_s <= 600


def test_sim_timings_change_no_hash_and_belong_to_sim_only():
    assert sim_spec(load_s=1).spec_hash() == sim_spec(load_s=2, time_scale=0.1).spec_hash() == sim_spec().spec_hash()
    raw = json.loads(load_pipeline_spec("tiny-cpu").model_dump_json())
    raw["model"]["sim"] = {"load_s": 1}
    with pytest.raises(SpecError, match="model.sim applies to model.source 'sim' only"):
        parse_pipeline_spec(raw)
    raw["model"]["sim"] = None  # an unset sim leaves every existing spec's hash (and output binding) as it was
    assert parse_pipeline_spec(raw).spec_hash() == load_pipeline_spec("tiny-cpu").spec_hash()
    with pytest.raises(SpecError, match="time_scale"):
        sim_spec(time_scale=0)


def test_the_denoise_stage_hosts_the_sim_engine_and_generates_without_torch(tmp_path):
    code = (
        "import sys, json; from latte_ray.spec import parse_pipeline_spec; "
        "from latte_ray.stages.denoise import DenoiseStage; "
        f"s = DenoiseStage({sim_spec(time_scale=0.001).model_dump_json()!r}); "
        "import numpy as np; n = 2; "
        "out = s({'id': np.array(['a', 'b'], dtype=object), 'prompt': np.array(['x', 'y'], dtype=object), "
        "'negative_prompt': np.array(['', ''], dtype=object), 'seed': np.array([1, 2]), "
        "'status': np.array(['pending'] * n, dtype=object), 'error': np.array([None] * n, dtype=object)}); "
        "print(type(s.engine).__name__, list(out['status']), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # A call too: importing torch there cost every simulated GPU ~10 s and ~250 MB on its first batch.
    assert out.stdout.split() == ["SimEngine", "['generated',", "'generated']", "False"]


def _rows(calls: list[tuple[str, float, float, float, int]]) -> pa.Table:
    """Manifest-like rows: (actor, actor start, call start, call end, rows in the call), epoch seconds."""
    cols = {c: [] for c in fleet.COLUMNS}
    for actor, started, a, b, n in calls:
        for _ in range(n):
            cols["actor"].append(actor)
            cols["node"].append("n1")
            for c, t in (("actor_started_at", started), ("busy_start", a), ("busy_end", b)):
                cols[c].append(int(t * 1e6))
    ts = pa.timestamp("us", tz="UTC")
    return pa.table({"actor": cols["actor"], "node": cols["node"],
                     **{c: pa.array(cols[c], pa.int64()).cast(ts) for c in fleet.COLUMNS[2:]}})


def test_fleet_lives_and_summary_from_busy_intervals():
    table = _rows([("a", 0, 10, 20, 2), ("a", 0, 20, 30, 2), ("b", 0, 15, 25, 2),
                   ("b", 40, 50, 60, 1)])  # b restarted at 40 (same Ray actor id, a new start): a new life
    found = fleet.lives(table)
    assert [(l.actor, l.started, l.calls) for l in found] == [
        ("a", 0, [(10, 20), (20, 30)]), ("b", 0, [(15, 25)]), ("b", 40, [(50, 60)])]
    assert [l.load_s for l in found] == [10, 15, 10] and [l.busy_s for l in found] == [20, 10, 10]
    times, counts = fleet.step_curve(fleet.busy_calls(found))
    assert counts.max() == 2
    s = fleet.summary(found)
    assert s["actor lives (model loads)"] == 3 and s["most actors alive at once"] == 2
    assert s["utilization (busy / (most actors x span))"] == pytest.approx(40 / (2 * 60), abs=1e-4)
    assert fleet.busy_between(found, 12, 18) == pytest.approx(6 + 3)
    assert fleet.lives(table.slice(0, 0)) == [] and fleet.summary([]) == {}


def test_a_sim_run_records_where_and_when_each_row_was_generated(tmp_path, ray_local):
    """A real run (a sim pool of 1..2 actors, one Ray Data execution): the pool starts with both actors the
    cluster holds; every generated row names its actor and node, the actor's start and its call's interval,
    which follows the slept load and lasts the slept call; the report draws the fleet from them."""
    from typer.testing import CliRunner

    from latte_ray import runner
    from latte_ray.cli import app
    from latte_ray.record.storage import OutputLayout, filesystem, read_manifest
    from latte_ray.spec import RunSpec
    from tests.conftest import write_prompts

    spec = sim_spec(compile_on=False, load_s=100, compile_s=0, batch_s_per_video=10, time_scale=0.01)
    spec = spec.with_overrides(concurrency=(1, 2), num_gpus_per_actor=0.0, num_cpus_per_actor=0.25, batch_size=2,
                               cpu_stage_max_actors=1)
    ids = [f"f-{i:02d}" for i in range(12)]
    table = write_prompts(tmp_path / "in.parquet", {"id": ids, "prompt": [f"a fleet of {i}" for i in ids]})
    out = tmp_path / "out"
    summary = runner.run(RunSpec(pipeline=spec, prompts=[str(table)], output=str(out)))
    assert (summary.ok, summary.error) == (12, 0)

    fs, root = filesystem(str(out))
    rows = read_manifest(fs, OutputLayout(str(out), root))
    assert rows.num_rows == 12 and set(rows["actor"].to_pylist()) - {None} and None not in rows["node"].to_pylist()
    found = fleet.lives(rows)
    assert len(found) == 2 and sum(len(l.calls) for l in found) == 6  # 12 rows, 2 per call
    assert len({l.node for l in found}) == 1 and all(l.node for l in found)
    for life in found:
        assert life.load_s >= 1.0  # load_s x time_scale slept before the first call
        assert all(b - a >= 0.2 - 1e-3 for a, b in life.calls)  # 2 videos x 10 s x 0.01 each
    by_call: dict = {}
    for r in rows.to_pylist():
        by_call.setdefault((r["actor"], r["busy_start"]), []).append(r["id"])
    assert sorted(len(v) for v in by_call.values()) == [2] * 6

    dest = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(out), "--dest", str(dest), "--samples", "2"])
    assert result.exit_code == 0, result.output
    page = (dest / "index.html").read_text()
    assert "<table id='fleet'>" in page and f"<tr><th>actor lives (model loads)</th><td>{len(found)}</td>" in page
    assert (dest / "fleet.png").stat().st_size > 5000


def test_the_generation_pool_starts_with_every_actor_the_cluster_holds():
    from latte_ray.plan.fit import Autoscaler, initial_pool_size

    prod = load_pipeline_spec("latte-1-t2v-512")  # concurrency [1, 64], 1 GPU and 2 CPUs per actor
    gpu_node = {"CPU": 17.0, "GPU": 8.0}
    fixed, scaling = Autoscaler(False, "none"), Autoscaler(True, "test")
    assert initial_pool_size(prod, [gpu_node] * 2, fixed) == 16  # every GPU of two 8-GPU nodes, at once
    assert initial_pool_size(prod, [gpu_node] * 9, fixed) == 64  # never above the pool's maximum
    assert initial_pool_size(prod, [gpu_node], scaling) == 64  # pending actors: the autoscaler's demand
    assert initial_pool_size(prod, [{"CPU": 4.0, "GPU": 0.0}], fixed) == 1  # never below the minimum
    tiny = load_pipeline_spec("tiny-cpu")  # 1..2 actors of 0.5 CPU beside 3 x 0.25 CPU on 2 cores: both
    assert initial_pool_size(tiny, [{"CPU": 2.0}], fixed) == 2
    assert initial_pool_size(tiny.with_overrides(concurrency=3), [{"CPU": 2.0}], fixed) == 3  # a fixed size


def test_a_free_slot_goes_to_the_oldest_rounds_batch_on_the_least_busy_loaded_server():
    """fleet/broker.pick_slot: the broker's choice for a batch waiting for a generation server's slot."""
    from latte_ray.fleet.broker import SLOTS, _Server, pick_slot

    servers = {"a": _Server(None, ready=True, node="n1", holders=["c"]),
               "b": _Server(None, ready=True, node="n2"),
               "loading": _Server(None, ready=False, node="n2")}  # never granted before its model has loaded
    assert pick_slot(servers, [], (0, 0)) == "b"  # the most free slots
    servers["b"].holders = ["c"]
    servers["b"].granted = 5
    assert pick_slot(servers, [], (0, 0)) == "a"  # as free: the less used
    # Two free slots: the next round's batch waits while two (or more) batches of the older round wait too.
    waiting = [(0, 7), (0, 8), (0, 9), (1, 3)]
    assert pick_slot(servers, waiting, (1, 3)) is None
    assert pick_slot(servers, waiting[1:], (1, 3)) is None
    assert pick_slot(servers, waiting[2:], (1, 3)) is not None  # one older batch ahead, a slot left over
    assert pick_slot(servers, waiting, (0, 7)) == "a"
    # Free slots are counted, not servers: one server with both slots free serves one older batch and this one.
    lone = {"c": _Server(None, ready=True, node="n1")}
    assert pick_slot(lone, [(0, 1), (1, 2)], (1, 2)) == "c"
    assert pick_slot(lone, [(0, 1), (0, 2), (1, 3)], (1, 3)) is None
    # A batch whose server died on n2 stays on n2 (its crash ledger) and does not wait in line.
    assert pick_slot(servers, waiting, (1, 4), prefer_node="n2") == "b"
    servers["b"].holders = ["c"] * SLOTS
    assert pick_slot(servers, [], (0, 0), prefer_node="n2") is None  # n2's loaded server is busy: wait for it
    servers["b"].ready = False
    assert pick_slot(servers, [], (0, 0), prefer_node="n2") == "a"  # none loaded on n2: any node
