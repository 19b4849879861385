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
    # ORT's pool threads spin between ops by default, burning the cores that the event loop and
    # anything else on the box need: all-MiniLM-L6-v2 with 2 threads beside one busy core ran batch 1
    # at 124 embeddings/s spinning vs 162 not (one thread: 153), batch 32 at 189 vs 207 (206); on
    # idle cores spinning gained only 7% / 2%. (With one thread there is no pool to spin.)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings would break our one-JSON-per-line logs
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
