"""The runtime Pipeline and `rtrt infer` on a tiny bundle + tiny LLaVA (issue 5).

Correctness (the plug-in off equals the stock VLM), determinism, thread safety, a soak run,
bad questions/bundles/VLMs, and the CLI's JSON, heatmap and exit codes.
"""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from rtrt.runtime import BundleError, InputError, ModelMismatchError
from rtrt.runtime.bundle import VLMSpec, load_bundle
from rtrt.runtime.pipeline import DEFAULT_QUESTION, Pipeline
from rtrt.runtime.vlm import load_vlm
from fixtures.tiny_vlm import build_tiny_vlm
from fixtures.tiny_bundle import make_tiny_bundle


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    vlm_dir = build_tiny_vlm("llava", root / "vlm", seed=0)
    fam = load_vlm(vlm_dir)
    spec = VLMSpec("llava", str(vlm_dir), fam.hidden_size, fam.image_token_layout())
    bundle = make_tiny_bundle(root / "bundle", d_llm=fam.hidden_size, vlm=spec)
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        a = rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)
        p = root / f"img{i}.png"
        Image.fromarray(a).save(p)
        images.append(p)
    return {"root": root, "vlm": vlm_dir, "bundle": bundle, "images": images}


@pytest.fixture(scope="module")
def pipe(assets):
    return Pipeline.from_bundle(assets["bundle"], backend="torch", max_new_tokens=8)


def test_plugin_off_equals_stock_vlm(pipe, assets):
    img = Image.open(assets["images"][0]).convert("RGB")
    res = pipe(img, "what is ahead?", hints=False, refine=False)
    fam = pipe.vlm
    batch = fam.prepare([img], ["what is ahead?"])
    with torch.no_grad():
        stock = fam.model.generate(**batch, max_new_tokens=8, do_sample=False)
    new = stock[:, batch["input_ids"].shape[1]:]
    assert res.answer == fam.decode(new)[0].strip()
    assert res.hints == []


def test_plugin_false_is_the_vlm_alone_without_a_detector_call(pipe, assets, monkeypatch):
    img = assets["images"][0]
    off = pipe(img, "what is ahead?", hints=False, refine=False)
    calls = []
    real = pipe.backend.detect
    monkeypatch.setattr(pipe.backend, "detect", lambda *a, **k: calls.append(1) or real(*a, **k))
    (alone,) = pipe.batch([img], ["what is ahead?"], plugin=False)
    assert calls == []  # no detector work at all
    assert alone.answer == off.answer
    assert alone.detections == [] and alone.hints == [] and alone.similarity is None
    assert "detector" not in alone.timings_ms and "adapter" not in alone.timings_ms
    for stage in ("image_decode", "prompt_build", "vision_tower", "prefill", "decode_per_token"):
        assert stage in alone.timings_ms


def test_refine_changes_answer_path_and_hints_go_into_prompt(pipe, assets):
    img = assets["images"][0]
    res = pipe(img, "what is ahead?")
    assert res.detections, "tiny bundle's threshold is low enough to report classes"
    assert res.hints == [d.name for d in res.detections]
    for stage in ("image_decode", "detector", "prompt_build", "vision_tower", "adapter", "prefill", "decode_per_token"):
        assert stage in res.timings_ms and res.timings_ms[stage] >= 0
    d = res.to_dict()
    assert set(d) == {"answer", "detections", "timings_ms", "backend", "precision", "providers", "vlm_backend", "refine_mask_z",
                      "refine_mask_classes"}
    assert (d["backend"], d["precision"], d["providers"], d["vlm_backend"]) == ("torch", "fp32", [], "torch")
    assert all(set(x) == {"name", "label", "score", "box", "peak"} for x in d["detections"])


