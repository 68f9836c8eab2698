"""LoRA weights (spec model.lora): fetched once per node, checked against the model in the driver, fused once
per actor before quantization and compile.

Loading and fusing are diffusers' own (the family pipeline's `lora_state_dict`, `load_lora_weights`,
`fuse_lora`, `unload_lora_weights`, on peft; `load_into_transformer_2` for Wan 2.2 A14B's second expert): a LoRA in the original Wan or musubi key layout is converted by
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


def lora_component(lora, experts, field: str) -> str:
    """The denoiser a LoRA is fused into (LoraSpec.component): named, or the only transformer the model has;
    refused in one line when it names one the model lacks, or leaves it open on a model with two experts."""
    if lora.component is None:
        if len(experts) > 1:
            raise SpecError(f"{field}: the model has two experts ({', '.join(experts)}: Wan 2.2 A14B's high- and "
                            f"low-noise transformers); say which this LoRA is fused into with component: "
                            f"transformer or component: transformer_2 (one entry per expert)")
        return "transformer"
    if lora.component not in experts:
        raise SpecError(f"{field}: component {lora.component!r}, but the model has no {lora.component} "
                        f"(model_index.json names {', '.join(experts)})")
    return lora.component


def check_loras(spec, experts: dict[str, tuple[str, dict]], cache_dir: str | None = None,
                storage_options: dict | None = None) -> tuple[str, list[dict]]:
    """Refuse (SpecError, one line) a LoRA with a key that adapts no module of the denoiser it is fused into
    or whose shapes do not fit it; `experts`: {component: (class name, config)} of the model's transformers
    (transformer, and Wan 2.2 A14B's transformer_2). Returns a summary ("LoRA a.safetensors x0.8 (rank 4, 12
    modules)") and each file's identity (name, sha256) for the output record."""
    import diffusers
    import torch

    from latte_ray.model.families import family_of

    pipeline_class = getattr(diffusers, family_of(spec).pipeline_class)
    built: dict[str, tuple[str, dict]] = {}

    def modules_of(component: str) -> tuple[str, dict]:
        if component not in built:
            class_name, transformer_config = experts[component]
            cls = getattr(diffusers, class_name)
            config = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
            with torch.device("meta"):
                transformer = cls.from_config(config)
            built[component] = (cls.__name__, dict(transformer.named_modules()))
        return built[component]

    parts, identity = [], []
    for i, lora in enumerate(spec.model.lora):
        field = f"model.lora[{i}] {lora.source!r}"
        component = lora_component(lora, experts, field)
        class_name, modules = modules_of(component)
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
            # diffusers keeps the "transformer." prefix for either expert (load_into_transformer_2 loads the
            # same keys into transformer_2)
            if not key.startswith(LORA_PREFIX):
                raise SpecError(f"{field}: key {key!r} adapts no module of the transformer (only transformer "
                                f"LoRAs are fused)")
            name, _, kind = key[len(LORA_PREFIX):].rpartition(".lora_")
            module = modules.get(name)
            if module is None or not hasattr(module, "weight") or kind not in ("A.weight", "B.weight", "A.bias",
                                                                                "B.bias"):
                raise SpecError(f"{field}: key {key!r} matches no module of the {class_name} "
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
        into = f" into {component}" if len(experts) > 1 else ""
        parts.append(f"{path.name}{into} x{lora.scale:g} (rank {'/'.join(map(str, sorted(ranks)))}, "
                     f"{len(adapted)} modules, sha256 {digest[:12]})")
    return "LoRA " + ", ".join(parts), identity


def fuse_loras(pipe, loras, cache_dir: str | None = None, storage_options: dict | None = None) -> list[str]:
    """Fuse each LoRA into its denoiser (LoraSpec.component; Wan 2.2 A14B's transformer_2 through diffusers'
    load_into_transformer_2) at its scale, with diffusers' load_lora_weights + fuse_lora, one after another,
    then drop the peft layers (unload_lora_weights): the fused weights stay."""
    experts = [c for c in ("transformer", "transformer_2") if getattr(pipe, c, None) is not None]
    fused = []
    for i, lora in enumerate(loras):
        path = lora_file(lora, i, cache_dir, storage_options)
        component = lora_component(lora, experts, f"model.lora[{i}] {lora.source!r}")
        name = f"latte_ray_lora_{i}"
        into = {"load_into_transformer_2": True} if component == "transformer_2" else {}
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name, use_safetensors=True,
                               **into)
        pipe.fuse_lora(components=[component], lora_scale=lora.scale, adapter_names=[name])
        pipe.unload_lora_weights()
        fused.append(f"{path.name}{f' into {component}' if len(experts) > 1 else ''} x{lora.scale:g}")
    return fused
