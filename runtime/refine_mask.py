"""Where the adapter may change the visual tokens: the detector's cells (numpy, no torch).

The paper's refinement changes every visual token. With ``Pipeline.refine_mask_z`` (an addition to the
paper's recipe; a bundle's default is its ``adapter.refine_mask_z``, 0 in the demo bundle, none unless
``rtrt calibrate --refine-mask-z`` set it) the adapter's residual is kept only at the LLaVA token cells where the
calibrated detector finds a rare class: a class's z-score of the detector's similarity, sampled at the
cell's centre, exceeds ``z``. Tokens of common objects and background then reach the VLM unchanged.
With ``Pipeline.refine_mask_classes`` (``adapter.refine_mask_classes``) a cell counts only when its best
class (the highest z-score there) is one the setting allows: ``"reported"``, the image's detections;
``"unhinted"``, the classes the prompt's hint does not name (a cell that belongs to a hinted class is
left to the hint).

- ``cell_centres``: (x, y) in input-image pixels of each token cell's centre, through the CLIP image
  processor's resize and centre crop (the same for transformers' processor and the numpy one).
- ``sample_cells``: the detector's similarity map [C, gh, gw] sampled bilinearly at those centres
  (``torch.nn.functional.grid_sample`` with ``align_corners=False`` and border padding).
- ``hot_cells``: the cells whose sampled similarity the detector's decision would report.
- ``token_mask``: the 0/1 mask over one image's visual tokens (a CLS token, "full" strategy, gets 0).
- ``box_cells``: the cells whose centre lies in a region question's box (at least the one nearest its centre).
- ``token_bias``: the detector's calibrated z-score of each class at each token's cell, [tokens, C], for an
  adapter trained with ``detector_bias`` (a region question's: the box cells' mean z at every token).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .errors import ModelMismatchError

__all__ = ["processor_geometry", "cell_centres", "sample_cells", "hot_cells", "token_cells", "token_mask", "box_cells", "box_mask",
           "cells_bias", "token_bias"]


def _hw(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return int(value["height"]), int(value["width"])
    return int(value.height), int(value.width)


def processor_geometry(image_processor) -> dict:
    """The resize and crop of a CLIP image processor (transformers' or ``vlm_ort``'s) as plain values:
    ``{"shortest_edge": int | None, "size": (h, w) | None, "crop": (h, w) | None}``."""
    size = image_processor.size
    short = size.get("shortest_edge") if isinstance(size, Mapping) else getattr(size, "shortest_edge", None)
    crop = _hw(image_processor.crop_size) if getattr(image_processor, "do_center_crop", False) else None
    return {"shortest_edge": int(short) if short else None, "size": None if short else _hw(size), "crop": crop}


def cell_centres(image_size: tuple[int, int], grid: int, geometry: Mapping[str, Any]) -> np.ndarray:
    """``[grid * grid, 2]`` float64: (x, y) in input-image pixels of the centre of each token cell, row-major.

    The processor resizes (shortest edge to ``shortest_edge``, or to ``size``) and then centre-crops;
    the token grid covers the crop, so each cell centre goes back through both steps."""
    width, height = image_size
    if geometry.get("shortest_edge"):
        short = geometry["shortest_edge"]
        rw, rh = width * short / min(width, height), height * short / min(width, height)
    else:
        rh, rw = geometry["size"]
    ch, cw = geometry["crop"] if geometry.get("crop") else (rh, rw)
    ox, oy = (rw - cw) / 2, (rh - ch) / 2
    centre = (np.arange(grid, dtype=np.float64) + 0.5) / grid
    ys, xs = np.meshgrid(centre * ch, centre * cw, indexing="ij")
    return np.stack([(xs.ravel() + ox) * width / rw, (ys.ravel() + oy) * height / rh], axis=-1)


def sample_cells(similarity, image_size: tuple[int, int], centres: np.ndarray) -> np.ndarray:
    """``[N, C]`` float32: the similarity [C, gh, gw] (over the whole image, as the VFM sees it) sampled
    bilinearly at the N ``centres`` (input pixels); the map's border value outside it."""
    sim = np.asarray(similarity, dtype=np.float32)
    _, gh, gw = sim.shape
    width, height = image_size
    # grid_sample, align_corners=False: pixel x of the map at normalised u is ((u + 1) * gw - 1) / 2.
    ix = np.clip(np.asarray(centres[:, 0], dtype=np.float64) / width * gw - 0.5, 0, gw - 1)
    iy = np.clip(np.asarray(centres[:, 1], dtype=np.float64) / height * gh - 0.5, 0, gh - 1)
    x0, y0 = np.floor(ix).astype(np.int64), np.floor(iy).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, gw - 1), np.minimum(y0 + 1, gh - 1)
    fx, fy = (ix - x0)[:, None], (iy - y0)[:, None]
    at = lambda y, x: sim[:, y, x].T  # noqa: E731  [N, C]
    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def hot_cells(cells: np.ndarray, detector, z: float | None = None, classes=None) -> np.ndarray:
    """``[N]`` bool: the cells whose own similarity ``cells`` [N, C] the detector's decision reports:
    the cell's best class (its highest calibrated z-score) above ``z`` (None: the detector's
    ``z_threshold``), or an uncalibrated detector's raw threshold; for every class at once that is "any
    class above it". ``classes``: the cell counts only when its best class is one of these indices
    (``refine_mask_classes``: the image's detections, or the classes the hint does not name; empty: no
    cell), so a cell that belongs to another class is left alone; None: every class."""
    scores = detector.decision_scores(np.asarray(cells, dtype=np.float64))
    threshold = z if z is not None and detector.calibrated else detector.decision_threshold
    hot = scores.max(axis=-1) > threshold
    if classes is not None:
        hot &= np.isin(scores.argmax(axis=-1), np.asarray(list(classes), dtype=np.int64))
    return hot


