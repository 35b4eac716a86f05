"""Calibrated hints (issue 14, item 4): per-class z-scores, stored in the manifest and applied by the runtime."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from fixtures.tiny_bundle import make_tiny_bundle
from rtrt.runtime import load_bundle
from rtrt.runtime.modules import DetectorConfig, select_detections
from rtrt.runtime.pipeline import Pipeline
from rtrt.tools.calibrate import fit_calibration, hint_quality
from rtrt.tools.cli import main as rtrt_main
from rtrt.tools.demo.world import WorldConfig, generate_world


def test_decision_uses_z_scores_and_a_threshold_that_applies():
    names = ["a", "b", "c"]
    cfg = DetectorConfig(8, 8, threshold=0.3, top_k=2, score_mean=[0.5, 0.1, 0.4], score_std=[0.1, 0.1, 0.05], z_threshold=1.0)
    assert cfg.calibrated and cfg.decision_threshold == 1.0
    scores = np.array([0.55, 0.25, 0.52])  # raw: a first; z: a 0.5, b 1.5, c 2.4
    dets = select_detections(scores, names, cfg.top_k, cfg.decision_threshold, rank_by=cfg.decision_scores(scores))
    assert [d.name for d in dets] == ["c", "b"]  # a is above the raw threshold but below its own z threshold
    assert dets[0].score == pytest.approx(0.52)  # detections keep the raw score
    # Every class at its mean: nothing is hinted, although every raw score is above 0.3.
    mean = np.array(cfg.score_mean)
    assert select_detections(mean, names, 2, cfg.decision_threshold, rank_by=cfg.decision_scores(mean)) == []
    plain = DetectorConfig(8, 8)
    assert not plain.calibrated and np.array_equal(plain.decision_scores(scores), scores)
    with pytest.raises(ValueError, match="calibration has 3 classes"):
        cfg.decision_scores(np.zeros(4))


def test_fit_picks_the_best_f1_and_respects_given_values():
    rng = np.random.default_rng(0)
    present = [{i % 3} if i % 4 else set() for i in range(60)]
    scores = rng.normal(0.4, 0.02, (60, 3))
    for i, p in enumerate(present):
        for c in p:
            scores[i, c] += 0.1  # present classes score higher, each by its own offset
    fit = fit_calibration(scores, present, top_k=3)
    assert fit["quality"]["f1"] == 100.0 and fit["top_k"] == 1
    assert fit["quality"]["no_hint_when_nothing_rare"] == 100.0
    fixed = fit_calibration(scores, present, z=0.0, max_hints=3)
    assert fixed["z_threshold"] == 0.0 and fixed["top_k"] == 3 and fixed["quality"]["f1"] < 100.0
    assert hint_quality([[0], []], [{0}, set()]) == {"precision": 100.0, "recall": 100.0, "f1": 100.0, "per_image": 0.5,
                                                       "no_hint_when_nothing_rare": 100.0}


def test_absent_stats_standardise_each_class_by_the_images_without_it():
    # Class 0 is in most images, class 1 in few: over every image, class 0's mean sits among its
    # positives, so one z threshold hints it less readily than class 1; over absent images only,
    # both classes' z-scores measure the distance from their own false-hint level.
    rng = np.random.default_rng(1)
    present = [({0} if i % 5 else set()) | ({1} if i % 10 == 0 else set()) for i in range(200)]
    scores = rng.normal(0.3, 0.01, (200, 2))
    for i, p in enumerate(present):
        for c in p:
            scores[i, c] += 0.1
    absent0 = np.array([0 not in p for p in present])
    fit = fit_calibration(scores, present, z=2.0, max_hints=2, stats="absent")
    assert fit["stats"] == "absent"
    assert fit["score_mean"][0] == pytest.approx(scores[absent0, 0].mean())
    assert fit["score_std"][0] == pytest.approx(scores[absent0, 0].std())
    plain = fit_calibration(scores, present, z=2.0, max_hints=2)
    assert plain["stats"] == "all" and plain["score_mean"][0] == pytest.approx(scores[:, 0].mean())
    # Over every image class 0's z threshold of 2 lies above its positives (recall lost); over its
    # absent images both classes are found.
    assert fit["quality"]["recall"] == 100.0 and plain["quality"]["recall"] < 50.0
    with pytest.raises(ValueError, match="stats"):
        fit_calibration(scores, present, stats="present")


def test_min_precision_picks_the_highest_recall_that_keeps_the_precision():
    # Class 0 separates well, class 1 overlaps its absent images: the best F1 hints class 0 alone
    # (a high threshold); a precision floor of 60 lowers it until recall is as high as that floor allows.
    rng = np.random.default_rng(1)
    present = [{0} if i % 3 == 0 else ({1} if i % 3 == 1 else set()) for i in range(300)]
    scores = rng.normal(0.0, 1.0, (300, 2))
    for i, p in enumerate(present):
        scores[i, 0] += 4.0 * (0 in p)
        scores[i, 1] += 1.0 * (1 in p)
    best_f1 = fit_calibration(scores, present, top_k=2)
    floor = fit_calibration(scores, present, top_k=2, min_precision=60.0)
    assert floor["quality"]["min_precision_met"] and floor["quality"]["precision"] >= 60.0
    assert floor["quality"]["recall"] > best_f1["quality"]["recall"]
    # Every pair above the floor has at most that recall (the fit is the highest one).
    zs = (scores - scores.mean(0)) / scores.std(0)
    from rtrt.tools.calibrate import _hinted
    for k in (1, 2):
        for t in np.arange(0.0, 4.01, 0.1):
            q = hint_quality(_hinted(zs, round(float(t), 1), k), present)
            if q["precision"] >= 60.0:
                assert q["recall"] <= floor["quality"]["recall"]
    # A floor nothing reaches (class 1's scores carry nothing): the best F1, and the quality says so.
    only1 = [p - {0} for p in present]
    noise = scores.copy()
    noise[:, 1] = rng.normal(0.0, 1.0, 300)
    none = fit_calibration(noise[:, 1:], [{0} if p else set() for p in only1], top_k=1, min_precision=90.0)
    plain = fit_calibration(noise[:, 1:], [{0} if p else set() for p in only1], top_k=1)
    assert not none["quality"]["min_precision_met"] and none["quality"]["precision"] < 90.0
    assert (none["z_threshold"], none["top_k"]) == (plain["z_threshold"], plain["top_k"])


@pytest.fixture(scope="module")
def world_and_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    generate_world(WorldConfig(seed=5, pretrain=0, plugin=0, val=6, test=0, width=96, height=96), root / "world", progress=False)
    return root / "world", make_tiny_bundle(root / "bundle")


def test_rtrt_calibrate_writes_the_manifest_and_the_pipeline_applies_it(world_and_bundle, tmp_path, capsys):
    world, src = world_and_bundle
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    assert rtrt_main(["calibrate", "--bundle", str(bundle), "--data", str(world), "--split", "val", "--dry-run", "--json", "--backend", "torch"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["written"] is False and dry["images"] == 6 and not load_bundle(bundle).manifest.detector.calibrated
    assert rtrt_main(["calibrate", "--bundle", str(bundle), "--data", str(world), "--z", "0.5", "--max-hints", "2", "--backend", "torch"]) == 0
    cfg = load_bundle(bundle).manifest.detector  # hashes verify: the update was one atomic bundle version
    assert cfg.calibrated and cfg.z_threshold == 0.5 and cfg.top_k == 2 and len(cfg.score_mean) == len(cfg.score_std) == 8
    # Applied: on a constructed image whose every score sits at the class mean, nothing is hinted.
    pipe = Pipeline.from_bundle(bundle, "torch", load_vlm_model=False)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    res = pipe.detect(image)
    at_mean = load_bundle(bundle)
    at_mean.manifest.detector = dataclasses.replace(cfg, score_mean=[float(v) for v in res.scores])
    at_mean.add_files({})
    assert Pipeline.from_bundle(bundle, "torch", load_vlm_model=False).detect(image).detections == []
    # A class below its threshold is never hinted, whatever its raw score.
    z = pipe.detector_cfg.decision_scores(res.scores)
    hinted = {d.name for d in res.detections}
    assert all(z[i] > 0.5 for i, n in enumerate(pipe.class_names) if n in hinted) and len(hinted) <= 2


def test_bad_calibrate_arguments_exit_2(world_and_bundle, capsys):
    world, bundle = world_and_bundle
    assert rtrt_main(["calibrate", "--bundle", str(bundle), "--data", str(world), "--z", "high"]) == 2
    assert "--z" in capsys.readouterr().err
    assert rtrt_main(["calibrate", "--bundle", str(bundle), "--data", str(world), "--split", "nope"]) == 2
    assert "no CODA-LM split" in capsys.readouterr().err
    assert rtrt_main(["calibrate", "--bundle", str(bundle), "--data", str(world), "--min-precision", "150"]) == 2
    assert "--min-precision" in capsys.readouterr().err


def test_min_precision_is_recorded(world_and_bundle, tmp_path, capsys):
    world, src = world_and_bundle
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    assert rtrt_main(["calibrate", "--bundle", str(bundle), "--data", str(world), "--min-precision", "10", "--backend", "torch"]) == 0
    assert "rule:" in capsys.readouterr().out
    cal = load_bundle(bundle).manifest.training["calibration"]
    assert cal["min_precision"] == 10.0 and "min_precision_met" in cal["hints_after"]


def test_absent_stats_are_recorded_and_stored(world_and_bundle, tmp_path, capsys):
    world, src = world_and_bundle
    import shutil

    means = {}
    for stats in ("all", "absent"):
        bundle = tmp_path / stats
        shutil.copytree(src, bundle)
        assert rtrt_main(["calibrate", "--bundle", str(bundle), "--data", str(world), "--stats", stats, "--backend", "torch"]) == 0
        m = load_bundle(bundle).manifest
        assert m.training["calibration"].get("stats", "all") == stats
        means[stats] = m.detector.score_mean
    capsys.readouterr()
    assert means["all"] != means["absent"]
    with pytest.raises(SystemExit) as bad:
        rtrt_main(["calibrate", "--bundle", str(src), "--data", str(world), "--stats", "present"])
    assert bad.value.code == 2 and "--stats" in capsys.readouterr().err


def test_calibrate_sets_keeps_and_removes_the_refinement_mask(world_and_bundle, tmp_path, capsys):
    world, src = world_and_bundle
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    base = ["calibrate", "--bundle", str(bundle), "--data", str(world), "--backend", "torch"]
    assert load_bundle(bundle).manifest.adapter.refine_mask_z is None
    assert rtrt_main([*base, "--refine-mask-z", "0.5"]) == 0
    assert "exceeds 0.5 (--refine-mask-z)" in capsys.readouterr().out
    assert load_bundle(bundle).manifest.adapter.refine_mask_z == 0.5
    assert json.loads((bundle / "manifest.json").read_text())["adapter"]["refine_mask_z"] == 0.5
    assert rtrt_main(base) == 0  # keep (the default): a recalibration leaves the setting
    assert load_bundle(bundle).manifest.adapter.refine_mask_z == 0.5
    assert rtrt_main([*base, "--refine-mask-z", "off"]) == 0
    assert "every visual token" in capsys.readouterr().out
    assert "refine_mask_z" not in json.loads((bundle / "manifest.json").read_text())["adapter"]  # off: not written
    assert load_bundle(bundle).manifest.adapter.refine_mask_z is None
    for bad in ("bundle", "nan"):
        with pytest.raises(SystemExit):
            rtrt_main([*base, "--refine-mask-z", bad])
        assert "--refine-mask-z: expected a finite number, off or keep" in capsys.readouterr().err


def test_calibrate_sets_and_keeps_whose_cells_the_mask_keeps(world_and_bundle, tmp_path, capsys):
    """``--refine-mask-classes reported``: written into the adapter section and said; a recalibration keeps it;
    ``any`` (the default) is not written, so a bundle without it keeps its manifest bytes."""
    world, src = world_and_bundle
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    base = ["calibrate", "--bundle", str(bundle), "--data", str(world), "--backend", "torch"]
    assert load_bundle(bundle).manifest.adapter.refine_mask_classes == "any"
    assert rtrt_main([*base, "--refine-mask-z", "0", "--refine-mask-classes", "reported"]) == 0
    assert "of the classes the detector reports (--refine-mask-classes reported)" in capsys.readouterr().out
    assert json.loads((bundle / "manifest.json").read_text())["adapter"]["refine_mask_classes"] == "reported"
    assert rtrt_main(base) == 0  # keep
    assert load_bundle(bundle).manifest.adapter.refine_mask_classes == "reported"
    assert rtrt_main([*base, "--refine-mask-classes", "any"]) == 0
    assert "refine_mask_classes" not in json.loads((bundle / "manifest.json").read_text())["adapter"]
    assert load_bundle(bundle).manifest.adapter.refine_mask_classes == "any"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        rtrt_main([*base, "--refine-mask-classes", "some"])
    assert "invalid choice: 'some'" in capsys.readouterr().err


def test_calibrate_refuses_a_mask_the_bundle_cannot_run(world_and_bundle, tmp_path, capsys):
    """No adapter, or a VLM without LLaVA's fixed token grid: one line, exit 2, nothing written."""
    world, src = world_and_bundle
    import shutil

    from rtrt.runtime.bundle import VLMSpec

    for name, change, message in (
        ("no_adapter", lambda m: setattr(m, "adapter", None), "needs a bundle with an adapter"),
        ("internvl", lambda m: setattr(m, "vlm", VLMSpec(family="internvl", ref="/opt/models/internvl", hidden_size=64)),
         "needs LLaVA's fixed image-token grid, not a 'internvl' VLM"),
    ):
        bundle = tmp_path / name
        shutil.copytree(src, bundle)
        b = load_bundle(bundle)
        change(b.manifest)
        b.add_files({})
        before = (bundle / "manifest.json").read_bytes()
        assert rtrt_main(["calibrate", "--bundle", str(bundle), "--data", str(world), "--backend", "torch",
                          "--refine-mask-z", "0"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert (bundle / "manifest.json").read_bytes() == before


def test_a_refinement_mask_in_the_manifest_is_a_finite_number(tmp_path):
    from rtrt.runtime.bundle import Manifest
    from rtrt.runtime.errors import BundleError

    d = load_bundle(make_tiny_bundle(tmp_path / "b")).manifest.to_dict()
    for bad in ("0", float("nan"), True):
        d["adapter"]["refine_mask_z"] = bad
        with pytest.raises(BundleError, match="refine_mask_z must be a finite number or null"):
            Manifest.from_dict(d)
    d["adapter"]["refine_mask_z"] = -1
    assert Manifest.from_dict(d).adapter.refine_mask_z == -1
    for bad in ("all", 1, None):
        d["adapter"]["refine_mask_classes"] = bad
        with pytest.raises(BundleError, match="refine_mask_classes"):
            Manifest.from_dict(d)
    d["adapter"]["refine_mask_classes"] = "reported"
    assert Manifest.from_dict(d).adapter.refine_mask_classes == "reported"


# ----------------------------------------------------------------------------- region questions
def test_region_threshold_rule():
    from rtrt.tools.calibrate import fit_region_threshold, region_quality

    # Six boxes: the best class's z, whether it is the box's category, whether the box is rare.
    z = np.array([2.0, 1.5, 0.5, -0.5, -1.0, -2.0])
    right = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    rare = np.array([1, 1, 1, 1, 0, 0], dtype=bool)
    q = region_quality(z, right, rare, None)
    assert (q["precision"], q["recall"], q["per_region"]) == (50.0, 75.0, 1.0)
    # At precision >= 70: z > -0.6 .. -0.5 hint 4 boxes, 3 right (75 / 75); the highest such threshold wins the tie.
    fit = fit_region_threshold(z, right, rare, min_precision=70.0)
    assert fit["region_z_threshold"] == -0.6 and fit["quality"]["min_precision_met"]
    assert (fit["quality"]["precision"], fit["quality"]["recall"]) == (75.0, 75.0)
    # Without a floor: the best F1 (also 75 / 75 here); with one nothing reaches: the same, said.
    assert fit_region_threshold(z, right, rare)["region_z_threshold"] == -0.6
    none = fit_region_threshold(z, right, rare, min_precision=100.1)
    assert not none["quality"]["min_precision_met"] and none["region_z_threshold"] == -0.6
    # Every box right: every box hinted; of the thresholds that do it, the highest (-2.1 < -2.0).
    assert fit_region_threshold(z, np.ones(6, bool), np.ones(6, bool), min_precision=50.0)["region_z_threshold"] == -2.1
    # A z below the grid on a right box: only no threshold at all hints it.
    assert fit_region_threshold(np.array([-9.0, 1.0]), np.ones(2, bool), np.ones(2, bool))["region_z_threshold"] is None
    with pytest.raises(ValueError, match="1-D of one length"):
        fit_region_threshold(z, right[:3], rare)


def test_calibrate_fits_the_region_threshold_and_the_pipeline_applies_it(world_and_bundle, tmp_path, capsys):
    import shutil

    from rtrt.runtime.detection import region_means
    from rtrt.tools.calibrate import fit_region_threshold
    from rtrt.trainer.coda import iter_annotations

    world, src = world_and_bundle
    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    assert rtrt_main(["calibrate", "--bundle", str(bundle), "--data", str(world), "--backend", "torch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = load_bundle(bundle).manifest.detector
    # Recomputed by hand from the frames: the fit is over every region box of the split.
    pipe = Pipeline.from_bundle(bundle, "torch", load_vlm_model=False)
    names = pipe.class_names
    zs, right, rare = [], [], []
    for path, ann in iter_annotations(world / "CODA-LM" / "val"):
        frame = Image.open(world / "val" / "images" / (path.stem.split("_", 1)[1] + ".jpg")).convert("RGB")
        sim = pipe.detect(frame).similarity
        for reg in ann.region_perception:
            x, y, w, h = reg.box
            zb = cfg.decision_scores(region_means(sim, (x, y, x + w, y + h), frame.size))
            zs.append(zb.max())
            right.append(names[int(zb.argmax())] == reg.category_name)
            rare.append(reg.category_name in names)
    assert any(rare), "the tiny world's val split holds rare region boxes"
    want = fit_region_threshold(np.array(zs), np.array(right), np.array(rare))
    assert cfg.region_z_threshold == want["region_z_threshold"] == out["region_z_threshold"]
    assert out["region_hints"]["regions"] == len(zs) and out["region_hints"]["rare_regions"] == sum(rare)
    # Applied: a threshold nothing reaches gives a region question no hint; one everything passes, one hint.
    frame = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for cut, n in ((1e9, 0), (-1e9, 1)):
        b = load_bundle(bundle)
        b.manifest.detector = dataclasses.replace(cfg, region_z_threshold=cut)
        b.add_files({})
        p = Pipeline.from_bundle(bundle, "torch", load_vlm_model=False)
        sim = p.detect(frame).similarity
        from rtrt.runtime.detection import region_detection

        got = region_detection(sim, (4, 4, 40, 40), frame.size, p.class_names, p.detector_cfg.decision_scores,
                               p.detector_cfg.region_z_threshold)
        assert (got is not None) == bool(n)
    # off: always hinted (None); a number: that number; anything else: one line, exit 2.
    for arg, want_t in (("off", None), ("0.7", 0.7)):
        assert rtrt_main(["calibrate", "--bundle", str(bundle), "--data", str(world), "--backend", "torch", "--region-z", arg]) == 0
        assert load_bundle(bundle).manifest.detector.region_z_threshold == want_t
        assert "region questions: the box's best class hinted" in capsys.readouterr().out
    for bad in ("high", "nan", "inf"):  # refused before anything is written: the bundle still loads
        assert rtrt_main(["calibrate", "--bundle", str(bundle), "--data", str(world), "--region-z", bad]) == 2
        assert "--region-z must be a finite number, auto or off" in capsys.readouterr().err
    assert load_bundle(bundle).manifest.detector.region_z_threshold == 0.7
