"""python -m rtrt.tools.demo.repro: the demo build's fingerprint, its comparison and the pinned-ISA build (issue 14)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rtrt.tools.demo import build, repro


def _fake_build(root: Path) -> Path:
    (root / "bundle" / "vlm").mkdir(parents=True)
    (root / "examples").mkdir()
    (root / "bundle" / "adapter.safetensors").write_bytes(b"\x00\x01weights")
    (root / "bundle" / "vlm" / "demo_vlm.json").write_text('{"built": "/tmp/x at 12:00"}')
    (root / "examples" / "scene_1.jpg").write_bytes(b"jpeg")
    manifest = {"detector": {"z_threshold": 1.3, "score_mean": [0.1]}, "adapter": {"width": 16},
                "training": {"out": "/tmp/a/bundle_phase2"}, "exports": {"exported_utc": "2026-12-07T05:39:49Z"}}
    (root / "bundle" / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_fingerprint_ignores_paths_and_times_and_catches_weights_and_calibration(tmp_path, capsys):
    root = _fake_build(tmp_path / "demo")
    ref = repro.fingerprint(root)
    assert set(ref["files"]) == {"bundle/adapter.safetensors", "bundle/manifest.json#detector", "bundle/manifest.json#adapter",
                                 "examples/scene_1.jpg"}
    assert ref["cpu"]["machine"] and isinstance(ref["cpu"]["flags"], list) and "torch" in ref["versions"]
    ref_file = tmp_path / "ref.json"
    ref_file.write_text(json.dumps(ref))
    # Another build whose manifest differs only in paths and times, and whose demo_vlm.json differs: the same.
    m = json.loads((root / "bundle" / "manifest.json").read_text())
    m["training"]["out"], m["exports"]["exported_utc"] = "/elsewhere", "2027-01-01T00:00:00Z"
    (root / "bundle" / "manifest.json").write_text(json.dumps(m))
    (root / "bundle" / "vlm" / "demo_vlm.json").write_text("{}")
    assert repro.compare(repro.fingerprint(root), ref) == ([], [])
    assert repro.main(["--fingerprint", str(root), "--compare", str(ref_file)]) == 0
    # A weight byte and the calibration: each named, exit 1.
    (root / "bundle" / "adapter.safetensors").write_bytes(b"\x00\x02weights")
    m["detector"]["z_threshold"] = 1.2
    (root / "bundle" / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert repro.main(["--fingerprint", str(root), "--compare", str(ref_file)]) == 1
    out = capsys.readouterr().out
    assert "differs: bundle/adapter.safetensors" in out and "differs: bundle/manifest.json#detector" in out
    assert "differs: examples/scene_1.jpg" not in out and "2 of 4 files equal" in out


def test_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    assert repro.main(["--fingerprint", str(tmp_path)]) == 2
    assert "no demo bundle" in capsys.readouterr().err
    root = _fake_build(tmp_path / "demo")
    assert repro.main(["--fingerprint", str(root), "--compare", str(tmp_path / "missing.json")]) == 2
    assert "--compare" in capsys.readouterr().err
    monkeypatch.setattr(repro.platform, "machine", lambda: "aarch64")
    assert repro.main(["--out", str(tmp_path / "x"), "--isa", "avx2"]) == 2
    assert "pins x86-64 kernels" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_stored_reference_is_a_pinned_tiny_fingerprint():
    # What another CPU model compares against (README: made on the 2-core AMD EPYC).
    assert set(repro.PINS["avx2"]) == set(build.ISA_ENV)  # the variables the build records are the ones pinned
    ref = json.loads((Path(repro.__file__).parent / "repro_tiny_avx2.json").read_text())
    assert ref["isa_env"] == repro.PINS["avx2"] and (ref["preset"], ref["seed"], ref["threads"]) == ("tiny", 0, 1)
    assert {"bundle/vlm/model.safetensors", "bundle/vfm/model.safetensors", "bundle/adapter.safetensors",
            "bundle/embeddings.safetensors", "bundle/manifest.json#detector"} <= set(ref["files"])


@pytest.mark.skipif(not repro.platform.machine().lower() in ("x86_64", "amd64"), reason="AVX2 pins are x86-64's")
def test_pinned_tiny_build_records_its_pins_and_repeats(tmp_path):
    out = tmp_path / "demo"
    assert repro.main(["--out", str(out), "--isa", "avx2", "--json", str(tmp_path / "fp.json")]) == 0
    report = json.loads((out / "build_report.json").read_text())
    assert report["isa_env"] == repro.PINS["avx2"] and report["preset"] == "tiny"
    fp = json.loads((tmp_path / "fp.json").read_text())
    assert fp["isa_env"] == repro.PINS["avx2"] and "bundle/vlm/model.safetensors" in fp["files"]
    assert repro.main(["--fingerprint", str(out), "--compare", str(tmp_path / "fp.json")]) == 0


def test_from_refuses_stages_built_under_other_pins(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    for k in build.ISA_ENV:
        monkeypatch.delenv(k, raising=False)
    assert build.main(["--out", str(out), "--preset", "tiny", "--threads", "1", "--quiet", "--keep-work", "--stop-after", "world"]) == 0
    state = json.loads((tmp_path / "demo.work" / "build_state.json").read_text())
    assert "isa_env" not in state["key"]  # unpinned keys are as before
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    capsys.readouterr()
    assert build.main(["--out", str(out), "--preset", "tiny", "--threads", "1", "--quiet", "--from", "vlm", "--stop-after", "vlm"]) == 2
    assert "pinned ISA" in capsys.readouterr().err


@pytest.mark.skipif(not repro.platform.machine().lower() in ("x86_64", "amd64"), reason="AVX2 pins are x86-64's")
def test_build_isa_avx2_runs_pinned_in_a_child_and_records_it(tmp_path, monkeypatch):
    for k in build.ISA_ENV:
        monkeypatch.delenv(k, raising=False)
    argv = ["--out", str(tmp_path / "demo"), "--preset", "tiny", "--threads", "1", "--quiet", "--keep-work",
            "--stop-after", "world", "--isa", "avx2"]
    assert build.main(argv) == 0
    assert all(k not in os.environ for k in build.ISA_ENV)  # this process is left as it was
    report = json.loads((tmp_path / "demo" / "build_report.json").read_text())
    assert report["isa_env"] == build.ISA_PINS["avx2"]
    state = json.loads((tmp_path / "demo.work" / "build_state.json").read_text())
    assert state["key"]["isa_env"] == build.ISA_PINS["avx2"]


def test_build_isa_avx2_is_refused_off_x86(tmp_path, monkeypatch, capsys):
    for k in build.ISA_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert build.main(["--out", str(tmp_path / "demo"), "--preset", "tiny", "--isa", "avx2"]) == 2
    err = capsys.readouterr().err
    assert "--isa avx2 pins x86-64 kernels" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()
