"""A tiny random-weight LattePipeline, built entirely offline.

It has the real Latte architecture (T5 text encoder, Latte 3D transformer, KL VAE, DDIM) at toy size, so the
whole pipeline can run end to end on a CPU in well under a second per 16-frame 128x128 video. Weights are
random but fixed by the seed, so every process builds exactly the same model; `ensure_tiny_model` saves it
once to a node-local cache so that workers load it like any other diffusers model folder.

A saved tiny model carries a marker file (MARKER: its version and the files it wrote). `save_tiny_model`
writes only into a missing or empty folder, or over an earlier tiny model that has its marker and nothing
else added; any other path (a folder with someone's files, `.`, a regular file) is refused, untouched.
torch and diffusers are imported only to build the model, so `model_configs` is cheap for driver checks.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from latte_ray.errors import InputError

if TYPE_CHECKING:
    from diffusers import LattePipeline
    from transformers import T5Tokenizer

TINY_MODEL_VERSION = "v1"
MARKER = ".latte-ray-tiny-model"

VIDEO_LENGTH = 16
RESOLUTION = 128
VAE_CHANNELS = (8, 16, 16, 16)  # four blocks: a VAE scale factor of 8, so 128 px -> 16 latent px
TEXT_DIM = 32  # T5 d_model, which is also the transformer's caption_channels


def model_configs() -> dict[str, dict]:
    """The parts of the saved configs that driver-side checks read (model/configs.py), without building
    the model; tests/test_tiny_model.py checks them against a saved model."""
    return {
        "model_index": {"_class_name": "LattePipeline", "transformer": ["diffusers", "LatteTransformer3DModel"],
                        "text_encoder": ["transformers", "T5EncoderModel"]},
        "transformer": {"video_length": VIDEO_LENGTH, "caption_channels": TEXT_DIM},
        "text_encoder": {"d_model": TEXT_DIM},
    }


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """The tiny model's folder in the cache, built on first use; safe to call from many processes at once."""
    return ensure_built(cache_root(cache_dir) / f"tiny-latte-{TINY_MODEL_VERSION}", lambda p: save_tiny_model(p))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("LATTE_RAY_CACHE") or "~/.cache/latte-ray"
    return Path(cache_dir).expanduser().resolve()


def ensure_built(path: Path, save) -> Path:
    """`path`, made by `save(path)` on first use (which must make it appear complete: see save_atomically);
    many processes may ask at once, one builds."""
    if _complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".lock"))):
        if not _complete(path):  # another process may have built it while we waited
            save(path)
    return path


def _complete(path: Path) -> bool:
    """A finished tiny model: its marker (written last), or, for caches saved before markers existed, a
    folder that was renamed into place whole."""
    return (path / MARKER).is_file() or (path / "model_index.json").is_file()


def save_tiny_model(path: str | os.PathLike) -> Path:
    """Build the tiny pipeline and save it to `path` (safetensors only), atomically: into a missing folder,
    an empty one, or over an earlier tiny model (see `_claim`); InputError for anything else."""
    return save_atomically(path, _write_tiny_model)


def _write_tiny_model(folder: Path) -> None:
    build_tiny_pipeline().save_pretrained(folder, safe_serialization=True)


