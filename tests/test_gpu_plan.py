"""benchmarks/gpu.py, the one-command GPU plan (../shared/GPU.md), rehearsed without a GPU: its budget logic on a
fake clock with simulated step durations, its launcher on real processes (a failing and a hung step), and every
step's code at toy size on the CPU (`--device cpu`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu  # noqa: E402  (benchmarks/gpu.py)

EAGER_S, WAN_EAGER_S, TIMING_S = 110.0, 80.0, 30.0


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulated(clock: FakeClock, compile_s: float, ran: list):
    """A launcher that takes simulated time: eager EAGER_S, wan-eager WAN_EAGER_S; a compile step compile_s then
    TIMING_S, or its whole timeout when that is shorter (stopped while compiling: no compile_s, as the real
    launcher reports)."""

    def launch(step, options, timeout):
        ran.append((step.name, options, timeout))
        need = compile_s + TIMING_S if step.compiles else WAN_EAGER_S if step.name == "wan-eager" else EAGER_S
        if need > timeout:
            clock.now += timeout
            return {"status": "timeout", "seconds": timeout, "reason": "stopped at its timeout"}
        clock.now += need
        return {"status": "ok", "seconds": need, **({"compile_s": compile_s} if step.compiles else {})}

    return launch


def replay(tmp_path: Path, compile_s: float, torchao: str | None = None, steps=gpu.STEPS):
    clock, ran = FakeClock(), []
    results = tmp_path / f"replay-{compile_s:g}.jsonl"
    returned = gpu.run_plan(steps, gpu.BUDGET_S, clock, simulated(clock, compile_s, ran),
                            lambda line: gpu.append(results, line), torchao)
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert lines == returned and [x["step"] for x in lines] == [s.name for s in steps], "one line per step"
    assert clock.now - 1000.0 <= gpu.BUDGET_S, "the plan ran past its budget"
    return {x["step"]: x for x in lines}, ran


def test_plan_order_latte_first_then_wan():
    assert [s.name for s in gpu.STEPS] == ["eager", "compiled", "float8", "production-mode", "wan-eager",
                                           "wan-compiled"]


def test_budget_replay_compile_60s_runs_every_latte_step_and_wan_eager_on_what_is_left(tmp_path):
    lines, ran = replay(tmp_path, 60)
    assert [lines[s]["status"] for s in lines] == ["ok"] * 5 + ["skipped"]
    # Eager took 110 s: 370 left, 90 kept for float8, so a whole-model compile (~300 s) does not fit: blocks.
    assert lines["compiled"]["scope"] == "blocks" and lines["compiled"]["timeout_s"] == 370
    assert lines["production-mode"]["at_s"] == 110 + 3 * 90
    # 100 s left: Wan eager (needs 90) runs, given all of it; then 20 s is less than a compile seen (60 + 40).
    assert lines["wan-eager"]["timeout_s"] == 100 and lines["wan-eager"]["at_s"] == 380 + WAN_EAGER_S
    assert lines["wan-compiled"]["reason"] == (f"needs 100 s (a compile here took 60 s or more, + 40 s of timing), "
                                               f"20 s left of the budget ({gpu.WAN_NOTE})")


def test_budget_replay_compile_300s_keeps_compiled_and_says_why_the_rest_is_skipped(tmp_path):
    lines, ran = replay(tmp_path, 300)
    assert [lines[s]["status"] for s in lines] == ["ok", "ok"] + ["skipped"] * 4
    assert [name for name, _, _ in ran] == ["eager", "compiled"]
    assert "took 300 s" in lines["float8"]["reason"] and "40 s left" in lines["float8"]["reason"]
    assert "40 s left" in lines["production-mode"]["reason"]
    assert lines["wan-eager"]["reason"] == (f"needs 90 s (its least useful time), 40 s left of the budget "
                                            f"({gpu.WAN_NOTE})")


def test_budget_replay_compile_450s_stops_compiled_at_the_budget(tmp_path):
    lines, ran = replay(tmp_path, 450)
    assert [lines[s]["status"] for s in lines] == ["ok", "timeout"] + ["skipped"] * 4
    assert lines["compiled"]["timeout_s"] == 370 and lines["compiled"]["at_s"] == gpu.BUDGET_S
    assert all("0 s left" in lines[s]["reason"] for s in ("float8", "production-mode", "wan-eager", "wan-compiled"))


def test_budget_replay_without_torchao(tmp_path):
    """float8 is skipped with the reason, and step 2 no longer keeps time for it: a whole-model compile fits."""
    lines, _ = replay(tmp_path, 60, torchao="torchao is not installed here")
    assert lines["float8"] == {**lines["float8"], "status": "skipped", "reason": "torchao is not installed here"}
    assert lines["compiled"]["scope"] == "whole" and lines["production-mode"]["status"] == "ok"
    # float8's 90 s is Wan's: both Wan steps run, the compiled one with the 110 s left after Wan eager.
    assert lines["wan-eager"]["status"] == lines["wan-compiled"]["status"] == "ok"
    assert lines["wan-compiled"]["timeout_s"] == gpu.BUDGET_S - 110 - 90 - 90 - WAN_EAGER_S


def test_budget_replay_wan_only(tmp_path):
    """`--only wan-eager wan-compiled`: the Wan table with the whole budget, nothing kept for Latte."""
    wan = [s for s in gpu.STEPS if s.name.startswith("wan-")]
    lines, ran = replay(tmp_path, 60, steps=wan)
    assert [lines[s]["status"] for s in lines] == ["ok", "ok"]
    assert [(name, timeout) for name, _, timeout in ran] == [("wan-eager", 240), ("wan-compiled", 240)]


def test_launcher_keeps_a_failed_or_hung_steps_log_and_line(tmp_path, monkeypatch):
    """The real launcher: a step that fails writes its line with the reason from its log, the log kept whole;
    one that hangs is stopped at its timeout (its process group killed) and says so."""
    launcher = gpu.ChildLauncher(tmp_path, "cpu")
    failed = launcher(gpu.Step("no-such-step", cap_s=60, min_s=1), {}, timeout=60)
    assert failed["status"] == "failed" and "KeyError" in failed["reason"] and failed["log"] in failed["reason"]
    assert "Traceback" in (tmp_path / failed["log"]).read_text()

    monkeypatch.setitem(gpu.__dict__, "__file__", str(_hanging_script(tmp_path)))
    hung = launcher(gpu.Step("hangs", cap_s=60, min_s=1), {}, timeout=2)
    assert hung["status"] == "timeout" and hung["parts"] == ["started"] and 2 <= hung["seconds"] < 30
    assert "after part 'started'" in hung["reason"]


def _hanging_script(tmp_path: Path) -> Path:
    script = tmp_path / "hangs.py"
    script.write_text(
        "import json, sys, time\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "open(out + '/gpu.jsonl', 'a').write(json.dumps({'step': 'hangs', 'part': 'started'}) + '\\n')\n"
        "time.sleep(600)\n")
    return script


@pytest.mark.parametrize("step,options", [("eager", {}), ("compiled", {"scope": "whole"}), ("float8", {}),
                                         ("production-mode", {})])
def test_every_step_runs_at_toy_size_on_the_cpu(step, options, tmp_path):
    """`--device cpu`: each step's own code at toy size (in this process; the launcher test above covers the
    processes): every part it measures is written, the latents are finite, the compile steps report their
    compile and no recompile, float8's stand-in reports its error against the unquantized step."""
    gpu.run_child(step, options, tmp_path, smoke=True)
    parts = [json.loads(x) for x in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert {p["step"] for p in parts} == {step} and parts[-1]["part"] == "done"
    by = {}
    for p in parts:
        by.setdefault(p["part"], []).append(p)
    assert by["video"][0]["latents_finite"] and by["video"][0]["frames_std"] > 0
    if step == "eager":
        assert [p["batch"] for p in by["step"]] == list(gpu.BATCHES) and all(p["finite"] for p in by["step"])
        assert {"t5", "flops", "profile", "batch-invariance", "build"} <= set(by)
        assert [p["cudnn_benchmark"] for p in by["vae-decode"]] == [False, True] and by["profile"][0]["top"]
        # float32 on the CPU: row 0 alone and beside another row agree to rounding (the models in eval mode:
        # T5's dropout, live in a freshly built model, made them differ by 1e-2)
        assert by["batch-invariance"][0]["max_abs_diff"] < 1e-4
    else:
        assert by["compile"][0]["compile_s"] > 0 and by["step"][0]["finite"]
    if step in ("compiled", "production-mode"):
        assert by["compile"][0]["scope"] == options.get("scope", "blocks")
        assert by["step"][0]["recompiles"] == by["video"][0]["recompiles"] == 0, "timing made dynamo recompile"
    if step == "production-mode":
        assert by["compile"][0]["mode"] == "max-autotune-no-cudagraphs"
    if step == "float8":
        error = by["error"][0]
        assert error["kind"] == "int8_weight_only" and 0 < error["relative_l2"] < 0.1 and error["finite"]


def test_wan_steps_run_at_toy_size_on_the_cpu(tmp_path):
    """`--device cpu` for the Wan table: Wan 2.1-1.3B's published configs at the tiny Wan's widths, through
    WanEngine. Every part is written; the built weights are what Wan's memory model predicts (UMT5 included for
    eager, left out for compiled, which feeds embeddings directly); row 0 does not depend on its batch; the
    compiled step's timing and video make dynamo recompile nothing."""
    by = {}
    for step in ("wan-eager", "wan-compiled"):
        gpu.run_child(step, {}, tmp_path, smoke=True)
    for p in map(json.loads, (tmp_path / "gpu.jsonl").read_text().splitlines()):
        by.setdefault((p["step"], p["part"]), []).append(p)
    assert by[("wan-eager", "done")] and by[("wan-compiled", "done")]
    build = by[("wan-eager", "build")][0]
    assert build["weights_gib"] == pytest.approx(build["predicted_weights_gib"], rel=1e-3)
    assert [p["batch"] for p in by[("wan-eager", "umt5")]] == list(gpu.WAN_BATCHES)
    steps = by[("wan-eager", "step")]
    assert [p["batch"] for p in steps] == list(gpu.WAN_BATCHES) and all(p["finite"] for p in steps)
    assert steps[1]["model_tflop_per_step"] == pytest.approx(2 * steps[0]["model_tflop_per_step"])
    from latte_ray.model.families.wan_figures import figures  # the model itself, at batch 2

    c = gpu.WanChild("wan-eager", tmp_path, smoke=True)
    two = figures(c.spec(2), c.cfg["transformer"], c.cfg["text_encoder"], c.cfg["vae"])
    assert steps[1]["predicted_denoise_gib"] == pytest.approx(two.denoise_activations / 2**30)
    assert steps[1]["model_tflop_per_step"] == pytest.approx(2 * 2 * two.transformer_per_forward / 1e12)
    assert by[("wan-eager", "batch-invariance")][0]["max_abs_diff"] < 1e-4
    assert [p["cudnn_benchmark"] for p in by[("wan-eager", "vae-decode")]] == [False, True]
    assert by[("wan-eager", "profile")][0]["top"] and by[("wan-eager", "flops")][0]["counted_tflop"] > 0
    compile_, = by[("wan-compiled", "compile")]
    assert compile_["compile_s"] > 0 and compile_["scope"] == "blocks"
    assert 0 < compile_["weights_gib"] < build["weights_gib"] / 2, "the compile step builds no UMT5"
    step, = by[("wan-compiled", "step")]
    assert step["finite"] and step["recompiles"] == 0
    assert step["model_tflop_per_step"] == steps[0]["model_tflop_per_step"]
    for video in (by[("wan-eager", "video")][0], by[("wan-compiled", "video")][0]):
        assert video["latents_finite"] and video["frames_std"] > 0 and video["steps"] == 2 and "cut_short" not in video
    assert by[("wan-compiled", "video")][0]["recompiles"] == 0


def test_wan_video_takes_the_steps_that_fit_its_timeout(tmp_path):
    """The Wan video is the last and longest part: all 50 steps when they fit the time the child has left,
    else as many as fit beside the decode and a spare 20 s (at least 2). The child's time left runs from the
    deadline the launcher gives it."""
    assert gpu.video_steps(50, step_s=None, decode_s=5, left=60) is None, "no step timed: the spec's steps"
    assert gpu.video_steps(50, step_s=1.3, decode_s=5, left=60) == 26  # (60 - 5 - 20) / 1.3
    assert gpu.video_steps(50, step_s=100.0, decode_s=5, left=60) == 2
    assert gpu.video_steps(50, step_s=1.3, decode_s=5, left=200) is None
    assert gpu.video_steps(50, step_s=1.3, decode_s=5, left=float("inf")) is None, "no deadline: all steps"
    assert gpu.video_steps(2, step_s=100.0, decode_s=5, left=60) is None, "2 of 2 is not cut short"
    assert 0 < gpu.WanChild("wan-eager", tmp_path, False, deadline=time.time() + 60).left() <= 60
    assert gpu.WanChild("wan-eager", tmp_path, False).left() == float("inf")
