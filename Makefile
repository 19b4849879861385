# Meridian: `make up` runs the whole stack locally, `make test` installs everything and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Heavy artefacts (ONNX exports, generated checkpoints) live outside git, built once and reused.
export MERIDIAN_CACHE ?= $(HOME)/.cache/meridian
STAMP := $(VENV)/.installed

.PHONY: venv models up down test test-unit clean help proto edge-image gateway-image core-image images

help:
	@echo "make up      run the whole stack locally (Redis, two zones of edge + Triton core, gateway)"
	@echo "make test    install everything, build the models, run the tests"
	@echo "make models  build model artefacts into $(MERIDIAN_CACHE) (cached)"
	@echo "make down    stop a stack started with 'meridian up --detach'"
	@echo "make edge-image  build the edge-node container with podman"
	@echo "make images  the gateway, edge and core containers (also gateway-image, core-image)"

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: unpinned, pip would fetch a multi-GB CUDA build on CPU machines.
	$(BIN)/python -m pip install --quiet --progress-bar off -c constraints.txt "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --progress-bar off -c constraints.txt -e ".[all,dev]"
	@touch $(STAMP)

models: $(STAMP)
	$(BIN)/meridian models

up: models
	$(BIN)/meridian up

down:
	@test -x $(BIN)/meridian && $(BIN)/meridian down || true

test: models
	$(BIN)/python -m pytest -q -ra

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not integration"

clean:
	rm -rf var/ .pytest_cache

# The containers the Kubernetes manifests run, built with podman (installed when missing; no registry needed).
edge-image: $(STAMP)
	deploy/docker/build_image.sh edge

gateway-image: $(STAMP)
	deploy/docker/build_image.sh gateway

core-image: $(STAMP)
	deploy/docker/build_image.sh core

images: gateway-image edge-image core-image

# Regenerate the gateway <-> edge stubs after editing edge/api/edge.proto (the output is committed).
proto: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
		--grpclib_python_out=. edge/api/edge.proto