def save_atomically(path: str | os.PathLike, write) -> Path:
    """Have `write(folder)` fill a temporary sibling folder, mark it (MARKER: the version and every file
    written), then move it to `path`: a missing or empty folder, or an earlier tiny model (`_claim`)."""
    path = Path(path).expanduser().resolve()
    replacing = _claim(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling on the same filesystem, so the final rename is atomic. Not tempfile.mkdtemp: its
    # 0700 mode would follow the folder into place and hide the model from other users of the node.
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        write(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        (tmp / MARKER).write_text(json.dumps({"tiny_model_version": TINY_MODEL_VERSION, "files": files}, indent=2))
        if replacing:  # os.replace cannot overwrite a non-empty folder: move our old one aside first
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        elif path.is_dir():  # an empty folder someone made: fill it, keeping the folder itself (marker last)
            for entry in sorted(tmp.iterdir(), key=lambda p: p.name == MARKER):
                os.replace(entry, path / entry.name)
            tmp.rmdir()
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _claim(path: Path) -> bool:
    """May a tiny model be saved at `path`? False: it is missing or an empty folder; True: it is an earlier
    tiny model to replace (its marker, and no file its marker does not list). Anything else is refused."""
    if not path.exists() and not path.is_symlink():
        return False
    if not path.is_dir():
        raise InputError(f"tiny-model: {path} exists and is not a folder; refusing to replace it (give a new or "
                        f"empty folder)")
    entries = list(path.iterdir())
    if not entries:
        return False
    marker = path / MARKER
    if not marker.is_file():
        raise InputError(f"tiny-model: {path} is a folder with files in it that is not a tiny model saved by "
                        f"latte-ray (no {MARKER}); refusing to replace it (give a new or empty folder)")
    try:
        listed = set(json.loads(marker.read_text())["files"])
    except (ValueError, KeyError, TypeError):
        raise InputError(f"tiny-model: {marker} is not a latte-ray tiny model marker; refusing to replace "
                        f"{path}") from None
    extra = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                   if p.is_file() and p.name != MARKER and str(p.relative_to(path)) not in listed)
    if extra:
        raise InputError(f"tiny-model: {path} holds files the tiny model did not write ({', '.join(extra[:5])}"
                        f"{', ...' if len(extra) > 5 else ''}); refusing to replace it")
    return True


def build_tiny_pipeline(seed: int = 0) -> LattePipeline:
    """A random-weight LattePipeline; the same seed gives the same weights in any process."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RESOLUTION,
        mid_block_add_attention=False,
    )
    vae_scale_factor = 2 ** (len(VAE_CHANNELS) - 1)
    heads, head_dim = 2, 16
    transformer = LatteTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,  # Latte predicts noise and variance; the pipeline keeps the first half
        num_layers=1,
        cross_attention_dim=heads * head_dim,
        attention_bias=True,
        sample_size=RESOLUTION // vae_scale_factor,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=TEXT_DIM,
        video_length=VIDEO_LENGTH,
    )
    scheduler = DDIMScheduler()
    pipe = LattePipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Whole words get a better score than their spelling so the Unigram model prefers them; anything else falls
# back to single characters, so prompt lengths in tokens track their lengths in words and letters.
# Also the words of the tiny CLIP tokenizer (latte_ray/model/clip.py).
TINY_WORDS = """
a an the and or but of in on at to from with without by for into onto over under above below between
through across along around behind beside near far up down out off inside outside before after during
while then than as like is are was were be been being has have had do does did will would can could
should may might must it its this that these those there here he she they we you i me him her them us
my your his their our who what which when where why how all some any each every many much more most
few little other another such no not only very too so just also again still ever never always often
one two three four five six seven eight nine ten hundred thousand first second last next new old big
small large tiny huge long short tall high low wide narrow deep thick thin heavy light dark bright
fast slow quick young ancient modern beautiful pretty ugly clean dirty empty full quiet loud calm wild
hot cold warm cool wet dry soft hard smooth rough sharp round flat golden silver wooden stone glass
red orange yellow green blue purple pink brown black white gray grey colorful vivid pale neon
man woman boy girl child children baby person people family friend crowd dancer runner musician chef
dog cat bird horse cow sheep fish whale dolphin shark lion tiger bear wolf fox deer rabbit panda
monkey elephant giraffe zebra turtle frog snake butterfly bee owl eagle penguin duck chicken
car bus train plane boat ship bike bicycle truck rocket robot drone camera phone computer book
house home city town village street road bridge tower castle building room kitchen garden park farm
forest jungle desert mountain hill valley river lake sea ocean beach island sky cloud clouds sun moon
star stars rain snow storm wind fog fire smoke water ice wave waves tree trees flower flowers grass
leaf leaves rock sand field space planet galaxy night day morning evening sunset sunrise light shadow
walk walks walking run runs running jump jumps jumping fly flies flying swim swims swimming dance
dances dancing sing sings singing play plays playing eat eats eating drink sit sits sitting stand
stands standing ride rides riding drive drives driving move moves moving turn turns turning look
looks looking watch watches watching smile smiles smiling laugh fall falls falling rise rises
rising float floats floating glow glows glowing shine shines shining burn burns burning flow flows
flowing spin spins spinning grow grows growing open opens close closes wave waving hold holds
holding cook cooks cooking paint paints painting read reads reading write writes writing explore
slowly quickly gently softly together alone toward towards away back forward camera pan zoom shot
view scene video film movie cinematic realistic photorealistic detailed style animation cartoon
painting drawing sketch oil watercolor portrait landscape closeup close aerial wide angle motion
background foreground 4k hd high quality lighting golden hour dramatic soft studio time lapse slow
"""
_SUFFIXES = ["s", "es", "ed", "ing", "ly", "er", "est", "y", "n't", "'s"]
_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ".,;:!?'\"-_()[]{}<>/\\|@#$%^&*+=~`"
)


def build_tiny_tokenizer() -> T5Tokenizer:
    """A T5 Unigram tokenizer over a fixed vocabulary (no sentencepiece model, no download, no training)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -20.0)]
    pieces += [("▁" + w, -3.0) for w in TINY_WORDS.split()]
    pieces += [(s, -4.0) for s in _SUFFIXES]
    pieces += [("▁" + c, -10.0) for c in _CHARS] + [(c, -10.0) for c in _CHARS]
    # Keep the first score of a repeated piece (e.g. "▁a" is a word and a letter); dicts keep insertion
    # order, so the ids are the same in every process.
    scores: dict[str, float] = {}
    for piece, score in pieces:
        scores.setdefault(piece, score)
    return T5Tokenizer(vocab=list(scores.items()), extra_ids=0, model_max_length=512)


