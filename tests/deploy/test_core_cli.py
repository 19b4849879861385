"""`meridian core` and `meridian up` refuse a checkpoint the core cannot serve at once, in one line,
before any Triton starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.cli import main


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (None, "is not a checkpoint directory (no config.json)"),
        ('{"model_type": "qwen2"', "cannot be served by the core: Expecting"),
        (json.dumps({"model_type": "qwen2", "hidden_size": 64}), "unsupported model_type 'qwen2'; supported: deepseek_v3"),
        (json.dumps({"model_type": "mixtral", "hidden_act": "gelu"}), "unsupported hidden_act 'gelu'"),
    ],
    ids=["no-config", "broken-json", "dense-family", "other-activation"],
)
def test_a_checkpoint_the_core_cannot_serve_is_refused_before_triton_starts(
    tmp_path: Path, capsys, config: str | None, fragment: str
) -> None:
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    workdir = tmp_path / "work"
    assert main(["core", "--checkpoint", str(tmp_path), "--workdir", str(workdir)]) == 2
    assert fragment in capsys.readouterr().err
    assert not workdir.exists()  # no model repository written for it


def test_up_refuses_a_core_model_the_core_cannot_serve_before_starting_anything(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "dense"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    var = tmp_path / "var"
    assert main(["up", "--var-dir", str(var), "--core-model", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert "model dense:" in err and "unsupported model_type 'llama'" in err
    assert not (var / "logs").exists()  # nothing was started
