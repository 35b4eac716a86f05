"""`rtrt export` on the tiny bundle: ONNX graphs, parity reports, int8 variants, the node walk, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from rtrt.export.cli import main
from rtrt.export.onnx_export import FORBIDDEN_OPS, freeze_rope, graph_info, tensorrt_problems
from rtrt.export.parity import TOLERANCES, parity_images, rank_classes, topk_agreement
from rtrt.runtime import load_bundle
from rtrt.runtime.graphs import AdapterGraph, DetectorGraph
from rtrt.runtime.names import ADAPTER, DETECTOR
from rtrt.runtime.trt_engine import tensorrt_status
from rtrt.runtime.vfm import load_vfm
from fixtures.tiny_bundle import exported_tiny_bundle, exported_tiny_bundle_int8, make_tiny_bundle


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The tiny bundle after `rtrt export` (fp32 graphs; shared with test_backends.py)."""
    return exported_tiny_bundle(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def exported_int8(tmp_path_factory) -> Path:
    """A copy after `rtrt export --precision int8`: only the int8 tests depend on it."""
    return exported_tiny_bundle_int8(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def refs(exported):
    b = load_bundle(exported)
    det = DetectorGraph(load_vfm(b.manifest.vfm, b.resolve_ref), b.detector()).eval()
    return b, det, AdapterGraph(b.adapter()).eval(), b.class_embeddings().weight.detach()


def _session(bundle_dir: Path, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundle_dir / name), providers=["CPUExecutionProvider"])


def test_export_writes_graphs_and_parity_reports(exported: Path):
    b = load_bundle(exported)  # every hash verifies, including the new files
    for f in ("detector.onnx", "adapter.onnx"):
        assert b.has(f)
    onnx_meta = b.manifest.exports.onnx
    assert onnx_meta.image_size == 64 and onnx_meta.opset >= 18
    graphs = onnx_meta.graphs
    for name in ("detector", "adapter"):
        assert graphs[name].parity["passed"], graphs[name].parity["failures"]
        assert graphs[name].problems == []
        # A parity report is a fact about one machine: it says which.
        machine = graphs[name].parity["machine"]
        assert machine["cpu"] and machine["arch"] and isinstance(machine["isa"], list) and machine["onnxruntime"]
    assert max(graphs["detector"].parity["max_abs_error"].values()) <= 1e-4
    assert graphs["detector"].parity["topk_agreement"] == 1.0
    assert graphs["detector"].inputs["pixel_values"] == ["batch", 3, 64, 64]
    assert graphs["adapter"].inputs["visual_tokens"] == ["batch", "num_tokens", 64]
    assert graphs["adapter"].inputs["class_embeddings"] == ["num_classes", 64]


@pytest.mark.parametrize("batch,classes", [(1, 1), (2, 8), (3, 5)])
def test_ort_detector_matches_torch(exported, refs, batch, classes):
    b, det, _, w = refs
    px, _ = parity_images(batch, 64, b.manifest.vfm.mean, b.manifest.vfm.std, seed=batch)
    ww = w[:classes].numpy()
    got = _session(exported, "detector.onnx").run(None, {"pixel_values": px, "class_embeddings": ww})
    with torch.inference_mode():
        want = det(torch.from_numpy(px), torch.from_numpy(ww))
    for name, g, t in zip(DETECTOR.outputs, got, want):
        assert g.shape == tuple(t.shape), name
        assert np.abs(g - t.numpy()).max() <= 1e-4, name


@pytest.mark.parametrize("batch,tokens,classes", [(1, 1, 1), (2, 17, 8), (3, 576, 3)])
def test_ort_adapter_matches_torch(exported, refs, batch, tokens, classes):
    _, _, adapter, w = refs
    g = torch.Generator().manual_seed(tokens)
    v = torch.randn(batch, tokens, 64, generator=g)
    ww = w[:classes]
    (got,) = _session(exported, "adapter.onnx").run(None, {"visual_tokens": v.numpy(), "class_embeddings": ww.numpy()})
    with torch.inference_mode():
        want = adapter(v, ww)
    assert not torch.allclose(want, v)  # the tiny adapter is not the identity
    assert np.abs(got - want.numpy()).max() <= 1e-4


@pytest.mark.parametrize("slot_value", [False, True])
def test_adapter_with_null_slot_exports_with_dynamic_shapes(tmp_path, slot_value):
    """The null slot (a zero-value key beside W's rows, or a learned value with ``slot_value``) keeps
    B, N and C dynamic and TensorRT-friendly."""
    from rtrt.export.onnx_export import export_adapter
    from rtrt.runtime.modules import CrossAttentionAdapter

    torch.manual_seed(0)
    ad = CrossAttentionAdapter(64, 32, 4, null_slot=True, slot_value=slot_value).eval()
    with torch.no_grad():
        ad.gate.fill_(0.7)
        ad.null_key.normal_()
        if slot_value:
            ad.null_value.normal_()
    path = export_adapter(ad, tmp_path / "adapter.onnx")
    assert tensorrt_problems(path) == []
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, tokens, classes in [(1, 1, 1), (2, 17, 8), (3, 40, 3)]:
        v, w = torch.randn(batch, tokens, 64), torch.randn(classes, 64)
        (got,) = sess.run(None, {"visual_tokens": v.numpy(), "class_embeddings": w.numpy()})
        with torch.inference_mode():
            want = AdapterGraph(ad)(v, w)
        assert not torch.allclose(want, v) and np.abs(got - want.numpy()).max() <= 1e-4


def test_int8_export_writes_graphs_and_parity_reports(exported_int8: Path):
    b = load_bundle(exported_int8)
    graphs = b.manifest.exports.graphs
    for name in ("detector", "adapter", "detector.int8", "adapter.int8"):
        assert b.has(graphs[name].file)
        assert graphs[name].parity["passed"], graphs[name].parity["failures"]
        assert graphs[name].problems == []


def test_int8_top5_agreement(exported_int8, refs):
    """int8 (ORT dynamic) vs PyTorch fp32 on 8 synthetic road scenes; the figure is printed and bounded."""
    b, det, _, w = refs
    px, _ = parity_images(8, 64, b.manifest.vfm.mean, b.manifest.vfm.std, seed=7)
    got = _session(exported_int8, "detector.int8.onnx").run(None, {"pixel_values": px, "class_embeddings": w.numpy()})
    with torch.inference_mode():
        ref_scores = det(torch.from_numpy(px), w)[0].numpy()
    agree = topk_agreement(ref_scores, rank_classes(got[0]), k=5).mean()
    print(f"int8 top-5 agreement with fp32 PyTorch on the tiny bundle: {agree:.1%}; max score error {np.abs(got[0] - ref_scores).max():.2e}")
    assert agree >= TOLERANCES["int8"].topk_agreement
    recorded = load_bundle(exported_int8).manifest.exports.graph("detector.int8").parity
    assert recorded["topk_agreement"] >= TOLERANCES["int8"].topk_agreement


def test_node_walk_finds_no_trap(exported):
    for name in ("detector.onnx", "adapter.onnx"):
        model = onnx.load(str(exported / name))
        ops = {n.op_type for n in model.graph.node}
        assert not ops & FORBIDDEN_OPS, (name, ops & FORBIDDEN_OPS)
        assert "TopK" not in ops  # sorting is a rank computation, see rtrt.runtime.graphs
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        assert not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute)
        assert tensorrt_problems(model) == []
    info = graph_info(exported / "detector.onnx")
    assert info.op_counts["MatMul"] > 0 and info.problems == []


