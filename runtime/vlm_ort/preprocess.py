"""The VLM families' image processors in numpy and PIL, pixel for pixel what transformers feeds the model.

transformers 5 loads every image processor rtrt supports with its torchvision backend when
torchvision is installed (``AutoProcessor`` gives ``CLIPImageProcessor``,
``Qwen2VLImageProcessor`` and ``GotOcr2ImageProcessor``, all ``TorchvisionBackend``). Their
resize is ``torchvision``'s ``resize(antialias=True)`` on a uint8 image, which PyTorch runs as an
integer kernel (``upsample_avx_bilinear_bicubic_uint8``, a port of Pillow-SIMD; the non-AVX
fallback uses the same integer weights): separable, the width first, each pass rounded to uint8;
Keys' cubic (a = -0.5) stretched by the downscale factor; weights normalised in float64 and
quantised to int16 with a per-pass precision; int32 sums with a rounding offset, shifted and
clamped. ``resize_bicubic`` reproduces it exactly, so the pixels here equal the processor's (0
difference measured on every size tried, up- and downscaling; tests/test_vlm_ort_preprocess.py).
The rescale and normalisation are the backend's fused form ``(x - 255 * mean) / (255 * std)`` in
float32. Cost: a 1920x1080 frame to 796x448 takes about 90 ms in numpy on one busy core
(torchvision's SIMD kernel: about 55 ms); an image already at the model's size is not resized.

- ``ClipImageProcessor`` (LLaVA): shortest edge to ``size``, centre crop, normalise ->
  ``pixel_values`` [N, 3, H, W].
- ``Qwen2VLImageProcessor`` (Qwen2.5-VL): ``smart_resize`` to multiples of patch x merge within
  [min_pixels, max_pixels], normalise, cut into patches -> ``pixel_values`` [patches, C*t*p*p] and
  ``image_grid_thw`` [N, 3].
- ``GotOcr2ImageProcessor`` (InternVL): the tile grid closest to the aspect ratio within
  [min_patches, max_patches], the image resized onto it and cut into tiles, plus a thumbnail when
  there is more than one tile -> ``pixel_values`` [tiles, 3, h, w] and ``num_patches`` [N].

``load_image_processor(config)`` picks the class from the processor config's
``image_processor_type`` (``processor_config.json``'s ``image_processor``, or a legacy
``preprocessor_config.json``). Only bicubic resampling is supported (what all three families
use). Without torchvision transformers falls back to its PIL backend, whose resize rounds
differently (up to 1 grey level, see the test): the torch path then differs from this one.
Imports numpy and PIL only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
from PIL import Image

from ..errors import InputError, ModelMismatchError

__all__ = [
    "BICUBIC",
    "resize_bicubic",
    "to_rgb_array",
    "ImageProcessor",
    "ClipImageProcessor",
    "Qwen2VLImageProcessor",
    "GotOcr2ImageProcessor",
    "IMAGE_PROCESSORS",
    "load_image_processor",
]

BICUBIC = 3  # PIL's resample code for bicubic, as processor configs write it
# OpenAI CLIP's mean and std: the default of all three processors when the config omits them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------- resize
def _keys_cubic(x: np.ndarray) -> np.ndarray:
    # Keys' cubic convolution with a = -0.5 (PyTorch's aa_filter for antialiased bicubic), in the
    # same operation order as ATen's cubic_convolution1/2 so the float64 weights match bit for bit.
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(input index [out, K], int16-valued weights [out, K], precision bits) of one resize pass.

    ATen's ``_compute_indices_min_size_weights_aa`` and ``_compute_index_ranges_int16_weights``
    with ``align_corners=False`` and no explicit scale.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0  # the cubic's support (2) widened when shrinking
    k = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size) + 0.5)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C++ casts truncate
    xsize = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin, 0, k)
    j = np.arange(k)
    valid = j[None, :] < xsize[:, None]
    x = ((j[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * invscale
    w = np.where(valid, _keys_cubic(x), 0.0)
    total = np.zeros(out_size)
    for c in range(k):  # summed tap by tap, in ATen's order (np.sum would pair them differently)
        total = total + w[:, c]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    wt_max = float(w.max())
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    weights = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int64)
    index = np.minimum(xmin[:, None] + j[None, :], in_size - 1)  # taps past xsize carry weight 0
    return index, np.where(valid, weights, 0), precision


def _resize_rows(image: np.ndarray, out_size: int) -> np.ndarray:
    # One pass along axis 0 of a contiguous uint8 array: int32 sums as the kernel's (it wraps the
    # same way), tap by tap over whole rows so each step is a contiguous gather, multiply and add.
    index, weights, precision = _taps(image.shape[0], out_size)
    rows = image.reshape(image.shape[0], -1)
    acc = np.full((out_size, rows.shape[1]), 1 << (precision - 1), dtype=np.int32)
    term = np.empty_like(acc)
    for c in range(index.shape[1]):
        np.multiply(np.take(rows, index[:, c], axis=0), weights[:, c:c + 1].astype(np.int32), out=term)
        acc += term
    acc >>= precision
    return np.clip(acc, 0, 255).astype(np.uint8).reshape((out_size,) + image.shape[1:])


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` uint8 [H, W, C] resized to [height, width, C] exactly as torchvision's antialiased
    bicubic ``resize`` on a uint8 tensor does on a CPU (the width pass first, then the height)."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise InputError(f"resize_bicubic needs a uint8 HxWxC image, got {image.dtype} of shape {image.shape}")
    if height <= 0 or width <= 0:
        raise InputError(f"cannot resize to {width}x{height}")
    if image.shape[1] != width:
        columns = np.ascontiguousarray(image.transpose(1, 0, 2))
        image = np.ascontiguousarray(_resize_rows(columns, width).transpose(1, 0, 2))
    if image.shape[0] != height:
        image = _resize_rows(np.ascontiguousarray(image), height)
    return image


def to_rgb_array(image: Any) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image (transparency composited on white, as transformers'
    ``convert_to_rgb`` does) or of an HxWx3 uint8 array."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    raise InputError(f"the VLM takes a PIL image or an HxWx3 uint8 array, got {type(image).__name__}"
                     + (f" {image.dtype} {image.shape}" if isinstance(image, np.ndarray) else ""))


# ---------------------------------------------------------------------------------------- processors
def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelMismatchError(f"image processor {name} must be a positive integer, got {value!r}")
    return value


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
        raise ModelMismatchError(f"image processor {name} must be 3 numbers, got {value!r}")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class ImageProcessor:
    """What every family's processor does after its resize: rescale and normalise (config fields as transformers names them)."""

    types: ClassVar[tuple[str, ...]] = ()  # image_processor_type values this class reproduces

    do_convert_rgb: bool = True  # composite transparency on white and drop alpha first
    do_resize: bool = True  # resize (the family's rule); False feeds the image as it is
    resample: int = BICUBIC  # PIL resample code; only bicubic is reproduced
    do_rescale: bool = True  # multiply by rescale_factor
    rescale_factor: float = 1 / 255  # pixel scale before normalising
    do_normalize: bool = True  # subtract image_mean, divide by image_std
    image_mean: tuple[float, float, float] = CLIP_MEAN  # per-channel mean (RGB)
    image_std: tuple[float, float, float] = CLIP_STD  # per-channel std (RGB)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "ImageProcessor":
        """From an image processor config dict (keys transformers writes; unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: config[k] for k in known if config.get(k) is not None}
        for key in ("image_mean", "image_std"):
            if key in values:
                values[key] = _triple(values[key], key)
        if "rescale_factor" in values:
            values["rescale_factor"] = float(values["rescale_factor"])
        out = cls(**{**values, **cls._parse(config)})
        if out.do_resize and out.resample != BICUBIC:
            raise ModelMismatchError(
                f"image processor resample {out.resample!r}: only bicubic ({BICUBIC}) is reproduced in numpy")
        if any(s == 0 for s in out.image_std):
            raise ModelMismatchError("image processor image_std has a zero")
        return out

    @classmethod
    def _parse(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Family fields that need converting (sizes); overridden by each family."""
        return {}

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 [..., H, W, 3] -> float32 [..., 3, H, W], the torchvision backend's fused
        ``(x - mean / rescale) / (std / rescale)`` (float32 arithmetic, true division)."""
        x = np.moveaxis(images, -1, -3).astype(np.float32)
        shape = (3, 1, 1)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            if self.do_rescale:  # mean and std divided by the scale instead of the pixels
                inv = np.float32(1.0 / self.rescale_factor)
                mean, std = mean * inv, std * inv
            return ((x - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)
        if self.do_rescale:
            return x * np.float32(self.rescale_factor)
        return x

    def __call__(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """The processor's output for a list of images (one per prompt), as numpy arrays."""
        raise NotImplementedError


