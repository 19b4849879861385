"""Dynamic int8 MatMuls: the graph ONNX Runtime's `quantize_dynamic` writes, written one weight at a time.

For each MatMul whose B is an fp32 initializer, the activation is quantized on the fly
(DynamicQuantizeLinear, one per distinct input) and B is stored as int8 with one symmetric scale
per output column: MatMulInteger, Cast, and a Mul by the product of the two scales, which ONNX
Runtime fuses into one DynamicQuantizeMatMul when it loads the graph. The names, the node order
and the arithmetic of the scales and the rounding are `quantize_dynamic`'s (QInt8, per channel,
MatMulConstBOnly; `tests/edge/test_int8_matmul.py` checks the weights bit for bit against it). One
difference: a weight that another node reads as well stays fp32 for that node, where quantize_dynamic
hands it a copy dequantized from int8 (no graph the edge exports has one).

Why not call it: it holds the fp32 graph several times over while it works (7.3 GB for a 2.4 GB
model), and the export holds its PyTorch model meanwhile. Here only the weight being quantized is in
memory; the others are copied from file to file.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from edge.onnx_weights import WeightsFile, is_external, read_array, write_graph

QMAX = 127  # symmetric int8: [-127, 127], so that zero is exactly 0


def quantize_matmuls(src: Path, dst: Path, *, exclude: Iterable[str] = (), data_name: str | None = None) -> list[str]:
    """Write `src`'s graph to `dst` with int8 MatMul weights; names the MatMuls quantized.

    With `data_name`, every weight of `dst` goes into that file beside it (for graphs past protobuf's
    limit); without, `dst` holds its weights inline."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    graph, folder = model.graph, src.parent
    initializers = {t.name: t for t in graph.initializer}
    excluded = set(exclude)
    chosen = [n for n in graph.node if n.op_type == "MatMul" and n.name not in excluded
              and _is_fp32_matrix(initializers.get(n.input[1]))]
    chosen_ids = {id(n) for n in chosen}
    weights = [t.name for t in graph.initializer if t.name in {n.input[1] for n in chosen}]
    still_used = _names_read(graph, skip=chosen_ids)

    nodes = _rewritten(graph, chosen_ids)
    kept = [t for t in graph.initializer if t.name not in weights or t.name in still_used]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)

    out = []
    with WeightsFile(dst.parent, data_name) if data_name else nullcontext() as beside:
        for name in weights:  # first: a weight kept as well is pointed at dst's file below
            q, scale, zero = _quantize(initializers[name], folder)
            if beside is not None:
                beside.write(q, q.raw_data)
            out += [q, scale, zero]
        for tensor in kept:
            if beside is not None:
                beside.take(tensor, folder)
            elif is_external(tensor):
                raise ValueError(f"{src}: {tensor.name} is stored beside the graph; name a data file for {dst}")
            out.append(tensor)
        graph.initializer.extend(out)
        model.producer_name = "onnx.quantize"
        write_graph(model, dst)
    return [n.name for n in chosen]


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, fp32 scale per column) of a [K, N] fp32 matrix, as ONNX Runtime computes them
    (`quant_utils.quantize_data`, symmetric, range [-127, 127], zero points 0)."""
    rmin = np.minimum(w.min(axis=0), np.float32(0))
    rmax = np.maximum(w.max(axis=0), np.float32(0))
    absmax = np.maximum(np.abs(rmin), np.abs(rmax))
    wide = (absmax.astype(np.float64) + absmax.astype(np.float64)) / np.float64(2 * QMAX)
    scale = np.where(wide < np.finfo(np.float32).tiny, np.float32(1), wide.astype(np.float32)).astype(np.float32)
    q = np.divide(w, scale)  # one temporary the size of w, rounded and clipped in place
    np.round(q, out=q)
    np.clip(q, -QMAX - 1, QMAX, out=q)
    return q.astype(np.int8), scale


def _is_fp32_matrix(tensor) -> bool:
    import onnx

    return tensor is not None and tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) == 2


def _activation_names(x: str) -> list[str]:
    return [f"{x}_quantized", f"{x}_scale", f"{x}_zero_point"]


def _rewritten(graph, chosen: set[int]) -> list:
    """`graph`'s nodes with each chosen MatMul replaced by its int8 form."""
    from onnx import helper

    nodes, activations = [], set()
    for node in graph.node:
        if id(node) not in chosen:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in activations:  # one quantization per activation, shared by the MatMuls reading it
            activations.add(x)
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], _activation_names(x), f"{x}_QuantizeLinear"))
        nodes.extend(_int8_matmul(node))
    return nodes


def _int8_matmul(node) -> list:
    """MatMulInteger, Cast and the two Muls that replace one MatMul (quantize_dynamic's names)."""
    from onnx import TensorProto, helper

    x, w = node.input
    xq, x_scale, x_zp = _activation_names(x)
    name = f"{node.name}_quant" if node.name else ""
    product = f"{node.output[0]}_output_quantized"
    cast = f"{product}_cast_output"
    scales = f"{name}_scales_mul" if name else f"{x_scale}_{w}_scale_mul"
    return [
        helper.make_node("MatMulInteger", [xq, f"{w}_quantized", x_zp, f"{w}_zero_point"], [product], name),
        helper.make_node("Cast", [product], [cast], f"{product}_cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [x_scale, f"{w}_scale"], [f"{scales}:0"], scales),
        helper.make_node("Mul", [cast, f"{scales}:0"], [node.output[0]], f"{name}_output_scale_mul" if name else ""),
    ]


def _quantize(tensor, folder: Path) -> tuple:
    """The int8 weights, scales and zero points that replace one fp32 initializer."""
    from onnx import numpy_helper

    q, scale = quantize_columns(read_array(tensor, folder))
    return (numpy_helper.from_array(q, f"{tensor.name}_quantized"),
            numpy_helper.from_array(scale, f"{tensor.name}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{tensor.name}_zero_point"))


def _names_read(graph, skip: set[int]) -> set[str]:
    """Every name a node of `graph` (outside `skip`, subgraphs included) reads, and the graph's outputs."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        if id(node) not in skip:
            names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _names_read(sub, skip)
    return names
