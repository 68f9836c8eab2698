"""A model source's configs, read without loading any weights, and checked against the spec in the driver.

Before this check a wrong frame count, a folder that is not a `save_pretrained` folder, an offline hub id or
an unreachable s3:// mirror surfaced 15-55 s into a run, inside an actor, under hundreds of lines of Ray
traceback. Here it is one line naming `model.source` or the spec field, before Ray starts. Only small
files are read: model_index.json and the transformer's and text encoder's config.json (for a hub id,
fetched with huggingface_hub, which honours HF_HUB_OFFLINE and its cache). Weights are not read, only
listed where listing is cheap (a local folder, an object store): a corrupt weight file can only show when
an actor loads it (runner.py reports that failure as one line too).

This module imports neither torch nor diffusers, so `run --dry-run` stays light.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from latte_ray.spec import NULL_SOURCE, SIM_SOURCE, TINY_SOURCE, ModelSpec, PipelineSpec, SpecError

CONFIG_FILES = {"model_index": "model_index.json", "transformer": "transformer/config.json",
                "text_encoder": "text_encoder/config.json"}
# More configs some families' checks read (only for those families: a Latte hub cache need not hold them).
FAMILY_CONFIG_FILES = {"wan": {"vae": "vae/config.json", "transformer_2": "transformer_2/config.json"}}


def config_files(model: ModelSpec) -> dict[str, str]:
    return {**CONFIG_FILES, **FAMILY_CONFIG_FILES.get(model.family, {})}
WEIGHTED = ("transformer", "vae", "text_encoder")  # components whose weights must be safetensors


def source_kind(source: str) -> str:
    """'tiny', 'null', 'sim', 'remote' (an fsspec URL), 'local' (an existing folder), 'missing' (a path that does
    not exist) or 'hub' (anything else: a Hugging Face Hub id). model/loading.py resolves by the same rule."""
    if source == TINY_SOURCE:
        return "tiny"
    if source == NULL_SOURCE:
        return "null"
    if source == SIM_SOURCE:
        return "sim"
    if "://" in source and not source.startswith("file://"):
        return "remote"
    if Path(source.removeprefix("file://")).expanduser().is_dir():
        return "local"
    if source.startswith(("/", "./", "../", "~", "file://")) or source in (".", ".."):
        return "missing"
    return "hub"


@dataclass
class ModelConfigs:
    where: str  # what was read, for messages: "the tiny model", "local folder", "object store", "Hugging Face Hub"
    model_index: dict
    transformer: dict | None
    text_encoder: dict | None
    files: set[str] | None = None  # every file of the model (relative paths), when it could be listed
    identity: dict = field(default_factory=dict)  # what exactly was read: hub commit, or a fingerprint
    extra: dict = field(default_factory=dict)  # FAMILY_CONFIG_FILES read for this family (None: not there)

    def component_present(self, name: str) -> bool:
        value = self.model_index.get(name)
        return isinstance(value, list) and any(value)

    def resolved(self) -> tuple[dict | None, dict | None]:
        """The transformer's and text encoder's configs as the loaded models will have them. The tiny model's
        are our own complete literals (model/tiny.py): no library import for them, so a dry run stays light."""
        if self.identity.get("kind") == "tiny":
            return self.transformer, self.text_encoder
        return (resolve_config(self.model_index, "transformer", self.transformer),
                resolve_config(self.model_index, "text_encoder", self.text_encoder))


def resolve_config(model_index: dict, component: str, raw: dict | None) -> dict | None:
    """`raw` (a component's config.json) as its library resolves it when it loads the component: the class
    named in model_index.json builds it from the keys its `__init__` takes, with the `__init__` defaults for
    the ones the file leaves out. diffusers: `ConfigMixin.extract_init_dict` (what `from_config` calls),
    over the signature's defaults (what `register_to_config` records); transformers: the config class
    itself. A class we do not know is left as the raw file."""
    if raw is None:
        return None
    library, name = (model_index.get(component) or [None, None])[:2]
    if library == "diffusers" and name:
        import diffusers

        cls = getattr(diffusers, name, None)
        if cls is None or not hasattr(cls, "extract_init_dict"):
            return dict(raw)
        init, _unused, _hidden = cls.extract_init_dict(dict(raw))
        signature = inspect.signature(cls.__init__)
        ignored = set(getattr(cls, "ignore_for_config", ()))
        defaults = {k: p.default for k, p in signature.parameters.items()
                    if k != "self" and k not in ignored and p.default is not inspect.Parameter.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        return {**defaults, **init}
    if library == "transformers" and raw.get("model_type"):
        from transformers import AutoConfig

        try:
            return AutoConfig.for_model(**raw).to_dict()
        except (ValueError, KeyError, TypeError):
            return dict(raw)
    return dict(raw)


def read_model_configs(model: ModelSpec, storage_options: dict | None = None) -> ModelConfigs | None:
    """The source's configs (None for the benchmark stand-ins 'null' and 'sim'); SpecError naming model.source."""
    kind = source_kind(model.source)
    src = f"model.source {model.source!r}"
    if kind in ("null", "sim"):
        return None
    if kind == "tiny":
        from latte_ray.model.families import FAMILIES

        family = FAMILIES[model.family].load()
        configs = family.tiny_configs()
        identity = {"kind": "tiny", "source": TINY_SOURCE, "version": family.tiny_version()}
        if model.family != "latte":  # the Latte tiny model's identity predates families: unchanged
            identity["family"] = model.family
        return ModelConfigs("the tiny model", configs["model_index"], configs["transformer"], configs["text_encoder"],
                            identity=identity, extra={k: configs.get(k) for k in FAMILY_CONFIG_FILES.get(model.family, {})})
    if kind == "missing":
        raise SpecError(f"{src}: no such folder")
    if kind == "hub":
        return _hub_configs(model, src)
    return _fs_configs(model, src, storage_options, "local folder" if kind == "local" else "object store")


def _fs_configs(model: ModelSpec, src: str, storage_options: dict | None, where: str) -> ModelConfigs:
    from latte_ray.record.storage import filesystem

    url = model.source if where == "object store" else str(Path(model.source.removeprefix("file://")).expanduser())
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    try:
        listing = fs.find(root, detail=True)
    except Exception as e:  # noqa: BLE001 - unreachable endpoint, missing bucket, permission
        raise SpecError(f"{src}: cannot list it: {type(e).__name__}: {_first_line(e)}") from e
    listing = {p[len(root) + 1:]: info for p, info in listing.items() if info.get("type") != "directory"}
    files = set(listing)
    if CONFIG_FILES["model_index"] not in files:
        raise SpecError(f"{src}: no model_index.json there (not a diffusers save_pretrained folder)")
    loaded = {}
    for name, rel in config_files(model).items():
        if rel not in files:
            loaded[name] = None
            continue
        try:
            loaded[name] = json.loads(fs.cat_file(f"{root}/{rel}"))
        except Exception as e:  # noqa: BLE001
            raise SpecError(f"{src}: cannot read {rel}: {type(e).__name__}: {_first_line(e)}") from e
    identity = {"kind": "folder" if where == "local folder" else "mirror", "source": model.source,
                "fingerprint": _fingerprint(fs, root, listing)}
    return ModelConfigs(where, loaded["model_index"], loaded["transformer"], loaded["text_encoder"], files,
                        identity=identity, extra={k: loaded.get(k) for k in FAMILY_CONFIG_FILES.get(model.family, {})})


def _fingerprint(fs, root: str, listing: dict[str, dict]) -> str:
    """A cheap content hash of a model folder: every file's path and size, an object store's ETag (a content
    hash of the object), and the bytes of every JSON file (the configs). Weights are not read in full, so a
    weight file rewritten in place with the same size on local disk goes unseen: publish a changed model
    under a new folder or prefix."""
    digest = hashlib.sha256()
    for rel in sorted(listing):
        info = listing[rel]
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        digest.update(f"{rel}\0{int(info.get('size') or 0)}\0{etag}\n".encode())
        if rel.endswith(".json"):
            digest.update(fs.cat_file(f"{root}/{rel}"))
    return digest.hexdigest()[:32]


def _hub_configs(model: ModelSpec, src: str) -> ModelConfigs:
    import os

    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    loaded = {}
    for name, rel in config_files(model).items():
        try:
            path = hf_hub_download(repo_id=model.source, filename=rel, revision=model.revision)
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, invalid id, missing file
            if name != "model_index" and type(e).__name__ == "EntryNotFoundError":
                loaded[name] = None
                continue
            hint = " (HF_HUB_OFFLINE is set and it is not in the local hub cache)" if offline else ""
            raise SpecError(
                f"{src} is not 'tiny', a folder on this machine or a URL, so it is a Hugging Face Hub id, and "
                f"its {rel} cannot be fetched{hint}: {type(e).__name__}: {_first_line(e)}"
            ) from None
        loaded[name] = json.loads(Path(path).read_text())
        if name == "model_index":  # huggingface_hub keeps a revision's files under snapshots/<commit>/
            commit = Path(path).parent.name
    identity = {"kind": "hub", "source": model.source, "revision": model.revision or "main", "commit": commit}
    return ModelConfigs("Hugging Face Hub", loaded["model_index"], loaded["transformer"], loaded["text_encoder"],
                        identity=identity, extra={k: loaded.get(k) for k in FAMILY_CONFIG_FILES.get(model.family, {})})


def check_model_source(spec: PipelineSpec, storage_options: dict | None = None) -> str:
    """Check that the source is a Latte pipeline whose configs agree with the spec; returns a one-line
    summary, raises SpecError (one line) naming the field that disagrees."""
    return check_model(spec, storage_options)[0]


def check_model(spec: PipelineSpec, storage_options: dict | None = None) -> tuple[str, dict]:
    """check_model_source's summary line, and the source's identity (ModelConfigs.identity)."""
    from latte_ray.model.families import check_supported, family_of

    check_supported(spec)  # what the family cannot do: refused before any file is read
    family = family_of(spec)
    model = spec.model
    configs = read_model_configs(model, storage_options)
    if configs is None:
        if model.source == SIM_SOURCE:
            t = model.sim_timing
            return (f"model.source {model.source!r}: the benchmark simulated engine (no model; load {t.load_s:g} s"
                    f"{f' + compile {t.compile_s:g} s' if model.compile.enabled else ''}, {t.batch_s_fixed:g} s + "
                    f"{t.batch_s_per_video:g} s/video per call, time scale {t.time_scale:g})", {"kind": "sim"})
        return f"model.source {model.source!r}: the benchmark null engine (no model)", {"kind": "null"}
    src = f"model.source {model.source!r}"
    summary = family.load().check_configs(spec, configs, src)
    identity = configs.identity
    if model.lora:  # each LoRA fits the transformer, or the run is refused here (before any GPU time)
        from latte_ray.model.lora import check_loras

        transformer, _ = configs.resolved()
        experts = {"transformer": (configs.model_index["transformer"][1], transformer)}
        if configs.component_present("transformer_2"):  # Wan 2.2 A14B's low-noise expert
            second = configs.extra.get("transformer_2")
            if second is None:
                raise SpecError(f"{src}: model.lora is set but transformer_2/config.json cannot be read (the "
                                f"LoRAs cannot be checked against the second expert)")
            experts["transformer_2"] = (configs.model_index["transformer_2"][1],
                                        resolve_config(configs.model_index, "transformer_2", second))
        loras, digests = check_loras(spec, experts, storage_options=storage_options)
        summary = f"{summary}; {loras}"
        identity = {**identity, "lora": digests}
    if configs.files is not None:
        for component in WEIGHTED:
            if not any(f.startswith(f"{component}/") and f.endswith((".safetensors", ".safetensors.index.json"))
                       for f in configs.files):
                raise SpecError(f"{src}: {component}/ has no .safetensors weights (latte-ray loads safetensors "
                                f"only, never pickled weights)")
    pinned = configs.identity.get("commit") or configs.identity.get("fingerprint") or configs.identity.get("version")
    return f"{src} ({configs.where}{', ' + str(pinned)[:12] if pinned else ''}): {summary}", identity


def _component_present(model_index: dict, name: str) -> bool:
    value = model_index.get(name)
    return isinstance(value, list) and any(value)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""
