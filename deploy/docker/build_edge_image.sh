#!/usr/bin/env bash
# Build the edge-node image with podman, from nothing but this checkout and the package mirrors:
#   1. install podman & friends (apt, as root) when they are missing;
#   2. make a local base image once (debootstrap'd Debian bookworm with python3), cached, no registry;
#   3. build the edge models on the host (`meridian models` recipe, cached and verified against PyTorch);
#   4. fetch the runtime wheels on the host and build the meridian wheel into the context;
#   5. `podman build --network=none` (pip inside a networked build trips over TLS interception here).
# Usage: deploy/docker/build_edge_image.sh [IMAGE]   (default localhost/meridian-edge:latest)
# Env: PYTHON (default .venv/bin/python), MERIDIAN_CACHE (default ~/.cache/meridian),
#      BASE_IMAGE (skip step 2 and build FROM this image instead), DEBIAN_MIRROR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
IMAGE="${1:-localhost/meridian-edge:latest}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CACHE="${MERIDIAN_CACHE:-$HOME/.cache/meridian}"
WORK="$CACHE/container"
LOCAL_BASE="localhost/meridian-debian-python:bookworm"
CONTEXT="$ROOT/var/edge-image"

log() { printf '[edge-image] %s\n' "$*" >&2; }

install_podman() {
    command -v podman >/dev/null && command -v debootstrap >/dev/null && return
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "podman and debootstrap are needed: install them (apt-get install podman buildah runc fuse-overlayfs slirp4netns uidmap debootstrap)"
        exit 1
    fi
    log "installing podman (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        podman buildah runc fuse-overlayfs slirp4netns uidmap debootstrap >/dev/null
}

# crun refuses the hybrid cgroups of these machines and the sandbox forbids raising rlimits.
containers_conf() {
    mkdir -p "$WORK"
    cat >"$WORK/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
    export CONTAINERS_CONF="$WORK/containers.conf"
}

debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    echo "${uri:-http://deb.debian.org/debian}"
}

base_image() {
    if [ -n "${BASE_IMAGE:-}" ]; then echo "$BASE_IMAGE"; return; fi
    if ! podman image exists "$LOCAL_BASE"; then
        if [ ! -f "$WORK/rootfs/usr/bin/python3" ]; then
            log "debootstrapping Debian bookworm with python3 into $WORK/rootfs (once)"
            rm -rf "$WORK/rootfs.partial"
            debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
                bookworm "$WORK/rootfs.partial" "$(debian_mirror)" >"$WORK/debootstrap.log" 2>&1
            rm -rf "$WORK/rootfs"
            mv "$WORK/rootfs.partial" "$WORK/rootfs"
        fi
        log "importing the base image $LOCAL_BASE"
        tar -C "$WORK/rootfs" -c . | podman import - "$LOCAL_BASE" >/dev/null
    fi
    echo "$LOCAL_BASE"
}

build_models() {
    log "building the edge models (skipped when up to date)"
    MERIDIAN_CACHE="$CACHE" OMP_NUM_THREADS=1 "$PYTHON" - <<'PY'
import os
from pathlib import Path
from edge.export import build_embedding_model
from edge.lm_export import build_small_lm
cache = Path(os.environ["MERIDIAN_CACHE"]) / "edge"
build_embedding_model(cache / "all-minilm-l6-v2")
build_small_lm(cache / "edge-small")
PY
}

prepare_context() {
    log "preparing the build context in $CONTEXT"
    rm -rf "$CONTEXT"
    mkdir -p "$CONTEXT/wheels" "$CONTEXT/models/edge"
    cp "$ROOT/deploy/docker/edge-requirements.txt" "$CONTEXT/wheels/"
    cp "$ROOT/deploy/docker/edge-topology.yaml" "$CONTEXT/"
    # (pip warns about index locations of this machine's pip.conf that do not exist; not ours to fix.)
    "$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$CONTEXT/wheels" \
        -c "$ROOT/constraints.txt" -r "$ROOT/deploy/docker/edge-requirements.txt" 2> >(grep -v 'is ignored' >&2)
    "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$CONTEXT/wheels" "$ROOT"
    rm -rf "$ROOT/build"  # setuptools' scratch folder
    for model in all-minilm-l6-v2 edge-small; do
        # Only what the runtime reads: the generated PyTorch checkpoint stays on the host.
        mkdir -p "$CONTEXT/models/edge/$model"
        cp "$CACHE/edge/$model/"{meta.json,tokenizer.json,model.onnx,model.int8.onnx} "$CONTEXT/models/edge/$model/"
    done
    chmod -R a+rX "$CONTEXT"
}

main() {
    install_podman
    containers_conf
    local base
    base="$(base_image)"
    build_models
    prepare_context
    log "building $IMAGE FROM $base (no network)"
    podman build --quiet --network=none --format docker --build-arg "BASE_IMAGE=$base" \
        -t "$IMAGE" -f "$ROOT/deploy/docker/edge.Dockerfile" "$CONTEXT" >/dev/null
    log "built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
    echo "$IMAGE"
}

main
