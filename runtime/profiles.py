"""How many visual tokens the adapter sees per call, and the engine shape ranges that follow.

The adapter is called once per VLM batch with every image's tokens in one row
(``rtrt.runtime.names.ADAPTER_CALL``: ``[1, T_total, D]``), so its ``batch`` is always 1 and
``num_tokens`` runs from the fewest tokens one image can give (``max_batch`` = 1, smallest image)
to ``max_batch`` x the most tokens one image can give. The per-image count comes from the
bundle's ``manifest.vlm.image_token_layout`` (written by ``VLMFamily.image_token_layout``), which
mirrors each family's processor:

- ``llava``: ``tokens_per_image``, the same for every image (576 for LLaVA-1.5 at 336 px).
- ``qwen2_5_vl``: the processor resizes each image to multiples of ``f = patch_size x
  spatial_merge_size`` px with ``min_pixels <= h x w <= max_pixels`` (transformers'
  ``smart_resize``) and gives one token per f x f block: 4 .. 16384 tokens with Qwen2.5-VL's
  released processor (3136 .. 12845056 px), 4 .. 1280 with transformers' class defaults.
- ``internvl``: ``tokens_per_tile`` per tile; an image gives 1 tile, or a grid of ``min_patches``
  .. ``max_patches`` tiles plus a thumbnail (InternVL3: 256 per 448 px tile, up to 12 + 1).

Layouts of older bundles lack the processor bounds; ``FAMILY_DEFAULTS`` (the released
checkpoints' processors) fill them in. ``image_tokens(layout, h, w)`` is the exact count for one
image (tests compare it with the real processors), ``token_bounds`` the per-image (min, typical,
max), ``adapter_ranges``/``detector_ranges``/``graph_ranges`` the (min, opt, max) of every
symbolic dimension in ``rtrt.runtime.names`` that a TensorRT optimisation profile needs. The
``opt`` is one typical image (``TYPICAL_IMAGE_HW``, an HD dashcam frame), not the detector's
input size. Pure functions: no torch, no transformers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from .vlm_ort.preprocess import best_tile_grid  # InternVL's tiling, as the runtime's preprocessing does it
from .vlm_ort.preprocess import smart_resize as _smart_resize  # transformers' rounding, in one place

__all__ = [
    "TYPICAL_IMAGE_HW",
    "FAMILY_DEFAULTS",
    "UNKNOWN_VLM_BOUNDS",
    "TokenBounds",
    "effective_layout",
    "image_tokens",
    "token_bounds",
    "adapter_ranges",
    "detector_ranges",
    "graph_ranges",
]

# The image the profile's opt is tuned for: a 1280x720 camera frame (height, width).
TYPICAL_IMAGE_HW = (720, 1280)

# Processor bounds of the released checkpoints, used where a bundle's layout predates them.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # llava-hf/llava-1.5-*-hf: CLIP ViT-L/14 at 336 px, CLS dropped.
    "llava": {"tokens_per_image": 576},
    # Qwen/Qwen2.5-VL-*-Instruct preprocessor_config.json: min_pixels 3136, max_pixels 12845056.
    "qwen2_5_vl": {"patch_size": 14, "spatial_merge_size": 2, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384},
    # OpenGVLab/InternVL3-*-hf: 448 px tiles, 256 tokens each, 1..12 tiles + a thumbnail.
    "internvl": {"tokens_per_tile": 256, "tile_size": [448, 448], "min_patches": 1, "max_patches": 12, "crop_to_patches": True},
}

# Qwen2-VL's processor refuses images whose sides differ by more than this factor.
_QWEN_MAX_ASPECT = 200


@dataclass(frozen=True)
class TokenBounds:
    """Visual tokens of ONE image."""

    min: int  # fewest tokens any image can give
    typical: int  # tokens of a TYPICAL_IMAGE_HW image
    max: int  # most tokens any image can give


# A bundle that names no VLM: the count is unknown, so any count up to 4096 per image.
UNKNOWN_VLM_BOUNDS = TokenBounds(1, 576, 4096)


def effective_layout(layout: Mapping[str, Any] | None, family: str | None = None) -> dict[str, Any] | None:
    """``layout`` with the family's defaults filled in for the keys it lacks; None for an unknown family.

    ``family`` overrides the layout's own family (a layout of another family is then ignored).
    """
    layout = dict(layout or {})
    fam = family or layout.get("family")
    if fam not in FAMILY_DEFAULTS:
        return None
    if layout.get("family") not in (None, fam):
        layout = {}
    out = {**FAMILY_DEFAULTS[fam], **{k: v for k, v in layout.items() if v is not None}}
    out["family"] = fam
    return out


def _qwen_factor(layout: Mapping[str, Any]) -> int:
    return int(layout["patch_size"]) * int(layout["spatial_merge_size"])


def _internvl_tiles(layout: Mapping[str, Any], height: int, width: int) -> int:
    max_p, min_p = int(layout["max_patches"]), int(layout["min_patches"])
    if not layout.get("crop_to_patches") or max_p <= 1:
        return 1
    th, tw = (int(s) for s in layout["tile_size"])
    cols, rows = best_tile_grid(height, width, (th, tw), min_p, max_p)
    n = cols * rows
    return n + 1 if n > 1 else 1  # a thumbnail follows the tiles when there is more than one


def image_tokens(layout: Mapping[str, Any], height: int, width: int) -> int:
    """Visual tokens the family's processor gives one ``height`` x ``width`` image."""
    lay = effective_layout(layout)
    if lay is None:
        raise ValueError(f"no token count for VLM family {dict(layout or {}).get('family')!r}")
    fam = lay["family"]
    if fam == "llava":
        return int(lay["tokens_per_image"])
    if fam == "qwen2_5_vl":
        f = _qwen_factor(lay)
        h, w = _smart_resize(int(height), int(width), f, int(lay["min_pixels"]), int(lay["max_pixels"]))
        return (h // f) * (w // f)
    return int(lay["tokens_per_tile"]) * _internvl_tiles(lay, int(height), int(width))


def token_bounds(layout: Mapping[str, Any] | None, family: str | None = None) -> TokenBounds:
    """(fewest, typical, most) visual tokens of one image for the bundle's ``layout``."""
    lay = effective_layout(layout, family)
    if lay is None:
        return UNKNOWN_VLM_BOUNDS
    fam = lay["family"]
    typical = image_tokens(lay, *TYPICAL_IMAGE_HW)
    if fam == "llava":
        n = int(lay["tokens_per_image"])
        return TokenBounds(n, n, n)
    if fam == "qwen2_5_vl":
        f2 = _qwen_factor(lay) ** 2
        lo_px, hi_px = int(lay["min_pixels"]), int(lay["max_pixels"])
        m, big = lo_px / f2, hi_px / f2  # the pixel bounds in tokens
        # Fewest: an image scaled up to min_pixels, or one scaled down below max_pixels, where
        # flooring both sides keeps more than a quarter of max_pixels.
        lo = max(1, min(math.ceil(m), math.floor(big / 4) + 1))
        # Most: max_pixels, unless an extreme aspect ratio (<= 200) keeps the short side at one
        # block, or scaling up to min_pixels rounds both sides up.
        a = _QWEN_MAX_ASPECT
        hi = max(math.floor(big), math.floor(math.sqrt(a * big)), math.floor(m + math.sqrt(a * m) + math.sqrt(m / a) + 1))
        return TokenBounds(lo, min(max(typical, lo), hi), hi)
    per_tile = int(lay["tokens_per_tile"])
    max_p, min_p = int(lay["max_patches"]), int(lay["min_patches"])
    if not lay.get("crop_to_patches") or max_p <= 1:
        return TokenBounds(per_tile, per_tile, per_tile)
    fewest = 1 if min_p <= 1 else min_p + 1  # a 1x1 grid has no thumbnail
    return TokenBounds(per_tile * fewest, typical, per_tile * (max_p + 1))


def adapter_ranges(
    layout: Mapping[str, Any] | None, max_batch: int, num_classes: int, family: str | None = None
) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of the adapter's symbolic dimensions under ``ADAPTER_CALL``.

    ``batch`` is (1, 1, 1); ``num_tokens`` runs from one smallest image to ``max_batch`` largest
    ones with opt at one typical image; ``num_classes`` is (1, C, C): the runtime always passes
    the bundle's W (C rows); fewer rows are allowed for checks on class subsets.
    """
    b = token_bounds(layout, family)
    n = _positive(max_batch, "max_batch")
    c = _positive(num_classes, "num_classes")
    return {"batch": (1, 1, 1), "num_tokens": (b.min, b.typical, n * b.max), "num_classes": (1, c, c)}


def detector_ranges(max_batch: int, num_classes: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of the detector's symbolic dimensions: 1..``max_batch`` images, opt 1; classes as the adapter's."""
    n = _positive(max_batch, "max_batch")
    c = _positive(num_classes, "num_classes")
    return {"batch": (1, 1, n), "num_classes": (1, c, c)}


def graph_ranges(
    layout: Mapping[str, Any] | None, num_classes: int, max_batch: int, family: str | None = None
) -> dict[str, dict[str, tuple[int, int, int]]]:
    """{"detector": ranges, "adapter": ranges} for a bundle (its layout, its C, the engines' max batch)."""
    return {
        "detector": detector_ranges(max_batch, num_classes),
        "adapter": adapter_ranges(layout, max_batch, num_classes, family),
    }


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return int(value)
