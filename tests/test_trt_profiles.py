"""The adapter's call contract and the engine profiles derived from it (no TensorRT needed).

Every backend's adapter is called once per VLM batch with ALL visual tokens of the batch in one
row, ``[1, T_total, D]`` (``rtrt.runtime.names.ADAPTER_CALL``), and TensorRT engines are built for
the (min, opt, max) that ``rtrt.runtime.profiles`` derives from the bundle's image-token layout
(``rtrt.runtime.trt_build.dim_ranges`` + ``derive_profile``, as ``rtrt export --backend trt``
does). These tests run the real ``Pipeline`` with tiny VLMs of every family (``tests/fixtures/tiny_vlm.py``)
at batch 1..MAX_BATCH, record what it passes to the backend, and check that every call lies inside
the profile, and that one image more, or a processor that allows bigger images than the bundle
records, lies outside (so the check can fail). ``image_tokens`` is compared with the families'
real processors over image sizes that reach the extremes.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import rtrt.runtime.trt_build as tb
from rtrt.runtime import ModelMismatchError
from rtrt.runtime.assets import default_bundle
from rtrt.runtime.backends import make_backend
from rtrt.runtime.bundle import VLMSpec, load_bundle
from rtrt.runtime.names import ADAPTER, ADAPTER_CALL, DETECTOR
from rtrt.runtime.pipeline import Pipeline
from rtrt.runtime.profiles import (FAMILY_DEFAULTS, TYPICAL_IMAGE_HW, adapter_ranges, detector_ranges, image_tokens,
                                   token_bounds)
from rtrt.runtime.vlm import load_vlm
from fixtures.tiny_vlm import build_tiny_vlm
from fixtures.tiny_bundle import make_tiny_bundle

MAX_BATCH = 3
QUESTION = "What is in the image?"

# (height, width) per family: varied, non-square, and reaching the fewest and most tokens the
# tiny processors allow (Qwen: 56..112 px squared in 28 px blocks, aspect <= 200; InternVL:
# 32 px tiles, 1..4 tiles + a thumbnail).
SIZES = {
    "llava": [(40, 64), (64, 40), (20, 20)],
    "qwen2_5_vl": [(10, 10), (40, 64), (113, 257), (300, 17), (56, 56), (1000, 700), (28, 5600), (5600, 28)],
    "internvl": [(20, 20), (40, 64), (56, 56), (32, 200), (200, 32), (64, 64), (17, 300)],
}
# Per family: the size giving the fewest tokens and the one giving the most.
EXTREMES = {"llava": ((20, 20), (40, 64)), "qwen2_5_vl": ((10, 10), (28, 5600)), "internvl": ((20, 20), (64, 64))}


def _image(hw, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))


def _llava_576(root):
    """A tiny LLaVA whose CLIP sees 336 px in 14 px patches: 576 tokens per image, as LLaVA-1.5."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    src = build_tiny_vlm("llava", root / "llava16")
    config = AutoConfig.from_pretrained(src)
    config.vision_config.image_size, config.vision_config.patch_size = 336, 14
    config.image_seq_length = 576
    config.text_config.max_position_embeddings = 4096  # MAX_BATCH + 1 images of 576 tokens fit
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = LlavaForConditionalGeneration.from_pretrained(src).generation_config
    processor = AutoProcessor.from_pretrained(src)
    processor.patch_size = 14
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    out = root / "llava576"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile_vlms")
    dirs = {name: build_tiny_vlm(name, root / name) for name in SIZES}
    dirs["llava576"] = _llava_576(root)
    return dirs


@pytest.fixture(scope="module")
def pipes(vlm_dirs, tmp_path_factory):
    """family -> (Pipeline on the torch backend, list of recorded backend calls)."""
    root = tmp_path_factory.mktemp("profile_bundles")
    out = {}
    for name, path in vlm_dirs.items():
        fam = load_vlm(path)
        spec = VLMSpec(fam.name, str(path), fam.hidden_size, fam.image_token_layout())
        bundle = load_bundle(make_tiny_bundle(root / name, d_llm=fam.hidden_size, vlm=spec))
        backend = make_backend("torch", bundle)
        calls: list[tuple[str, dict]] = []
        detect, refine = backend.detect, backend.refine

        def rec_detect(px, w=None, _detect=detect, _calls=calls):
            _calls.append(("detector", {DETECTOR.inputs[0]: tuple(px.shape), DETECTOR.inputs[1]: tuple(w.shape)}))
            return _detect(px, w)

        def rec_refine(v, w=None, _refine=refine, _calls=calls):
            _calls.append(("adapter", {ADAPTER.inputs[0]: tuple(v.shape), ADAPTER.inputs[1]: tuple(w.shape)}))
            return _refine(v, w)

        backend.detect, backend.refine = rec_detect, rec_refine
        out[name] = (Pipeline(bundle, backend, fam, max_new_tokens=1), calls)
    return out


