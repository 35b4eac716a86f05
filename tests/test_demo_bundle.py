"""The shipped demo bundle (``runtime/assets/demo_bundle``, built by ``python -m rtrt.tools.demo.build``).

It loads with every hash checked, fits the 40 MiB budget (its exported VLM included), is the default of ``rtrt infer``, and
answers a shipped example scene the same way twice; hints and refinement change the prompt and the
visual tokens only where they should.
"""
from __future__ import annotations

import json

import pytest

from rtrt.runtime.assets import default_bundle, example_images

BUNDLE = default_bundle()


@pytest.fixture(scope="module")
def pipe():
    from rtrt.runtime import Pipeline

    return Pipeline.from_bundle(BUNDLE, backend="ort")


def _jpgs():
    return [p for p in example_images() if p.suffix == ".jpg"]


def test_demo_bundle_is_shipped_complete_and_within_budget():
    from rtrt.runtime.bundle import load_bundle
    from rtrt.tools.demo.presets import MAX_BUNDLE_BYTES
    from rtrt.tools.demo.world import RARE_CATEGORIES

    bundle = load_bundle(BUNDLE)  # verifies every file's sha256
    files = [p for p in BUNDLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BUNDLE_BYTES == 40 * 2**20  # issue 16: at most 40 MiB with the exported VLM
    names = [c.name for c in bundle.manifest.classes]
    assert names and set(names) <= set(RARE_CATEGORIES)
    assert (BUNDLE / "detector.onnx").is_file() and (BUNDLE / "adapter.onnx").is_file()
    assert (BUNDLE / "vlm" / "config.json").is_file()
    assert bundle.manifest.exports.vlm is not None and (BUNDLE / "vlm_onnx" / "onnx" / "decoder_model_merged.onnx").is_file()
    assert len(_jpgs()) >= 3


def test_rtrt_infer_defaults_to_the_demo_bundle_and_is_deterministic(capsys):
    from rtrt.tools.cli import main

    image = str(_jpgs()[0])
    outs = []
    for _ in range(2):
        assert main(["infer", "--image", image, "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    a, b = outs
    assert a["answer"] == b["answer"] and a["detections"] == b["detections"]
    assert a["answer"].strip().startswith(("Objects that influence the ego car:", "Nothing in the scene"))
    assert {"detector", "prefill", "decode"} <= set(a["timings_ms"])


def test_hints_and_refinement_are_switches_of_one_pipeline(pipe):
    from rtrt.runtime.vlm import format_hint

    image = _jpgs()[0]
    det = pipe.detect(image)
    base = pipe(image, hints=False, refine=False)
    hinted = pipe(image, hints=True, refine=False)
    assert base.detections == hinted.detections == det.detections  # the detector runs either way
    assert base.hints == [] and hinted.hints == [d.name for d in det.detections]
    assert det.detections and format_hint(hinted.hints)  # the example holds rare objects the detector finds
    again = pipe(image, hints=False, refine=False)
    assert again.answer == base.answer
