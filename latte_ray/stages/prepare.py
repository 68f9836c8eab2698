"""Prepare stage: validate rows, give them ids and seeds, apply the work plan.

It runs inside the read tasks (`prepare_batch`, a plain function that Ray Data fuses into
`ReadFiles->MapBatches`), not in an actor pool: it keeps no state worth keeping between blocks, and an
actor pool of its own cost every execution (each round, each re-plan) one more worker process to start and
held a share of a CPU for the whole run. On a 2-core machine that was ~1.8 s of each execution's start.

The work plan (latte_ray/plan/workplan.py) arrives as small sorted key arrays in Ray's object store, read
zero-copy by every read task on a node: ids already done (dropped), ids repeated with different content
(error rows naming the id), and ids repeated with identical content together with the one copy of each
that is generated.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from latte_ray.plan.keys import contains, id_keys
from latte_ray.plan.prompts import WORK_COLUMNS, prepare_rows
from latte_ray.stages.declare import Context, Stage


def _resolve(value):
    if value is None:
        return None
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


class PrepareStage:
    def __init__(self, default_negative: str, run_seed: int, skip: object = None, conflicts: object = None,
                 dups: object = None, winners: object = None, without_id: list[str] | None = None,
                 round_of: tuple[int, int] | None = None, carry: bool = False):
        self.default_negative = default_negative
        self.carry = carry  # keep the input's other columns (the processor: the caller's columns ride along)
        self.round_of = round_of  # (k, rounds): keep only the ids of round k (scheduler.rounds)
        self.without_id = frozenset(without_id or ())  # files with no id column (prompts.prepare_rows)
        self.run_seed = run_seed
        self.skip = _resolve(skip)  # sorted id keys to leave out (resume), or None
        self.conflicts = _resolve(conflicts)  # {"keys": sorted id keys, "copies": uint32}, or None
        self.dups = _resolve(dups)  # sorted id keys with identical copies, or None
        self.winners = _resolve(winners)  # sorted row keys (row_hash, hi, lo) of the copies to keep

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = prepare_rows(batch, self.default_negative, self.run_seed, self.without_id)
        if self.carry:
            for name in batch.column_names:
                if name not in rows:
                    rows[name] = batch[name].to_numpy(zero_copy_only=False)
        if self.skip is None and self.conflicts is None and self.dups is None and self.round_of is None:
            return rows
        keys = id_keys(rows["id"])
        keep = np.ones(len(keys), bool)
        if self.round_of is not None:
            k, rounds = self.round_of
            keep &= keys["lo"] % np.uint64(rounds) == np.uint64(k)
        if self.skip is not None:
            keep &= ~contains(self.skip, keys)
        if self.conflicts is not None:
            self._mark_conflicts(batch, rows, keys)
        if self.dups is not None:
            from latte_ray.plan.workplan import ROW_KEY_DTYPE

            copy = contains(self.dups, keys)
            row_keys = np.empty(len(keys), ROW_KEY_DTYPE)
            row_keys["row_hash"] = batch["row_hash"].to_numpy().astype(np.uint64)
            row_keys["hi"], row_keys["lo"] = keys["hi"], keys["lo"]
            keep &= ~copy | contains(self.winners, row_keys)
        return {k: v[keep] for k, v in rows.items()}

    def _mark_conflicts(self, batch: pa.Table, rows: dict[str, np.ndarray], keys: np.ndarray) -> None:
        table = self.conflicts["keys"]
        hit = contains(table, keys)
        if not hit.any():
            return
        paths = batch["path"].to_pylist() if "path" in batch.column_names else [""] * len(keys)
        for i in np.flatnonzero(hit):
            copies = int(self.conflicts["copies"][np.searchsorted(table, keys[i])])
            video_id = rows["id"][i]
            message = (f"id {video_id!r} appears {copies} times in the input with different prompt, "
                       f"negative_prompt or seed; none of its copies is generated")
            if rows["status"][i] == "error":
                rows["error"][i] = f"{rows['error'][i]}; {message}"
            else:
                rows["error"][i] = f"{paths[i]}: row id={video_id}: {message}"
            rows["status"][i] = "error"


def prepare_batch(batch: pa.Table, **kwargs) -> dict[str, np.ndarray]:
    """The Ray Data UDF: PrepareStage(**kwargs) on one block, inside the read task that produced it."""
    return PrepareStage(**kwargs)(batch)


def _map_args(ctx: Context) -> dict:
    """Inside the read tasks (a plain function), with the work plan's refs and the round (a run's), or
    carrying the input's other columns (the processor's)."""
    work = ctx.extra.get("work")
    kwargs = {"default_negative": ctx.spec.sampling.negative_prompt, "run_seed": ctx.run_seed,
              **(work.refs if work is not None else {}), "round_of": ctx.extra.get("round_of"),
              "without_id": work.without_id if work is not None else None}
    if ctx.extra.get("carry"):
        kwargs["carry"] = True
    return {"fn": prepare_batch, "fn_kwargs": kwargs, "batch_format": "pyarrow",
            "num_cpus": ctx.spec.execution.num_cpus_per_cpu_task}


STAGE = Stage(
    name="prepare_batch", label="prepare stage", reads=("prompt",), writes=tuple(WORK_COLUMNS),
    replaces=True, map_args=_map_args,
)
# The processor's: the same stage, the caller's other columns carried along (its Context says carry).
CARRYING = Stage(
    name="prepare_batch", label="prepare stage", reads=("prompt",), writes=tuple(WORK_COLUMNS),
    map_args=_map_args,
)
