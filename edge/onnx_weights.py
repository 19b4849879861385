"""Where an exported graph keeps its weights: inside the ONNX protobuf, or in one file beside it.

Protobuf caps a message at 2 GiB, so a small LM of more than about 500M fp32 parameters cannot hold
its weights inline. torch's exporter then writes one file per tensor (hundreds, named after the
tensors); the build gathers them into a single `<graph>.data` file, as ONNX Runtime's own tools
write it, so that a model folder stays a handful of files a build can list and an image can copy.

The gathering streams one tensor at a time: the build still holds the PyTorch model it checks the
graph against, so loading every weight of the graph as well would double the build's memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# Weights past this size go beside the graph even where the exporter kept them inline, well under
# protobuf's limit, which the graph's own nodes and the quantizer's copies also count against.
INLINE_MAX_BYTES = 1 << 30
# Tensors smaller than this stay inline (onnx's own default threshold).
MIN_TENSOR_BYTES = 1024
# Large tensors start on a 64 KiB boundary, so ONNX Runtime can map them from the file (onnx's rule).
ALIGN_FROM_BYTES, ALIGNMENT = 1 << 20, 1 << 16
_CHUNK = 64 << 20


def has_external_weights(graph) -> bool:
    """Whether any initializer of `graph` (an onnx GraphProto) lives in a file beside it."""
    return any(is_external(t) for t in graph.initializer)


def store_beside(graph_path: Path, data_name: str, min_bytes: int | None = None) -> bool:
    """Move the weights of the graph at `graph_path` into `data_name` beside it when they are
    external already (one file per tensor) or the graph is at least `min_bytes` (INLINE_MAX_BYTES);
    True if moved."""
    import onnx

    min_bytes = INLINE_MAX_BYTES if min_bytes is None else min_bytes
    model = onnx.load(str(graph_path), load_external_data=False)
    scattered = {_location(t) for t in tensors(model.graph) if is_external(t)}
    if not scattered and graph_path.stat().st_size < min_bytes:
        return False
    folder = graph_path.parent
    with WeightsFile(folder, data_name) as weights:
        for tensor in tensors(model.graph):
            if is_external(tensor):
                weights.copy(tensor, folder)
        # Inline weights: initializers only, as onnx converts them (not Constant nodes' values).
        for tensor in tensors(model.graph, attributes=False):
            if not is_external(tensor):
                weights.take(tensor, folder)
        write_graph(model, graph_path)
    for name in scattered - {data_name}:
        (folder / name).unlink(missing_ok=True)
    return True


class WeightsFile:
    """The one data file beside a graph, written tensor by tensor (each tensor then points at it).

    It is written under a temporary name and takes its own on a clean exit, so reading tensors
    from a file of the same name while writing is safe."""

    def __init__(self, folder: Path, data_name: str) -> None:
        self.folder, self.data_name = folder, data_name
        self._tmp = folder / f".{data_name}.tmp"

    def __enter__(self) -> WeightsFile:
        self._sink = open(self._tmp, "wb")
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self._sink.close()
        if kind is None:
            os.replace(self._tmp, self.folder / self.data_name)
        else:
            self._tmp.unlink(missing_ok=True)

    def copy(self, tensor, folder: Path) -> None:
        """Copy an external tensor's bytes from its file in `folder`, chunk by chunk, and point it here."""
        source, offset, length = _span(tensor, folder)
        start = self._align(length)
        with open(source, "rb") as src:
            src.seek(offset)
            left = length
            while left:
                chunk = src.read(min(left, _CHUNK))
                if not chunk:
                    raise ValueError(f"{source}: {tensor.name} ends {left} bytes early")
                self._sink.write(chunk)
                left -= len(chunk)
        self._point(tensor, start, length)

    def take(self, tensor, folder: Path) -> None:
        """Move `tensor`'s bytes here: from its file in `folder` if it has one, else from inline
        when they are at least MIN_TENSOR_BYTES (smaller ones stay inline)."""
        if is_external(tensor):
            self.copy(tensor, folder)
        elif _inline_bytes(tensor) >= MIN_TENSOR_BYTES:
            self.write(tensor, _inline_raw(tensor))

    def write(self, tensor, raw: bytes) -> None:
        """Write `raw` as `tensor`'s bytes and drop any it holds inline."""
        start = self._align(len(raw))
        self._sink.write(raw)
        for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(name)
        self._point(tensor, start, len(raw))

    def _point(self, tensor, offset: int, length: int) -> None:
        import onnx

        del tensor.external_data[:]
        for key, value in (("location", self.data_name), ("offset", offset), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        tensor.data_location = onnx.TensorProto.EXTERNAL

    def _align(self, length: int) -> int:
        """Pad so that a tensor of `length` bytes starts where onnx would place it; its offset."""
        at = self._sink.tell()
        if length >= ALIGN_FROM_BYTES and at % ALIGNMENT:
            self._sink.write(b"\0" * (ALIGNMENT - at % ALIGNMENT))
        return self._sink.tell()


def read_array(tensor, folder: Path):
    """The values of an initializer, from its file in `folder` if it is external (only it is read)."""
    import numpy as np
    from onnx import helper, numpy_helper

    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    source, offset, length = _span(tensor, folder)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    return np.fromfile(source, dtype=dtype, count=length // dtype.itemsize, offset=offset).reshape(tuple(tensor.dims))


def write_graph(model, path: Path) -> None:
    """Save a graph whose weights are all written already (inline, or in files beside it)."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)


def tensors(graph, attributes: bool = True) -> Iterator:
    """The tensors of `graph`, subgraphs (If, Loop) included: initializers, and with `attributes`
    the values held by nodes' attributes too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attributes and attr.HasField("t"):
                yield attr.t
            if attributes:
                yield from attr.tensors
            if attr.HasField("g"):
                yield from tensors(attr.g, attributes)
            for sub in attr.graphs:
                yield from tensors(sub, attributes)


def _span(tensor, folder: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor's bytes."""
    info = {e.key: e.value for e in tensor.external_data}
    source = folder / info["location"]
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else source.stat().st_size - offset
    return source, offset, length


def _inline_raw(tensor) -> bytes:
    from onnx import numpy_helper

    return tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()


def _inline_bytes(tensor) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    import numpy as np
    from onnx import helper

    if tensor.data_type == 8:  # STRING: no fixed width, never a weight worth moving
        return 0
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def is_external(tensor) -> bool:
    """Whether an onnx TensorProto keeps its bytes in a file."""
    import onnx

    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _location(tensor) -> str:
    return next(e.value for e in tensor.external_data if e.key == "location")