def test_region_question_hints_the_box_class_and_the_vlm_sees_the_box(pipe, assets, monkeypatch):
    from rtrt.runtime.detection import region_detection
    from rtrt.runtime.image import draw_region

    frame = Image.open(assets["images"][2]).convert("RGB")
    box = (8.0, 10.0, 40.0, 30.0)
    seen = {}
    detect, answer = pipe._detect_images, pipe._answer
    monkeypatch.setattr(pipe, "_detect_images", lambda ims, t: seen.setdefault("detector", list(ims)) and detect(ims, t))
    monkeypatch.setattr(pipe, "_answer", lambda ims, *a, **k: seen.setdefault("vlm", list(ims)) and answer(ims, *a, **k))
    res = pipe(frame, "what is in the box?", region=box)
    cfg = pipe.detector_cfg
    want = region_detection(res.similarity, box, frame.size, pipe.class_names,
                            cfg.decision_scores if cfg.calibrated else None)
    assert res.region == want and res.hints == [want.name]  # one class, the box's, not the image's detections
    assert res.to_dict()["region"] == want.to_dict()
    # The detector saw the frame, the VLM the frame with the box drawn as CODA-LM draws it.
    assert np.array_equal(np.asarray(seen["detector"][0]), np.asarray(frame))
    assert np.array_equal(np.asarray(seen["vlm"][0]), np.asarray(draw_region(frame, box)))
    monkeypatch.undo()
    # A given boxed image is what the VLM sees; drawn by hand it answers the same.
    given = pipe(frame, "what is in the box?", region=box, region_image=draw_region(frame, box))
    assert given.answer == res.answer and given.hints == res.hints
    plain = pipe(frame, "what is in the box?")
    assert plain.region is None and "region" not in plain.to_dict() and plain.hints == [d.name for d in plain.detections]
    off = pipe(frame, "what is in the box?", region=box, hints=False)
    assert off.hints == [] and off.region == want  # the region is still reported


def test_region_threshold_of_a_calibrated_bundle_is_applied(assets, tmp_path):
    import dataclasses
    import shutil

    from rtrt.runtime.detection import region_detection

    frame, box = Image.open(assets["images"][2]).convert("RGB"), (8.0, 10.0, 40.0, 30.0)
    bundle = tmp_path / "b"
    shutil.copytree(assets["bundle"], bundle)
    for cut in (1e9, -1e9, None):
        b = load_bundle(bundle)
        n = len(b.manifest.class_names)
        # Per-class statistics that reorder the classes: the box's raw best class is not its z-score's best.
        b.manifest.detector = dataclasses.replace(b.manifest.detector, score_mean=[0.5] + [0.0] * (n - 1),
                                                  score_std=[0.1] * n,
                                                  z_threshold=0.5, region_z_threshold=cut)
        b.add_files({})
        p = Pipeline.from_bundle(bundle, backend="torch", max_new_tokens=4)
        res = p(frame, "what is in the box?", region=box)
        cfg = p.detector_cfg
        best = region_detection(res.similarity, box, frame.size, p.class_names, cfg.decision_scores)
        assert best.name != region_detection(res.similarity, box, frame.size, p.class_names).name
        if cut == 1e9:  # nothing stands out that much: no region, no hint (not the image's detections either)
            assert res.region is None and res.hints == []
        else:  # ranked by the calibrated z-scores
            assert res.region == best and res.hints == [best.name]


def test_region_refusals(pipe, assets):
    img = assets["images"][0]  # 64 x 48
    with pytest.raises(InputError, match="outside the 64x48 image"):
        pipe(img, "q", region=(70, 0, 80, 10))
    with pytest.raises(InputError, match="empty"):
        pipe(img, "q", region=(10, 10, 5, 20))
    with pytest.raises(InputError, match="same picture"):
        pipe(img, "q", region=(0, 0, 10, 10), region_image=assets["images"][1])
    with pytest.raises(InputError, match="2 images but 1 regions"):
        pipe.batch(assets["images"][:2], ["q", "q"], regions=[(0, 0, 10, 10)])
    with pytest.raises(InputError, match="a region image needs its region"):
        pipe(img, "q", region_image=img)
    with pytest.raises(InputError, match="2 images but 3 region images"):
        pipe.batch(assets["images"][:2], ["q", "q"], regions=[None, None], region_images=[None] * 3)
    # A batch mixes region and ordinary questions.
    mixed = pipe.batch(assets["images"][:2], ["q", "q"], regions=[None, (0, 0, 30, 20)])
    assert mixed[0].region is None and mixed[1].region is not None and len(mixed[1].hints) == 1


def test_same_frame_same_answer(pipe, assets):
    a = pipe(assets["images"][1], "q")
    b = pipe(assets["images"][1], "q")
    assert a.answer == b.answer and a.detections == b.detections


