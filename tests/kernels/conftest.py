"""Kernel tests: on a machine without CUDA the Triton kernels run in Triton's interpreter on CPU
tensors, so the same tests check them in CI and on the GPU machine."""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton picks the interpreter when a kernel is decorated, so set it before the kernel
    # modules load, and reload them if another test folder loaded them first.
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("kernels.workspace", "kernels.moe_gemv", "kernels.fused_moe", "kernels.router", "kernels.rmsnorm"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

import pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """Where the kernels under test run: CUDA, else the CPU under the interpreter."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible inputs for every test."""
    torch.manual_seed(0)