T5_SPIECE_PIECES = 32000  # T5's sentencepiece vocabulary; its tokenizer adds 100 <extra_id_N> after it (32000-32099)
_FILLER = 0xF0000  # Supplementary Private Use Area-A: characters no prompt holds


def tiny_spiece_model(pieces: int = T5_SPIECE_PIECES) -> bytes:
    """The tiny tokenizer's vocabulary as a sentencepiece model file (spiece.model), the file T5's tokenizer
    loads (`T5Tokenizer.from_pretrained` over spiece.model and its JSON files, as a published T5 tokenizer is
    read). Same pieces, scores and ids as build_tiny_tokenizer; padded to `pieces` with private-use characters
    that no prompt contains, so the <extra_id_N> tokens of a published tokenizer_config.json land on the ids
    they have there. Built from the fixed vocabulary, never trained: every process writes the same bytes."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = build_tiny_tokenizer()._vocab_scores
    if len(vocab) > pieces:
        raise ValueError(f"the tiny vocabulary has {len(vocab)} pieces, more than {pieces}")
    model = pb.ModelProto()
    kind = pb.ModelProto.SentencePiece.Type
    for i, (piece, score) in enumerate(vocab):
        entry = model.pieces.add(piece=piece, score=score)
        entry.type = kind.CONTROL if i in (0, 1) else kind.UNKNOWN if i == 2 else kind.NORMAL
    for n in range(pieces - len(vocab)):
        model.pieces.add(piece=chr(_FILLER + n), score=-100.0, type=kind.NORMAL)
    trainer = model.trainer_spec
    trainer.model_type, trainer.vocab_size = pb.TrainerSpec.UNIGRAM, pieces
    trainer.pad_id, trainer.eos_id, trainer.unk_id, trainer.bos_id = 0, 1, 2, -1
    normalizer = model.normalizer_spec
    normalizer.name, normalizer.add_dummy_prefix, normalizer.remove_extra_whitespaces = "identity", True, True
    return model.SerializeToString()


def tiny_vocab_size() -> int:
    """How many of tiny_spiece_model's ids a prompt can produce (the real pieces before the filler)."""
    return len(build_tiny_tokenizer()._vocab_scores)
