"""TensorRT: profiles, the TensorRT 10/11 builder's control flow, fp16 graphs, and real engines.

Kinds of tests:
- pure functions (profiles from the bundle's layout, the fp16 graph conversion run in ONNX
  Runtime CPU, the ORT TensorRT EP's options), run everywhere;
- ``EngineBuilder`` against a fake ``tensorrt`` module of version 10 or 11: these prove CONTROL
  FLOW ONLY (which network flags, builder flags and source graphs the code asks for, that every
  parser error is reported, the timing cache wiring); they prove nothing about TensorRT itself;
- real engines built from the exported tiny bundle and compared with PyTorch and ORT: skipped with
  the reason "TensorRT not installed" or "no CUDA GPU" where those are missing, run where both are
  (``rtrt check --bundle B --backend trt`` covers the same on a deployment machine).
"""
from __future__ import annotations

import shutil
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import rtrt.runtime.trt_build as tb
from rtrt.export.fp16 import FP32_OPS, convert_to_fp16
from rtrt.export.parity import TOLERANCES, parity_images, torch_runner
from rtrt.runtime import load_bundle
from rtrt.runtime.errors import EngineBuildError
from rtrt.runtime.names import ADAPTER, DETECTOR
from rtrt.runtime.trt_build import float16_kinds
from rtrt.runtime.trt_engine import tensorrt_status
from fixtures.tiny_bundle import exported_tiny_bundle

TRT_REASON = tensorrt_status()
requires_trt = pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return exported_tiny_bundle(tmp_path_factory.getbasetemp())


# --- profiles ---


def test_dim_ranges_per_graph_from_the_layout():
    r = tb.dim_ranges({"family": "llava", "image_token_id": 3, "tokens_per_image": 196}, 32, max_batch=4)
    assert r["adapter"] == {"batch": (1, 1, 1), "num_tokens": (196, 196, 784), "num_classes": (1, 32, 32)}
    assert r["detector"] == {"batch": (1, 1, 4), "num_classes": (1, 32, 32)}
    assert tb.dim_ranges(None, 8, 2, family="qwen2_5_vl")["adapter"]["num_tokens"] == (4, 1196, 2 * 16384)
    assert tb.dim_ranges({"family": "internvl"}, 8, 1)["adapter"]["num_tokens"] == (256, 2304, 3328)


def test_profile_from_onnx_dynamic_axes(exported):
    """Dims come from the exported ONNX's inputs (symbols where dynamic), ranges from the layout."""
    graphs = load_bundle(exported).manifest.exports.graphs
    ranges = tb.dim_ranges({"family": "qwen2_5_vl"}, 8, max_batch=2)
    det = tb.derive_profile(graphs["detector"].inputs, DETECTOR, ranges["detector"])
    assert det == {"pixel_values": ((1, 3, 64, 64), (1, 3, 64, 64), (2, 3, 64, 64)), "class_embeddings": ((1, 64), (8, 64), (8, 64))}
    ad = tb.derive_profile(graphs["adapter"].inputs, ADAPTER, ranges["adapter"])
    assert ad["visual_tokens"] == ((1, 4, 64), (1, 1196, 64), (1, 2 * 16384, 64))
    # TensorRT reports dynamic dims as -1: the symbol comes from rtrt.runtime.names.
    assert tb.derive_profile({"visual_tokens": [-1, -1, 64], "class_embeddings": [-1, 64]}, ADAPTER, ranges["adapter"]) == ad
    with pytest.raises(EngineBuildError, match="no range"):
        tb.derive_profile({"x": [-1, 3]}, ADAPTER, ranges["adapter"])


# --- small ONNX graphs the fake builder reads (precision checks look into the file) ---


def _matmul_graph(path: Path) -> Path:
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    g = helper.make_graph(
        [helper.make_node("MatMul", ["visual_tokens", "w"], ["refined_tokens"])], "g",
        [helper.make_tensor_value_info("visual_tokens", TensorProto.FLOAT, ["batch", "num_tokens", 4])],
        [helper.make_tensor_value_info("refined_tokens", TensorProto.FLOAT, ["batch", "num_tokens", 4])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _qdq_graph(path: Path) -> Path:
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.05])
    z = helper.make_tensor("z", TensorProto.INT8, [], [0])
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["visual_tokens", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["refined_tokens"])], "g",
        [helper.make_tensor_value_info("visual_tokens", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("refined_tokens", TensorProto.FLOAT, [1, 4])], [s, z])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    fp32 = _matmul_graph(root / "adapter.onnx")
    return {"fp32": fp32, "fp16": convert_to_fp16(fp32, root / "adapter.fp16.onnx"), "qdq": _qdq_graph(root / "adapter.qdq.onnx")}


