"""Prepare stage (CPU tasks): validate rows, give them ids and seeds, drop ids that are already done."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from latte_ray.prompts import prepare_rows


class PrepareStage:
    def __init__(self, default_negative: str, run_seed: int, skip_ids: object = None):
        self.default_negative = default_negative
        self.run_seed = run_seed
        if skip_ids is not None and not isinstance(skip_ids, pa.Array):
            import ray

            skip_ids = ray.get(skip_ids)  # an ObjectRef: one copy in the object store, shared by all tasks
        self.skip_ids = skip_ids  # ids to leave out (resume), or None

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = prepare_rows(batch, self.default_negative, self.run_seed)
        if self.skip_ids is not None and len(self.skip_ids):
            import pyarrow.compute as pc

            keep = ~pc.is_in(pa.array(rows["id"], pa.string()), value_set=self.skip_ids).to_numpy(zero_copy_only=False)
            rows = {k: v[keep] for k, v in rows.items()}
        return rows
