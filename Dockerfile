# syntax=docker/dockerfile:1
# latte-ray's image: the wheel built from this checkout, installed into Ray's own image. Every Ray node (head,
# GPU workers, the RayJob submitter) runs it; nothing is installed at run time.
#
#   make image REGISTRY=ghcr.io/acme                 # = docker build -t ghcr.io/acme/latte-ray:0.1.0-ray2.60.0-gpu .
#   make image REGISTRY=ghcr.io/acme VARIANT=cpu     # CPU-only (embedded default, CI-like rehearsals): ...-cpu
#   docker push ghcr.io/acme/latte-ray:0.1.0-ray2.60.0-gpu
#
# The tag is <latte-ray version>-ray<Ray version>-<variant>, both versions from pyproject.toml; the manifests in
# infra/ name REGISTRY/latte-ray:<that tag> (tests/test_infra.py checks they all agree with pyproject.toml).
# Keep this file small: everything beyond "install the wheel" is untested here (no Docker engine in CI), while
# the wheel itself is installed and run end to end by tests/test_wheel.py.

# The Ray version must equal pyproject.toml's pin (ray[data,default]==...); the Python of the base image must be
# one the wheel supports. VARIANT picks the base image flavour and the torch build: gpu (CUDA) or cpu.
ARG RAY_VERSION=2.60.0
ARG VARIANT=gpu

# ---------------------------------------------------------------------------------------------- 1: the wheel
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY latte_ray/ latte_ray/
COPY pipelines/ pipelines/
COPY examples/ examples/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist . && ls -l /dist

# ---------------------------------------------------------------------------------------------- 2: the image
FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}
ARG VARIANT
# torch is pinned like requirements/constraints.txt; the CUDA build comes from PyTorch's index (its wheels carry
# the CUDA runtime: the node only needs the NVIDIA driver).
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128

# One pip install: the wheel with its [s3] extra and a pinned torch build, under the versions the tests run with.
RUN --mount=type=bind,from=wheel,source=/dist,target=/tmp/dist \
    --mount=type=bind,source=requirements/constraints.txt,target=/tmp/constraints.txt \
    case "$VARIANT" in \
      gpu) build="$TORCH_CUDA" ;; \
      cpu) build=cpu ;; \
      *) echo "VARIANT must be gpu or cpu, got '$VARIANT'" >&2; exit 2 ;; \
    esac \
 && pip install --no-cache-dir --constraint /tmp/constraints.txt \
      --extra-index-url "https://download.pytorch.org/whl/${build}" \
      "torch==${TORCH_VERSION}+${build}" "$(ls /tmp/dist/latte_ray-*.whl)[s3]" \
 && python -m latte_ray --version \
 && python -m latte_ray pipelines

# The node-local model cache (mount a volume here, as infra/ does), and quiet, unbuffered logs.
USER root
RUN mkdir -p /cache && chown ray /cache
USER ray
ENV LATTE_RAY_CACHE=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1
# Not here: PIP_NO_DEPS=1, which lets a job ship a newer latte-ray wheel with runtime env `py_modules` without
# Ray's `pip install --target` pulling torch & co. again. It would also silently drop dependencies from every
# `pip install` in images built FROM this one, so the cluster manifests in infra/ set it on the Ray containers.