def test_float16_kinds(graphs):
    assert float16_kinds(graphs["fp32"]) == set()
    assert float16_kinds(graphs["fp16"]) == {"fp16"}
    assert float16_kinds(graphs["qdq"]) == {"qdq"}


# --- EngineBuilder against a fake tensorrt (CONTROL FLOW ONLY; see the module docstring) ---


def _fake_trt(*, version="10.9.0", parse_ok=True, fast_fp16=True, inputs=(("visual_tokens", (-1, -1, 64)), ("class_embeddings", (-1, 64)))):
    """A stand-in ``tensorrt`` module: TensorRT 11's lacks the precision flags and platform queries it removed."""
    eleven = int(version.split(".")[0]) >= 11
    rec = types.SimpleNamespace(flags=set(), cleared=set(), shapes={}, timing_in=None, built=0, network_flags=None)

    class Err:
        def __init__(self, i):
            self.i = i

        def code(self):
            return 8

        def desc(self):
            return f"unsupported thing {self.i}"

        def node(self):
            return self.i

        def node_name(self):
            return f"/n{self.i}"

        def node_operator(self):
            return "If"

    class Net:
        num_inputs = len(inputs)

        def get_input(self, i):
            return types.SimpleNamespace(name=inputs[i][0], shape=inputs[i][1])

    class Parser:
        def __init__(self, net, logger):
            self.num_errors = 0 if parse_ok else 3

        def parse_from_file(self, path):
            return parse_ok

        def get_error(self, i):
            return Err(i)

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            rec.shapes[name] = (lo, opt, hi)

    class Cache:
        def serialize(self):
            return b"timing-v2"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            rec.workspace = size

        def set_flag(self, f):
            rec.flags.add(f)

        def clear_flag(self, f):
            rec.cleared.add(f)

        def add_optimization_profile(self, p):
            rec.profiles = getattr(rec, "profiles", 0) + 1

        def create_timing_cache(self, blob):
            rec.timing_in = blob
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return Cache()

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            rec.network_flags = flags
            return Net()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, net, config):
            rec.built += 1
            return b"ENGINE"

    if not eleven:
        Builder.platform_has_fast_fp16 = fast_fp16
        Builder.platform_has_fast_int8 = True

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level):
            pass

    flags = {"TF32": "TF32"} if eleven else {"FP16": "FP16", "INT8": "INT8", "TF32": "TF32"}
    trt = types.SimpleNamespace(
        __version__=version,
        Logger=Logger,
        Builder=Builder,
        OnnxParser=Parser,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
        BuilderFlag=types.SimpleNamespace(**flags),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=5 if eleven else 1),
    )
    return trt, rec


PROFILE = {"visual_tokens": ((1, 4, 64), (1, 256, 64), (1, 16384, 64)), "class_embeddings": ((1, 64), (8, 64), (8, 64))}


def _build(monkeypatch, path, precision, **fake):
    trt, rec = _fake_trt(**fake)
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    out = tb.EngineBuilder(log=lambda m: None).build(path, PROFILE, precision)
    return out, rec


def test_builder_reports_every_parser_error(monkeypatch, graphs):
    """Control flow only: every parser error reaches the log and the one-line error."""
    trt, _ = _fake_trt(parse_ok=False)
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    lines = []
    with pytest.raises(EngineBuildError) as e:
        tb.EngineBuilder(log=lines.append).build(graphs["fp32"], PROFILE, "fp16")
    assert "3 error(s)" in str(e.value) and "\n" not in str(e.value)
    for i in range(3):
        assert f"unsupported thing {i}" in str(e.value) and f"name=/n{i}" in str(e.value)
    assert len(lines) == 3


