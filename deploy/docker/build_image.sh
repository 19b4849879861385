#!/usr/bin/env bash
# Build one of Meridian's images with podman, from nothing but this checkout and the package mirrors:
#   1. install podman & friends (apt, as root) when they are missing;
#   2. make a local base image once (debootstrap'd Debian bookworm with python3), cached, no registry;
#   3. edge only: build the edge models on the host (`meridian models` recipe, cached and verified
#      against PyTorch); the core's checkpoints are mounted at run time, not baked in;
#   4. fetch the runtime wheels on the host and build the meridian wheel into the context;
#   5. `podman build --network=none` (pip inside a networked build trips over TLS interception here).
# Usage: deploy/docker/build_image.sh KIND [IMAGE]
#   KIND: edge | gateway | core; IMAGE defaults to localhost/meridian-KIND:latest.
# Env: PYTHON (default .venv/bin/python), MERIDIAN_CACHE (default ~/.cache/meridian),
#      BASE_IMAGE (skip step 2 and build FROM this image instead), DEBIAN_MIRROR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KIND="${1:-}"
case "$KIND" in
    edge | gateway | core) ;;
    *) echo "usage: $0 edge|gateway|core [IMAGE]" >&2; exit 2 ;;
esac
IMAGE="${2:-localhost/meridian-$KIND:latest}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CACHE="${MERIDIAN_CACHE:-$HOME/.cache/meridian}"
WORK="$CACHE/container"
# The core's python backend stub links libpython, which Debian ships apart from python3.
BASE_PACKAGES="python3,python3-venv,libpython3.11,ca-certificates"
LOCAL_BASE="localhost/meridian-debian-python:bookworm-2"
ROOTFS="$WORK/rootfs-2"
CONTEXT="$ROOT/var/$KIND-image"

log() { printf '[%s-image] %s\n' "$KIND" "$*" >&2; }

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
        if [ ! -f "$ROOTFS/usr/bin/python3" ]; then
            log "debootstrapping Debian bookworm with python3 into $ROOTFS (once)"
            rm -rf "$ROOTFS.partial"
            debootstrap --variant=minbase --include="$BASE_PACKAGES" \
                bookworm "$ROOTFS.partial" "$(debian_mirror)" >"$WORK/debootstrap.log" 2>&1
            rm -rf "$ROOTFS"
            mv "$ROOTFS.partial" "$ROOTFS"
        fi
        log "importing the base image $LOCAL_BASE"
        tar -C "$ROOTFS" -c . | podman import - "$LOCAL_BASE" >/dev/null
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

# The runtime wheels: the edge and the core install a list of their own and meridian without its
# dependencies (those are the gateway's); the gateway installs the meridian wheel with them.
fetch_wheels() {
    local dest="$CONTEXT/wheels"
    mkdir -p "$dest"
    "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$dest" "$ROOT"
    rm -rf "$ROOT/build"  # setuptools' scratch folder
    local wanted=("$dest"/meridian-*.whl)
    if [ "$KIND" != gateway ]; then
        cp "$ROOT/deploy/docker/$KIND-requirements.txt" "$dest/"
        wanted=(-r "$ROOT/deploy/docker/$KIND-requirements.txt")
    fi
    # (pip warns about index locations of this machine's pip.conf that do not exist; not ours to fix.)
    "$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$dest" -c "$ROOT/constraints.txt" \
        "${wanted[@]}" 2> >(grep -v 'is ignored' >&2)
}

copy_edge_models() {
    cp "$ROOT/deploy/docker/edge-topology.yaml" "$CONTEXT/"
    for model in all-minilm-l6-v2 edge-small; do
        # Only what the runtime reads: the build's files (the graphs, their weights where they sit
        # beside them, the int8 graph where it passed its quality gate, tokenizer and meta.json),
        # not the generated PyTorch checkpoint, a folder, which stays on the host.
        mkdir -p "$CONTEXT/models/edge/$model"
        find "$CACHE/edge/$model" -maxdepth 1 -type f ! -name '.*' -exec cp {} "$CONTEXT/models/edge/$model/" \;
    done
}

prepare_context() {
    log "preparing the build context in $CONTEXT"
    rm -rf "$CONTEXT"
    mkdir -p "$CONTEXT"
    fetch_wheels
    if [ "$KIND" = edge ]; then copy_edge_models; fi
    chmod -R a+rX "$CONTEXT"
}

main() {
    install_podman
    containers_conf
    local base
    base="$(base_image)"
    if [ "$KIND" = edge ]; then build_models; fi
    prepare_context
    log "building $IMAGE FROM $base (no network)"
    # Labelled with its sources' digest: the image tests skip an image built from other sources.
    local source
    source="$(cd "$ROOT" && "$PYTHON" -m deploy.source_digest)"
    podman build --quiet --network=none --format docker --build-arg "BASE_IMAGE=$base" \
        --label "org.meridian.source=$source" \
        -t "$IMAGE" -f "$ROOT/deploy/docker/$KIND.Dockerfile" "$CONTEXT" >/dev/null
    log "built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
    echo "$IMAGE"
}

main
