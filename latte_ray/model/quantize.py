"""Low-precision weights (`model.quantization`): torchao quantization of the Linear layers, applied at load.

Why torchao's `quantize_` on the loaded modules rather than diffusers' `TorchAoConfig` in `from_pretrained`:
the same call then serves every way a pipeline reaches the engine (a model folder, a hub id, an s3:// mirror,
and the random full-size pipelines benchmarks/gpu.py passes in), weights still load as safetensors, and the
transformer and T5 are quantized by one code path. It is what `TorchAoConfig` runs underneath (diffusers'
torchao quantizer calls `quantize_` with the same config classes).

Quantizing changes pixels: the spec hash covers `model.quantization`, and the manifest records its kind.
Weight-only int8 works on CPU and CUDA; the float8 kinds need float8 tensor cores (CUDA compute capability
>= 8.9: Ada, Hopper). A spec asking for float8 on `device: cpu` fails at spec validation; on cuda/auto,
`check_supported` fails the actor at load with one line, before any weights are read; when the actors run
on the driver's machine (a local Ray) `check_before_run` refuses the run up front (a driver-side cluster
check can call `check_supported` for other nodes).

torch is imported inside the functions that use it: every model actor calls `leave_torchao_unimported`
first, and the simulated engine's actors (model/sim.py) never import torch at all.
"""

from __future__ import annotations

import logging
import sys

from latte_ray.errors import QuantizationUnsupported  # noqa: F401 - re-exported
from latte_ray.spec import FLOAT8_MIN_CAPABILITY, QUANTIZATION_KINDS, ModelSpec, QuantizationSpec, SpecError

log = logging.getLogger(__name__)


def check_supported(quantization: QuantizationSpec | None, device: "torch.device | str") -> None:
    """Raise QuantizationUnsupported when `quantization` cannot run on `device` (cpu, cuda, cuda:N)."""
    if quantization is None or not quantization.needs_float8:
        return
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        raise QuantizationUnsupported(quantization.refusal(f"the model runs on {device.type}", "int8_weight_only there"))
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_MIN_CAPABILITY:
        here = f"this {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
        raise QuantizationUnsupported(quantization.refusal(here, "int8_weight_only or int8_dynamic on it"))


def check_before_run(model: ModelSpec) -> None:
    """Driver side: when the generation actors will run on this machine (no RAY_ADDRESS, so latte-ray starts
    a local Ray), refuse a quantization this machine cannot run before anything starts, as a SpecError
    (exit 2, one line). On a cluster the actors' nodes may differ from the driver's: they check at load."""
    import os

    q = model.quantization
    if q is None or not q.needs_float8 or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    device = "cuda" if model.device != "cpu" and torch.cuda.is_available() else "cpu"
    try:
        check_supported(q, device)
    except QuantizationUnsupported as e:
        raise SpecError(str(e)) from None


def leave_torchao_unimported(quantization: QuantizationSpec | None) -> None:
    """In a model actor whose spec asks for no quantization, keep torchao from being imported at all.

    Importing transformers' modeling code imports torchao whenever it is installed (transformers/quantizers/
    quantizer_torchao.py: `if is_torchao_available(): from torchao... import ...`), and so do diffusers'
    torchao quantizer and group offloading; torchao's import then prints its load failures on a machine
    without its CUDA kernels (`Failed to load .../torchao/_C_cutlass_90a.abi3.so`, `Unable to import
    torchao Tensor objects`) in every actor, which read as errors. A `None` entry in sys.modules is Python's
    documented way to make a module unimportable: `importlib.util.find_spec` (the libraries' availability
    check) then answers None, so they take their no-torchao path. Only when torchao is not imported yet;
    `quantize_pipeline` lifts it again, so a later quantized load in the same process still works."""
    if quantization is None and "torchao" not in sys.modules:
        sys.modules["torchao"] = None


def _allow_torchao() -> None:
    if "torchao" in sys.modules and sys.modules["torchao"] is None:
        del sys.modules["torchao"]


def torchao_config(quantization: QuantizationSpec):
    """The torchao AOBaseConfig for the spec's kind (what diffusers' TorchAoConfig would wrap)."""
    _allow_torchao()
    import torchao.quantization as ao

    return getattr(ao, QUANTIZATION_KINDS[quantization.kind][0])()


def quantize_pipeline(pipe, quantization: QuantizationSpec | None) -> dict[str, int]:
    """Quantize the spec's components of `pipe` in place (those the pipeline holds: a text-encode actor has
    no transformer, a generation actor behind a text-encode stage no text encoder).
    Returns {component: Linear layers quantized}."""
    if quantization is None:
        return {}
    _allow_torchao()
    import torch
    from torchao.quantization import quantize_

    done = {}
    names = [n for c in quantization.components for n in ((c, "transformer_2") if c == "transformer" else (c,))]
    for name in names:  # "transformer" is the denoiser: Wan 2.2 A14B's second expert (transformer_2) too
        module = getattr(pipe, name, None)
        if module is None:
            continue
        linears = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
        quantize_(module, torchao_config(quantization))
        done[name] = linears
    if done:
        log.info("quantized %s with %s", done, quantization.kind)
    return done
