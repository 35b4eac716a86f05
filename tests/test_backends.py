"""Runtime backends: torch (reference) vs ort on the exported tiny bundle; the engine-mismatch policy.

The ``trt`` policy tests here replace TensorRT by stand-ins (a fake platform, a fake engine
loader): they test rtrt's decision logic (detect a mismatch from the manifest, then rebuild,
fall back or fail), not TensorRT. Real engines are exercised in test_trt.py where TensorRT exists.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rtrt.export.parity import TOLERANCES, parity_images, rank_classes, topk_agreement
from rtrt.runtime import load_bundle, select_detections
from rtrt.runtime import backends as be
from rtrt.runtime.errors import BackendUnavailableError, EngineMismatchError, InputError
from rtrt.runtime.exports import EngineExport
from rtrt.runtime.names import GRAPHS, engine_file, engine_name
from rtrt.runtime.trt_engine import PlatformInfo, tensorrt_status
from fixtures.tiny_bundle import exported_tiny_bundle, exported_tiny_bundle_int8, make_tiny_bundle


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return exported_tiny_bundle(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def exported_int8(tmp_path_factory) -> Path:
    return exported_tiny_bundle_int8(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def pair(exported):
    return be.make_backend("torch", exported), be.make_backend("ort", exported, device="cpu")


def _pixels(bundle_dir: Path, n: int, seed: int = 0) -> torch.Tensor:
    m = load_bundle(bundle_dir).manifest.vfm
    return torch.from_numpy(parity_images(n, m.image_size, m.mean, m.std, seed=seed)[0])


@pytest.mark.parametrize("batch,classes", [(1, 8), (2, 3), (4, 1)])
def test_detect_ort_matches_torch(exported, pair, batch, classes):
    ref, ort_b = pair
    px = _pixels(exported, batch, seed=batch)
    w = ref.class_embeddings[:classes]
    a, b = ref.detect(px, w), ort_b.detect(px, w)
    assert b.similarity.shape == (batch, classes, 16)
    for name in ("scores", "similarity"):
        assert (getattr(a, name) - getattr(b, name)).abs().max() <= 1e-4, name
    names = load_bundle(exported).class_names[:classes]
    for i in range(batch):
        da = select_detections(a.scores[i], names, 5, 0.1)
        db = select_detections(b.scores[i], names, 5, 0.1)
        assert [d.name for d in da] == [d.name for d in db]


@pytest.mark.parametrize("batch,tokens,classes", [(1, 576, 8), (2, 5, 2), (3, 1, 1)])
def test_refine_ort_matches_torch(pair, batch, tokens, classes):
    ref, ort_b = pair
    v = torch.randn(batch, tokens, ref.d_llm, generator=torch.Generator().manual_seed(tokens))
    w = ref.class_embeddings[:classes]
    a, b = ref.refine(v, w), ort_b.refine(v, w)
    assert b.shape == v.shape and (a - b).abs().max() <= 1e-4
    assert (a - v).abs().max() > 1e-2  # not the identity


def test_default_class_embeddings_are_the_bundles_w(exported, pair):
    ref, ort_b = pair
    px = _pixels(exported, 1)
    assert torch.equal(ort_b.detect(px).scores, ort_b.detect(px, ref.class_embeddings).scores)
    assert ort_b.detect(px).scores.shape == (1, len(load_bundle(exported).class_names))


def test_ort_int8_backend_top5(exported_int8, pair):
    ref, _ = pair
    q = be.make_backend("ort", exported_int8, precision="int8", device="cpu")
    px = _pixels(exported_int8, 8, seed=3)
    agree = topk_agreement(ref.detect(px).scores.numpy(), rank_classes(q.detect(px).scores.numpy()), 5).mean()
    print(f"ort int8 backend top-5 agreement with torch: {agree:.1%}")
    assert agree >= TOLERANCES["int8"].topk_agreement
    v = torch.randn(2, 9, ref.d_llm)
    assert (q.refine(v) - ref.refine(v)).abs().max() < 0.2


def test_pipeline_precision_picks_the_int8_graphs(exported, exported_int8):
    from rtrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(exported_int8, "ort", load_vlm_model=False, precision="int8")
    files = {g: Path(s._model_path).name for g, s in pipe.backend.sessions.items()}
    assert files == {"detector": "detector.int8.onnx", "adapter": "adapter.int8.onnx"}
    assert Path(Pipeline.from_bundle(exported_int8, "ort", load_vlm_model=False).backend.sessions["detector"]._model_path).name == "detector.onnx"
    # A bundle exported in fp32 only: one clear error naming the command that adds the int8 graphs.
    with pytest.raises(BackendUnavailableError, match="--precision int8"):
        Pipeline.from_bundle(exported, "ort", load_vlm_model=False, precision="int8")


def test_bad_inputs_and_names(exported, pair):
    _, ort_b = pair
    with pytest.raises(InputError, match="pixel_values"):
        ort_b.detect(torch.zeros(1, 3, 32, 32))
    with pytest.raises(InputError, match="class_embeddings"):
        ort_b.detect(_pixels(exported, 1), torch.zeros(3, 7))
    with pytest.raises(InputError, match="visual_tokens"):
        ort_b.refine(torch.zeros(1, 4, 5))
    with pytest.raises(InputError, match="unknown backend"):
        be.make_backend("onnx", exported)
    with pytest.raises(InputError, match="precision"):
        be.make_backend("ort", exported, precision="int4")
    with pytest.raises(InputError, match="on_engine_mismatch"):
        be.make_backend("trt", exported, on_engine_mismatch="ignore")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(InputError, match="threads must be a positive integer"):
            be.make_backend("ort", exported, threads=bad)


def test_ort_threads_are_the_sessions_and_results_do_not_change(exported, pair):
    _, ort_all = pair
    one = be.make_backend("ort", exported, device="cpu", threads=1)
    for s in one.sessions.values():
        assert int(s.get_session_options().intra_op_num_threads) == 1
    px = _pixels(exported, 2)
    for a, b in zip(one.detect(px), ort_all.detect(px)):
        assert torch.allclose(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=1e-5)


def test_ort_needs_an_export(tmp_path):
    path = make_tiny_bundle(tmp_path / "b", with_detector=False)
    with pytest.raises(BackendUnavailableError, match="rtrt export"):
        be.make_backend("ort", path)


def test_ort_providers_order():
    assert be.ort_providers(device="cpu") == ["CPUExecutionProvider"]
    names = [p[0] if isinstance(p, tuple) else p for p in be.ort_providers()]
    assert names[-1] == "CPUExecutionProvider"
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert names == [n for n in order if n in names]


# --- engine mismatch policy (stand-ins for TensorRT; see the module docstring) ---

HERE = PlatformInfo("10.9.0", "NVIDIA Orin", "8.7")


@pytest.fixture
def with_engine(exported, tmp_path):
    """A copy of the exported bundle with a detector/adapter fp16 'engine' recorded for HERE."""
    path = tmp_path / "b"
    shutil.copytree(exported, path)
    b = load_bundle(path)
    engines = {
        engine_name(g, "fp16"): EngineExport(file=engine_file(g, "fp16"), onnx_sha256=b.manifest.exports.graph(g).sha256, source_graph=g, **HERE.to_dict())
        for g in GRAPHS
    }
    b.add_files({e.file: b"not a real engine" for e in engines.values()}, exports=dataclasses.replace(b.manifest.exports, engines=engines))
    return path


@pytest.fixture
def fake_trt(monkeypatch):
    """TensorRT 'present' with platform HERE; engines 'load' into a recorder."""
    loaded = []

    class FakeEngine:
        def __init__(self, path, device=None):
            loaded.append(Path(path))
            self.device = torch.device("cuda", 0)

    monkeypatch.setattr(be, "tensorrt_status", lambda: None)
    monkeypatch.setattr(be, "platform_info", lambda device=None: HERE)
    monkeypatch.setattr(be, "TrtEngine", FakeEngine)
    return loaded


def test_matching_engine_is_used(with_engine, fake_trt):
    backend = be.make_backend("trt", with_engine, precision="fp16", on_engine_mismatch="fail")
    assert isinstance(backend, be.TrtBackend)
    assert sorted(p.name for p in fake_trt) == ["adapter.fp16.engine", "detector.fp16.engine"]


@pytest.mark.parametrize(
    "other,needle",
    [
        (PlatformInfo("10.11.0", HERE.gpu_name, HERE.compute_capability), "trt version"),
        (PlatformInfo(HERE.trt_version, "NVIDIA H100", HERE.compute_capability), "gpu name"),
        (PlatformInfo(HERE.trt_version, HERE.gpu_name, "9.0"), "compute capability"),
    ],
)
def test_mismatch_fail_and_fallback(with_engine, fake_trt, monkeypatch, other, needle):
    monkeypatch.setattr(be, "platform_info", lambda device=None: other)
    with pytest.raises(EngineMismatchError, match=needle):
        be.make_backend("trt", with_engine, precision="fp16", on_engine_mismatch="fail")
    # ORT on this CPU cannot run fp16: the fallback says so instead of silently running fp32.
    with pytest.warns(RuntimeWarning, match="falling back to the ort backend"):
        with pytest.raises(BackendUnavailableError, match="fp16"):
            be.make_backend("trt", with_engine, precision="fp16", on_engine_mismatch="fallback")
    # An fp32 engine falls back to ORT's fp32 graphs.
    b = load_bundle(with_engine)
    engines = {engine_name(g, "fp32"): dataclasses.replace(b.manifest.exports.engine(engine_name(g, "fp16")), file=engine_file(g, "fp32"), precision="fp32")
               for g in GRAPHS}
    b.add_files({e.file: b"not a real engine" for e in engines.values()}, exports=dataclasses.replace(b.manifest.exports, engines=engines))
    with pytest.warns(RuntimeWarning, match="falling back to the ort backend"):
        backend = be.make_backend("trt", with_engine, precision="fp32", on_engine_mismatch="fallback")
    assert isinstance(backend, be.OrtBackend) and backend.precision == "fp32"
    assert not fake_trt  # the stale engines were never deserialized


def test_mismatch_rebuild(with_engine, fake_trt, monkeypatch, tmp_path):
    import rtrt.runtime.trt_build as tb

    monkeypatch.setattr(be, "platform_info", lambda device=None: PlatformInfo("10.11.0", "NVIDIA H100", "9.0"))
    built = []

    def fake_build(bundle, graph, precision, cache_dir=None, **kw):
        built.append((graph, precision))
        p = tmp_path / f"{graph}.rebuilt.engine"
        p.write_bytes(b"rebuilt")
        return p, {}

    monkeypatch.setattr(tb, "build_bundle_engine", fake_build)
    with pytest.warns(RuntimeWarning, match="building a matching engine"):
        backend = be.make_backend("trt", with_engine, precision="fp16")
    assert isinstance(backend, be.TrtBackend)
    assert sorted(built) == [("adapter", "fp16"), ("detector", "fp16")]
    assert sorted(p.name for p in fake_trt) == ["adapter.rebuilt.engine", "detector.rebuilt.engine"]


def test_stale_engine_after_reexport_is_a_mismatch(with_engine):
    b = load_bundle(with_engine)
    entry = dataclasses.replace(b.manifest.exports.engine("detector.fp16"), onnx_sha256="0" * 64)
    assert "re-exported" in be.engine_mismatch(entry, b, "detector", HERE)
    assert be.engine_mismatch(None, b, "detector", HERE) == "no engine recorded in the bundle"
    assert be.engine_mismatch(b.manifest.exports.engine("detector.fp16"), b, "detector", HERE) is None


@pytest.mark.skipif(tensorrt_status() is None, reason="TensorRT and a GPU are present")
def test_trt_unavailable_here(exported):
    with pytest.raises(BackendUnavailableError, match=tensorrt_status()):
        be.make_backend("trt", exported, on_engine_mismatch="fail")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = be.make_backend("trt", exported, on_engine_mismatch="fallback", device="cpu")
    assert isinstance(backend, be.OrtBackend) and any("falling back" in str(w.message) for w in caught)


def test_import_is_lean():
    code = (
        "import sys, rtrt.runtime.backends, rtrt.runtime.trt_engine, rtrt.runtime.graphs\n"
        "bad = [m for m in ('onnx', 'tensorrt', 'timm', 'open_clip', 'rtrt.export', 'rtrt.trainer', 'onnxruntime') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
