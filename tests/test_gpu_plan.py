"""benchmarks/gpu.py, the one-command GPU plan (../shared/GPU.md), rehearsed without a GPU: its budget logic on a
fake clock with simulated step durations, its launcher on real processes (a failing and a hung step), and every
step's code at toy size on the CPU (`--device cpu`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu  # noqa: E402  (benchmarks/gpu.py)

EAGER_S, TIMING_S = 110.0, 30.0


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulated(clock: FakeClock, compile_s: float, ran: list):
    """A launcher that takes simulated time: eager EAGER_S; a compile step compile_s then TIMING_S, or its
    whole timeout when that is shorter (stopped while compiling: no compile_s, as the real launcher reports)."""

    def launch(step, options, timeout):
        ran.append((step.name, options, timeout))
        need = EAGER_S if not step.compiles else compile_s + TIMING_S
        if need > timeout:
            clock.now += timeout
            return {"status": "timeout", "seconds": timeout, "reason": "stopped at its timeout"}
        clock.now += need
        return {"status": "ok", "seconds": need, **({"compile_s": compile_s} if step.compiles else {})}

    return launch


def replay(tmp_path: Path, compile_s: float, torchao: str | None = None):
    clock, ran = FakeClock(), []
    results = tmp_path / f"replay-{compile_s:g}.jsonl"
    returned = gpu.run_plan(gpu.STEPS, gpu.BUDGET_S, clock, simulated(clock, compile_s, ran),
                            lambda line: gpu.append(results, line), torchao)
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert lines == returned and [x["step"] for x in lines] == [s.name for s in gpu.STEPS], "one line per step"
    assert clock.now - 1000.0 <= gpu.BUDGET_S, "the plan ran past its budget"
    return {x["step"]: x for x in lines}, ran


def test_budget_replay_compile_60s_runs_every_step(tmp_path):
    lines, ran = replay(tmp_path, 60)
    assert [lines[s]["status"] for s in lines] == ["ok"] * 4
    # Eager took 110 s: 370 left, 90 kept for float8, so a whole-model compile (~300 s) does not fit: blocks.
    assert lines["compiled"]["scope"] == "blocks" and lines["compiled"]["timeout_s"] == 370
    assert lines["production-mode"]["at_s"] == 110 + 3 * 90


def test_budget_replay_compile_300s_keeps_compiled_and_says_why_the_rest_is_skipped(tmp_path):
    lines, ran = replay(tmp_path, 300)
    assert [lines[s]["status"] for s in lines] == ["ok", "ok", "skipped", "skipped"]
    assert [name for name, _, _ in ran] == ["eager", "compiled"]
    assert "took 300 s" in lines["float8"]["reason"] and "40 s left" in lines["float8"]["reason"]
    assert "40 s left" in lines["production-mode"]["reason"]


def test_budget_replay_compile_450s_stops_compiled_at_the_budget(tmp_path):
    lines, ran = replay(tmp_path, 450)
    assert [lines[s]["status"] for s in lines] == ["ok", "timeout", "skipped", "skipped"]
    assert lines["compiled"]["timeout_s"] == 370 and lines["compiled"]["at_s"] == gpu.BUDGET_S
    assert "0 s left" in lines["float8"]["reason"] and "0 s left" in lines["production-mode"]["reason"]


def test_budget_replay_without_torchao(tmp_path):
    """float8 is skipped with the reason, and step 2 no longer keeps time for it: a whole-model compile fits."""
    lines, _ = replay(tmp_path, 60, torchao="torchao is not installed here")
    assert lines["float8"] == {**lines["float8"], "status": "skipped", "reason": "torchao is not installed here"}
    assert lines["compiled"]["scope"] == "whole" and lines["production-mode"]["status"] == "ok"


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
