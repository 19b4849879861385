"""The local checkpoint is rebuilt when its recipe changes, and only then."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
