"""The Triton model repository the core writes: exactly the models it is asked for."""

from __future__ import annotations

from pathlib import Path

from core.triton.repository import CoreModelSpec, write_model_repository


def test_a_model_an_earlier_run_left_is_removed_and_files_beside_the_models_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_model_repository(root, [CoreModelSpec("old-model", tmp_path / "old")])
    (root / "notes.txt").write_text("not a model")
    write_model_repository(root, [CoreModelSpec("new-model", tmp_path / "new")])
    assert sorted(p.name for p in root.iterdir()) == ["new-model", "notes.txt"]
    assert (root / "new-model" / "config.pbtxt").is_file() and (root / "new-model" / "1" / "model.py").is_file()
    write_model_repository(root, [CoreModelSpec("new-model", tmp_path / "new")])  # refreshed in place
    assert sorted(p.name for p in root.iterdir()) == ["new-model", "notes.txt"]
