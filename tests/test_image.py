"""Image decoding: every bad input is a one-line ImageError; odd formats are converted (issue 5)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rtrt.runtime.errors import ImageError
from rtrt.runtime.image import MAX_PIXELS, load_image, vfm_pixels, vfm_resize


def _png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w=16, h=12):
    a = np.arange(w * h * 3, dtype=np.uint8).reshape(h, w, 3)
    return Image.fromarray(a, "RGB")


def _err(src) -> str:
    with pytest.raises(ImageError) as e:
        load_image(src)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    assert "empty file" in _err(p)


def test_missing_file_and_directory(tmp_path):
    assert "not found" in _err(tmp_path / "nope.png")
    assert "directory" in _err(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)
    p = tmp_path / f"trunc.{fmt.lower()}"
    p.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _err(p) or "not a recognised image" in _err(p)


def test_not_an_image(tmp_path):
    p = tmp_path / "x.png"
    p.write_text("hello, I am text")
    assert "not a recognised image" in _err(p)


def test_zero_size_array():
    assert "empty" in _err(np.zeros((0, 5, 3), np.uint8))


def test_decompression_bomb(tmp_path):
    # A tiny PNG whose header claims a huge size: refused before pixels are decoded.
    side = int(MAX_PIXELS**0.5) + 100
    img = Image.new("1", (side, side))
    p = tmp_path / "bomb.png"
    p.write_bytes(_png(img))
    msg = _err(p)
    assert "limit" in msg


def test_huge_array_refused():
    a = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape=(20000, 20000, 3), strides=(0, 0, 0))
    assert "exceeds the limit" in _err(a)


def test_bad_array_dtype_and_shape():
    assert "uint8" in _err(np.zeros((4, 4, 3), np.float32))
    assert "shape" in _err(np.zeros((4, 4, 5), np.uint8))


def test_unsupported_type():
    assert "unsupported image input" in _err(12345)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _rgb().convert("L"),
        lambda: _rgb().convert("RGBA"),
        lambda: _rgb().convert("CMYK"),
        lambda: _rgb().convert("P"),
        lambda: Image.fromarray((np.arange(16 * 12, dtype=np.uint16).reshape(12, 16) * 300)),
    ],
    ids=["gray", "rgba", "cmyk", "palette", "16bit"],
)
def test_converted_formats(make):
    img = make()
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    out = load_image(_png(img, fmt))
    assert out.mode == "RGB" and out.size == (16, 12)


def test_16bit_keeps_dynamic_range():
    a = np.linspace(0, 65535, 16 * 12).astype(np.uint16).reshape(12, 16)
    out = np.asarray(load_image(_png(Image.fromarray(a))))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_exif_rotation_applied():
    img = _rgb(16, 12)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_image(_png(img, "JPEG", exif=exif))
    assert out.size == (12, 16)


def test_array_inputs():
    a = np.random.default_rng(0).integers(0, 255, (8, 10, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(a)), a)
    assert load_image(a[..., 0]).size == (10, 8)
    rgba = np.concatenate([a, np.full((8, 10, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(np.asarray(load_image(rgba)), a)


def test_vfm_pixels_normalises():
    img = Image.new("RGB", (30, 20), (255, 0, 0))
    x = vfm_pixels([img, img], 32, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert x.shape == (2, 3, 32, 32)
    assert np.allclose(x[0, 0].numpy(), 1.0) and np.allclose(x[0, 1].numpy(), -1.0)


def test_vfm_resize_matches_pillow_and_its_reducing_gap():
    a = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    img = Image.fromarray(a, "RGB")
    exact = np.asarray(vfm_resize(img, 32))
    assert np.array_equal(exact, np.asarray(img.resize((32, 32), Image.BICUBIC)))
    # reducing_gap 1.0 on an exact 2x: Pillow's box reduction, which is not the bicubic pass
    fast = np.asarray(vfm_resize(img, 32, "bicubic", 1.0))
    assert np.array_equal(fast, np.asarray(img.reduce(2)))
    assert not np.array_equal(fast, exact)
    assert np.array_equal(np.asarray(vfm_resize(img, 32, "bilinear")), np.asarray(img.resize((32, 32), Image.BILINEAR)))
    gray = vfm_resize(img.convert("L"), 16)
    assert gray.mode == "RGB" and gray.size == (16, 16)


@pytest.mark.parametrize("resample, gap, msg", [("sinc", None, "unknown resample filter"), ("bicubic", 0.5, "at least 1.0")])
def test_vfm_resize_refuses_bad_settings(resample, gap, msg):
    with pytest.raises(ValueError, match=msg):
        vfm_resize(_rgb(), 8, resample, gap)


def test_vfm_pixels_equals_the_plain_formula_and_follows_the_spec():
    from rtrt.runtime.bundle import VFMSpec
    from rtrt.runtime.image import spec_pixels

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8), "RGB")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = vfm_pixels([img], 32, mean, std)
    ref = (np.asarray(img.resize((32, 32), Image.BICUBIC), np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(x[0].numpy(), ref.transpose(2, 0, 1), atol=1e-5)
    # Bit for bit the float32 x * (1 / (255 std)) - mean / std that trained the shipped bundles.
    s32 = np.float32(std)
    hwc = np.asarray(img.resize((32, 32), Image.BICUBIC), np.float32) * (1.0 / (255.0 * s32)) + (-np.float32(mean) / s32)
    assert np.array_equal(x[0].numpy(), hwc.transpose(2, 0, 1))
    spec = VFMSpec("timm", "w.safetensors", image_size=32, mean=mean, std=std, reducing_gap=1.0)
    y = spec_pixels([img], spec)
    assert np.array_equal(y.numpy(), vfm_pixels([img], 32, mean, std, reducing_gap=1.0).numpy())
    assert not np.array_equal(y.numpy(), x.numpy())
    assert spec_pixels([img], spec, size=16).shape == (1, 3, 16, 16)
