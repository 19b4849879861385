"""The local checkpoint is rebuilt when its recipe changes, and only then; others may read it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.checkpoint import synthetic


def test_a_checkpoint_of_another_recipe_is_not_built(local_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(local_checkpoint, copy)
    assert synthetic.is_built(copy)
    # Another version of a library the recipe's output depends on: a different build.
    real = synthetic.metadata.version
    monkeypatch.setattr(synthetic.metadata, "version", lambda p: "0.0-other" if p == "tokenizers" else real(p))
    assert not synthetic.is_built(copy)
    monkeypatch.undo()
    (copy / synthetic.BUILD_FILE).write_text(json.dumps({"fingerprint": "0" * 16}))  # an older recipe
    assert not synthetic.is_built(copy)
    (copy / synthetic.BUILD_FILE).unlink()  # built before builds were fingerprinted
    assert not synthetic.is_built(copy)


def test_every_file_of_the_checkpoint_is_readable_by_other_users(local_checkpoint: Path) -> None:
    # The core image runs as an unprivileged user over a mounted cache; save_pretrained alone
    # writes the weights 0600.
    modes = {f.name: f.stat().st_mode & 0o777 for f in local_checkpoint.iterdir() if f.is_file()}
    assert "model.safetensors" in modes
    assert all(mode & 0o044 == 0o044 for mode in modes.values()), modes


def test_unreadable_weights_are_named_as_such(local_checkpoint: Path, monkeypatch) -> None:
    from core.model import loader

    # This suite runs as root, which may read anything: the permission check is what is faked.
    monkeypatch.setattr(loader.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="model.safetensors is not readable by this process"):
        loader.weight_files(local_checkpoint)
