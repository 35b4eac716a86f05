"""Bundle format: round trip, and one test for each refusal (issue 2)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from rtrt.runtime import BundleError, ClassEmbeddings, CrossAttentionAdapter, RareObjectDetector, load_bundle, write_bundle
from rtrt.runtime.bundle import MANIFEST_NAME, SCHEMA_VERSION, ClassInfo, Manifest, VFMSpec, VLMSpec


def _make(tmp_path, name="b"):
    torch.manual_seed(0)
    ce = ClassEmbeddings(["traffic_cone", "dog", "debris"], 32, weight=torch.randn(3, 32))
    ad = CrossAttentionAdapter(32, 16, 4)
    with torch.no_grad():
        ad.gate.fill_(0.5)
    det = RareObjectDetector(8, 32, threshold=0.1, top_k=2)
    man = Manifest(
        classes=[ClassInfo("traffic_cone", ["cone", "pylon"]), ClassInfo("dog", ["puppy"]), ClassInfo("debris")],
        d_llm=32,
        vlm=VLMSpec("llava", "some-org/some-vlm", 32, {"image_token_id": 5, "tokens_per_image": 4}),
        vfm=VFMSpec("timm", "vfm/model.safetensors", "vit_tiny_patch16_dinov3_qkvb", 64, 16, dim=8),
        adapter=ad.config,
        detector=det.config,
    )
    tensors = {
        "embeddings.safetensors": {"W": ce.weight},
        "adapter.safetensors": ad.state_dict(),
        "detector.safetensors": det.state_dict(),
    }
    return write_bundle(tmp_path / name, man, tensors), ce, ad, det


def test_round_trip(tmp_path):
    b, ce, ad, det = _make(tmp_path)
    b2 = load_bundle(b.root)
    assert b2.class_names == ["traffic_cone", "dog", "debris"]
    assert b2.manifest.classes[0].synonyms == ["cone", "pylon"]
    assert b2.manifest.schema_version == SCHEMA_VERSION
    assert b2.manifest.vlm == b.manifest.vlm and b2.manifest.vfm == b.manifest.vfm
    assert torch.equal(b2.class_embeddings().weight, ce.weight)
    v = torch.randn(2, 5, 32)
    assert torch.equal(b2.adapter()(v, ce.weight), ad.eval()(v, ce.weight))
    p = torch.randn(1, 7, 8)
    assert torch.equal(b2.detector()(p, ce.weight)[0], det(p, ce.weight)[0])
    # every file in the directory except the manifest is listed with its hash
    on_disk = {p.relative_to(b.root).as_posix() for p in b.root.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert on_disk == set(b2.manifest.files)


def test_write_refuses_existing_and_leaves_no_partial(tmp_path):
    b, *_ = _make(tmp_path)
    with pytest.raises(BundleError, match="already exists"):
        _make(tmp_path)
    # a failing write leaves neither the target nor a temporary directory behind
    man = load_bundle(b.root).manifest
    with pytest.raises(Exception):
        write_bundle(tmp_path / "bad", man, {"embeddings.safetensors": {"W": "not a tensor"}})
    assert not (tmp_path / "bad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def _manifest(b):
    return json.loads((b.root / MANIFEST_NAME).read_text())


def _write_manifest(b, d):
    (b.root / MANIFEST_NAME).write_text(json.dumps(d))


def test_refuses_missing_file(tmp_path):
    b, *_ = _make(tmp_path)
    os.remove(b.root / "adapter.safetensors")
    with pytest.raises(BundleError, match=r"^adapter\.safetensors: listed in manifest\.json but missing"):
        load_bundle(b.root)


def test_refuses_altered_file(tmp_path):
    b, *_ = _make(tmp_path)
    p = b.root / "embeddings.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01  # same size, one bit flipped
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"^embeddings\.safetensors: sha256 mismatch"):
        load_bundle(b.root)


def test_refuses_truncated_file(tmp_path):
    b, *_ = _make(tmp_path)
    p = b.root / "detector.safetensors"
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(BundleError, match=r"^detector\.safetensors: size"):
        load_bundle(b.root)


def test_refuses_newer_schema(tmp_path):
    b, *_ = _make(tmp_path)
    d = _manifest(b)
    d["schema_version"] = SCHEMA_VERSION + 1
    _write_manifest(b, d)
    with pytest.raises(BundleError, match="newer than this rtrt supports"):
        load_bundle(b.root)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/../../x", "C:\\x", ""])
def test_refuses_paths_outside(tmp_path, bad):
    b, *_ = _make(tmp_path)
    d = _manifest(b)
    d["files"][bad] = {"sha256": "0" * 64, "size": 1}
    _write_manifest(b, d)
    with pytest.raises(BundleError):
        load_bundle(b.root)


def test_refuses_symlink_escaping(tmp_path):
    b, *_ = _make(tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x")
    (b.root / "link.bin").symlink_to(secret)
    d = _manifest(b)
    d["files"]["link.bin"] = {"sha256": "0" * 64, "size": 1}
    _write_manifest(b, d)
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(b.root)


def test_refuses_missing_manifest_and_bad_json(tmp_path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nope")
    b, *_ = _make(tmp_path)
    (b.root / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(b.root)
    os.remove(b.root / MANIFEST_NAME)
    with pytest.raises(BundleError, match="missing"):
        load_bundle(b.root)


@pytest.mark.parametrize(
    "patch, msg",
    [
        (lambda d: d.pop("schema_version"), "schema_version missing"),
        (lambda d: d.pop("classes"), "malformed"),
        (lambda d: d.update(d_llm="wide"), "malformed"),
        (lambda d: d["files"].pop("embeddings.safetensors"), "embeddings.safetensors: missing"),
        (lambda d: d["adapter"].update(d_model=7), "adapter d_model 7"),
        (lambda d: d["vlm"].update(hidden_size="x"), "malformed"),
        (lambda d: d["vfm"].update(resample="sinc"), "malformed.*unknown resample filter 'sinc'"),
        (lambda d: d["vfm"].update(reducing_gap=0.5), "malformed.*reducing_gap must be at least 1.0"),
    ],
)
def test_refuses_malformed_manifest(tmp_path, patch, msg):
    b, *_ = _make(tmp_path)
    d = _manifest(b)
    patch(d)
    _write_manifest(b, d)
    with pytest.raises(BundleError, match=msg):
        load_bundle(b.root)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    b, *_ = _make(tmp_path)
    d = _manifest(b)
    d["classes"].append({"name": "extra", "synonyms": []})
    _write_manifest(b, d)
    with pytest.raises(BundleError, match="W has shape"):
        load_bundle(b.root).class_embeddings()


def test_errors_are_one_line(tmp_path):
    b, *_ = _make(tmp_path)
    (b.root / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(BundleError) as e:
        load_bundle(b.root)
    assert "\n" not in str(e.value)


def test_add_files_is_atomic_and_hashed(tmp_path):
    b, *_ = _make(tmp_path)
    b.add_files({"extra/notes.txt": b"hello"}, exports={"onnx": {"ok": True}})
    b2 = load_bundle(b.root)
    assert b2.manifest.exports == {"onnx": {"ok": True}}
    assert b2.path("extra/notes.txt").read_bytes() == b"hello"
    with pytest.raises(BundleError):
        b.add_files({"../escape.txt": b"x"})
    assert not (tmp_path / "escape.txt").exists()


def test_no_pickle_in_the_package():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    hits = []
    for folder in ("runtime", "trainer", "export", "tools"):
        for f in (root / folder).rglob("*.py"):
            text = f.read_text()
            for pat in (r"pickle\.loads?\(", r"trust_remote_code\s*=\s*True", r"torch\.load\((?![^)]*weights_only=True)"):
                if re.search(pat, text):
                    hits.append(f"{f.name}: {pat}")
    assert hits == []
