"""Our int8 MatMul rewrite against the quantizer it stands in for: ONNX Runtime's `quantize_dynamic`."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.quant_utils import quantize_data

from edge.export import INT8_KEEP_FP32
from edge.int8_matmul import quantize_columns, quantize_matmuls
from edge.runtime.model_dir import MODEL_FILE
from tests.support.memory import peak_growth_mib


def ort_quantized(src: Path, dst: Path, exclude: list[str]) -> onnx.ModelProto:
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                     nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})
    return onnx.load(str(dst))


def nodes(model: onnx.ModelProto) -> Counter:
    return Counter((n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in model.graph.node)


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("which", ["small_lm_dir", "embedding_model_dir"])
def test_the_graph_and_weights_are_quantize_dynamic_s_bit_for_bit(which: str, request, tmp_path: Path) -> None:
    src = request.getfixturevalue(which) / MODEL_FILE
    graph = onnx.load(str(src), load_external_data=False).graph
    exclude = [n.name for n in graph.node if n.op_type == "MatMul" and which == "embedding_model_dir"
               and any(re.search(k, n.name) for k in INT8_KEEP_FP32)]
    quantized = quantize_matmuls(src, tmp_path / "ours.onnx", exclude=exclude)
    ours, theirs = onnx.load(str(tmp_path / "ours.onnx")), ort_quantized(src, tmp_path / "ort.onnx", exclude)
    assert len(quantized) == sum(n.op_type == "MatMulInteger" for n in theirs.graph.node) > 0
    assert nodes(ours) == nodes(theirs)  # the order may differ: ONNX Runtime sorts the graph itself
    mine, reference = arrays(ours), arrays(theirs)
    assert mine.keys() == reference.keys()
    for name, value in reference.items():
        assert mine[name].dtype == value.dtype and np.array_equal(mine[name], value), name
    onnx.checker.check_model(ours)


def test_columns_are_scaled_and_rounded_as_onnx_runtime_does() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 9)).astype(np.float32)
    w[:, 0] = 0  # no range: scale 1
    w[:, 1] = np.abs(w[:, 1])  # one-signed: the range still includes 0
    w[:, 2] = -np.abs(w[:, 2]) * 1e-30  # under float32's smallest normal scale
    w[:5, 3] = np.array([0.5, 1.5, 2.5, -0.5, 127.0], np.float32)  # ties round to even
    w[5:, 3] = 0
    w[:, 4] *= 1e30
    q, scale = quantize_columns(w)
    for i in range(w.shape[1]):
        zero, s, values = quantize_data(w[:, i], TensorProto.INT8, True, reduce_range=False)
        assert int(zero) == 0 and np.float32(s) == scale[i], i
        assert np.array_equal(np.asarray(values, np.int8), q[:, i]), i
    assert scale[0] == 1 and not q[:, 0].any() and q.min() >= -127


def two_layer_graph(path: Path, *, beside: bool) -> tuple[np.ndarray, np.ndarray]:
    """x -> MatMul(W1) -> MatMul(W2) and x -> MatMul(W1) again, W2 also added to the output (so it
    must stay fp32 too), and a MatMul named `keep` left out. Returns (x, fp32 output)."""
    rng = np.random.default_rng(2)
    w1, w2, w3 = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3))
    x = rng.standard_normal((64, 64)).astype(np.float32)  # 64 rows, so that W2 adds to them
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["a"], "first"),
         helper.make_node("MatMul", ["x", "W1"], ["b"], "again"),
         helper.make_node("MatMul", ["a", "W2"], ["c"], "second"),
         helper.make_node("Add", ["c", "W2"], ["d"], "add_w2"),
         helper.make_node("MatMul", ["b", "W3"], ["e"], "keep"),
         helper.make_node("Add", ["d", "e"], ["y"], "sum")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "W1"), (w2, "W2"), (w3, "W3"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=beside, location=f"{path.name}.data", size_threshold=0)
    return x, ((x @ w1) @ w2 + w2) + (x @ w1) @ w3


@pytest.mark.parametrize("beside", [False, True])
def test_shared_weights_quantize_once_and_weights_still_read_stay(tmp_path: Path, beside: bool) -> None:
    x, expected = two_layer_graph(tmp_path / "model.onnx", beside=beside)
    dst = tmp_path / "model.int8.onnx"
    done = quantize_matmuls(tmp_path / "model.onnx", dst, exclude=["keep"],
                            data_name="model.int8.onnx.data" if beside else None)
    assert sorted(done) == ["again", "first", "second"]
    model = onnx.load(str(dst), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["DynamicQuantizeLinear"] == 2 and ops["MatMulInteger"] == 3 and ops["MatMul"] == 1  # x, a
    names = {t.name for t in model.graph.initializer}
    assert {"W1_quantized", "W2_quantized", "W2", "W3"} <= names and "W1" not in names
    assert all(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer
               if t.name.endswith("_quantized") or t.name in ("W2", "W3")) == beside
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()  # int8 error, not a wrong graph
    # quantize_dynamic's graph, but for the Add: it reads W2 dequantized from int8 there, ours the fp32 W2.
    theirs = nodes(ort_quantized(tmp_path / "model.onnx", tmp_path / "ort.onnx", ["keep"]))
    assert theirs - nodes(model) == Counter({("DequantizeLinear", "W2_DequantizeLinear",
                                              ("W2_quantized", "W2_scale", "W2_zero_point"), ("W2",)): 1})
    assert not nodes(model) - theirs


def test_a_graph_with_weights_beside_it_is_quantized_one_weight_at_a_time(tmp_path: Path) -> None:
    """The export holds its PyTorch model meanwhile: the graph's weights must not all be held too."""
    names = [f"W{i}" for i in range(8)]  # 8 x 32 MiB, each read by a MatMul of its own
    tensors = [numpy_helper.from_array(np.full((2048, 4096), i + 1, np.float32), n) for i, n in enumerate(names)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", n], [f"o{i}"], f"mm{i}") for i, n in enumerate(names)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2048])],
        [helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, [1, 4096]) for i in range(8)], tensors)
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    del tensors, graph
    grown = peak_growth_mib("from edge.int8_matmul import quantize_matmuls; import onnx",
                            "src = Path(sys.argv[1])\n"
                            "quantize_matmuls(src, src.with_name('model.int8.onnx'), data_name='model.int8.onnx.data')",
                            str(path))
    assert grown < 192, f"peak memory grew {grown:.0f} MiB for 256 MiB of weights"
    session = ort.InferenceSession(str(tmp_path / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"x": np.ones((1, 2048), np.float32)})
    np.testing.assert_allclose([o[0, 0] for o in outputs], [2048.0 * (i + 1) for i in range(8)], rtol=1e-5)
