"""Model build bookkeeping shared by the edge exporters: fingerprints, locks and atomic swaps.

A build is skipped when its folder already holds one with the same fingerprint, is made beside its
destination and renamed into place once complete, so a reader never sees half a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edge.runtime.model_dir import META_FILE, MODEL_FILE


def build_atomically(dest: Path, wanted: str, build: Callable[[Path], None], *, force: bool, tag: str) -> Path:
    """Run `build(tmp)` and rename `tmp` onto `dest`, unless `dest` already holds build `wanted`."""
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Tests and `make models` may build the same folder at once: one builds, the other then skips.
    with file_lock(dest.parent / f".{dest.name}.lock"):
        if not force and built_fingerprint(dest) == wanted:
            progress(tag, f"{dest} is up to date ({wanted}); skipping")
            return dest
        check_replaceable(dest)
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-", dir=dest.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the worker may run as another user
        try:
            build(tmp)
            readable_by_all(tmp)
            swap_into_place(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress(tag, f"built {dest} in {time.perf_counter() - started:.1f}s")
    return dest


def built_fingerprint(dest: Path) -> str | None:
    """The fingerprint of a complete build in `dest`, or None."""
    try:
        meta = json.loads((dest / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    files = [MODEL_FILE, *meta.get("files", [])]
    if not all((dest / name).is_file() for name in files):
        return None
    return meta.get("fingerprint")


def check_replaceable(dest: Path) -> None:
    """Refuse to replace a folder that is neither empty nor an earlier build of ours."""
    if (
        dest.exists()
        and any(dest.iterdir())
        and not ((dest / META_FILE).exists() or (dest / MODEL_FILE).exists())
    ):
        raise FileExistsError(f"{dest} exists and does not look like an edge model build; not replacing it")


def readable_by_all(folder: Path) -> None:
    """Every file of a build readable by all: savers write some 0600 (onnx's external weights,
    save_pretrained's safetensors), and the worker may run as another user (the edge image's)."""
    for f in folder.rglob("*"):
        mode = f.stat().st_mode
        if f.is_file() and mode & 0o044 != 0o044:
            f.chmod(mode | 0o444)


def swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished build onto `dest`, moving any old build aside first."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`, held for the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def step(tag: str, name: str) -> Iterator[None]:
    """Print a step's name when it starts and its duration when it ends."""
    progress(tag, f"{name} ...")
    started = time.perf_counter()
    yield
    progress(tag, f"{name} done in {time.perf_counter() - started:.1f}s")


def progress(tag: str, line: str) -> None:
    """One human-readable progress line on stderr (stdout carries only the result path)."""
    print(f"[{tag}] {line}", file=sys.stderr, flush=True)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def torch_threads(limit: int = 2) -> Iterator[None]:
    """Cap torch's intra-op threads for the block: build machines are shared."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(min(limit, previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
