"""GPU kernels in the Triton language, behind a dispatcher: the kernels on CUDA, the PyTorch
references (`kernels.reference`) elsewhere. Model code calls only these functions."""

from kernels.dispatch import fused_moe, rms_norm, route

__all__ = ["fused_moe", "rms_norm", "route"]
