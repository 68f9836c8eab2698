PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean wheel image push chromium spec-reference

# The venv is built once and rebuilt only when the dependencies change.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e '.[dev,s3]'
	touch $(STAMP)

install: $(STAMP)

# The run ends by writing outputs/demo/report/ (its summary says what to open).
demo: $(STAMP)
	$(BIN)/latte-ray run

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q --durations=30 tests

# The report's browser test (tests/test_scoring.py) opens the gallery in Debian's headless chromium, driven by
# the playwright package (a dev dependency; it downloads no browser of its own). Installed once, if missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium)

# docs/spec-reference.md is rendered from the spec's pydantic models (tests/test_docs.py fails when they differ).
spec-reference: $(STAMP)
	$(BIN)/python -m latte_ray.ops.specref docs/spec-reference.md

clean:
	rm -rf $(VENV) outputs build dist

# Release artefacts: the wheel (dist/) and the image built from it (Dockerfile). Versions come from pyproject.toml;
# the infra/ manifests name $(REGISTRY)/latte-ray:$(TAG) with VARIANT=gpu (tests/test_infra.py checks they agree).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
RAY_VERSION := $(shell sed -n 's/^ *"ray\[[a-z,]*\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
VARIANT ?= gpu
REGISTRY ?= REGISTRY
TAG := $(VERSION)-ray$(RAY_VERSION)-$(VARIANT)
IMAGE := $(REGISTRY)/latte-ray:$(TAG)

wheel:
	rm -rf build
	$(PY) -m pip wheel --no-deps --wheel-dir dist .

image:
	docker build --build-arg RAY_VERSION=$(RAY_VERSION) --build-arg VARIANT=$(VARIANT) -t $(IMAGE) .

push: image
	docker push $(IMAGE)
