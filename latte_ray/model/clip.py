"""Quality scores of a video: CLIPScore (text-video alignment) and a LAION-style aesthetic score.

    clip_score      = mean over the sampled frames of 100 * max(cos(CLIP image embedding, CLIP text embedding), 0)
                      (CLIPScore as torchmetrics defines it: w = 100, clipped at 0; Hessel et al. 2021)
    aesthetic_score = mean over the same frames of head(CLIP image embedding / its norm)
                      (the LAION aesthetic predictor: a linear layer or an MLP on the normalized embedding)

Frames: `frames` evenly spaced indices from first to last (`sample_indices`) of the decoded mp4, so a score is
a function of the stored video and the prompt alone. Images go through the model's own CLIP image processor,
always its PIL backend (the torchvision one, picked when torchvision is installed, resizes slightly
differently: scores would depend on the machine). Text: CLIP's window is `max_position_embeddings` (77)
tokens including its start and end tokens, so a longer prompt is scored on its first 75 BPE tokens and the
row records `clip_prompt_truncated`.

Sources load like the video model (latte_ray/model/loading.py): 'tiny' (built offline here), a local folder,
an fsspec URL mirrored once per node, or a hub id; safetensors only, no remote code. An aesthetic head is a
folder with `config.json` ({"layers": [["linear", in, out] | ["dropout", p] | ["relu"] | ["gelu"], ...],
"input_dim": D, "normalize_input": true}) and `model.safetensors` whose keys are `layers.<i>.weight|bias`,
the layout of LAION's improved-aesthetic-predictor MLP (docs/datasets.md: converting its checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latte_ray.errors import ModelSourceError
from latte_ray.spec import ScoringSpec

log = logging.getLogger(__name__)

TINY_CLIP_VERSION = "v1"
TINY_AESTHETIC_VERSION = "v1"
TINY_DIM = 32  # hidden size of both towers and the projection
TINY_IMAGE = 32  # the tiny CLIP's input resolution
HEAD_CONFIG = "config.json"
HEAD_WEIGHTS = "model.safetensors"


class ScoringSourceError(ModelSourceError):
    """A scoring model source that cannot be loaded (names the field, the source and why)."""


# ---------------------------------------------------------------------------------------- frames


def sample_indices(num_frames: int, k: int) -> list[int]:
    """k evenly spaced frame indices from the first to the last (fewer when the video is shorter)."""
    if num_frames <= 0:
        return []
    return sorted(set(np.linspace(0, num_frames - 1, min(k, num_frames)).round().astype(int).tolist()))


# ---------------------------------------------------------------------------------------- aesthetic head


class AestheticHead(torch.nn.Module):
    """A linear layer or MLP on the CLIP image embedding, as `nn.Sequential` named `layers` (LAION's layout)."""

    def __init__(self, input_dim: int, layers: list[list], normalize_input: bool = True):
        super().__init__()
        self.config = {"input_dim": int(input_dim), "layers": [list(x) for x in layers],
                       "normalize_input": bool(normalize_input)}
        modules: list[torch.nn.Module] = []
        for spec in layers:
            kind = spec[0]
            if kind == "linear":
                modules.append(torch.nn.Linear(int(spec[1]), int(spec[2])))
            elif kind == "dropout":
                modules.append(torch.nn.Dropout(float(spec[1])))
            elif kind == "relu":
                modules.append(torch.nn.ReLU())
            elif kind == "gelu":
                modules.append(torch.nn.GELU())
            else:
                raise ValueError(f"aesthetic head layer {spec!r}: expected linear, dropout, relu or gelu")
        self.layers = torch.nn.Sequential(*modules)
        self.normalize_input = bool(normalize_input)
        self.eval()

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = image_embeds / image_embeds.norm(dim=-1, keepdim=True) if self.normalize_input else image_embeds
        return self.layers(x).squeeze(-1)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / HEAD_CONFIG).write_text(json.dumps({"latte_ray_head": "aesthetic", **self.config}, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / HEAD_WEIGHTS))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, field: str = "scoring.aesthetic_head") -> "AestheticHead":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / HEAD_CONFIG).exists():
            raise ScoringSourceError(f"{field}: {folder} has no {HEAD_CONFIG}")
        if not (folder / HEAD_WEIGHTS).exists():
            raise ScoringSourceError(f"{field}: {folder} has no {HEAD_WEIGHTS} (weights load as safetensors only)")
        config = json.loads((folder / HEAD_CONFIG).read_text())
        try:
            head = cls(config["input_dim"], config["layers"], config.get("normalize_input", True))
            head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)), strict=True)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ScoringSourceError(f"{field}: {folder}: not an aesthetic head: {type(e).__name__}: {e}") from e
        return head.eval()


# ---------------------------------------------------------------------------------------- tiny models


