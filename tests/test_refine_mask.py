"""``Pipeline.refine_mask_z`` (issue 14): the adapter's change kept only where the detector fires.

Shows: the numpy cell geometry and bilinear sampling equal torch's ``grid_sample`` and the CLIP
processor's resize + crop; a cell the detector does not report reaches the VLM exactly as the plain
vision encoder gave it, a reported one exactly as the refined encoder gave it (exported VLM); a z no
cell reaches gives the unrefined answers and a z every cell passes the unmasked refinement's, on the
exported and the transformers VLM alike, which also agree with each other at z = 0; the bundle's
own z (``manifest.adapter.refine_mask_z``) is the default, None / ``off`` turns the mask off; what
ran is reported; bad settings are one-line errors.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rtrt.runtime.assets import default_bundle, example_images
from rtrt.runtime.detection import DetectorConfig
from rtrt.runtime.errors import InputError, ModelMismatchError
from rtrt.runtime.image import load_image
from rtrt.runtime.pipeline import Pipeline
from rtrt.runtime.refine_mask import cell_centres, hot_cells, processor_geometry, sample_cells, token_mask
from rtrt.tools.cli import main

DEMO = default_bundle()
IMAGES = [str(p) for p in example_images()]  # refinement alone changes all six answers (the shipped bundle)


def test_sample_cells_is_torch_grid_sample():
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((5, 7, 9)).astype(np.float32)
    size = (90, 70)
    centres = np.concatenate([rng.uniform(-10, 100, (40, 1)), rng.uniform(-10, 80, (40, 1))], axis=1)  # some outside
    where = torch.from_numpy(np.stack([2 * centres[:, 0] / size[0] - 1, 2 * centres[:, 1] / size[1] - 1], -1)).float()
    want = F.grid_sample(torch.from_numpy(sim)[None], where[None, None], mode="bilinear", padding_mode="border",
                         align_corners=False)[0, :, 0].T.numpy()
    got = sample_cells(sim, size, centres)
    assert got.shape == (40, 5) and np.abs(got - want).max() < 1e-5


def test_cell_centres_follow_the_processors_resize_and_crop():
    plain = {"shortest_edge": None, "size": (32, 32), "crop": None}
    assert cell_centres((64, 32), 2, plain).tolist() == [[16, 8], [48, 8], [16, 24], [48, 24]]
    # Shortest edge 32 on a 64 x 32 image keeps it; the 32 x 32 centre crop covers x 16..48.
    crop = {"shortest_edge": 32, "size": None, "crop": (32, 32)}
    assert cell_centres((64, 32), 2, crop).tolist() == [[24, 8], [40, 8], [24, 24], [40, 24]]
    pipe = Pipeline.from_bundle(DEMO, vlm_backend="torch", max_new_tokens=2)
    ort = Pipeline.from_bundle(DEMO, max_new_tokens=2)
    # transformers' CLIP processor and the numpy one read to the same geometry
    assert processor_geometry(pipe.vlm.processor.image_processor) == processor_geometry(ort.vlm.processor.image_processor)


def test_hot_cells_is_the_detectors_decision_per_cell():
    cells = np.array([[0.9, 0.1], [0.2, 0.2], [0.1, 0.65]])
    raw = DetectorConfig(d_vfm=4, d_llm=4, threshold=0.5)
    assert hot_cells(cells, raw).tolist() == [True, False, True]
    cal = DetectorConfig(d_vfm=4, d_llm=4, score_mean=[0.5, 0.5], score_std=[0.1, 0.1], z_threshold=2.0)
    assert hot_cells(cells, cal).tolist() == [True, False, False]
    assert hot_cells(cells, cal, 0.0).tolist() == [True, False, True]
    layout = {"tokens_per_image": 5}  # a CLS token and a 2 x 2 grid: the CLS token is never refined
    sim = np.zeros((2, 2, 2), dtype=np.float32)
    sim[0, 0, 0] = 10.0
    geometry = {"shortest_edge": None, "size": (8, 8), "crop": None}
    mask = token_mask(sim, (8, 8), layout, geometry, raw, None)
    assert mask.tolist()[0] == 0.0 and mask.sum() >= 1 and mask[1] == 1.0



def test_class_masks_keep_the_cells_whose_best_class_is_allowed():
    """``refine_mask_classes``: a cell counts only when its best class (highest z) passes z and is one of the
    classes given (the image's detections, or the classes the hint does not name): a cell where an allowed
    class passes z but another class stands out more is left alone; none given, no cell; None, every class
    (``"any"``: any class above z, the same as the best one)."""
    cells = np.array([[0.9, 0.1], [0.2, 0.2], [0.1, 0.65], [0.9, 0.8]])
    cal = DetectorConfig(d_vfm=4, d_llm=4, score_mean=[0.5, 0.5], score_std=[0.1, 0.1], z_threshold=2.0)
    assert hot_cells(cells, cal, 0.0, None).tolist() == [True, False, True, True]
    assert hot_cells(cells, cal, 0.0, [0]).tolist() == [True, False, False, True]  # class 1's cell left out
    assert hot_cells(cells, cal, 0.0, [1]).tolist() == [False, False, True, False]  # the last cell is class 0's (z 4 > 3)
    assert hot_cells(cells, cal, 0.0, []).tolist() == [False, False, False, False]
    assert hot_cells(cells, cal, 0.0, [1, 0]).tolist() == [True, False, True, True]
    assert hot_cells(cells, cal, 3.5, [1]).tolist() == [False, False, False, False]


@pytest.fixture(scope="module")
def pipes():
    return Pipeline.from_bundle(DEMO, max_new_tokens=32), Pipeline.from_bundle(DEMO, vlm_backend="torch", max_new_tokens=32)


def test_the_pipelines_class_masks_are_their_detections_cells(pipes):
    """On the examples: "reported" keeps exactly the cells whose best class passes z and is one of the image's
    detections, "unhinted" those whose best class the hint does not name (with no hint: the any-class mask); a frame
    without detections gets no reported cell; refinement alone (no hint) runs "unhinted" as "any"; the
    exported and the transformers VLM answer alike with each setting."""
    ort = pipes[0]
    images = [load_image(p) for p in IMAGES]
    dets = [ort.detect(im) for im in images]
    assert all(d.detections for d in dets[:3])
    hinted = [[x.name for x in d.detections] for d in dets]
    every = ort._refine_masks(images, dets, 0.0, classes="any")
    reported = ort._refine_masks(images, dets, 0.0, classes="reported")
    unhinted = ort._refine_masks(images, dets, 0.0, classes="unhinted", hinted=hinted)
    assert np.array_equal(ort._refine_masks(images, dets, 0.0, classes="unhinted"), every)  # no hint: every class
    assert np.all(reported <= every) and reported.sum() < every.sum()  # other classes' cells dropped
    assert np.all(unhinted <= every) and unhinted.sum() < every.sum()
    per = int(ort.vlm.image_token_layout()["tokens_per_image"])
    names = list(ort.class_names)
    for i, (im, d) in enumerate(zip(images, dets)):
        _, offset, _, cells = ort._token_cells(i, im, d, "test", {})
        mine = [names.index(n) for n in hinted[i]]
        want = hot_cells(cells, ort.detector_cfg, 0.0, mine)
        assert np.array_equal(reported[i * per + offset:(i + 1) * per] > 0, want)
        want = hot_cells(cells, ort.detector_cfg, 0.0, [c for c in range(len(names)) if c not in mine])
        assert np.array_equal(unhinted[i * per + offset:(i + 1) * per] > 0, want)
    blank = dataclasses.replace(dets[0], detections=[])
    assert every[:per].sum() > 0 and ort._refine_masks(images[:1], [blank], 0.0, classes="reported").sum() == 0
    alone = [r.answer for r in ort.batch(IMAGES, hints=False)]
    try:
        for which in ("reported", "unhinted"):
            for p in pipes:
                p.refine_mask_classes = which
            assert [p.describe()["refine_mask_classes"] for p in pipes] == [which, which]
            assert [r.answer for r in pipes[0].batch(IMAGES)] == [r.answer for r in pipes[1].batch(IMAGES)]
            assert np.array_equal(ort.refine_mask(IMAGES[0], hints=True),
                                  ort._refine_masks(images[:1], dets[:1], 0.0, classes=which, hinted=hinted[:1]))
        assert [r.answer for r in ort.batch(IMAGES, hints=False)] == alone  # unhinted without hints: every class
        with pytest.raises(InputError, match="refine_mask_classes must be one of any, reported, unhinted, not 'all'"):
            pipes[0].refine_mask_classes = "all"
    finally:
        for p in pipes:
            p.refine_mask_classes = "any"


def test_masked_tokens_are_the_plain_or_the_refined_encoders(pipes):
    ort = pipes[0]
    images = [load_image(p) for p in IMAGES]
    dets = [ort.detect(im) for im in images]
    mask = ort._refine_masks(images, dets, 0.0)
    bias = ort._class_biases(images, dets)  # the demo's adapter reads the detector's z-scores (detector_bias)
    feeds = ort.vlm.prefill_inputs(images, ["Describe the objects."] * len(images))
    plain, refined = ort.vlm.vision_features(feeds, False), ort.vlm.vision_features(feeds, True, None, bias)
    got = ort.vlm.vision_features(feeds, True, mask, bias)
    on = mask > 0
    assert 0 < on.sum() < on.size  # the examples hold cells of both kinds
    assert np.array_equal(got[on], refined[on]) and np.array_equal(got[~on], plain[~on])
    assert not np.array_equal(refined[~on], plain[~on])  # the mask did something


@pytest.mark.parametrize("which", [0, 1], ids=["ort", "torch"])
def test_extreme_z_gives_the_unrefined_and_the_unmasked_answers(pipes, which):
    pipe = pipes[which]
    own = pipe.refine_mask_z
    try:
        pipe.refine_mask_z = None  # every visual token refined: the paper's method
        unmasked = [r.answer for r in pipe.batch(IMAGES, hints=False, refine=True)]
        plain = [r.answer for r in pipe.batch(IMAGES, hints=False, refine=False)]
        assert unmasked != plain  # else the extremes below could not tell the mask's ends apart
        pipe.refine_mask_z = 1e6  # no cell reaches it: no token changes
        assert [r.answer for r in pipe.batch(IMAGES, hints=False, refine=True)] == plain
        pipe.refine_mask_z = -1e6  # every cell passes: the paper's refinement
        assert [r.answer for r in pipe.batch(IMAGES, hints=False, refine=True)] == unmasked
        assert pipe.describe()["refine_mask_z"] == -1e6
        assert "refine_mask" in pipe(IMAGES[0]).timings_ms  # the mask's own stage, timed
    finally:
        pipe.refine_mask_z = own
    assert pipe.describe()["refine_mask_z"] == own


def test_ort_and_torch_agree_with_the_mask(pipes):
    # Both pipelines run the bundle's own setting (the demo bundle's mask at z = 0).
    assert [p.refine_mask_z for p in pipes] == [0.0, 0.0]
    assert [r.answer for r in pipes[0].batch(IMAGES)] == [r.answer for r in pipes[1].batch(IMAGES)]


def test_the_bundle_sets_the_default_and_off_turns_it_off(tmp_path):
    from rtrt.runtime.bundle import load_bundle

    assert load_bundle(DEMO).manifest.adapter.refine_mask_z == 0.0
    for arg, want in (("bundle", 0.0), (None, None), (-0.5, -0.5)):
        assert Pipeline.from_bundle(DEMO, load_vlm_model=True, refine_mask_z=arg).refine_mask_z == want
    assert Pipeline.from_bundle(DEMO, load_vlm_model=False).refine_mask_z is None  # no VLM: nothing to refine
    with pytest.raises(InputError, match="'bundle', a finite number or None"):
        Pipeline.from_bundle(DEMO, load_vlm_model=False, refine_mask_z="off")


def test_refine_mask_errors(pipes, tmp_path, capsys):
    own = pipes[0].refine_mask_z
    for bad in (float("nan"), "abc", True, [1]):
        with pytest.raises(InputError, match="finite number or None"):
            pipes[0].refine_mask_z = bad
    assert pipes[0].refine_mask_z == own
    cal = DetectorConfig(d_vfm=4, d_llm=4, score_mean=[0.5], score_std=[0.1], z_threshold=1.0)
    with pytest.raises(ModelMismatchError, match=r"\[C, gh, gw\] map"):  # a non-square VFM grid keeps [C, N]
        token_mask(np.zeros((1, 6), dtype=np.float32), (8, 8), {"tokens_per_image": 4},
                   {"shortest_edge": None, "size": (8, 8), "crop": None}, cal, 0.0)
    no_vlm = Pipeline.from_bundle(DEMO, load_vlm_model=False)
    with pytest.raises(ModelMismatchError, match="LLaVA's fixed image-token grid"):
        no_vlm.refine_mask_z = 0.0
    answers, ran = {}, {}
    for arg in ("0", "off", "bundle", "1e6"):
        assert main(["infer", "--image", IMAGES[0], "--refine-mask-z", arg, "--json", "--max-new-tokens", "48"]) == 0
        out = json.loads(capsys.readouterr().out)
        answers[arg], ran[arg] = out["answer"], out["refine_mask_z"]
    assert ran == {"0": 0.0, "off": None, "bundle": 0.0, "1e6": 1e6}  # --json says which mask ran
    for arg, want in (("any", "any"), ("unhinted", "unhinted")):
        assert main(["infer", "--image", IMAGES[0], "--refine-mask-classes", arg, "--json", "--max-new-tokens", "4"]) == 0
        assert json.loads(capsys.readouterr().out)["refine_mask_classes"] == want
    assert main(["infer", "--image", IMAGES[0], "--refine-mask-z", "off", "--json", "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["refine_mask_classes"] is None  # no mask: no classes
    assert answers["0"] == answers["bundle"] and answers["off"] != answers["1e6"]
    assert main(["infer", "--image", IMAGES[0], "--no-refine", "--json", "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["refine_mask_z"] is None  # nothing refined
    for bad in ("nan", "inf", "x"):
        with pytest.raises(SystemExit):
            main(["infer", "--image", IMAGES[0], "--refine-mask-z", bad])
        assert "expected a finite number, off or bundle" in capsys.readouterr().err


def test_a_refined_encoder_without_the_mask_input_is_refused(pipes, monkeypatch):
    """A bundle exported before the refined encoder took ``refine_mask``: a mask is refused when it is
    set (at load for the bundle's own), with the fix in one line; every token refined still runs."""
    from rtrt.runtime.errors import BundleError
    from rtrt.runtime.names import VISION_ENCODER_REFINED

    pipe = pipes[0]
    own = pipe.refine_mask_z
    monkeypatch.setitem(pipe.vlm._vision_inputs, VISION_ENCODER_REFINED, ["pixel_values"])  # what such a graph lists
    assert not pipe.vlm.takes_refine_mask
    with pytest.raises(BundleError, match=r"takes no refinement mask .*rtrt export --bundle .* --vlm`$"):
        pipe.refine_mask_z = 0.5
    assert pipe.refine_mask_z == own
    feeds = pipe.vlm.prefill_inputs([load_image(IMAGES[0])], ["Describe the objects."])
    with pytest.raises(BundleError, match=r"takes no refine_mask .*rtrt export --bundle .* --vlm"):
        pipe.vlm.vision_features(feeds, True, np.ones(196, np.float32))
    # The bundle's own setting is checked at load and names itself and the way around it.
    from rtrt.runtime.vlm_ort import OrtVLM

    real = OrtVLM.from_bundle.__func__

    def old_export(cls, *a, **k):
        vlm = real(cls, *a, **k)
        vlm._vision_inputs[VISION_ENCODER_REFINED] = ["pixel_values"]
        return vlm
    monkeypatch.setattr(OrtVLM, "from_bundle", classmethod(old_export))
    with pytest.raises(BundleError, match=r"^the bundle's adapter\.refine_mask_z 0: .* pass refine_mask_z=None \(--refine-mask-z off\)"):
        Pipeline.from_bundle(DEMO)
    assert Pipeline.from_bundle(DEMO, refine_mask_z=None).refine_mask_z is None