def test_batch_equals_single_calls(pipe, assets):
    imgs = assets["images"][:2]
    batch = pipe.batch(imgs, ["short?", "a somewhat longer question here?"])
    singles = [pipe(imgs[0], "short?"), pipe(imgs[1], "a somewhat longer question here?")]
    assert [r.detections for r in batch] == [r.detections for r in singles]
    assert len(batch) == 2 and all(isinstance(r.answer, str) for r in batch)


def test_input_types_agree(pipe, assets):
    p = assets["images"][2]
    arr = np.asarray(Image.open(p).convert("RGB"))
    r1, r2, r3 = pipe.detect(p), pipe.detect(arr), pipe.detect(Image.fromarray(arr))
    assert r1.detections == r2.detections == r3.detections
    g = pipe.image_size // pipe.vfm_spec.patch_size
    assert r1.similarity.shape == (len(pipe.class_names), g, g)


def test_four_threads_equal_serial(pipe, assets):
    jobs = [(assets["images"][i % 3], f"question {i}?") for i in range(8)]
    serial = [pipe(img, q).answer for img, q in jobs]
    out: list = [None] * len(jobs)
    errors: list = []

    def worker(k):
        try:
            for i in range(k, len(jobs), 4):
                out[i] = pipe(*jobs[i]).answer
        except Exception as e:  # pragma: no cover - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and out == serial


def test_question_too_long_refused_before_compute(pipe, assets):
    calls = []
    orig = pipe.vlm.generate
    pipe.vlm.generate = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with pytest.raises(InputError, match="exceeds the model's"):
            pipe(assets["images"][0], "word " * 1100)
        with pytest.raises(InputError, match="cannot fit"):
            pipe(assets["images"][0], "x" * 10_000_000)
    finally:
        pipe.vlm.generate = orig
    assert calls == []


def test_bad_questions_and_arguments(pipe, assets):
    with pytest.raises(InputError):
        pipe(assets["images"][0], "   ")
    with pytest.raises(InputError):
        pipe.batch(assets["images"][:2], ["one"])
    with pytest.raises(InputError):
        pipe(assets["images"][0], "q", max_new_tokens=0)


def test_vlm_hidden_size_mismatch(assets, tmp_path):
    fam = load_vlm(assets["vlm"])
    spec = VLMSpec("llava", str(assets["vlm"]), 32, fam.image_token_layout())
    b = make_tiny_bundle(tmp_path / "b32", d_llm=32, vlm=spec)
    with pytest.raises(ModelMismatchError, match="hidden size 64 differs from the bundle's 32"):
        Pipeline.from_bundle(b, backend="torch")


def test_image_token_layout_mismatch(assets, tmp_path):
    fam = load_vlm(assets["vlm"])
    layout = dict(fam.image_token_layout(), tokens_per_image=576)
    spec = VLMSpec("llava", str(assets["vlm"]), fam.hidden_size, layout)
    b = make_tiny_bundle(tmp_path / "blayout", d_llm=fam.hidden_size, vlm=spec)
    with pytest.raises(ModelMismatchError, match="tokens_per_image"):
        Pipeline.from_bundle(b, backend="torch")


def test_tampered_bundle_refused(assets, tmp_path):
    import shutil

    b = tmp_path / "tampered"
    shutil.copytree(assets["bundle"], b)
    f = b / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="adapter.safetensors: sha256 mismatch"):
        Pipeline.from_bundle(b, backend="torch")


def test_soak_rss_stable(pipe, assets):
    """1,000 detect+refine calls: RSS grows by under 5% after warm-up."""
    import resource  # noqa: F401 - Linux only, like the vehicles we target

    def rss_kb():
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    img = np.asarray(Image.open(assets["images"][0]).convert("RGB"))
    fam = pipe.vlm
    batch = fam.prepare([Image.fromarray(img)], ["q"])
    with torch.inference_mode():
        v = fam.visual_tokens(batch)

    def step():
        pipe.detect(img)
        with torch.inference_mode():
            pipe.backend.refine(v[None], pipe.W)

    for _ in range(100):
        step()
    before = rss_kb()
    for _ in range(1000):
        step()
    after = rss_kb()
    assert after <= before * 1.05, f"RSS grew from {before} kB to {after} kB"


