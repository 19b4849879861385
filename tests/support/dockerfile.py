"""Reading a Dockerfile's instructions, for tests that check what an image runs."""

from __future__ import annotations

import json
from pathlib import Path

DOCKER = Path(__file__).resolve().parents[2] / "deploy" / "docker"
KINDS = ("gateway", "edge", "core")


def dockerfile(kind: str) -> Path:
    """The Dockerfile of one of our images: gateway, edge or core."""
    return DOCKER / f"{kind}.Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = path.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def final_stage(path: Path) -> dict[str, str]:
    """The last stage's instructions by name (the last of each wins, as in the image)."""
    ops = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(ops) if op == "FROM")
    return dict(ops[last_from:])


def exec_form(path: Path, instruction: str) -> list[str]:
    """ENTRYPOINT or CMD of the final stage, written in exec (JSON) form."""
    return json.loads(final_stage(path)[instruction])
