"""LoRA weights (spec model.lora): fetched once per node, checked against the model in the driver, fused once
per actor before quantization and compile.

Loading and fusing are diffusers' own (the family pipeline's `lora_state_dict`, `load_lora_weights`,
`fuse_lora`, `unload_lora_weights`, on peft): a LoRA in the original Wan or musubi key layout is converted by
diffusers as it would be in a notebook. Each LoRA is fused alone, at its own scale, in the spec's order, and
its peft layers are unloaded afterwards, so the generation actor runs plain fused weights (nothing per step).

Why a driver check: diffusers only warns about LoRA keys that match no module, and a LoRA of another model's
width fails inside an actor after the model has loaded. `check_loras` reads each LoRA's tensors (small) and
the transformer built on the meta device from its config (no weights), and refuses in one line a LoRA with a key
that matches no module, or a shape that does not fit, before any GPU time. Safetensors only, never pickles.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from filelock import FileLock

from latte_ray.errors import SpecError

LORA_PREFIX = "transformer."  # the component a text-to-video LoRA adapts (diffusers' key layout)


def lora_file(lora, index: int, cache_dir: str | None = None, storage_options: dict | None = None) -> Path:
    """The LoRA's .safetensors on this machine: a hub file (at its revision, through the hub cache), a local
    file or folder, or an fsspec object copied once into the node-local cache (treated as immutable)."""
    from latte_ray.model.configs import source_kind

    field = f"model.lora[{index}]"
    kind = source_kind(lora.source)
    if kind == "hub":
        from huggingface_hub import hf_hub_download

        name = lora.weight_name or "pytorch_lora_weights.safetensors"
        try:
            return Path(hf_hub_download(repo_id=lora.source, filename=name, revision=lora.revision))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, missing file
            raise SpecError(f"{field} {lora.source!r} is a Hugging Face Hub id and its {name} cannot be fetched: "
                            f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")
    if kind in ("local", "missing") or lora.source.startswith("file://"):
        path = Path(lora.source.removeprefix("file://")).expanduser()
        if path.is_dir():
            return _in_folder(path, sorted(p.name for p in path.iterdir()), lora, field)
        if not path.is_file():
            raise SpecError(f"{field} {lora.source!r}: no such file or folder")
        if path.suffix != ".safetensors":
            raise SpecError(f"{field} {lora.source!r}: LoRA weights load as .safetensors only")
        return path
    if kind == "remote":
        return _mirror(lora, field, cache_dir, storage_options)
    raise SpecError(f"{field} {lora.source!r}: not a hub id, a path or a URL")


def _in_folder(folder: Path, names: list[str], lora, field: str) -> Path:
    if lora.weight_name:
        if lora.weight_name not in names:
            raise SpecError(f"{field} {lora.source!r}: no {lora.weight_name} there")
        return folder / lora.weight_name
    found = [n for n in names if n.endswith(".safetensors")]
    if len(found) != 1:
        raise SpecError(f"{field} {lora.source!r}: {len(found)} .safetensors files there; name one with weight_name")
    return folder / found[0]


def _mirror(lora, field: str, cache_dir: str | None, storage_options: dict | None) -> Path:
    from latte_ray.model.loading import default_cache_dir
    from latte_ray.record.storage import filesystem

    url = lora.source.rstrip("/")
    if not url.endswith(".safetensors"):
        fs, root = filesystem(url, storage_options)
        try:
            names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        except Exception as e:  # noqa: BLE001
            raise SpecError(f"{field} {lora.source!r}: cannot list it: {type(e).__name__}: {e}") from None
        url = f"{url}/{_in_folder(Path('.'), names, lora, field).name}"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = Path(cache_dir or default_cache_dir()) / "loras" / key / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent) + ".lock"):
        if not target.is_file():
            fs, path = filesystem(url, storage_options)
            tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
            try:
                fs.get(path, str(tmp))
            except Exception as e:  # noqa: BLE001
                raise SpecError(f"{field} {lora.source!r}: cannot read {url}: {type(e).__name__}: {e}") from None
            os.replace(tmp, target)
    return target


def lora_state_dict(pipeline_class, path: Path) -> dict:
    """The LoRA's tensors in diffusers' key layout, as the family pipeline's loader converts them."""
    return pipeline_class.lora_state_dict(str(path.parent), weight_name=path.name, use_safetensors=True)


