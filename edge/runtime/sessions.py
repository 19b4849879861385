"""ONNX Runtime sessions as the edge runs them: CPU, small fixed thread pools, quiet."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def cpu_session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session with small, fixed thread pools: edge boxes share cores with other work."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: ORT's warnings would break our one-JSON-per-line logs
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
