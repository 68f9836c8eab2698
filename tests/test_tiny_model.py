"""The tiny offline Latte model: deterministic across processes, safetensors-only, cached once, race-free."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LattePipeline

from latte_ray.model import tiny
from latte_ray.model.tiny import TINY_MODEL_VERSION, build_tiny_pipeline, ensure_tiny_model, save_tiny_model

PROMPTS = ["A cat walks on the beach at sunset.", "zzz", "Aerial drone shot of a snowy mountain, 4k!", ""]
GEN_KWARGS = dict(
    num_inference_steps=20, guidance_scale=7.5, height=128, width=128, video_length=16,
    output_type="np", clean_caption=False,
)  # fmt: skip

# Run in a fresh interpreter with another hash seed: the weights and the vocabulary must not depend on either.
FINGERPRINT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from latte_ray.model.quantize import leave_torchao_unimported
    leave_torchao_unimported(None)  # as a model actor whose spec has no model.quantization starts
    sys.path.insert(0, {tests_dir!r})
    from test_tiny_model import PROMPTS, weights_hash
    from latte_ray.model.tiny import build_tiny_pipeline
    pipe = build_tiny_pipeline()
    from diffusers.utils import is_torchao_available
    from transformers.utils import is_torchao_available as transformers_sees_torchao
    print(json.dumps({{"weights": weights_hash(pipe), "ids": [pipe.tokenizer(p).input_ids for p in PROMPTS],
                      "torchao": repr(sys.modules["torchao"]),
                      "torchao seen": [is_torchao_available(), transformers_sees_torchao()]}}))
    """
)


def weights_hash(pipe: LattePipeline) -> str:
    digest = hashlib.sha256()
    for name in ("text_encoder", "vae", "transformer"):
        for key, tensor in sorted(getattr(pipe, name).state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def generate(pipe: LattePipeline, prompt: str, seed: int = 0) -> np.ndarray:
    return pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **GEN_KWARGS).frames


@pytest.fixture(scope="module")
def pipe() -> LattePipeline:
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def fresh_process() -> dict:
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    script = FINGERPRINT_SCRIPT.format(tests_dir=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


def test_save_load_round_trip_is_safetensors_only_and_identical(pipe, tmp_path):
    path = save_tiny_model(tmp_path / "model")

    weights = [p for p in path.rglob("*") if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}]
    assert sorted(p.relative_to(path).parts[0] for p in weights) == ["text_encoder", "transformer", "vae"]
    assert all(p.suffix == ".safetensors" for p in weights), weights
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the temporary folder was renamed away

    loaded = LattePipeline.from_pretrained(path, use_safetensors=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.tokenizer.model_max_length >= 120
    assert weights_hash(loaded) == weights_hash(pipe)

    built, reloaded = generate(pipe, PROMPTS[0], seed=7), generate(loaded, PROMPTS[0], seed=7)
    assert built.shape == (1, 16, 128, 128, 3)
    assert np.array_equal(built, reloaded)
    assert built.std() > 0.02  # random weights still give varied pixels, not a flat image
    assert not np.array_equal(built[0, 0], built[0, -1])  # and the frames differ
    assert not np.array_equal(built, generate(pipe, PROMPTS[0], seed=8))


def test_same_weights_in_a_fresh_process(pipe, fresh_process):
    assert fresh_process["weights"] == weights_hash(pipe)
    assert weights_hash(build_tiny_pipeline(seed=1)) != weights_hash(pipe)


def test_a_model_process_without_quantization_never_imports_torchao(fresh_process):
    """The fresh process starts as a model actor without model.quantization does (stages/denoise.py): it
    builds and runs a LattePipeline (diffusers and transformers imported) and torchao is never imported
    (transformers' modeling code would import it, and it prints load failures of its CUDA kernels on a
    machine without them); both libraries take their no-torchao path."""
    assert fresh_process["torchao"] == "None" and fresh_process["torchao seen"] == [False, False]
    assert "torchao" not in fresh_process["stderr"], fresh_process["stderr"][-2000:]


def test_same_token_ids_in_a_fresh_process(pipe, fresh_process):
    assert fresh_process["ids"] == [pipe.tokenizer(p).input_ids for p in PROMPTS]


def test_prompts_of_different_lengths_give_different_mask_lengths(pipe):
    # LattePipeline pads to 120 tokens and keeps as many text embeddings as the mask has ones.
    masks = pipe.tokenizer(PROMPTS, padding="max_length", max_length=120, truncation=True).attention_mask
    assert {len(m) for m in masks} == {120}
    lengths = [sum(m) for m in masks]
    assert len(set(lengths)) == len(PROMPTS), lengths
    assert pipe.tokenizer.unk_token_id not in pipe.tokenizer(PROMPTS[0]).input_ids


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    class Broken:
        def save_pretrained(self, path, **kwargs):
            (Path(path) / "model_index.json").write_text("{}")
            raise OSError("disk full")

    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda seed=0: Broken())
    with pytest.raises(OSError, match="disk full"):
        save_tiny_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_ensure_builds_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("LATTE_RAY_CACHE", str(tmp_path))
    path = ensure_tiny_model()
    assert path == tmp_path / f"tiny-latte-{TINY_MODEL_VERSION}"
    stamp = (path / "model_index.json").stat().st_mtime_ns, (path / "model_index.json").stat().st_ino

    def no_rebuild(path):
        raise AssertionError("rebuilt an existing model")

    monkeypatch.setattr(tiny, "save_tiny_model", no_rebuild)
    assert ensure_tiny_model(tmp_path) == path
    assert ((path / "model_index.json").stat().st_mtime_ns, (path / "model_index.json").stat().st_ino) == stamp