def check_loras(spec, class_name: str, transformer_config: dict, cache_dir: str | None = None,
                storage_options: dict | None = None) -> tuple[str, list[dict]]:
    """Refuse (SpecError, one line) a LoRA with a key that adapts no module of the transformer or whose
    shapes do not fit it; returns a summary ("LoRA a.safetensors x0.8 (rank 4, 12 modules)") and each file's
    identity (name, sha256) for the output record."""
    import diffusers
    import torch

    from latte_ray.model.families import family_of

    pipeline_class = getattr(diffusers, family_of(spec).pipeline_class)
    cls = getattr(diffusers, class_name)
    config = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = cls.from_config(config)
    modules = dict(transformer.named_modules())
    parts, identity = [], []
    for i, lora in enumerate(spec.model.lora):
        field = f"model.lora[{i}] {lora.source!r}"
        path = lora_file(lora, i, cache_dir, storage_options)
        try:
            state = lora_state_dict(pipeline_class, path)
        except Exception as e:  # noqa: BLE001 - not safetensors, damaged, an unknown layout
            raise SpecError(f"{field}: {path.name} is not a LoRA diffusers can read: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from None
        if not state:
            raise SpecError(f"{field}: {path.name} holds no LoRA tensors")
        ranks, adapted = set(), set()
        for key, tensor in state.items():
            if not key.startswith(LORA_PREFIX):
                raise SpecError(f"{field}: key {key!r} adapts no module of the transformer (only transformer "
                                f"LoRAs are fused)")
            name, _, kind = key[len(LORA_PREFIX):].rpartition(".lora_")
            module = modules.get(name)
            if module is None or not hasattr(module, "weight") or kind not in ("A.weight", "B.weight", "A.bias",
                                                                                "B.bias"):
                raise SpecError(f"{field}: key {key!r} matches no module of the {cls.__name__} "
                                f"({len(state)} keys; is it a LoRA for another model?)")
            out_features, in_features = module.weight.shape[0], module.weight.shape[1]
            if kind == "A.weight" and tuple(tensor.shape[1:2]) != (in_features,):
                raise SpecError(f"{field}: {key} has shape {tuple(tensor.shape)} but {name} takes {in_features} "
                                f"inputs (a LoRA for another model size?)")
            if kind == "B.weight" and tensor.shape[0] != out_features:
                raise SpecError(f"{field}: {key} has shape {tuple(tensor.shape)} but {name} has {out_features} "
                                f"outputs (a LoRA for another model size?)")
            if kind == "A.weight":
                ranks.add(int(tensor.shape[0]))
                adapted.add(name)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        identity.append({"source": lora.source, "file": path.name, "sha256": digest})
        parts.append(f"{path.name} x{lora.scale:g} (rank {'/'.join(map(str, sorted(ranks)))}, "
                     f"{len(adapted)} modules, sha256 {digest[:12]})")
    return "LoRA " + ", ".join(parts), identity


def fuse_loras(pipe, loras, cache_dir: str | None = None, storage_options: dict | None = None) -> list[str]:
    """Fuse each LoRA into the pipeline's transformer at its scale (diffusers' load_lora_weights + fuse_lora),
    one after another, then drop the peft layers (unload_lora_weights): the fused weights stay."""
    fused = []
    for i, lora in enumerate(loras):
        path = lora_file(lora, i, cache_dir, storage_options)
        name = f"latte_ray_lora_{i}"
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name, use_safetensors=True)
        pipe.fuse_lora(components=["transformer"], lora_scale=lora.scale, adapter_names=[name])
        pipe.unload_lora_weights()
        fused.append(f"{path.name} x{lora.scale:g}")
    return fused
