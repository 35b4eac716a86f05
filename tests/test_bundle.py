"""Bundle format: round trip, and one test for each refusal (issue 2)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from rtrt.runtime import BundleError, ClassEmbeddings, CrossAttentionAdapter, RareObjectDetector, load_bundle, write_bundle
from rtrt.runtime.bundle import MANIFEST_NAME, SCHEMA_VERSION, ClassInfo, Manifest, VFMSpec, VLMSpec
from rtrt.runtime.exports import Exports, OnnxExports


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
    b.add_files({"extra/notes.txt": b"hello"}, exports=Exports(onnx=OnnxExports(opset=18)))
    b2 = load_bundle(b.root)
    assert b2.manifest.exports == Exports(onnx=OnnxExports(opset=18))
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


# ---- issue 15: references that cannot point elsewhere, pinned hub revisions, safetensors only ----

SHA = "0123456789abcdef0123456789abcdef01234567"


def _with_refs(tmp_path, vlm_ref, vfm_ref="vfm", vlm_rev=None, vfm_rev=None, carry=True):
    """A bundle carrying vfm/model.safetensors (when ``carry``) whose manifest names the given references."""
    b, *_ = _make(tmp_path)
    if carry:
        b.add_files({"vfm/model.safetensors": b"weights"})
    d = _manifest(b)
    d["vlm"].update(ref=vlm_ref, revision=vlm_rev)
    d["vfm"].update(ref=vfm_ref, revision=vfm_rev)
    _write_manifest(b, d)
    return load_bundle(b.root, verify=False)


def test_resolve_ref_carried_absolute_and_pinned(tmp_path):
    b = _with_refs(tmp_path, "some-org/some-vlm", vlm_rev=SHA)
    assert b.resolve_ref("vfm") == str(b.root / "vfm")  # a carried folder
    assert b.resolve_ref("vfm/model.safetensors") == str(b.root / "vfm/model.safetensors")  # a carried file
    # An absolute path is allowed as it is (a model kept outside the bundle; its hashes do not cover it).
    assert b.resolve_ref("/opt/models/llava") == "/opt/models/llava"
    # A hub id loads at the commit the manifest records beside it, or the one written into the reference.
    assert b.resolve_ref("some-org/some-vlm") == f"some-org/some-vlm@{SHA}"
    assert b.resolve_ref(f"other/model@{SHA}") == f"other/model@{SHA}"
    assert b.resolve_ref("other/model", revision=SHA) == f"other/model@{SHA}"


@pytest.mark.parametrize("ref, msg", [
    ("models/llava", "as a hub id it has no pinned revision"),  # relative, not carried: no cwd lookup
    ("llava-local", "neither carried in the bundle, an absolute path, nor a pinned hub id"),
    ("../vlm", "leaves the bundle"),
    ("vfm/../../vlm", "leaves the bundle"),
    ("some-org/some-vlm", "as a hub id it has no pinned revision"),  # no revision recorded
    ("some-org/some-vlm@main", "is not a 40-hex commit"),  # a branch moves
    (f"some-org/some-vlm@{SHA[:12]}", "is not a 40-hex commit"),
    ("", "empty model reference"),
])
def test_resolve_ref_refuses_what_could_point_elsewhere(tmp_path, ref, msg, monkeypatch):
    b = _with_refs(tmp_path, "some-org/some-vlm")
    # even a folder of that name in the current directory is not taken
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llava").mkdir(parents=True)
    (tmp_path / "llava-local").mkdir()
    with pytest.raises(BundleError, match=msg) as e:
        b.resolve_ref(ref)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("where", ["vlm", "vfm"])
def test_manifest_with_a_malformed_revision_is_refused(tmp_path, where):
    b, *_ = _make(tmp_path)
    d = _manifest(b)
    d[where]["revision"] = "main"
    _write_manifest(b, d)
    with pytest.raises(BundleError, match="malformed.*'main' is not a 40-hex commit sha"):
        load_bundle(b.root)


def test_manifest_without_revision_still_loads(tmp_path):
    b, *_ = _make(tmp_path)
    d = _manifest(b)
    del d["vlm"]["revision"], d["vfm"]["revision"]  # bundles written before the field
    _write_manifest(b, d)
    m = load_bundle(b.root).manifest
    assert m.vlm.revision is None and m.vfm.revision is None


def test_loaders_refuse_unpinned_hub_ids(tmp_path, monkeypatch):
    from rtrt.runtime import InputError
    from rtrt.runtime.vfm import load_vfm
    from rtrt.runtime.vlm import load_vlm
    from rtrt.trainer.cli import vlm_hidden_size

    monkeypatch.chdir(tmp_path)
    for bad, msg in [("llava-hf/llava-1.5-7b-hf", "no pinned revision"), ("llava-hf/llava-1.5-7b-hf@main", "not a 40-hex"),
                     ("no-such-dir", "VLM not found")]:
        with pytest.raises(InputError, match=msg):
            load_vlm(bad)
        with pytest.raises(InputError, match=msg):
            vlm_hidden_size(bad)
    for kind in ("timm", "transformers"):
        spec = VFMSpec(kind, "timm/vit_small_patch16_dinov3.lvd1689m", "vit_small_patch16_dinov3", 64, 16, dim=384)
        with pytest.raises(BundleError, match="no pinned revision"):
            load_vfm(spec)
    with pytest.raises(BundleError, match="malformed"):
        Manifest.from_dict({**_manifest_dict_minimal(), "vfm": {"kind": "timm", "ref": "a/b", "revision": "v1.0"}})


def _manifest_dict_minimal():
    return {"schema_version": SCHEMA_VERSION, "classes": [{"name": "x"}], "d_llm": 4}


def test_trainer_records_the_pinned_revision_of_a_hub_vfm():
    from rtrt.runtime import InputError
    from rtrt.trainer.features import vfm_spec

    kw = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    spec = vfm_spec("timm", f"timm/vit_small_patch16_dinov3.lvd1689m@{SHA}", "vit_tiny_patch16_dinov3_qkvb", 64, kw)
    assert (spec.ref, spec.revision) == ("timm/vit_small_patch16_dinov3.lvd1689m", SHA)
    with pytest.raises(InputError, match="no pinned revision"):
        vfm_spec("timm", "timm/vit_small_patch16_dinov3.lvd1689m", "vit_tiny_patch16_dinov3_qkvb", 64, kw)


def test_models_without_safetensors_are_refused(tmp_path):
    """A model folder whose config is valid but whose weights are not safetensors: one line, never unpickled."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from rtrt.runtime import InputError
    from rtrt.runtime.vfm import load_vfm
    from rtrt.runtime.vlm import load_vlm
    from fixtures.tiny_vlm import build_tiny_vlm

    vlm = build_tiny_vlm("llava", tmp_path / "vlm")
    assert load_vlm(vlm).hidden_size > 0  # it loads as saved (safetensors)
    (vlm / "model.safetensors").unlink()
    (vlm / "pytorch_model.bin").write_bytes(b"not a pickle: never opened")
    with pytest.raises(InputError, match=r"safetensors are required.*no file named model\.safetensors") as e:
        load_vlm(vlm)
    assert "\n" not in str(e.value)

    dino = tmp_path / "dino"
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=64, patch_size=16)).save_pretrained(dino)
    spec = VFMSpec("transformers", str(dino), image_size=64, dim=32)
    assert load_vfm(spec)(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 32)
    (dino / "model.safetensors").unlink()
    (dino / "pytorch_model.bin").write_bytes(b"not a pickle: never opened")
    with pytest.raises(BundleError, match="safetensors are required") as e:
        load_vfm(spec)
    assert "\n" not in str(e.value)