def _profiles(pipe: Pipeline) -> dict[str, dict]:
    """The optimisation profiles ``rtrt export --backend trt`` would build for this bundle."""
    m = pipe.bundle.manifest
    ranges = tb.dim_ranges(m.vlm.image_token_layout, len(m.classes), MAX_BATCH)
    d, s = m.d_llm, pipe.image_size
    # The exported graphs' input dims: symbols where dynamic (see rtrt.runtime.names).
    dims = {
        "detector": {"pixel_values": ["batch", 3, s, s], "class_embeddings": ["num_classes", d]},
        "adapter": {"visual_tokens": ["batch", "num_tokens", d], "class_embeddings": ["num_classes", d]},
    }
    specs = {"detector": DETECTOR, "adapter": ADAPTER}
    return {g: tb.derive_profile(dims[g], specs[g], ranges[g]) for g in specs}


def _inside(profile: dict, shapes: dict) -> bool:
    return all(
        len(shapes[n]) == len(lo) and all(a <= x <= b for a, x, b in zip(lo, shapes[n], hi))
        for n, (lo, _opt, hi) in profile.items()
    )


def _run(pipe_calls, images) -> list[tuple[str, dict]]:
    pipe, calls = pipe_calls
    calls.clear()
    pipe.batch(images, [QUESTION] * len(images))
    return list(calls)


# --------------------------------------------------------------------------- the per-image count
@pytest.mark.parametrize("name", list(SIZES))
def test_image_tokens_match_the_real_processor(pipes, name):
    fam = pipes[name][0].vlm
    layout = fam.image_token_layout()
    counts = {}
    for hw in SIZES[name]:
        batch = fam.prepare([_image(hw)], [QUESTION])
        counts[hw] = int(fam.image_mask(batch).sum())
        assert image_tokens(layout, *hw) == counts[hw], hw
    b = token_bounds(layout)
    assert all(b.min <= n <= b.max for n in counts.values())
    lo, hi = EXTREMES[name]
    assert counts[lo] == b.min and counts[hi] == b.max  # the bounds are reached, not just safe
    assert b.typical == image_tokens(layout, *TYPICAL_IMAGE_HW)


def test_layout_records_the_processor_bounds(pipes):
    qwen = pipes["qwen2_5_vl"][0].vlm.image_token_layout()
    assert (qwen["min_pixels"], qwen["max_pixels"]) == (56 * 56, 112 * 112)
    intern = pipes["internvl"][0].vlm.image_token_layout()
    assert (intern["tile_size"], intern["min_patches"], intern["max_patches"], intern["crop_to_patches"]) == ([32, 32], 1, 4, True)
    assert pipes["llava576"][0].vlm.image_token_layout()["tokens_per_image"] == 576


# --------------------------------------------------------------------------- the real pipeline's calls
@pytest.mark.parametrize("name", list(EXTREMES) + ["llava576"])
def test_pipeline_calls_lie_inside_the_profiles(pipes, name):
    pipe = pipes[name][0]
    layout = pipe.bundle.manifest.vlm.image_token_layout
    profiles = _profiles(pipe)
    fam_name = "llava" if name == "llava576" else name
    lo, hi = EXTREMES[fam_name]
    sizes = [hi, lo, *SIZES[fam_name]]
    for k in range(1, MAX_BATCH + 1):
        for pick in (sizes[:k], [hi] * k, [lo] * k):  # mixed sizes, all largest, all smallest
            calls = _run(pipes[name], [_image(hw, i) for i, hw in enumerate(pick)])
            (det,) = [c for g, c in calls if g == "detector"]
            (ad,) = [c for g, c in calls if g == "adapter"]  # ONE adapter call per VLM batch
            total = sum(image_tokens(layout, *hw) for hw in pick)
            assert ad[ADAPTER.inputs[0]] == (1, total, pipe.bundle.manifest.d_llm), ADAPTER_CALL
            assert ad[ADAPTER.inputs[1]] == (len(pipe.class_names), pipe.bundle.manifest.d_llm)
            assert _inside(profiles["adapter"], ad), (k, pick, ad, profiles["adapter"])
            assert _inside(profiles["detector"], det), (k, det, profiles["detector"])


