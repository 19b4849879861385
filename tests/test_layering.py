"""Who may import whom (docs/ARCHITECTURE.md): the gateway speaks protocols, the edge and the
kernels stand alone, the core builds on the kernels only, the mobile SDK shares the edge's loops."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Package -> (top-level modules it must not import, the one part of `edge` it may use, if any).
RULES = {
    "gateway": ({"core", "kernels", "mobile", "deploy", "torch", "onnxruntime", "triton"}, "edge.api"),
    "edge": ({"gateway", "core", "kernels", "mobile", "deploy"}, None),
    "core": ({"gateway", "edge", "mobile", "deploy"}, None),
    "kernels": ({"gateway", "edge", "core", "mobile", "deploy"}, None),
    "mobile": ({"gateway", "core", "kernels", "deploy"}, "edge.runtime"),
}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a source file, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def breaches(package: str) -> list[str]:
    forbidden, edge_part = RULES[package]
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if "_generated" in path.parts:
            continue
        for line, module in imports(path):
            top = module.split(".")[0]
            if top in forbidden or (top == "edge" and edge_part and not module.startswith(edge_part)):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


@pytest.mark.parametrize("package", sorted(RULES))
def test_each_package_imports_only_what_its_layer_allows(package):
    assert breaches(package) == []


def test_the_check_sees_a_breach(tmp_path, monkeypatch):
    fake = tmp_path / "gateway"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    import torch\n    from edge.server import EdgeServer\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert breaches("gateway") == ["gateway/bad.py:2 imports torch", "gateway/bad.py:3 imports edge.server"]
