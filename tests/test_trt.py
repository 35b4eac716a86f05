"""TensorRT: profiles from the ONNX dynamic axes, the EngineBuilder's wiring, and real engines.

Three kinds of tests:
- pure functions (profiles), run everywhere;
- ``EngineBuilder`` against a fake ``tensorrt`` module: checks that every parser error is reported,
  the precision flags, the profile and the timing cache are wired as written; it does not test
  TensorRT itself;
- real engines built from the exported tiny bundle and compared with PyTorch and ORT: skipped with
  the reason "TensorRT not installed" or "no CUDA GPU" where those are missing, run where both are.
"""
from __future__ import annotations

import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import rtrt.export.trt_build as tb
from rtrt.export.onnx_export import ExportError
from rtrt.export.parity import TOLERANCES, parity_images
from rtrt.runtime import load_bundle
from rtrt.runtime.names import ADAPTER, DETECTOR
from rtrt.runtime.trt_engine import tensorrt_status
from tiny_bundle import exported_tiny_bundle

TRT_REASON = tensorrt_status()
requires_trt = pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")


# --- profiles ---


def test_dim_ranges_by_family():
    assert tb.dim_ranges("llava", 336, 32)["num_tokens"] == (576, 576, 576)
    assert tb.dim_ranges("qwen2_5_vl", 448, 32)["num_tokens"] == (4, 256, 16384)
    assert tb.dim_ranges("internvl", 448, 32)["num_tokens"] == (256, 256, 3328)
    assert tb.dim_ranges("internvl", 896, 32)["num_tokens"][1] == 256 * 5  # 4 tiles + thumbnail
    r = tb.dim_ranges(None, 448, 40, max_batch=8)
    assert r["batch"] == (1, 1, 8) and r["num_classes"] == (1, 40, 256)


def test_profile_from_onnx_dynamic_axes(tmp_path_factory):
    """Dims come from the exported ONNX's inputs (symbols where dynamic), ranges from the family."""
    graphs = load_bundle(exported_tiny_bundle(tmp_path_factory.getbasetemp())).manifest.exports["onnx"]["graphs"]
    ranges = tb.dim_ranges("qwen2_5_vl", 64, 8, max_batch=2)
    det = tb.derive_profile(graphs["detector"]["inputs"], DETECTOR, ranges)
    assert det == {"pixel_values": ((1, 3, 64, 64), (1, 3, 64, 64), (2, 3, 64, 64)), "class_embeddings": ((1, 64), (8, 64), (256, 64))}
    ad = tb.derive_profile(graphs["adapter"]["inputs"], ADAPTER, ranges)
    assert ad["visual_tokens"] == ((1, 4, 64), (1, 4, 64), (2, 16384, 64))
    # TensorRT reports dynamic dims as -1: the symbol comes from rtrt.runtime.names.
    assert tb.derive_profile({"visual_tokens": [-1, -1, 64], "class_embeddings": [-1, 64]}, ADAPTER, ranges) == ad
    with pytest.raises(ExportError, match="no range"):
        tb.derive_profile({"x": [-1, 3]}, ADAPTER, ranges)


# --- EngineBuilder against a fake tensorrt (wiring only) ---


def _fake_trt(*, parse_ok=True, fast_fp16=True, inputs=(("visual_tokens", (-1, -1, 64)), ("class_embeddings", (-1, 64)))):
    rec = types.SimpleNamespace(flags=set(), cleared=set(), shapes={}, timing_in=None, built=0)

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
        platform_has_fast_fp16 = fast_fp16
        platform_has_fast_int8 = True

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Net()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, net, config):
            rec.built += 1
            return b"ENGINE"

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level):
            pass

    trt = types.SimpleNamespace(
        __version__="10.fake",
        Logger=Logger,
        Builder=Builder,
        OnnxParser=Parser,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
        BuilderFlag=types.SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32"),
    )
    return trt, rec


PROFILE = {"visual_tokens": ((1, 4, 64), (1, 256, 64), (2, 16384, 64)), "class_embeddings": ((1, 64), (8, 64), (256, 64))}


def test_builder_reports_every_parser_error(monkeypatch, tmp_path):
    trt, _ = _fake_trt(parse_ok=False)
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    lines = []
    with pytest.raises(ExportError) as e:
        tb.EngineBuilder(log=lines.append).build(tmp_path / "a.onnx", PROFILE, "fp16")
    assert "3 error(s)" in str(e.value)
    for i in range(3):
        assert f"unsupported thing {i}" in str(e.value) and f"name=/n{i}" in str(e.value)
    assert len(lines) == 3


def test_builder_flags_profile_and_timing_cache(monkeypatch, tmp_path):
    trt, rec = _fake_trt()
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"timing-v1")
    out = tb.EngineBuilder(timing_cache=cache, log=lambda m: None).build(tmp_path / "a.onnx", PROFILE, "fp16")
    assert out == b"ENGINE" and rec.flags == {"FP16"} and rec.profiles == 1
    assert rec.shapes == PROFILE
    assert rec.timing_in == b"timing-v1" and cache.read_bytes() == b"timing-v2"

    trt, rec = _fake_trt()
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    tb.EngineBuilder(log=lambda m: None).build(tmp_path / "a.onnx", PROFILE, "fp32")
    assert rec.flags == set() and rec.cleared == {"TF32"}

    trt, rec = _fake_trt(fast_fp16=False)
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    with pytest.warns(RuntimeWarning, match="no fast fp16"):
        tb.EngineBuilder(log=lambda m: None).build(tmp_path / "a.onnx", PROFILE, "int8")
    assert rec.flags == {"FP16", "INT8"}


def test_builder_refuses_profile_for_other_inputs(monkeypatch, tmp_path):
    trt, _ = _fake_trt(inputs=(("pixel_values", (-1, 3, 64, 64)),))
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    with pytest.raises(ExportError, match="do not match"):
        tb.EngineBuilder(log=lambda m: None).build(tmp_path / "a.onnx", PROFILE, "fp16")


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
    engines = load_bundle(path).manifest.exports["engines"]
    assert engines[f"detector.{precision}"]["parity"]["passed"] and engines[f"adapter.{precision}"]["parity"]["passed"]
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
        v = torch.randn(batch, 37, ref.d_llm, device="cuda")
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
    assert not exports["engines"]["detector.fp16"]["built"]  # same ONNX, same GPU: reused from the cache
    b = load_bundle(copy)
    engines = {k: dict(v) for k, v in b.manifest.exports["engines"].items()}
    engines["detector.fp16"]["gpu_name"] = "Some Other GPU"
    b.add_files({}, exports={"engines": engines})
    with pytest.raises(EngineMismatchError, match="gpu name"):
        make_backend("trt", copy, precision="fp16", on_engine_mismatch="fail", cache_dir=cache)
    with pytest.warns(RuntimeWarning, match="building a matching engine"):
        rebuilt = make_backend("trt", copy, precision="fp16", on_engine_mismatch="rebuild", cache_dir=cache)
    assert rebuilt.name == "trt"