def test_trt10_sets_precision_flags_and_is_weakly_typed(monkeypatch, graphs, tmp_path):
    """Control flow only: TensorRT 10 gets create_network(0), FP16 / FP16+INT8 flags, TF32 cleared for fp32."""
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"timing-v1")
    trt, rec = _fake_trt()
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    out = tb.EngineBuilder(timing_cache=cache, log=lambda m: None).build(graphs["fp32"], PROFILE, "fp16")
    assert out == b"ENGINE" and rec.flags == {"FP16"} and rec.network_flags == 0 and rec.profiles == 1
    assert rec.shapes == PROFILE
    assert rec.timing_in == b"timing-v1" and cache.read_bytes() == b"timing-v2"

    _, rec = _build(monkeypatch, graphs["fp32"], "fp32")
    assert rec.flags == set() and rec.cleared == {"TF32"} and rec.network_flags == 0

    with pytest.warns(RuntimeWarning, match="no fast fp16"):
        _, rec = _build(monkeypatch, graphs["qdq"], "int8", fast_fp16=False)
    assert rec.flags == {"FP16", "INT8"} and rec.network_flags == 0

    with pytest.raises(EngineBuildError, match="Q/DQ"):  # int8 needs the Q/DQ graph on every version
        _build(monkeypatch, graphs["fp32"], "int8")


def test_trt11_is_strongly_typed_without_precision_flags(monkeypatch, graphs):
    """Control flow only: TensorRT 11 gets create_network(1 << STRONGLY_TYPED) and no precision flag
    (its fake BuilderFlag has no FP16/INT8, so asking for one would raise), TF32 cleared for fp32."""
    strongly = 1 << 5
    _, rec = _build(monkeypatch, graphs["fp16"], "fp16", version="11.4.1")
    assert rec.flags == set() and rec.cleared == set() and rec.network_flags == strongly and rec.built == 1
    _, rec = _build(monkeypatch, graphs["qdq"], "int8", version="11.4.1")
    assert rec.flags == set() and rec.network_flags == strongly
    _, rec = _build(monkeypatch, graphs["fp32"], "fp32", version="11.4.1")
    assert rec.flags == set() and rec.cleared == {"TF32"} and rec.network_flags == strongly


def test_trt11_refuses_fp16_from_an_fp32_graph(monkeypatch, graphs):
    """Control flow only: strongly typed TensorRT cannot make fp16 out of an fp32 graph; one line, before building."""
    trt, rec = _fake_trt(version="11.0.0")
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    with pytest.raises(EngineBuildError, match="strongly typed") as e:
        tb.EngineBuilder(log=lambda m: None).build(graphs["fp32"], PROFILE, "fp16")
    assert "\n" not in str(e.value) and "adapter.onnx" in str(e.value) and rec.built == 0


def test_source_graph_by_version():
    """Control flow only: which exported graph each TensorRT builds a precision from."""
    ten, eleven = _fake_trt()[0], _fake_trt(version="11.1.0")[0]
    assert [tb.source_graph("adapter", p, ten) for p in ("fp32", "fp16", "int8")] == ["adapter", "adapter", "adapter.qdq"]
    assert [tb.source_graph("adapter", p, eleven) for p in ("fp32", "fp16", "int8")] == ["adapter", "adapter.fp16", "adapter.qdq"]
    with pytest.raises(EngineBuildError, match="too old"):
        tb.source_graph("adapter", "fp16", _fake_trt(version="8.6.1")[0])


def test_builder_refuses_profile_for_other_inputs(monkeypatch, graphs):
    trt, _ = _fake_trt(inputs=(("pixel_values", (-1, 3, 64, 64)),))
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    with pytest.raises(EngineBuildError, match="do not match"):
        tb.EngineBuilder(log=lambda m: None).build(graphs["fp32"], PROFILE, "fp16")


# --- fp16 graphs (what TensorRT >= 11 builds fp16 engines from), run in ONNX Runtime CPU ---


