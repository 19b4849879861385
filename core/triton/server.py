"""How to run NVIDIA's tritonserver for a core model repository without a container.

The nvidia-pytriton wheel carries the server binary, the python backend and one backend stub per
Python version. The stub embeds libpython, so it must load this interpreter's own libpython
(LD_LIBRARY_PATH starts with its LIBDIR) and find this virtualenv's packages (PATH starts with its bin).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TritonServerSpec:
    """Where the repository is and what the server binds."""

    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    backend_dir: Path = Path("var/triton/backends")
    exit_timeout_s: int = 2
    log_verbose: int = 0

    @property
    def shm_prefix(self) -> str:
        """The names of this server's python-backend shared-memory regions begin with this. Servers
        that share /dev/shm (several on one machine) must not share it: with the default, one of
        four Tritons started together here died in the backend's setup (boost lock_exception), as
        python_backend's "Running Multiple Instances of Triton Server" warns."""
        return f"meridian_{re.sub(r'[^A-Za-z0-9]', '_', self.host)}_{self.http_port}_"


SHM_DIR = Path("/dev/shm")


def remove_stale_shm_regions(spec: TritonServerSpec, shm_dir: Path = SHM_DIR) -> int:
    """Delete the shared-memory regions a killed server of `spec` left behind (one that exits
    cleanly removes its own; a SIGKILL leaves 1 MB per model instance). Only while none runs."""
    removed = 0
    for region in shm_dir.glob(f"{spec.shm_prefix}*"):
        region.unlink(missing_ok=True)
        removed += 1
    return removed


def pytriton_root() -> Path:
    """The installed pytriton package (holding tritonserver/)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed; it provides the tritonserver binary")
    return Path(list(spec.submodule_search_locations)[0])


def assemble_backend_dir(dest: Path) -> Path:
    """`dest/python/` with libtriton_python.so, triton_python_backend_utils.py and this Python's stub."""
    server = pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"no python backend stub for Python {version} in {stub.parent.parent}")
    target = Path(dest) / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in (server / "backends/python/libtriton_python.so",
                server / "backends/python/triton_python_backend_utils.py", stub):
        out = target / src.name
        if not out.exists() or out.stat().st_size != src.stat().st_size:
            shutil.copy2(src, out)
    return Path(dest)


def tritonserver_command(spec: TritonServerSpec) -> tuple[list[str], dict[str, str]]:
    """argv and environment to run tritonserver for `spec` (assembles the backend dir if needed)."""
    root = pytriton_root()
    backend_dir = assemble_backend_dir(Path(spec.backend_dir).resolve())
    libs = root.parent / "nvidia_pytriton.libs"
    env = dict(os.environ)
    ld_path = [sysconfig.get_config_var("LIBDIR"), str(libs)]
    if env.get("LD_LIBRARY_PATH"):
        ld_path.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(ld_path)
    env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    argv = [
        str(root / "tritonserver/bin/tritonserver"),
        f"--model-repository={Path(spec.repository).resolve()}",
        f"--backend-directory={backend_dir}",
        f"--http-address={spec.host}",
        f"--http-port={spec.http_port}",
        f"--grpc-address={spec.host}",
        f"--grpc-port={spec.grpc_port}",
        f"--metrics-address={spec.host}",
        f"--metrics-port={spec.metrics_port}",
        "--allow-gpu-metrics=false",
        f"--exit-timeout-secs={spec.exit_timeout_s}",
        f"--backend-config=python,shm-region-prefix-name={spec.shm_prefix}",
        "--strict-readiness=true",
        f"--log-verbose={spec.log_verbose}",
        "--log-info=false",
        "--log-warning=false",
    ]
    return argv, env