def _size_dict(value: Any, name: str) -> dict[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {"shortest_edge": value}
    if not isinstance(value, Mapping):
        raise ModelMismatchError(f"image processor {name} must be a dict, got {value!r}")
    return {k: _positive_int(v, f"{name}.{k}") for k, v in value.items() if v is not None}


@dataclass(frozen=True)
class ClipImageProcessor(ImageProcessor):
    """LLaVA's ``CLIPImageProcessor``: shortest edge to ``size``, centre crop to ``crop_size``."""

    types: ClassVar[tuple[str, ...]] = ("CLIPImageProcessor", "CLIPImageProcessorFast")

    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 224})  # {"shortest_edge"} or {"height", "width"}
    do_center_crop: bool = True  # crop the middle crop_size after the resize
    crop_size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})  # {"height", "width"}

    @classmethod
    def _parse(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if config.get("size") is not None:
            out["size"] = _size_dict(config["size"], "size")
            if not ({"height", "width"} <= out["size"].keys() or set(out["size"]) == {"shortest_edge"}):
                raise ModelMismatchError(f"CLIP image processor size {config['size']!r}: need shortest_edge or height and width")
        if config.get("crop_size") is not None:
            crop = config["crop_size"]
            out["crop_size"] = ({"height": crop, "width": crop} if isinstance(crop, int) and not isinstance(crop, bool)
                                else _size_dict(crop, "crop_size"))
            if not {"height", "width"} <= out["crop_size"].keys():
                raise ModelMismatchError(f"CLIP image processor crop_size {crop!r}: need height and width")
        if config.get("do_pad"):
            raise ModelMismatchError("CLIP image processor with do_pad is not reproduced in numpy")
        return out

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize: transformers' ``get_resize_output_image_size``."""
        if "shortest_edge" in self.size and not {"height", "width"} <= self.size.keys():
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return self.size["height"], self.size["width"]

    def _center_crop(self, image: np.ndarray) -> np.ndarray:
        # The torchvision backend's center_crop: zero padding when the crop is larger, then int((H - h) / 2).
        ch, cw = self.crop_size["height"], self.crop_size["width"]
        h, w = image.shape[:2]
        if ch > h or cw > w:
            top, left = max(ch - h, 0) // 2, max(cw - w, 0) // 2
            bottom, right = (max(ch - h, 0) + 1) // 2, (max(cw - w, 0) + 1) // 2
            image = np.pad(image, ((top, bottom), (left, right), (0, 0)))
            h, w = image.shape[:2]
            if (h, w) == (ch, cw):
                return image
        top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
        return image[top:top + ch, left:left + cw]

    def __call__(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        out = []
        for image in images:
            rgb = to_rgb_array(image)
            if self.do_resize:
                rgb = resize_bicubic(rgb, *self.output_size(*rgb.shape[:2]))
            if self.do_center_crop:
                rgb = self._center_crop(rgb)
            out.append(self.normalize(rgb))
        if len({o.shape for o in out}) > 1:
            raise InputError(f"images of different sizes after preprocessing: {[o.shape for o in out]}")
        return {"pixel_values": np.stack(out)}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of ``factor``, the area in [min_pixels, max_pixels],
    the aspect ratio kept as closely as possible (transformers' ``smart_resize``, same rounding)."""
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image of {width}x{height}: the aspect ratio must be under 200 for Qwen2.5-VL")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class Qwen2VLImageProcessor(ImageProcessor):
    """Qwen2.5-VL's ``Qwen2VLImageProcessor``: ``smart_resize``, normalise, flatten into patches."""

    types: ClassVar[tuple[str, ...]] = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast")

    min_pixels: int = 56 * 56  # size.shortest_edge (or min_pixels): least area after the resize
    max_pixels: int = 28 * 28 * 1280  # size.longest_edge (or max_pixels): largest area after the resize
    patch_size: int = 14  # pixels per patch side
    temporal_patch_size: int = 2  # frames per patch (an image is repeated to fill them)
    merge_size: int = 2  # patches per side merged into one token

    @classmethod
    def _parse(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        size = _size_dict(config["size"], "size") if config.get("size") is not None else {}
        # As the processor's __init__: min_pixels / max_pixels override size's entries.
        for key, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            value = config.get(key, size.get(size_key))
            if value is not None:
                out[key] = _positive_int(value, key)
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            if config.get(key) is not None:
                out[key] = _positive_int(config[key], key)
        return out

    def _patchify(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        # [3, H, W] -> [grid_h * grid_w, 3 * t * p * p], patches ordered merge block by merge block.
        c, h, w = image.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = image.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])
        return np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p), (1, gh, gw)

    def __call__(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        factor = self.patch_size * self.merge_size
        patches, grids = [], []
        for image in images:
            rgb = to_rgb_array(image)
            if self.do_resize:
                rgb = resize_bicubic(rgb, *smart_resize(rgb.shape[0], rgb.shape[1], factor, self.min_pixels, self.max_pixels))
            if rgb.shape[0] % factor or rgb.shape[1] % factor:
                raise InputError(f"image of {rgb.shape[1]}x{rgb.shape[0]} is not a multiple of {factor} pixels")
            flat, grid = self._patchify(self.normalize(rgb))
            patches.append(flat)
            grids.append(grid)
        return {"pixel_values": np.concatenate(patches), "image_grid_thw": np.asarray(grids, dtype=np.int64)}


@lru_cache(maxsize=16)
def _tile_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    # (columns, rows) with min_tiles <= columns * rows <= max_tiles, fewest tiles first (a stable sort).
    grids = [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if min_tiles <= w * h <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def best_tile_grid(height: int, width: int, tile: tuple[int, int], min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the tile grid whose aspect ratio is closest to the image's: transformers'
    ``get_optimal_tiled_canvas`` (ties go to more tiles while the image covers over half of them)."""
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for grid in _tile_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * tile[0] * tile[1] * grid[0] * grid[1]:
            best = grid
    return best


@dataclass(frozen=True)
class GotOcr2ImageProcessor(ImageProcessor):
    """InternVL's ``GotOcr2ImageProcessor`` with tiling on (the ``InternVLProcessor`` always asks for it)."""

    types: ClassVar[tuple[str, ...]] = ("GotOcr2ImageProcessor", "GotOcr2ImageProcessorFast")

    size: dict[str, int] = field(default_factory=lambda: {"height": 384, "width": 384})  # tile {"height", "width"}
    crop_to_patches: bool = True  # tile the image; InternVLProcessor passes True whatever the config says
    min_patches: int = 1  # fewest tiles
    max_patches: int = 12  # most tiles (the thumbnail comes on top)

    @classmethod
    def _parse(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"crop_to_patches": True}
        if config.get("size") is not None:
            out["size"] = _size_dict(config["size"], "size")
            if not {"height", "width"} <= out["size"].keys():
                raise ModelMismatchError(f"GotOcr2 image processor size {config['size']!r}: need height and width")
        for key in ("min_patches", "max_patches"):
            if config.get(key) is not None:
                out[key] = _positive_int(config[key], key)
        return out

    def tiles(self, rgb: np.ndarray) -> list[np.ndarray]:
        """uint8 tiles of one image, row by row, then the thumbnail when there is more than one tile."""
        th, tw = self.size["height"], self.size["width"]
        if not self.crop_to_patches:
            return [resize_bicubic(rgb, th, tw) if self.do_resize else rgb]
        cols, rows = best_tile_grid(rgb.shape[0], rgb.shape[1], (th, tw), self.min_patches, self.max_patches)
        canvas = resize_bicubic(rgb, th * rows, tw * cols)
        out = [canvas[r * th:(r + 1) * th, c * tw:(c + 1) * tw] for r in range(rows) for c in range(cols)]
        if len(out) > 1:
            out.append(resize_bicubic(rgb, th, tw))
        return out

    def __call__(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        tiles, counts = [], []
        for image in images:
            these = self.tiles(to_rgb_array(image))
            tiles += [self.normalize(t) for t in these]
            counts.append(len(these))
        if len({t.shape for t in tiles}) > 1:
            raise InputError(f"tiles of different sizes: {sorted({t.shape for t in tiles})}")
        return {"pixel_values": np.stack(tiles), "num_patches": np.asarray(counts, dtype=np.int64)}


# image_processor_type -> class
IMAGE_PROCESSORS: dict[str, type[ImageProcessor]] = {
    name: cls for cls in (ClipImageProcessor, Qwen2VLImageProcessor, GotOcr2ImageProcessor) for name in cls.types
}


def load_image_processor(config: Mapping[str, Any]) -> ImageProcessor:
    """The numpy processor for an image processor config dict (``processor_config.json``'s
    ``image_processor``, or ``preprocessor_config.json``)."""
    kind = config.get("image_processor_type")
    if kind not in IMAGE_PROCESSORS:
        raise ModelMismatchError(
            f"image processor {kind!r} is not reproduced in numpy; supported: {', '.join(sorted(IMAGE_PROCESSORS))}")
    return IMAGE_PROCESSORS[kind].from_dict(config)
