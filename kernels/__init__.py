"""GPU kernels in the Triton language, behind a dispatcher: the kernels on CUDA, the PyTorch
references (`kernels.reference`) elsewhere. Model code calls only these functions."""

import importlib

# The kernel modules load before the public names are bound: `kernels.fused_moe` is both a module
# and the dispatcher's function, and a submodule's first import would otherwise overwrite the
# function with the module. Reach a module with importlib.import_module("kernels.fused_moe").
try:
    for _name in ("fused_moe", "router", "rmsnorm"):
        importlib.import_module(f"kernels.{_name}")
except ImportError:  # no triton on this platform: the references serve every call
    pass

from kernels.dispatch import fused_moe, rms_norm, route

__all__ = ["fused_moe", "rms_norm", "route"]