def token_mask(similarity, image_size: tuple[int, int], layout: Mapping[str, Any], geometry: Mapping[str, Any],
               detector, z: float, classes=None) -> np.ndarray:
    """``[tokens_per_image]`` float32: 1 at the visual tokens whose cell the detector reports a rare class
    in (at ``z``; ``classes``: only those class indices, see ``hot_cells``), 0 elsewhere; LLaVA's fixed
    grid (a first CLS token, "full" strategy, gets 0)."""
    per_image, offset, _, cells = token_cells(similarity, image_size, layout, geometry)
    mask = np.zeros(per_image, dtype=np.float32)
    mask[offset:] = hot_cells(cells, detector, z, classes)
    return mask


def token_cells(similarity, image_size: tuple[int, int], layout: Mapping[str, Any], geometry: Mapping[str, Any],
                need: str = "the refinement mask") -> tuple[int, int, np.ndarray, np.ndarray]:
    """``(tokens per image, offset of the grid's first token, centres [N, 2], cells [N, C])``: one image's
    token-cell centres and the detector's similarity sampled there, what the mask and the bias are built
    from (sampled once when both are)."""
    per_image, grid, offset = _grid(layout, similarity, need)
    centres = cell_centres(image_size, grid, geometry)
    return per_image, offset, centres, sample_cells(similarity, image_size, centres)


def _grid(layout: Mapping[str, Any], similarity=None, need: str = "the refinement mask") -> tuple[int, int, int]:
    """(tokens per image, grid side, offset of the grid's first token) of LLaVA's fixed grid."""
    per_image = int(layout["tokens_per_image"])
    grid = math.isqrt(per_image)
    if similarity is not None and np.ndim(similarity) != 3:
        raise ModelMismatchError(f"{need} needs the detector's similarity as a [C, gh, gw] map, not of shape "
                                 f"{np.shape(similarity)} (a non-square VFM patch grid)")
    return per_image, grid, per_image - grid * grid


def box_cells(box, image_size: tuple[int, int], centres: np.ndarray) -> np.ndarray:
    """``[N]`` bool: the cells whose centre (``centres`` [N, 2], input pixels) lies in ``box`` [x0, y0, x1, y1]
    (edges included); a box between centres gets the cell nearest its centre, so no region is left without one."""
    x0, y0, x1, y1 = (float(v) for v in box)
    c = np.asarray(centres, dtype=np.float64)
    inside = (c[:, 0] >= x0) & (c[:, 0] <= x1) & (c[:, 1] >= y0) & (c[:, 1] <= y1)
    if not inside.any():
        inside[int(np.argmin((c[:, 0] - (x0 + x1) / 2) ** 2 + (c[:, 1] - (y0 + y1) / 2) ** 2))] = True
    return inside


def token_bias(similarity, image_size: tuple[int, int], layout: Mapping[str, Any], geometry: Mapping[str, Any],
               detector, box=None) -> np.ndarray:
    """``[tokens_per_image, C]`` float32: the calibrated detector's z-score of each class at each token's cell
    (the similarity sampled at the cell's centre, standardised by ``detector.decision_scores``), the input
    ``class_bias`` of an adapter trained with ``detector_bias``. With ``box`` (a region question) every
    token gets the mean over the box's cells of the sampled similarity, standardised: the one object the
    question asks about. A CLS token ("full" strategy) gets 0."""
    if not detector.calibrated:
        raise ModelMismatchError("detector_bias needs a calibrated detector (rtrt calibrate): its z-scores are the bias")
    per_image, offset, centres, cells = token_cells(similarity, image_size, layout, geometry, "detector_bias")
    out = np.zeros((per_image, cells.shape[1]), dtype=np.float32)
    out[offset:] = cells_bias(cells, centres, image_size, detector, box)
    return out


def cells_bias(cells: np.ndarray, centres: np.ndarray, image_size: tuple[int, int], detector, box=None) -> np.ndarray:
    """``[N, C]``: the calibrated z-score of each class at each cell (``cells`` [N, C], the similarity sampled
    at ``centres``), or with ``box`` the z-score of the box cells' mean similarity at every cell (``token_bias``)."""
    cells = np.asarray(cells, dtype=np.float64)
    if box is None:
        return detector.decision_scores(cells)
    return np.broadcast_to(detector.decision_scores(cells[box_cells(box, image_size, centres)].mean(0)), cells.shape)


def box_mask(box, image_size: tuple[int, int], layout: Mapping[str, Any], geometry: Mapping[str, Any]) -> np.ndarray:
    """``[tokens_per_image]`` float32: 1 at the tokens whose cell lies in a region question's ``box`` (see ``box_cells``)."""
    per_image, grid, offset = _grid(layout)
    mask = np.zeros(per_image, dtype=np.float32)
    mask[offset:] = box_cells(box, image_size, cell_centres(image_size, grid, geometry))
    return mask
