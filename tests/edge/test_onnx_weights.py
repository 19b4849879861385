"""Weights beside the graph: what a small LM past protobuf's 2 GiB is built as, checked on small graphs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge import onnx_weights
from edge.artefacts import built_fingerprint
from edge.lm_export import build_small_lm, load_torch_model, torch_greedy
from edge.runtime.generation import SmallLM
from edge.runtime.model_dir import INT8_MODEL_DATA_FILE, INT8_MODEL_FILE, META_FILE, MODEL_DATA_FILE, MODEL_FILE
from tests.edge.test_lm_families import PROMPTS
from tests.support.memory import peak_growth_mib


def two_matmuls(path: Path) -> np.ndarray:
    """y = (x @ A) @ B with 64x64 constants, saved the way torch's exporter saves a large model:
    one file per tensor beside the graph. Returns y for x = ones."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    return np.ones((1, 64), np.float32) @ a @ b


def run(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ones((1, 64), np.float32)})[0]


def test_weights_written_one_file_per_tensor_are_gathered_into_one(tmp_path: Path) -> None:
    expected = two_matmuls(tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "B", "model.onnx"]
    assert onnx_weights.store_beside(tmp_path / "model.onnx", "model.onnx.data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert onnx_weights.has_external_weights(onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph)
    np.testing.assert_allclose(run(tmp_path / "model.onnx"), expected, rtol=1e-5)


def test_a_small_graph_keeps_its_weights_inline(tmp_path: Path) -> None:
    expected = two_matmuls(tmp_path / "scattered.onnx")
    onnx.save_model(onnx.load(str(tmp_path / "scattered.onnx")), str(tmp_path / "model.onnx"))  # inline
    assert not onnx_weights.has_external_weights(onnx.load(str(tmp_path / "model.onnx")).graph)
    assert not onnx_weights.store_beside(tmp_path / "model.onnx", "model.onnx.data")
    assert onnx_weights.store_beside(tmp_path / "model.onnx", "model.onnx.data", min_bytes=0)
    np.testing.assert_allclose(run(tmp_path / "model.onnx"), expected, rtol=1e-5)


def test_large_tensors_start_on_a_mapping_boundary_and_regathering_keeps_the_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    small, large = rng.standard_normal((1, 300)).astype(np.float32), rng.standard_normal((300, 1024)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "S"], ["h"]), helper.make_node("MatMul", ["h", "L"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
        [numpy_helper.from_array(small, "S"), numpy_helper.from_array(large, "L")])
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    expected = (np.ones((1, 300), np.float32) + small) @ large
    for _ in range(2):  # inline into the file, then from that file into a new one of the same name
        assert onnx_weights.store_beside(path, "model.onnx.data", min_bytes=0)
        stored = {t.name: {e.key: int(e.value) for e in t.external_data if e.key != "location"}
                  for t in onnx.load(str(path), load_external_data=False).graph.initializer}
        assert stored["S"] == {"offset": 0, "length": small.nbytes}
        assert stored["L"]["offset"] % onnx_weights.ALIGNMENT == 0 and stored["L"]["length"] == large.nbytes
        assert (tmp_path / "model.onnx.data").stat().st_size == stored["L"]["offset"] + large.nbytes
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"x": np.ones((1, 300), np.float32)})[0], expected, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_gathering_streams_the_weights_instead_of_loading_them(tmp_path: Path) -> None:
    """The build holds the PyTorch model meanwhile: the graph's weights must not be held as well."""
    tensors = [numpy_helper.from_array(np.full((2048, 4096), i, np.float32), f"W{i}") for i in range(8)]  # 256 MiB
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"h{i - 1}", f"W{i}"], [f"h{i}"]) for i in range(8)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2048, 4096])],
                              [helper.make_tensor_value_info("h7", TensorProto.FLOAT, [2048, 4096])], tensors)
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    del tensors, graph
    grown = peak_growth_mib("from edge import onnx_weights; import onnx",
                            "assert onnx_weights.store_beside(Path(sys.argv[1]), 'model.onnx.data')", str(path))
    assert grown < 96, f"peak memory grew {grown:.0f} MiB for 256 MiB of weights"
    weights = onnx.load(str(path)).graph.initializer
    assert [float(numpy_helper.to_array(t)[-1, -1]) for t in weights] == [float(i) for i in range(8)]


@pytest.fixture(scope="module")
def beside_build(tmp_path_factory, small_lm_dir: Path) -> tuple[Path, Path]:
    """The default small LM built as one past protobuf's limit is: every weight beside its graphs
    (its int8 weights pass their gate, so both graphs are built so)."""
    checkpoint = shutil.copytree(small_lm_dir / "checkpoint", tmp_path_factory.mktemp("beside") / "checkpoint")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_weights, "INLINE_MAX_BYTES", 0)
        return checkpoint, build_small_lm(checkpoint.parent / "export", checkpoint=checkpoint)


def test_a_small_lm_with_its_weights_beside_the_graph_generates_as_transformers_does(beside_build) -> None:
    checkpoint, export = beside_build
    meta = json.loads((export / META_FILE).read_text())
    assert MODEL_DATA_FILE in meta["files"]
    assert (export / MODEL_FILE).stat().st_size < (export / MODEL_DATA_FILE).stat().st_size / 10
    assert meta["int8"]["kept"] and {INT8_MODEL_FILE, INT8_MODEL_DATA_FILE} <= set(meta["files"])
    assert all((export / name).stat().st_mode & 0o044 == 0o044 for name in meta["files"])  # onnx writes 0600
    # The files the build lists are the whole of it: a copy of just those serves.
    copy = export.parent / "copy"
    copy.mkdir()
    for name in [MODEL_FILE, META_FILE, *meta["files"]]:
        shutil.copy(export / name, copy / name)
    torch_model, lm = load_torch_model(checkpoint), SmallLM.load(copy)
    for prompt in PROMPTS:
        expected = torch_greedy(torch_model, lm.encode(prompt), 12)  # ends early at an EOS; ours does not stop
        assert lm.greedy_ids(prompt, 12)[: len(expected)] == expected and expected, prompt
    int8 = SmallLM.load(copy, int8=True)
    assert int8.greedy_ids(PROMPTS[0], 12) == SmallLM.load(export, int8=True).greedy_ids(PROMPTS[0], 12)


def test_a_build_missing_its_weights_file_counts_as_not_built(beside_build, tmp_path: Path) -> None:
    _, export = beside_build
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    assert built_fingerprint(copy) is not None
    (copy / MODEL_DATA_FILE).unlink()
    assert built_fingerprint(copy) is None
