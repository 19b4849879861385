"""The SDK installs with aioquic alone: importing it loads nothing outside the stdlib and aioquic's tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# aioquic and what it depends on (directly or through its dependencies).
ALLOWED = {"aioquic", "cryptography", "pylsqpack", "certifi", "service_identity", "OpenSSL", "cffi",
           "_cffi_backend", "pycparser", "attr", "attrs", "pyasn1", "pyasn1_modules", "idna", "typing_extensions",
           "mobile"}

PROBE = """
import json, sys
before = set(sys.modules)
import mobile
client = mobile.Client("https://example.invalid", api_key="k", ticket_dir="/tmp/x")
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_import_pulls_only_stdlib_and_aioquic():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    foreign = {m for m in loaded - ALLOWED if m not in sys.stdlib_module_names and not m.startswith("_")}
    assert not foreign, f"mobile imported non-stdlib modules: {sorted(foreign)}"
    assert not loaded & {"edge", "gateway", "onnxruntime", "numpy", "aiohttp", "httpx", "requests", "msgspec"}


def test_sources_import_nothing_of_ours_but_edge_runtime_lazily():
    for path in (ROOT / "mobile").glob("*.py"):
        text = path.read_text()
        for banned in ("import gateway", "from gateway", "from core", "import core", "import kernels",
                       "from deploy", "import msgspec", "import aiohttp"):
            assert banned not in text, f"{path.name}: {banned}"
        assert "from edge" not in text and "import edge" not in text  # only importlib, at first use