@pytest.mark.parametrize("graph", ["detector", "adapter"])
def test_fp16_graph_runs_in_ort_close_to_fp32(exported, tmp_path, graph):
    import onnxruntime as ort

    b = load_bundle(exported)
    src = b.path(b.manifest.exports.graph(graph).file)
    dst = convert_to_fp16(src, tmp_path / f"{graph}.fp16.onnx")
    model = onnx.load(str(dst))
    onnx.checker.check_model(model)
    io = [*model.graph.input, *model.graph.output]
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in io)  # the backends feed fp32
    assert float16_kinds(dst) == {"fp16"}
    # The ops kept in fp32 read fp32 tensors (the converter puts Casts in front of them).
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types_ = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input)}
    types_.update({t.name: t.data_type for t in inferred.initializer})
    kept = [n for n in inferred.node if n.op_type in FP32_OPS]
    assert kept, "the tiny graphs have LayerNormalization/Softmax/ReduceL2"
    for n in kept:
        assert types_.get(n.input[0]) == TensorProto.FLOAT and TensorProto.FLOAT16 not in {types_.get(i) for i in n.input}, n.name
    half = [n for n in inferred.node if n.op_type == "MatMul" and types_.get(n.input[0]) == TensorProto.FLOAT16]
    assert half, "the matmuls run in fp16"

    rng = np.random.default_rng(0)
    w = b.class_embeddings().weight.detach().numpy()
    if graph == "detector":
        m = b.manifest.vfm
        feeds = {"pixel_values": parity_images(2, 64, m.mean, m.std, seed=3)[0], "class_embeddings": w}
    else:
        feeds = {"visual_tokens": (rng.standard_normal((1, 37, w.shape[1])) * w.std()).astype(np.float32), "class_embeddings": w}
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    tol = TOLERANCES["fp16"]
    for a, h in zip(run(src), run(dst)):
        assert h.dtype == np.float32 and h.shape == a.shape
        assert np.all(np.abs(h - a) <= tol.atol + tol.rtol * np.abs(a))
        assert np.abs(h - a).max() > 0  # it did compute in fp16


def test_export_fp16_for_trt_writes_checks_and_builds_from_the_fp16_graph(exported, tmp_path, monkeypatch):
    """Control flow only (a fake TensorRT 11, no GPU): ``rtrt export --backend trt --precision fp16``
    converts each graph to fp16, checks it in ORT CPU, and hands the builder ``<graph>.fp16.onnx``
    with that graph's ranges. The builder stand-in stops the export there."""
    import rtrt.export.exporter as cli
    import rtrt.runtime.trt_engine as te

    path = tmp_path / "b"
    shutil.copytree(exported, path)
    trt11 = _fake_trt(version="11.4.1")[0]
    monkeypatch.setattr(te, "tensorrt_status", lambda: None)
    monkeypatch.setattr(cli, "source_graph", lambda g, p: tb.source_graph(g, p, trt11))
    seen = []

    class Stop(Exception):
        pass

    def fake_build(onnx_path, graph, precision, input_dims, ranges, **kw):
        seen.append((Path(onnx_path).name, graph, precision, dict(ranges), float16_kinds(onnx_path)))
        raise Stop

    monkeypatch.setattr(cli, "build_engine", fake_build)
    logs = []
    with pytest.raises(Stop):
        cli.export_bundle(path, backend="trt", precision="fp16", max_batch=2, log=logs.append)
    name, graph, precision, ranges, kinds = seen[0]
    assert (name, graph, precision, kinds) == ("detector.fp16.onnx", "detector", "fp16", {"fp16"})
    assert ranges == {"batch": (1, 1, 2), "num_classes": (1, 8, 8)}
    assert any(line.strip().startswith("detector.fp16.onnx:") for line in logs)
    assert any(line.strip().startswith("detector fp16:") and line.endswith("ok") for line in logs), logs


# --- ONNX Runtime's TensorRT EP (options only; the EP itself is not installed here) ---


def test_ort_trt_ep_caches_under_the_engine_cache_root(monkeypatch, tmp_path):
    import onnxruntime as ort

    from rtrt.runtime import backends as be

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setenv("RTRT_ENGINE_CACHE", str(tmp_path / "root"))
    monkeypatch.chdir(tmp_path)
    providers = be.ort_providers(precision="fp16")
    assert [p[0] if isinstance(p, tuple) else p for p in providers] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    opts = providers[0][1]
    want = tmp_path / "root" / "ort-trt"
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"] and opts["trt_fp16_enable"]
    assert Path(opts["trt_engine_cache_path"]) == want and Path(opts["trt_timing_cache_path"]) == want and want.is_dir()
    opts = be.ort_providers(cache_dir=tmp_path / "mine")[0][1]  # an explicit cache_dir wins
    assert Path(opts["trt_engine_cache_path"]) == tmp_path / "mine" / "ort-trt" and not opts["trt_fp16_enable"]
    assert be.ort_providers(device="cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert be.ort_providers() == ["CPUExecutionProvider"]


# --- the fp32 reference on CUDA runs without TF32 ---


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_reference_runs_without_tf32():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, v, w):
            seen["matmul"] = torch.backends.cuda.matmul.fp32_precision if hasattr(torch.backends.cuda.matmul, "fp32_precision") else torch.backends.cuda.matmul.allow_tf32
            return v @ w.T @ w

    before = torch.backends.cuda.matmul.fp32_precision if hasattr(torch.backends.cuda.matmul, "fp32_precision") else torch.backends.cuda.matmul.allow_tf32
    rng = np.random.default_rng(0)
    v, w = rng.standard_normal((1, 512, 256)).astype(np.float32), rng.standard_normal((64, 256)).astype(np.float32)
    out = torch_runner(Probe(), ADAPTER, device="cuda")({"visual_tokens": v, "class_embeddings": w})["refined_tokens"]
    assert seen["matmul"] in ("ieee", False)
    after = torch.backends.cuda.matmul.fp32_precision if hasattr(torch.backends.cuda.matmul, "fp32_precision") else torch.backends.cuda.matmul.allow_tf32
    assert after == before
    ref = (v.astype(np.float64) @ w.T.astype(np.float64)) @ w.astype(np.float64)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