def test_ensure_is_safe_across_concurrent_processes(tmp_path):
    # Both processes wait for each other before calling ensure_tiny_model, and each build is slowed down,
    # so without the lock both would see the folder missing and both would build it.
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from latte_ray.model import tiny
        cache, me = Path(sys.argv[1]), sys.argv[2]
        real_save = tiny.save_tiny_model

        def slow_save(path):
            with open(cache / "builds.log", "a") as log:
                log.write(me + "\\n")
            time.sleep(1.0)
            return real_save(path)

        tiny.save_tiny_model = slow_save
        (cache / f"ready-{me}").touch()
        while len(list(cache.glob("ready-*"))) < 2:
            time.sleep(0.01)
        print(tiny.ensure_tiny_model(cache))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), name], stdout=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]

    assert len((tmp_path / "builds.log").read_text().split()) == 1
    expected = tmp_path / f"tiny-latte-{TINY_MODEL_VERSION}"
    assert outputs == [str(expected)] * 2
    assert (expected / "model_index.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_save_fills_an_empty_folder_replaces_only_its_own_model_and_refuses_the_rest(tmp_path):
    """tiny-model never deletes what it did not write: an empty folder is filled (the folder itself kept),
    an earlier tiny model is replaced, anything else is refused untouched (tests/test_bad_input.py has the
    CLI cases: `.`, a regular file)."""
    from latte_ray.errors import InputError

    folder = tmp_path / "empty"
    folder.mkdir()
    inode = folder.stat().st_ino
    assert save_tiny_model(folder) == folder and folder.stat().st_ino == inode
    marker = json.loads((folder / tiny.MARKER).read_text())
    assert marker["tiny_model_version"] == TINY_MODEL_VERSION
    assert set(marker["files"]) == {str(p.relative_to(folder)) for p in folder.rglob("*")
                                    if p.is_file() and p.name != tiny.MARKER}
    first = (folder / "model_index.json").stat().st_ino
    save_tiny_model(folder)  # its own model: replaced whole
    assert (folder / "model_index.json").stat().st_ino != first and (folder / tiny.MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no temp or old folder left

    (folder / "vae" / "my-notes.txt").write_text("mine")
    with pytest.raises(InputError, match="vae/my-notes.txt"):
        save_tiny_model(folder)
    assert (folder / "vae" / "my-notes.txt").read_text() == "mine"
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match=f"{user} is a folder with files in it"):
        save_tiny_model(user)
    assert [p.name for p in user.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "user"]


@pytest.mark.parametrize("family", ["latte", "wan"])
def test_the_configs_driver_checks_read_are_those_of_the_saved_model(tmp_path, family):
    """model_configs (what `run` checks the spec against, without torch) agrees with the saved files, for
    every family's tiny model (model/tiny.py, model/tiny_wan.py)."""
    from latte_ray.model.families import FAMILIES

    module = FAMILIES[family].load()
    path = module.ensure_tiny(tmp_path)
    for name, expected in module.tiny_configs().items():
        rel = "model_index.json" if name == "model_index" else f"{name}/config.json"
        if expected is None:  # a component the tiny model does not have (Wan's second expert)
            assert not (path / rel).exists(), name
            continue
        saved = json.loads((path / rel).read_text())
        assert {k: saved[k] for k in expected} == expected, name
