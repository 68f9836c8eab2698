"""Fleet utilization: where a run's generation actors (its GPUs) worked, loaded or waited, from its manifest.

Every generated row records its actor, node, when that actor started (its model load begins then) and the
start and end of the generation call that made it (stages/denoise.py). Rows of one call share the call, so
the distinct (actor, actor start, call) triples are the fleet's busy intervals. An actor *life* is one actor
process: a Ray actor restarted after a crash keeps its id but starts again (a new actor_started_at), so it is
a new life. A life is counted from its start (loading) to the end of its last call; what it did after that
(waiting for the end of its execution) the manifest cannot know, so the utilization here divides by the
peak number of lives alive at once over the whole span, which counts that wait as idle.

`latte-ray report` draws `fleet_chart` (busy, loading and idle actors over time) and prints `summary`;
benchmarks/fleet.py measures the same intervals against the GPUs it declared.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

COLUMNS = ["actor", "node", "actor_started_at", "busy_start", "busy_end"]


@dataclass
class Life:
    """One generation actor process: its start and its generation calls (epoch seconds, sorted, distinct)."""

    actor: str
    node: str
    started: float
    calls: list[tuple[float, float]] = field(default_factory=list)

    @property
    def first_busy(self) -> float:
        return self.calls[0][0]

    @property
    def last_end(self) -> float:
        return max(end for _, end in self.calls)

    @property
    def load_s(self) -> float:
        """From the actor's start to its first call: its model load and warm-up (and any wait for work)."""
        return self.first_busy - self.started

    @property
    def busy_s(self) -> float:
        return _union_length(self.calls)


def lives(attempts: pa.Table) -> list[Life]:
    """The actor lives of manifest rows (any columns, these among them: COLUMNS), sorted by start. Rows
    without an actor (errors found before generation, rows written by an older version) are left out."""
    if any(c not in attempts.column_names for c in COLUMNS) or not attempts.num_rows:
        return []
    rows = attempts.select(COLUMNS)
    rows = rows.filter(pc.and_(pc.is_valid(rows["actor"]), pc.is_valid(rows["busy_start"])))
    if not rows.num_rows:
        return []
    seconds = {c: pc.cast(rows[c], pa.int64()).to_numpy(zero_copy_only=False) / 1e6
               for c in ("actor_started_at", "busy_start", "busy_end")}
    actors, nodes = rows["actor"].to_pylist(), rows["node"].to_pylist()
    found: dict[tuple[str, float], Life] = {}
    calls: dict[tuple[str, float], set] = {}
    for i, actor in enumerate(actors):
        key = (actor, float(seconds["actor_started_at"][i]))
        if key not in found:
            found[key] = Life(actor, nodes[i] or "", key[1])
            calls[key] = set()
        calls[key].add((float(seconds["busy_start"][i]), float(seconds["busy_end"][i])))
    for key, life in found.items():
        life.calls = sorted(calls[key])
    return sorted(found.values(), key=lambda life: (life.started, life.actor))


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -np.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def step_curve(intervals: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(times, counts): how many of the intervals are open from times[i] until times[i + 1]."""
    if not intervals:
        return np.zeros(1), np.zeros(1, dtype=int)
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    times = np.array([t for t, _ in events])
    counts = np.cumsum([d for _, d in events])
    return times, counts


def busy_calls(found: list[Life]) -> list[tuple[float, float]]:
    return [call for life in found for call in life.calls]


def alive_spans(found: list[Life]) -> list[tuple[float, float]]:
    return [(life.started, life.last_end) for life in found]


def busy_between(found: list[Life], t0: float, t1: float) -> float:
    """Busy actor-seconds inside [t0, t1]."""
    return sum(max(0.0, min(b, t1) - max(a, t0)) for life in found for a, b in life.calls)


def summary(found: list[Life], slots: int | None = None) -> dict[str, object]:
    """What the report prints: spans, busy actor-seconds and utilization against `slots` actors (default: the
    peak number alive at once), the first and last actor to start working, loads and restarts."""
    if not found:
        return {}
    t0 = min(life.started for life in found)
    t1 = max(life.last_end for life in found)
    peak = int(step_curve(alive_spans(found))[1].max())
    slots = slots or peak
    busy = sum(life.busy_s for life in found)
    span = max(t1 - t0, 1e-9)
    loads = sorted(life.load_s for life in found)
    return {
        "actor lives (model loads)": len(found),
        "nodes": len({life.node for life in found}),
        "most actors alive at once": peak,
        "span, first actor start to last call end (s)": round(t1 - t0, 1),
        "busy actor-seconds": round(busy, 1),
        "utilization (busy / (most actors x span))": round(busy / (slots * span), 4),
        "median load, actor start to first call (s)": round(float(np.median(loads)), 1),
        "last actor's first call, after the first actor start (s)": round(max(l.first_busy for l in found) - t0, 1),
        "first actor out of work, before the last call end (s)": round(t1 - min(l.last_end for l in found), 1),
    }


def fleet_chart(found: list[Life]) -> bytes:
    """PNG: generation actors over time: busy (in a generation call), and alive (started, not past its last
    call); the gap between the two is loading or waiting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    if found:
        t0 = min(life.started for life in found)
        t1 = max(life.last_end for life in found)
        unit, scale = ("min", 60.0) if t1 - t0 >= 600 else ("s", 1.0)
        for intervals, colour, label in ((alive_spans(found), "#bab0ac", "alive (loading or waiting)"),
                                         (busy_calls(found), "#4c78a8", "busy (generating)")):
            times, counts = step_curve(intervals)
            ax.fill_between((times - t0) / scale, counts, step="post", color=colour, label=label)
        ax.set_xlabel(f"time since the first actor started ({unit})")
        ax.set_ylabel("generation actors")
        s = summary(found)
        ax.set_title(f"{s['actor lives (model loads)']} actor lives; utilization "
                     f"{s['utilization (busy / (most actors x span))']:.1%} of {s['most actors alive at once']}")
        ax.legend(loc="lower center", fontsize=8)
    else:
        ax.set_title("no generation intervals recorded")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def add_fleet_section(fs, layout, page: str) -> tuple[bytes, str]:
    """For `latte-ray report`: (fleet.png, the page with a Fleet section after its throughput chart)."""
    from latte_ray.record.storage import read_manifest

    found = lives(read_manifest(fs, layout, columns=COLUMNS))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in summary(found).items())
    section = ("<h2>Fleet</h2><p>Generation actors over time, from the manifest's busy intervals "
               "(actor, actor_started_at, busy_start, busy_end): grey is an actor loading its model or waiting "
               "for work, blue is generating.</p>"
               f"<table id='fleet'>{rows}</table><img src='fleet.png' alt='fleet utilization over time'>")
    marker = "alt='throughput over time'>"
    page = page.replace(marker, marker + section, 1) if marker in page else page.replace("</body>", section + "</body>")
    return fleet_chart(found), page