def build_tiny_clip_tokenizer():
    """A CLIP byte-level BPE tokenizer over a fixed vocabulary: every byte (alone and word-final), and the
    tiny T5's words built up by merges left to right. No files, no download, the same ids in every process."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from latte_ray.model.tiny import TINY_WORDS

    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for token in ("<|startoftext|>", "<|endoftext|>"):
        add(token)
    chars = list(bytes_to_unicode().values())
    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in TINY_WORDS.split() if w.isalpha() and w.isascii()):
        # Segment the word as BPE would with the merges so far, then join what is left pair by pair: new
        # merges rank last, so every earlier word still comes out whole.
        symbols = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            add(pair[0] + pair[1])
            symbols = _bpe(symbols, ranks)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging as the BPE model applies it: the lowest-ranked adjacent pair first, leftmost first."""
    symbols = list(symbols)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks) + 1), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank > len(ranks):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_tiny_clip(seed: int = 0):
    """(CLIPModel, tokenizer, image processor) at toy size with random weights fixed by the seed.

    Both towers end in a LayerNorm with the same bias and share one projection, so image and text embeddings
    share a component and their cosines are positive (CLIPScore clips negatives to 0, and a random pair would
    often score exactly 0); the rest of each embedding depends on the pixels and on the words."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tiny_clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TINY_DIM, intermediate_size=2 * TINY_DIM,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=TINY_DIM, intermediate_size=2 * TINY_DIM, num_hidden_layers=2,
                           num_attention_heads=4, image_size=TINY_IMAGE, patch_size=8),
        projection_dim=TINY_DIM,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        shared = torch.randn(TINY_DIM)
        model.text_model.final_layer_norm.bias.copy_(shared)
        model.vision_model.post_layernorm.bias.copy_(shared)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    processor = CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE},
                                      crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    return model, tokenizer, processor


def build_tiny_aesthetic(seed: int = 0) -> AestheticHead:
    """The LAION MLP form at toy size (linear, dropout, linear, ...) on the tiny CLIP's embedding."""
    torch.manual_seed(seed + 1)
    head = AestheticHead(TINY_DIM, [["linear", TINY_DIM, 16], ["dropout", 0.2], ["linear", 16, 8],
                                    ["linear", 8, 1]])
    with torch.no_grad():  # LAION's scale: scores around 5 of 10, spread by the image
        head.layers[0].weight.mul_(10.0)
        head.layers[3].bias.fill_(5.0)
    return head


def _write_tiny_clip(folder: Path) -> None:
    model, tokenizer, processor = build_tiny_clip()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)


def _write_tiny_aesthetic(folder: Path) -> None:
    build_tiny_aesthetic().save_pretrained(folder)


def ensure_tiny_clip(cache_dir: str | os.PathLike | None = None) -> Path:
    from latte_ray.model.tiny import cache_root, ensure_built, save_atomically

    return ensure_built(cache_root(cache_dir) / f"tiny-clip-{TINY_CLIP_VERSION}",
                        lambda path: save_atomically(path, _write_tiny_clip))


def ensure_tiny_aesthetic(cache_dir: str | os.PathLike | None = None) -> Path:
    from latte_ray.model.tiny import cache_root, ensure_built, save_atomically

    return ensure_built(cache_root(cache_dir) / f"tiny-aesthetic-{TINY_AESTHETIC_VERSION}",
                        lambda path: save_atomically(path, _write_tiny_aesthetic))


# ---------------------------------------------------------------------------------------- loading


def resolve_clip(scoring: ScoringSpec, cache_dir: str | None = None, storage_options: dict | None = None) -> str:
    from latte_ray.model.loading import resolve_source

    return resolve_source(scoring.clip_model, cache_dir, storage_options, tiny=ensure_tiny_clip,
                          marker="config.json", field="scoring.clip_model")


def resolve_head(scoring: ScoringSpec, cache_dir: str | None = None, storage_options: dict | None = None) -> str:
    """A local folder holding the head; a hub id is fetched (config.json and safetensors only)."""
    from latte_ray.model.loading import resolve_source

    path = resolve_source(scoring.aesthetic_head, cache_dir, storage_options, tiny=ensure_tiny_aesthetic,
                          marker=HEAD_CONFIG, field="scoring.aesthetic_head")
    if Path(path).is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, revision=scoring.aesthetic_revision, allow_patterns=[HEAD_CONFIG, "*.safetensors"])
    except Exception as e:  # noqa: BLE001 - names the source
        raise ScoringSourceError(
            f"scoring.aesthetic_head {scoring.aesthetic_head!r} is not 'tiny', a folder on this node or a URL, so "
            f"it was fetched as a Hugging Face Hub id, and that failed: {type(e).__name__}: {e}") from e