def test_node_walk_flags_traps():
    """A hand-built graph with the constructs TensorRT rejects: each is reported."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Cast", ["s"], ["c"], to=TensorProto.BOOL),
        helper.make_node("If", ["c"], ["i"], then_branch=then_g, else_branch=then_g),
        helper.make_node("Shape", ["x"], ["k"]),
        helper.make_node("TopK", ["i", "k"], ["tv", "ti"]),
        helper.make_node("Cast", ["tv"], ["d"], to=TensorProto.DOUBLE),
        helper.make_node("NonZero", ["x"], ["nz"]),
        helper.make_node("SequenceConstruct", ["x"], ["seq"]),
        helper.make_node("Identity", ["tv"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "traps", [x], [y]))
    problems = "\n".join(tensorrt_problems(model))
    for needle in ("If", "subgraph", "K is computed", "float64", "NonZero", "SequenceConstruct"):
        assert needle in problems, needle


def test_freeze_rope_keeps_numbers(exported):
    b = load_bundle(exported)
    vfm = load_vfm(b.manifest.vfm, b.resolve_ref)
    x = torch.from_numpy(parity_images(2, 64, b.manifest.vfm.mean, b.manifest.vfm.std)[0])
    with torch.inference_mode():
        before = vfm(x)
    assert freeze_rope(vfm, 64, 16) == 1
    assert type(vfm.model.rope).__name__ == "_FrozenTimmRope"
    with torch.inference_mode():
        assert torch.equal(vfm(x), before)


def test_detector_graph_has_no_integer_outputs(exported):
    """The class ranking is the runtime's job: the graph returns float scores and the map only."""
    import onnx

    model = onnx.load(str(exported / "detector.onnx"))
    assert [o.name for o in model.graph.output] == list(DETECTOR.outputs) == ["scores", "similarity"]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)


def test_rank_classes_ties_and_order():
    s = np.array([[0.1, 0.5, 0.5, -1.0, 0.3]])
    assert rank_classes(s).tolist() == [[1, 2, 4, 0, 3]]


def test_parity_failure_writes_nothing(tmp_path, capsys):
    path = make_tiny_bundle(tmp_path / "b", d_llm=32, with_detector=False)
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    # A zero tolerance cannot be met by any float graph: the export must refuse and write nothing.
    assert main(["--bundle", str(path), "--tolerance", "0"]) == 2
    assert "parity outside tolerance" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    assert after == before
    assert not list(path.rglob("*.onnx")) and not list(tmp_path.glob(".*"))


@pytest.mark.skipif(tensorrt_status() is None, reason="TensorRT and a GPU are present; the refusal cannot be shown")
def test_trt_backend_refused_up_front(tmp_path, capsys):
    path = make_tiny_bundle(tmp_path / "b", d_llm=32)
    manifest = (path / "manifest.json").read_bytes()
    assert main(["--bundle", str(path), "--backend", "trt"]) == 2
    assert tensorrt_status() in capsys.readouterr().err
    assert (path / "manifest.json").read_bytes() == manifest


def test_json_output_is_what_the_manifest_holds(tmp_path, capsys):
    path = make_tiny_bundle(tmp_path / "b", d_llm=32, with_detector=False)
    assert main(["--bundle", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["onnx"]["graphs"]) == {"adapter"}
    assert load_bundle(path).manifest.exports.to_dict()["onnx"] == out["onnx"]
    assert out["onnx"]["graphs"]["adapter"]["outputs"][ADAPTER.outputs[0]] == ["batch", "num_tokens", 32]
