"""TeaCache for Latte, decided per video (`model.cache: {kind: teacache, threshold: ...}`).

TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model";
reference code ali-vilab/TeaCache, eval/teacache/experiments/latte.py) skips the whole stack of transformer
blocks at a step where the model's input has changed little since the last computed step, and reuses the
residual (blocks' output minus their input) cached at that step. The signal is the first block's
timestep-modulated input; its relative L1 change from the previous step is rescaled by a polynomial fitted
per model and accumulated; while the sum stays under the threshold the step is skipped, otherwise it is
computed and the sum restarts. The first and last steps are always computed.

The reference decides once per batch. Here every video decides for itself (DESIGN.md contract 1: a video is
the same whatever batch it is in): each keeps its own accumulator, previous modulated input and residual,
and the two classifier-free-guidance halves of a video decide together (their statistics pooled, as the
reference pools a batch of one). At each step only the videos that must compute go through the blocks;
the others add their own cached residual. The embeddings before the blocks and the final norm/projection
after them run for the whole batch (cheap; they depend on the step).

Where the blocks sit: this file splits diffusers' `LatteTransformer3DModel.forward` (diffusers 0.42) into
`embed` (patch + position embedding, AdaLN-single timestep embedding, caption projection), `blocks` (the
spatial/temporal block pairs, temporal position embedding included) and `head` (final norm, modulation,
projection, unpatchify), reusing the model's own modules; nothing in diffusers is patched. With every step
computed (threshold 0), the three parts run the same operations on the same tensors as `forward`, so the
video equals the uncached one bit for bit (tests/test_acceleration.py checks it, which also guards this copy
against a diffusers upgrade that changes `forward`).

torch.compile: a sub-batch of k videos that must compute is padded up to the next of a small fixed set of
sizes, the powers of two below `execution.batch_size` and the batch size itself, by repeating one of its
rows (the padded outputs are dropped). So there are at most ceil(log2(batch_size)) + 1 graphs of the blocks,
each compiled and warmed up at load (`warm_up_schedule`), and none mid-run. Why this scheme: a graph per
possible k (batch_size graphs) costs compile time and memory linearly; dynamic shapes give one graph but
weaker kernels (inductor specializes less) and still recompile at 0/1 boundaries; always running the full
batch would save nothing. Padding wastes at most half of a sub-batch and only when videos disagree. Without
compile nothing is padded (eager runs any size).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from latte_ray.spec import CacheSpec


def padded_sizes(batch_size: int) -> tuple[int, ...]:
    """Sub-batch sizes (in videos) compiled blocks run at: powers of two below batch_size, and batch_size."""
    sizes, p = {batch_size}, 1
    while p < batch_size:
        sizes.add(p)
        p *= 2
    return tuple(sorted(sizes))


def padded_size(k: int, batch_size: int) -> int:
    return min(s for s in padded_sizes(batch_size) if s >= k)


@dataclass
class Embedded:
    """What `LatteParts.embed` hands to the blocks and the head, for a batch of `batch` rows."""

    hidden: torch.Tensor  # (batch * frames, patches, dim): the blocks' input
    encoder: torch.Tensor  # (batch * frames, text, dim)
    t_spatial: torch.Tensor  # (batch * frames, 6 * dim)
    t_temporal: torch.Tensor  # (batch * patches, 6 * dim)
    embedded_timestep: torch.Tensor  # (batch, dim)
    modulated: torch.Tensor  # (batch * frames, patches, dim): block 0's modulated input, TeaCache's signal
    batch: int
    frames: int
    grid: tuple[int, int]  # patches per side (height, width)


class LatteParts:
    """LatteTransformer3DModel.forward as embed -> blocks -> head (see the module docstring)."""

    def __init__(self, model):
        self.model = model
        self._embed_fn, self.blocks_fn, self.head_fn = self._embed, self.blocks, self.head
        self.cuda_graphs = False  # outputs of a CUDA-graph run are overwritten by the next run

    def compile(self, backend: str, mode: str | None, fullgraph: bool) -> None:
        kwargs = {"mode": mode} if backend == "inductor" and mode else {}
        self.cuda_graphs = backend == "inductor" and mode in ("reduce-overhead", "max-autotune")
        self._embed_fn = torch.compile(self._embed, backend=backend, fullgraph=fullgraph, dynamic=False, **kwargs)
        self.blocks_fn = torch.compile(self.blocks, backend=backend, fullgraph=fullgraph, dynamic=False, **kwargs)
        self.head_fn = torch.compile(self.head, backend=backend, fullgraph=fullgraph, dynamic=False, **kwargs)

    def embed(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        e = Embedded(*self._embed_fn(hidden_states, timestep, encoder_hidden_states))
        if self.cuda_graphs:  # the modulated input is kept until the next step
            e.modulated = e.modulated.clone()
        return e

    def _embed(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        m = self.model
        batch, channels, frames, height, width = hidden_states.shape
        x = hidden_states.permute(0, 2, 1, 3, 4).reshape(-1, channels, height, width)
        grid = (x.shape[-2] // m.config.patch_size, x.shape[-1] // m.config.patch_size)
        patches = grid[0] * grid[1]
        x = m.pos_embed(x)
        t, embedded_timestep = m.adaln_single(
            timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, batch_size=batch,
            hidden_dtype=x.dtype,
        )
        enc = m.caption_projection(encoder_hidden_states)
        enc = enc.repeat_interleave(frames, dim=0, output_size=enc.shape[0] * frames).view(-1, *enc.shape[-2:])
        t_spatial = t.repeat_interleave(frames, dim=0, output_size=t.shape[0] * frames).view(-1, t.shape[-1])
        t_temporal = t.repeat_interleave(patches, dim=0, output_size=t.shape[0] * patches).view(-1, t.shape[-1])
        # Block 0's own first step (diffusers BasicTransformerBlock, norm_type "ada_norm_single").
        block = m.transformer_blocks[0]
        shift_msa, scale_msa = (block.scale_shift_table[None] + t_spatial.reshape(x.shape[0], 6, -1)).chunk(6, 1)[:2]
        modulated = block.norm1(x) * (1 + scale_msa) + shift_msa
        return x, enc, t_spatial, t_temporal, embedded_timestep, modulated, batch, frames, grid

    def blocks(self, x, encoder, mask, t_spatial, t_temporal, batch: int, frames: int, temporal: bool):
        m = self.model
        for i, (spatial, temporal_block) in enumerate(zip(m.transformer_blocks, m.temporal_transformer_blocks)):
            x = spatial(x, None, encoder, mask, t_spatial, None, None)
            if temporal:
                x = x.reshape(batch, -1, x.shape[-2], x.shape[-1]).permute(0, 2, 1, 3)
                x = x.reshape(-1, x.shape[-2], x.shape[-1])
                if i == 0 and frames > 1:
                    x = x + m.temp_pos_embed.to(x.dtype)
                x = temporal_block(x, None, None, None, t_temporal, None, None)
                x = x.reshape(batch, -1, x.shape[-2], x.shape[-1]).permute(0, 2, 1, 3)
                x = x.reshape(-1, x.shape[-2], x.shape[-1])
        return x

    def head(self, x, embedded_timestep, batch: int, frames: int, grid: tuple[int, int]):
        m = self.model
        e = embedded_timestep.repeat_interleave(frames, dim=0, output_size=embedded_timestep.shape[0] * frames)
        e = e.view(-1, embedded_timestep.shape[-1])
        shift, scale = (m.scale_shift_table[None] + e[:, None]).chunk(2, dim=1)
        x = m.norm_out(x)
        x = x * (1 + scale) + shift
        x = m.proj_out(x)
        p = m.config.patch_size
        x = x.reshape(shape=(-1, grid[0], grid[1], p, p, m.out_channels))
        x = torch.einsum("nhwpqc->nchpwq", x)
        out = x.reshape(shape=(-1, m.out_channels, grid[0] * p, grid[1] * p))
        return out.reshape(batch, -1, *out.shape[-3:]).permute(0, 2, 1, 3, 4)


@dataclass
class _State:
    """Per-batch TeaCache state; rows are indexed [uncond videos..., cond videos...] as the engine stacks them."""

    videos: int  # videos in the (possibly padded) batch
    real: int  # the first `real` are the batch's own videos; the rest are compile padding
    cfg: int  # rows per video: 2 with classifier-free guidance, else 1
    accumulated: np.ndarray = field(init=False)
    calls: np.ndarray = field(init=False)
    previous: torch.Tensor | None = None  # modulated input of the previous step, all rows
    previous_output: torch.Tensor | None = None  # the model's output at the previous step (fitting only)
    residual: torch.Tensor | None = None  # blocks' output - input at each video's last computed step

    def __post_init__(self):
        self.accumulated = np.zeros(self.videos)
        self.calls = np.zeros(self.videos, dtype=np.int64)

    def rows(self, videos) -> list[int]:
        return [v + half * self.videos for half in range(self.cfg) for v in videos]


class TeaCacheLatte:
    """Drop-in for the engine's transformer call: `noise = teacache(...)`, one instance per engine."""

    def __init__(self, transformer, cache: CacheSpec, batch_size: int):
        self.parts = LatteParts(transformer)
        self.threshold = float(cache.threshold)
        self.rescale = np.poly1d(cache.coefficients)
        self.batch_size = batch_size
        self.compiled = False  # compiled parts only ever see padded_sizes(batch_size) videos
        self.state: _State | None = None
        self._script: list | None = None
        self.recorder: list[tuple[float, float]] | None = None  # (input change, output change): fit_coefficients
        self.block_runs: Counter = Counter()  # (videos computing, sub-batch size they ran at) -> steps

    def compile(self, backend: str, mode: str | None, fullgraph: bool) -> None:
        import torch._dynamo

        self.parts.compile(backend, mode, fullgraph)
        self.compiled = True
        graphs = len(padded_sizes(self.batch_size))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs + 1)

    # ---- per batch ------------------------------------------------------------------------------

    def start(self, videos: int, real: int, cfg: bool) -> None:
        self.state = _State(videos, real, 2 if cfg else 1)

    def calls(self) -> list[int]:
        """Per video of the batch's own: rows it sent through the blocks, summed over the steps (one row is
        one CFG half of one video at one step, so a video computed at every step made steps x 2 calls)."""
        return [int(c) for c in self.state.calls[: self.state.real]]

    def warm_up_schedule(self) -> list:
        """Scripted decisions for a warm-up denoise (one step per entry) that runs every compiled sub-batch
        size once: the first and last steps compute the whole batch (as always), step i in between computes
        the i-th smaller size."""
        sizes = [s for s in padded_sizes(self.batch_size) if s < self.batch_size]
        script = [None] * (len(sizes) + 2)
        for i, size in enumerate(sizes, start=1):
            script[i] = np.arange(self.batch_size) < size
        return script

    def script(self, decisions: list | None) -> None:
        """Use `decisions[step]` (a bool per video, or None to decide) instead of deciding (warm-up only)."""
        self._script = decisions

    # ---- per step -------------------------------------------------------------------------------

    def __call__(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask,
                 enable_temporal_attentions: bool, step: int, steps: int) -> torch.Tensor:
        st = self.state
        e = self.parts.embed(hidden_states, timestep, encoder_hidden_states)
        compute = self._decide(e.modulated, step, steps)
        previous, st.previous = st.previous, e.modulated
        mask = encoder_attention_mask
        computing = np.flatnonzero(compute)
        if len(computing) == st.videos:
            self.block_runs[(st.videos, st.videos)] += 1
            # Compiled, every tensor a part takes is contiguous (the patch embedding's output is not), so that
            # one graph per size serves the whole batch and a padded sub-batch alike: dynamo guards on strides.
            # The values are the same, and so is the video (the threshold-0 test).
            hidden = e.hidden.contiguous() if self.compiled else e.hidden
            out = self.parts.blocks_fn(hidden, e.encoder, mask, e.t_spatial, e.t_temporal, e.batch, e.frames,
                                       enable_temporal_attentions)
            if step < steps - 1:  # the last step's residual would never be used
                st.residual = out - hidden
            x = out
        else:
            x = e.hidden + st.residual
            if len(computing):
                x = self._compute_some(e, mask, computing, x, enable_temporal_attentions)
        st.calls[computing] += st.cfg
        noise = self.parts.head_fn(x.contiguous() if self.compiled else x, e.embedded_timestep, e.batch, e.frames, e.grid)
        if self.recorder is not None:
            self._record(previous, e.modulated, st.previous_output, noise)
            st.previous_output = noise
        return noise

    def _relative_changes(self, now: torch.Tensor, before: torch.Tensor) -> np.ndarray:
        """Per video: mean |now - before| / mean |before| over its rows (CFG halves pooled)."""
        st = self.state
        rows = st.videos * st.cfg
        change = (now - before).abs().reshape(rows, -1).sum(dim=1, dtype=torch.float64)
        size = before.abs().reshape(rows, -1).sum(dim=1, dtype=torch.float64)
        change, size = torch.stack([change, size]).cpu().numpy()  # one device sync per step
        out = np.full(st.videos, np.inf)
        for v in range(st.videos):
            r = st.rows([v])
            if size[r].sum() > 0:
                out[v] = change[r].sum() / size[r].sum()
        return out

    def _record(self, modulated_before, modulated, output_before, output) -> None:
        if modulated_before is None or output_before is None:
            return
        x = self._relative_changes(modulated, modulated_before)
        y = self._relative_changes(output, output_before)
        self.recorder.extend(zip(x[: self.state.real].tolist(), y[: self.state.real].tolist()))

    def _compute_some(self, e: Embedded, mask, computing: np.ndarray, x: torch.Tensor, temporal: bool):
        """Run the blocks for `computing` videos only (padded to a compiled size), store their residuals and
        put their outputs into `x` (rows of the others keep input + cached residual)."""
        st = self.state
        k = len(computing)
        padding = [int(computing[0])] * (padded_size(k, self.batch_size) - k) if self.compiled else []
        self.block_runs[(k, k + len(padding))] += 1
        # The computing videos' rows first (both CFG halves), the padding's after them, to be dropped.
        keep = st.rows(list(computing))
        rows = torch.tensor(keep + st.rows(padding), device=e.hidden.device)
        keep = torch.tensor(keep, device=e.hidden.device)
        n, f = (k + len(padding)) * st.cfg, e.frames

        def take(t: torch.Tensor, per_row: int) -> torch.Tensor:  # rows of a (batch * per_row, ...) tensor
            return t.view(e.batch, per_row, *t.shape[1:])[rows].reshape(n * per_row, *t.shape[1:]).contiguous()

        patches = e.t_temporal.shape[0] // e.batch
        hidden = take(e.hidden, f)
        out = self.parts.blocks_fn(hidden, take(e.encoder, f), None if mask is None else take(mask, f),
                                   take(e.t_spatial, f), take(e.t_temporal, patches), n, f, temporal)
        real = k * st.cfg  # the padded rows' outputs are dropped
        out = out.view(n, f, *out.shape[1:])[:real]
        residual = out - hidden.view(n, f, *hidden.shape[1:])[:real]
        st.residual.view(e.batch, f, *st.residual.shape[1:])[keep] = residual
        x = x.view(e.batch, f, *x.shape[1:])
        x[keep] = out
        return x.view(e.batch * f, *x.shape[2:])

    def _decide(self, modulated: torch.Tensor, step: int, steps: int) -> np.ndarray:
        """A bool per video: compute this step? Updates each video's accumulated rescaled change."""
        st = self.state
        everyone = np.ones(st.videos, dtype=bool)
        if self._script is not None and self._script[step] is not None:
            return np.asarray(self._script[step], dtype=bool)
        if step == 0 or step == steps - 1 or st.previous is None or st.residual is None:
            st.accumulated[:] = 0.0
            return everyone
        # Relative L1 change of each video's modulated input (its CFG halves pooled), summed in float64 so
        # that the statistic does not depend on how the batch's reduction is split.
        relative = self._relative_changes(modulated, st.previous)
        compute = np.zeros(st.videos, dtype=bool)
        for v in range(st.videos):
            if v >= st.real:  # compile padding: never computed between the first and last step
                continue
            rescaled = float(self.rescale(relative[v])) if np.isfinite(relative[v]) else float("inf")
            # The polynomial is a fit over the changes a model makes between steps; where it is not
            # positive (Latte's: relative change > 0.237) the input is outside that range: compute.
            st.accumulated[v] += rescaled if rescaled > 0 else float("inf")
            if st.accumulated[v] >= self.threshold:
                compute[v] = True
                st.accumulated[v] = 0.0
        return compute


def fit_coefficients(engine, prompts: list[str], seeds: list[int], degree: int = 4) -> tuple[float, ...]:
    """TeaCache's calibration for the engine's model: generate `prompts` with every step computed, record
    for each video and step the relative L1 change of block 0's modulated input (x) and of the model's
    output (y) since the previous step, and fit y ~ polynomial(x) (highest power first, for
    `cache.coefficients`). `engine` must run TeaCache (any threshold; it is set to 0 while fitting)."""
    tc = engine.teacache
    if tc is None:
        raise ValueError("fit_coefficients needs an engine whose spec has model.cache.kind teacache")
    threshold, tc.threshold, tc.recorder = tc.threshold, 0.0, []
    try:
        batch = engine.spec.execution.batch_size
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            engine.generate(chunk, [engine.sampling.negative_prompt] * len(chunk), seeds[i : i + batch])
        x, y = np.array(tc.recorder).T
    finally:
        tc.threshold, tc.recorder = threshold, None
    return tuple(float(c) for c in np.polyfit(x, y, degree))
