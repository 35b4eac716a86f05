"""Image decoding and VFM preprocessing for the runtime.

Accepts a path, raw bytes, a PIL image or an HxWx3 (or HxW / HxWx4) uint8 array and returns an
RGB PIL image. Grayscale, RGBA, 16-bit, palette and CMYK inputs and EXIF rotation are converted;
empty, truncated, non-image, 0x0 and oversized (decompression-bomb) inputs raise ``ImageError``
with one line naming the problem.
"""
from __future__ import annotations

import io
import os
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError

__all__ = ["ImageInput", "MAX_PIXELS", "RESAMPLE", "load_image", "vfm_resize", "vfm_pixels", "spec_pixels", "draw_region"]

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

# Larger images are refused before decoding (PIL's decompression-bomb guard, made an error).
MAX_PIXELS = 40_000_000


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ImageError(f"array image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"image is empty ({a.shape[1]}x{a.shape[0]})")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise ImageError(f"image of {a.shape[1]}x{a.shape[0]} pixels exceeds the limit of {MAX_PIXELS}")
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(f"array image must be uint8 (or uint16), got {a.dtype}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        return _flatten_alpha(Image.fromarray(np.ascontiguousarray(a), "RGBA"))
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite on black so transparent pixels are deterministic."""
    bg = Image.new("RGB", img.size, (0, 0, 0))
    bg.paste(img, mask=img.getchannel("A"))
    return bg


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.uint32)
        peak = 65535 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255
        a = (a.astype(np.float64) * 255.0 / peak).clip(0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return _flatten_alpha(img.convert("RGBA"))
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_image(src: ImageInput) -> Image.Image:
    """Decode any supported input into an upright RGB PIL image (see module docstring)."""
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if isinstance(src, Image.Image):
        img = src
        name = "image"
    else:
        if isinstance(src, (bytes, bytearray)):
            data, name = bytes(src), "image bytes"
        elif isinstance(src, (str, os.PathLike)):
            name = os.fspath(src)
            try:
                with open(name, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise ImageError(f"{name}: file not found") from None
            except IsADirectoryError:
                raise ImageError(f"{name}: is a directory, not an image") from None
            except OSError as e:
                raise ImageError(f"{name}: cannot read ({e.strerror or e})") from None
        else:
            raise ImageError(f"unsupported image input of type {type(src).__name__}")
        if not data:
            raise ImageError(f"{name}: empty file")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise ImageError(f"{name}: image dimensions exceed the limit of {MAX_PIXELS} pixels") from None
        except Exception:
            raise ImageError(f"{name}: not a recognised image") from None
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"{name}: image is empty ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: image of {w}x{h} pixels exceeds the limit of {MAX_PIXELS}")
    try:
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)
    except ImageError:
        raise
    except Exception as e:  # truncated or corrupt data surfaces only at load()
        raise ImageError(f"{name}: truncated or corrupt image ({type(e).__name__})") from None


# Pillow resampling filters by the names model configs use (timm ``interpolation``, HF ``resample``).
RESAMPLE = {
    "nearest": Image.NEAREST,
    "box": Image.BOX,
    "bilinear": Image.BILINEAR,
    "hamming": Image.HAMMING,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}


def check_resize(resample: str, reducing_gap: float | None) -> None:
    """Refuse an unknown filter or a ``reducing_gap`` below 1 with one line."""
    if resample not in RESAMPLE:
        raise ValueError(f"unknown resample filter {resample!r}; choose from {', '.join(RESAMPLE)}")
    if reducing_gap is not None and not reducing_gap >= 1.0:
        raise ValueError(f"reducing_gap must be at least 1.0 (or None), got {reducing_gap!r}")


def vfm_resize(img: Image.Image, size: int, resample: str = "bicubic", reducing_gap: float | None = None) -> Image.Image:
    """``img`` resized to ``size`` x ``size`` RGB, as the VFM was trained.

    ``reducing_gap`` is Pillow's two-step resize: first a box reduction by an integer factor
    (as far as the gap allows), then ``resample``. ``None`` resamples in one exact pass; 2.0-3.0
    is close to it and much faster on large camera frames; 1.0 reduces as far as possible (for an
    exact 2x this is a box average).
    """
    check_resize(resample, reducing_gap)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img.resize((size, size), RESAMPLE[resample], reducing_gap=reducing_gap)


def vfm_pixels(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    resample: str = "bicubic",
    reducing_gap: float | None = None,
    numpy: bool = False,
):
    """Resize (``vfm_resize``) and normalise: the VFM's input [B, 3, size, size] float32, a torch
    tensor (``numpy=True``: a numpy array, for the torch-free runtime)."""
    std_ = np.asarray(std, dtype=np.float32)
    scale = (1.0 / (255.0 * std_)).reshape(3, 1, 1)
    shift = (-np.asarray(mean, dtype=np.float32) / std_).reshape(3, 1, 1)
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        # Channel-first in place: x * scale + shift in float32, the same numbers as the HWC
        # formula, without numpy's slow broadcast over a last axis of 3 and a strided copy.
        a = np.asarray(vfm_resize(img, size, resample, reducing_gap)).transpose(2, 0, 1)
        np.multiply(a, scale, out=out[i], dtype=np.float32)
        out[i] += shift
    if numpy:
        return out
    import torch

    return torch.from_numpy(out)


def spec_pixels(images: Sequence[Image.Image], spec, size: int | None = None, *, numpy: bool = False):
    """``vfm_pixels`` with everything taken from a ``VFMSpec`` (``size`` overrides its image size)."""
    return vfm_pixels(images, int(size or spec.image_size), spec.mean, spec.std,
                      resample=spec.resample, reducing_gap=spec.reducing_gap, numpy=numpy)


def draw_region(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """A copy of ``image`` (RGB) with ``box`` [x0, y0, x1, y1] outlined in red, 2 pixels wide: how
    CODA-LM's region questions show the object they ask about (``images_w_boxes``)."""
    from PIL import ImageDraw

    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    ImageDraw.Draw(out).rectangle([float(v) for v in box], outline="red", width=2)
    return out
