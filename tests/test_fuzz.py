"""Fuzzing with hypothesis: image decoding and manifest parsing raise only documented errors (issue 5)."""
from __future__ import annotations

import io
import json

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from rtrt.runtime.bundle import Manifest
from rtrt.runtime.errors import BundleError, ImageError
from rtrt.runtime.image import load_image

_PNG = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(_PNG, format="PNG")
_JPG = io.BytesIO()
Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(_JPG, format="JPEG")
SEEDS = [_PNG.getvalue(), _JPG.getvalue()]


@st.composite
def mutated_images(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_images(), st.binary(min_size=0, max_size=256)))
def test_image_decoding_never_crashes(data):
    try:
        img = load_image(data)
    except ImageError as e:
        assert "\n" not in str(e)
    else:
        assert img.mode == "RGB" and img.size[0] > 0 and img.size[1] > 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

_GOOD = {
    "schema_version": 1,
    "classes": [{"name": "traffic_cone", "synonyms": ["cone"]}],
    "d_llm": 8,
    "adapter": {"d_model": 8, "width": 4, "heads": 2},
    "files": {"embeddings.safetensors": {"sha256": "0" * 64, "size": 1}},
}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(_GOOD) + ["vlm", "vfm", "detector", "exports"]), json_values)
@example(key="d_llm", value=float("inf"))  # found by CI: int(inf) raised OverflowError
@example(key="d_llm", value=8.5)
@example(key="detector", value={"d_vfm": 4, "d_llm": 8, "threshold": float("inf")})
def test_manifest_parsing_never_crashes(key, value):
    d = json.loads(json.dumps(_GOOD))
    d[key] = value
    try:
        Manifest.from_dict(d)
    except BundleError as e:
        assert "\n" not in str(e)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_manifest_parsing_of_arbitrary_json(value):
    try:
        Manifest.from_dict(value)
    except BundleError as e:
        assert "\n" not in str(e)