# ----------------------------------------------------------------------------- CLI
def _infer(args, capsys):
    from rtrt.tools.cli import main

    code = main(["infer", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_infer_json_and_viz(assets, capsys, tmp_path):
    viz = tmp_path / "heat.png"
    code, out, err = _infer(
        ["--image", str(assets["images"][0]), "--bundle", str(assets["bundle"]), "--backend", "torch",
         "--json", "--max-new-tokens", "4", "--viz", str(viz)], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert isinstance(d["answer"], str) and isinstance(d["detections"], list) and "detector" in d["timings_ms"]
    im = Image.open(viz)
    assert im.format == "PNG" and im.size == Image.open(assets["images"][0]).size


def test_infer_region(assets, capsys):
    base = ["--image", str(assets["images"][0]), "--bundle", str(assets["bundle"]), "--backend", "torch", "--max-new-tokens", "4"]
    code, out, err = _infer([*base, "--json", "--region", "2,3,30,20"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["region"]["box"] == [2.0, 3.0, 30.0, 20.0] and d["region"]["name"]
    code, out, err = _infer([*base, "--region", "2, 3, 30, 20"], capsys)
    assert code == 0 and "in the region [2, 3, 30, 20]: " in out
    with pytest.raises(SystemExit) as bad:  # argparse's usage and error, exit 2
        _infer([*base, "--region", "2,3,30"], capsys)
    assert bad.value.code == 2 and "expected X0,Y0,X1,Y1" in capsys.readouterr().err
    code, out, err = _infer([*base, "--region", "200,3,300,20"], capsys)
    assert code == 2 and "outside the 64x48 image" in err and len(err.strip().splitlines()) == 1
    # Several images: a box outside one (64 x 48) fails that one only; the 64 x 64 one is answered.
    code, out, err = _infer(["--image", str(assets["images"][0]), str(assets["images"][2]), *base[2:], "--json",
                             "--region", "2,50,30,60"], capsys)
    lines = [json.loads(x) for x in out.splitlines()]
    assert code == 2 and len(err.strip().splitlines()) == 1 and "outside the 64x48 image" in err
    assert "error" in lines[0] and lines[1]["region"]["box"] == [2.0, 50.0, 30.0, 60.0]


def test_infer_human_output(assets, capsys):
    code, out, err = _infer(["--image", str(assets["images"][0]), "--bundle", str(assets["bundle"]), "--backend", "torch",
                             "--max-new-tokens", "4", "--no-hints", "--no-refine"], capsys)
    assert code == 0, err
    assert "rare objects:" in out and "timings (ms):" in out


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_infer_bad_image_exit_2_one_line(assets, capsys, tmp_path, content):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    code, out, err = _infer(["--image", str(p), "--bundle", str(assets["bundle"])], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and str(p) in err


def test_infer_missing_bundle_exit_2(assets, capsys, tmp_path):
    code, _, err = _infer(["--image", str(assets["images"][0]), "--bundle", str(tmp_path / "nope")], capsys)
    assert code == 2 and "bundle directory not found" in err and len(err.strip().splitlines()) == 1


def test_default_question_is_codas():
    assert DEFAULT_QUESTION.startswith("There is an image of traffic captured from the perspective of the ego car.")


def test_bundle_used_is_verified(assets):
    assert load_bundle(assets["bundle"]).manifest.vlm.family == "llava"


def test_bench_reports_stages_and_overhead(assets, capsys):
    from rtrt.tools.bench import bench_pipeline, main

    r = bench_pipeline(assets["bundle"], assets["images"][0], backend="torch", runs=2, warmup=1, new_tokens=3)
    for stage in ("image_decode", "detector", "vision_tower", "adapter", "prompt_build", "prefill", "decode_per_token"):
        assert r["stages_ms"][stage]["median"] >= 0
    e = r["end_to_end_ms"]
    assert e["plugin"]["median"] > 0 and e["baseline"]["median"] > 0
    assert r["overhead_ratio"] == pytest.approx((e["plugin"]["median"] - e["baseline"]["median"]) / e["baseline"]["median"])
    assert r["overhead_share"] == pytest.approx((e["plugin"]["median"] - e["baseline"]["median"]) / e["plugin"]["median"])
    assert r["peak_rss_mb"] > 0
    assert main(["--bundle", str(assets["bundle"]), "--image", str(assets["images"][0]), "--backend", "torch",
                 "--runs", "1", "--warmup", "0", "--new-tokens", "2", "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pipeline"]["new_tokens"] == 2 and out["pipeline"]["precision"] == "fp32"
    assert out["pipeline"]["ort_threads"] == 1