@pytest.mark.parametrize("name", list(EXTREMES) + ["llava576"])
def test_one_image_more_falls_outside(pipes, name):
    pipe = pipes[name][0]
    profiles = _profiles(pipe)
    hi = EXTREMES["llava" if name == "llava576" else name][1]
    calls = _run(pipes[name], [_image(hi, i) for i in range(MAX_BATCH + 1)])
    (det,) = [c for g, c in calls if g == "detector"]
    (ad,) = [c for g, c in calls if g == "adapter"]
    assert not _inside(profiles["adapter"], ad)
    assert not _inside(profiles["detector"], det)


@pytest.mark.parametrize("name,key,bigger,size", [
    ("qwen2_5_vl", "max_pixels", 224 * 224, (224, 224)),
    ("internvl", "max_patches", 9, (96, 96)),
])
def test_processor_allowing_bigger_images_is_refused(pipes, name, key, bigger, size):
    """A VLM whose processor gives more tokens than the bundle's layout records would overflow the
    engines' profile: its layout differs, so the pipeline refuses it before any call."""
    pipe, _ = pipes[name]
    fam = load_vlm(pipe.bundle.resolve_ref(pipe.bundle.manifest.vlm.ref))
    proc = fam.processor.image_processor
    if key == "max_pixels":
        proc.size = {"shortest_edge": proc.size.shortest_edge, "longest_edge": bigger}
    else:
        proc.max_patches = bigger
    n = int(fam.image_mask(fam.prepare([_image(size)], [QUESTION])).sum())
    assert n > token_bounds(pipe.bundle.manifest.vlm.image_token_layout).max
    assert n == image_tokens(fam.image_token_layout(), *size) <= token_bounds(fam.image_token_layout()).max
    with pytest.raises(ModelMismatchError, match=key):
        Pipeline(pipe.bundle, pipe.backend, fam)


def test_old_layout_without_processor_bounds_still_loads(pipes, tmp_path):
    """Bundles written before the layout recorded processor bounds load, and get the released defaults."""
    pipe, _ = pipes["qwen2_5_vl"]
    fam = pipe.vlm
    old = {k: v for k, v in fam.image_token_layout().items() if k not in ("min_pixels", "max_pixels")}
    bundle = load_bundle(make_tiny_bundle(tmp_path / "b", d_llm=fam.hidden_size, vlm=VLMSpec(fam.name, "vlm", fam.hidden_size, old)))
    Pipeline(bundle, make_backend("torch", bundle), fam)  # no ModelMismatchError
    assert token_bounds(old).max == 16384  # Qwen2.5-VL's released max_pixels, not the tiny one's


# --------------------------------------------------------------------------- pure ranges
def test_ranges_follow_the_layout_not_a_constant():
    demo = load_bundle(default_bundle()).manifest
    n = demo.vlm.image_token_layout["tokens_per_image"]
    assert n == 196  # the demo VLM: 14x14 patches
    assert adapter_ranges(demo.vlm.image_token_layout, 4, len(demo.classes))["num_tokens"] == (n, n, 4 * n)
    assert adapter_ranges({"family": "llava"}, 2, 8)["num_tokens"] == (576, 576, 1152)  # LLaVA-1.5 default
    assert adapter_ranges({"family": "qwen2_5_vl"}, 1, 8)["num_tokens"] == (4, 1196, 16384)
    assert adapter_ranges({"family": "qwen2_5_vl", "max_pixels": 28 * 28 * 1280}, 1, 8)["num_tokens"][2] == 1280
    assert adapter_ranges({"family": "internvl"}, 2, 8)["num_tokens"] == (256, 256 * 9, 2 * 256 * 13)
    assert FAMILY_DEFAULTS["internvl"]["max_patches"] == 12
    r = adapter_ranges(None, 4, 40)  # a bundle without a VLM
    assert r["batch"] == (1, 1, 1) and r["num_classes"] == (1, 40, 40) and r["num_tokens"][2] == 4 * 4096
    assert detector_ranges(8, 40) == {"batch": (1, 1, 8), "num_classes": (1, 40, 40)}
    with pytest.raises(ValueError, match="max_batch"):
        adapter_ranges({"family": "llava"}, 0, 8)