# --- real TensorRT (skipped without it) ---


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    from rtrt.export.cli import main

    src = exported_tiny_bundle(tmp_path_factory.getbasetemp())
    path = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(src, path)
    cache = path.parent / "engine-cache"
    for precision in ("fp32", "fp16"):
        assert main(["--bundle", str(path), "--backend", "trt", "--precision", precision, "--cache-dir", str(cache)]) == 0
    return path, cache


@pytest.mark.trt
@pytest.mark.gpu
@requires_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_engines_match_torch_and_ort(trt_bundle, precision):
    from rtrt.runtime.backends import make_backend

    path, cache = trt_bundle
    engines = load_bundle(path).manifest.exports.engines
    assert engines[f"detector.{precision}"].parity["passed"] and engines[f"adapter.{precision}"].parity["passed"]
    trt_b = make_backend("trt", path, precision=precision, on_engine_mismatch="fail", cache_dir=cache)
    ref = make_backend("torch", path, device="cuda")
    ort_b = make_backend("ort", path, device="cpu")
    tol = TOLERANCES[precision]
    m = load_bundle(path).manifest.vfm
    for batch, classes in [(1, 8), (3, 2)]:
        px = torch.from_numpy(parity_images(batch, 64, m.mean, m.std, seed=batch)[0]).cuda()
        w = ref.class_embeddings[:classes].cuda()
        got, want, cpu = trt_b.detect(px, w), ref.detect(px, w), ort_b.detect(px.cpu(), w.cpu())
        assert got.scores.is_cuda  # outputs stay on the GPU
        for name in ("scores", "similarity"):
            g, t = getattr(got, name).float(), getattr(want, name).float()
            assert torch.all((g - t).abs() <= tol.atol + tol.rtol * t.abs()), name
            assert np.abs(getattr(got, name).float().cpu().numpy() - getattr(cpu, name).numpy()).max() <= 2 * tol.atol + tol.rtol
        v = torch.randn(1, 37 * batch, ref.d_llm, device="cuda")  # ADAPTER_CALL: one row of every image's tokens
        r, rt = trt_b.refine(v, w).float(), ref.refine(v, w).float()
        assert torch.all((r - rt).abs() <= tol.atol + tol.rtol * rt.abs())


@pytest.mark.trt
@pytest.mark.gpu
@requires_trt
def test_trt_engine_cache_reused_and_mismatch_detected(trt_bundle, tmp_path):
    from rtrt.export.cli import export_bundle
    from rtrt.runtime.backends import make_backend
    from rtrt.runtime.errors import EngineMismatchError

    path, cache = trt_bundle
    copy = tmp_path / "b"
    shutil.copytree(path, copy)
    exports = export_bundle(copy, backend="trt", precision="fp16", cache_dir=cache, log=lambda m: None)
    assert not exports.engines["detector.fp16"].built  # same ONNX, same GPU: reused from the cache
    b = load_bundle(copy)
    exports = b.manifest.exports
    exports.engines["detector.fp16"].gpu_name = "Some Other GPU"
    b.add_files({}, exports=exports)
    with pytest.raises(EngineMismatchError, match="gpu name"):
        make_backend("trt", copy, precision="fp16", on_engine_mismatch="fail", cache_dir=cache)
    with pytest.warns(RuntimeWarning, match="building a matching engine"):
        rebuilt = make_backend("trt", copy, precision="fp16", on_engine_mismatch="rebuild", cache_dir=cache)
    assert rebuilt.name == "trt"