def check_sources(scoring: ScoringSpec, storage_options: dict | None = None) -> None:
    """Fail before any actor starts when a scoring source that names a place cannot be there: a local folder
    that does not exist or lacks config.json, a URL with no config.json under it. Costs one stat per source;
    hub ids are left to the actors (their failure names the source too)."""
    from latte_ray.model.configs import source_kind
    from latte_ray.record.storage import filesystem
    from latte_ray.spec import SpecError

    for field, source in (("scoring.clip_model", scoring.clip_model), ("scoring.aesthetic_head", scoring.aesthetic_head)):
        kind = source_kind(source)
        if kind in ("tiny", "hub"):
            continue
        if kind == "remote":
            try:
                fs, root = filesystem(source, storage_options)
                found = fs.exists(f"{root.rstrip('/')}/config.json")
            except Exception as e:  # noqa: BLE001 - names the source
                raise SpecError(f"{field} {source!r}: cannot read it: {type(e).__name__}: {e}") from e
            if not found:
                raise SpecError(f"{field} {source!r}: no config.json there (not a save_pretrained folder)")
        else:  # a local folder, or a path that does not exist
            folder = Path(source.removeprefix("file://")).expanduser()
            if not (folder / "config.json").is_file():
                raise SpecError(f"{field} {source!r}: no such folder with a config.json on this machine")


def load_clip(scoring: ScoringSpec, cache_dir: str | None = None, storage_options: dict | None = None):
    """(CLIPModel in the spec's dtype on the CPU, tokenizer, PIL image processor)."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from latte_ray.model.loading import DTYPES

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_clip(scoring, cache_dir, storage_options)
    revision = None if Path(path).is_dir() else scoring.clip_revision
    try:
        model = CLIPModel.from_pretrained(path, dtype=DTYPES[scoring.dtype], use_safetensors=True, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        processor = CLIPImageProcessorPil.from_pretrained(path, revision=revision)
    except OSError as e:
        raise ScoringSourceError(f"scoring.clip_model {scoring.clip_model!r}: cannot load a CLIP model with "
                                 f"safetensors weights from {path}: {e}") from e
    return model.eval(), tokenizer, processor


# ---------------------------------------------------------------------------------------- scorer


@dataclass
class Scores:
    clip: np.ndarray  # (n,) float64
    aesthetic: np.ndarray  # (n,) float64
    truncated: np.ndarray  # (n,) bool: the prompt was longer than CLIP's window
    tokens: np.ndarray  # (n,) int32: the prompt's CLIP tokens before truncation (start and end included)


class ClipScorer:
    """One CLIP model and aesthetic head on one device, loaded once, then scoring batches of videos."""

    def __init__(self, scoring: ScoringSpec, cache_dir: str | None = None, storage_options: dict | None = None):
        from latte_ray.model.engine import pick_device
        from latte_ray.model.loading import DTYPES

        self.scoring = scoring
        self.device = pick_device(scoring.device)
        self.dtype = DTYPES[scoring.dtype]
        model, self.tokenizer, self.processor = load_clip(scoring, cache_dir, storage_options)
        self.model = model.to(self.device)
        self.head = AestheticHead.from_folder(resolve_head(scoring, cache_dir, storage_options)).to(self.device)
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        width = int(self.model.config.projection_dim)
        if self.head.config["input_dim"] != width:
            raise ScoringSourceError(
                f"scoring.aesthetic_head {scoring.aesthetic_head!r} takes {self.head.config['input_dim']}-d "
                f"embeddings but scoring.clip_model {scoring.clip_model!r} makes {width}-d ones")

    def frame_indices(self, num_frames: int) -> list[int]:
        return sample_indices(num_frames, self.scoring.frames)

    @torch.inference_mode()
    def text_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(unit-norm float32 text embeddings, truncated flags, token counts before truncation)."""
        full = self.tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]
        lengths = np.array([len(ids) for ids in full], dtype=np.int32)
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        text = self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                            attention_mask=tok.attention_mask.to(self.device)).pooler_output
        text = text.float()
        return text / text.norm(dim=-1, keepdim=True), lengths > self.max_tokens, lengths

    @torch.inference_mode()
    def image_embeddings(self, frames: np.ndarray) -> torch.Tensor:
        """(N, D) float32 CLIP image embeddings (not normalized) of uint8 frames (N, H, W, 3)."""
        pixels = self.processor(images=list(frames), return_tensors="pt")["pixel_values"]
        image = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return image.float()

    @torch.inference_mode()
    def score(self, videos: list[np.ndarray], prompts: list[str]) -> Scores:
        """Scores of each video (sampled frames, (k, H, W, 3) uint8, see frame_indices) against its prompt."""
        text, truncated, tokens = self.text_embeddings(prompts)
        counts = [len(v) for v in videos]
        image = self.image_embeddings(np.concatenate(videos))
        unit = image / image.norm(dim=-1, keepdim=True)
        owner = torch.repeat_interleave(torch.arange(len(videos)), torch.tensor(counts)).to(self.device)
        per_frame_clip = 100.0 * (unit * text[owner]).sum(dim=-1).clamp(min=0)
        per_frame_aesthetic = self.head(image.to(next(self.head.parameters()).dtype)).float()
        clip = np.array([float(x.mean()) for x in per_frame_clip.split(counts)], dtype=np.float64)
        aesthetic = np.array([float(x.mean()) for x in per_frame_aesthetic.split(counts)], dtype=np.float64)
        return Scores(clip=clip, aesthetic=aesthetic, truncated=truncated, tokens=tokens)
