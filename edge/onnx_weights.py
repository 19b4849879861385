"""Where an exported graph keeps its weights: inside the ONNX protobuf, or in one file beside it.

Protobuf caps a message at 2 GiB, so a small LM of more than about 500M fp32 parameters cannot hold
its weights inline. torch's exporter then writes one file per tensor (hundreds, named after the
tensors); the build gathers them into a single `<graph>.data` file, as ONNX Runtime's own tools
write it, so that a model folder stays a handful of files a build can list and an image can copy.
"""

from __future__ import annotations

from pathlib import Path

# Weights past this size go beside the graph even where the exporter kept them inline, well under
# protobuf's limit, which the graph's own nodes and the quantizer's copies also count against.
INLINE_MAX_BYTES = 1 << 30


def has_external_weights(graph) -> bool:
    """Whether any initializer of `graph` (an onnx GraphProto) lives in a file beside it."""
    return any(_is_external(t) for t in graph.initializer)


def store_beside(graph_path: Path, data_name: str, min_bytes: int | None = None) -> bool:
    """Move the weights of the graph at `graph_path` into `data_name` beside it when they are
    external already (one file per tensor) or the graph is at least `min_bytes` (INLINE_MAX_BYTES);
    True if moved."""
    import onnx

    min_bytes = INLINE_MAX_BYTES if min_bytes is None else min_bytes
    shallow = onnx.load(str(graph_path), load_external_data=False)
    scattered = {_location(t) for t in shallow.graph.initializer if _is_external(t)}
    if not scattered and graph_path.stat().st_size < min_bytes:
        return False
    model = onnx.load(str(graph_path))  # every tensor's bytes, wherever they were
    onnx.save_model(model, str(graph_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    for name in scattered - {data_name}:
        (graph_path.parent / name).unlink(missing_ok=True)
    return True


def _is_external(tensor) -> bool:
    import onnx

    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _location(tensor) -> str:
    return next(e.value for e in tensor.external_data if e.key == "location")
