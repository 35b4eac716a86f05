"""`rtrt check` and `Pipeline.from_bundle(verify=True)`: reference data in the bundle, the table, the exit codes."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from rtrt.runtime import load_bundle
from rtrt.runtime.bundle import VLMSpec
from rtrt.runtime.check import REFERENCE_FILE, check_bundle, load_reference
from rtrt.runtime.errors import BackendUnavailableError, BundleError, ParityError
from rtrt.runtime.machine import machine_info
from rtrt.runtime.pipeline import Pipeline
from rtrt.tools.cli import main as rtrt_main
from fixtures.tiny_bundle import exported_tiny_bundle, exported_tiny_bundle_int8, make_tiny_bundle, shifted_reference_copy


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return exported_tiny_bundle(tmp_path_factory.getbasetemp())


def _run(argv, capsys) -> tuple[int, str, str]:
    code = rtrt_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_export_stores_reference_inputs_and_outputs(exported):
    b = load_bundle(exported)  # the reference file is listed and hashed like every bundle file
    assert b.has(REFERENCE_FILE) and b.manifest.files[REFERENCE_FILE].sha256
    ref = load_reference(b)
    det, ad = ref["detector"], ref["adapter"]
    w = b.class_embeddings().weight.detach().numpy()
    assert det["feeds"]["pixel_values"].shape == (2, 3, 64, 64)
    assert np.array_equal(det["feeds"]["class_embeddings"], w)
    assert det["outputs"]["scores"].shape == (2, len(w)) and det["outputs"]["similarity"].shape == (2, len(w), 16)
    # The adapter's call convention: every visual token of the batch as one sequence.
    assert ad["feeds"]["visual_tokens"].shape[0] == 1 and ad["outputs"]["refined_tokens"].shape == ad["feeds"]["visual_tokens"].shape
    assert "synthetic" in ad["inputs"]  # the tiny bundle names no VLM
    assert b.manifest.exports.reference.file == REFERENCE_FILE


def test_check_passes_and_prints_the_table_with_the_machine(exported, capsys):
    code, out, err = _run(["check", "--bundle", str(exported)], capsys)
    assert code == 0, out + err
    assert "machine: " in out and machine_info()["cpu"] in out
    for isa in machine_info()["isa"]:
        assert isa in out
    lines = out.splitlines()
    for graph in ("detector", "adapter"):
        for backend in ("torch", "ort"):
            row = [ln for ln in lines if ln.split()[:3] == [graph, backend, "fp32"]]
            assert len(row) == 1 and row[0].rstrip().endswith("pass"), out
    assert "trt" in out  # reported, as skipped or checked, never silently left out


def test_check_json_has_rows_and_machine(exported, capsys):
    code, out, _ = _run(["check", "--bundle", str(exported), "--backend", "ort", "--json"], capsys)
    assert code == 0
    d = json.loads(out)
    assert d["passed"] is True and d["machine"]["arch"]
    rows = {(r["graph"], r["backend"], r["precision"]): r for r in d["rows"]}
    assert set(rows) == {("detector", "ort", "fp32"), ("adapter", "ort", "fp32")}
    assert rows[("detector", "ort", "fp32")]["topk_agreement"] == 1.0
    assert max(rows[("adapter", "ort", "fp32")]["max_abs_error"].values()) <= 1e-4


def _tampered(src: Path, dst: Path) -> Path:
    return shifted_reference_copy(src, dst)


def test_check_exits_1_when_a_parity_fails(exported, tmp_path, capsys):
    bad = _tampered(exported, tmp_path / "bad")
    code, out, _ = _run(["check", "--bundle", str(bad), "--backend", "ort"], capsys)
    assert code == 1
    det = [ln for ln in out.splitlines() if ln.startswith("detector")]
    assert det and all("FAIL" in ln for ln in det)
    assert [ln for ln in out.splitlines() if ln.startswith("adapter")][0].rstrip().endswith("pass")
    report = check_bundle(bad, ["torch"])
    assert not report.passed and any(r.failed and r.graph == "detector" for r in report.rows)


def test_verify_at_start_up(exported, tmp_path):
    pipe = Pipeline.from_bundle(exported, "ort", load_vlm_model=False, verify=True)
    assert pipe.backend.name == "ort"
    bad = _tampered(exported, tmp_path / "bad")
    with pytest.raises(ParityError, match="detector on ort fp32.*rtrt check"):
        Pipeline.from_bundle(bad, "ort", load_vlm_model=False, verify=True)
    Pipeline.from_bundle(bad, "ort", load_vlm_model=False)  # without verify nothing is rerun


def test_bad_requests_exit_2(exported, tmp_path, capsys):
    code, _, err = _run(["check", "--bundle", str(exported), "--backend", "trt"], capsys)
    from rtrt.runtime.trt_engine import tensorrt_status

    if tensorrt_status():
        assert code == 2 and len(err.strip().splitlines()) == 1 and "trt" in err
    # A bundle exported in fp32 only has no int8 ORT graphs to check.
    code, _, err = _run(["check", "--bundle", str(exported), "--backend", "ort", "--precision", "int8"], capsys)
    assert code == 2 and "int8" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(["check", "--bundle", str(tmp_path / "missing")], capsys)
    assert code == 2 and "not found" in err
    # A bundle without reference data (never exported): one line naming the command that adds it.
    plain = make_tiny_bundle(tmp_path / "plain", with_detector=False)
    code, _, err = _run(["check", "--bundle", str(plain)], capsys)
    assert code == 2 and "rtrt export --bundle" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(BundleError, match="no reference.safetensors"):
        Pipeline.from_bundle(plain, "torch", load_vlm_model=False, verify=True)
    with pytest.raises(BackendUnavailableError):
        check_bundle(exported, ["ort"], ["int8"])


def test_int8_graphs_are_checked_too(tmp_path_factory, capsys):
    bundle = exported_tiny_bundle_int8(tmp_path_factory.getbasetemp())
    code, out, _ = _run(["check", "--bundle", str(bundle), "--backend", "ort", "--precision", "int8"], capsys)
    assert code == 0, out
    rows = [ln for ln in out.splitlines() if ln.split()[1:3] == ["ort", "int8"]]
    assert len(rows) == 2 and all(ln.rstrip().endswith("pass") for ln in rows)


def test_adapter_reference_uses_the_bundles_own_vlm(tmp_path):
    """With a loadable VLM the adapter's reference tokens are the VLM's own, in the pipeline's call shape."""
    from rtrt.export.cli import main as export_main
    from rtrt.runtime.vlm import load_vlm
    from fixtures.tiny_vlm import build_tiny_vlm

    vlm_dir = build_tiny_vlm("llava", tmp_path / "vlm", seed=0)
    fam = load_vlm(vlm_dir)
    spec = VLMSpec("llava", str(vlm_dir.resolve()), fam.hidden_size, fam.image_token_layout())
    bundle = make_tiny_bundle(tmp_path / "b", d_llm=fam.hidden_size, vlm=spec, with_detector=False)
    with redirect_stdout(io.StringIO()):
        assert export_main(["--bundle", str(bundle), "--reference-images", "2"]) == 0
    ref = load_reference(load_bundle(bundle))["adapter"]
    per_image = fam.image_token_layout()["tokens_per_image"]
    assert ref["feeds"]["visual_tokens"].shape == (1, 2 * per_image, fam.hidden_size)
    assert "bundle's VLM (llava)" in ref["inputs"]
    # The stored tokens are what the VLM gives on the first parity images (synthetic scenes here).
    import torch

    from rtrt.export.parity import parity_pil_images
    from rtrt.runtime.pipeline import DEFAULT_QUESTION

    images = parity_pil_images(4, 448, None)[0][:2]
    with torch.inference_mode():
        want = fam.visual_tokens(fam.prepare(images, [DEFAULT_QUESTION] * 2)).numpy()
    assert np.array_equal(ref["feeds"]["visual_tokens"][0], want)
    report = check_bundle(bundle)
    assert report.passed, report.table()


def test_reference_file_is_byte_reproducible(tmp_path):
    """Two exports of the same bundle write the same reference bytes (the demo rebuild ships byte for byte)."""
    from rtrt.export.cli import main as export_main

    digests = []
    for name in ("a", "b"):
        bundle = make_tiny_bundle(tmp_path / name, with_detector=False)
        with redirect_stdout(io.StringIO()):
            assert export_main(["--bundle", str(bundle)]) == 0
        digests.append(load_bundle(bundle).manifest.files[REFERENCE_FILE].sha256)
    assert digests[0] == digests[1]
