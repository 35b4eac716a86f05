"""The plug-in's configs and the detector's decision, in numpy: what runs without torch.

- ``AdapterConfig`` / ``DetectorConfig``: the shapes and decision rule saved in a bundle manifest.
- ``Detection``: one detected rare class, with its box and peak in the input image's pixels.
- ``select_detections``: the top-k classes over the threshold (per-class z-scores once calibrated).
- ``locate``: where a detected class is, read off that class's similarity map.

The PyTorch modules that produce W, the scores and the refined tokens are in ``rtrt.runtime.modules``,
which re-exports these names.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .names import REFINE_MASK_CLASSES, display_name

__all__ = [
    "AdapterConfig",
    "DetectorConfig",
    "Detection",
    "select_detections",
    "locate",
    "region_detection",
    "region_means",
    "check_region",
    "BOX_CUT",
    "BOX_UPSAMPLE",
    "display_name",
]

# How a detection's box is read off its class's similarity map (see ``locate``). Chosen on the demo
# test split (tools/benchmarks/boxes.py) for the best mean IoU with the annotated box, and confirmed on a
# world of another seed; the measured alternatives are in the README.
BOX_CUT = 0.8  # region cut: this fraction of the way from the map's median to its peak
BOX_UPSAMPLE = 4  # the map is bilinearly upsampled this many times per side before the cut (sub-patch boxes)


@dataclass
class AdapterConfig:
    """Shape of a ``CrossAttentionAdapter``; saved in the bundle manifest."""

    d_model: int  # hidden size of the VLM's language model (D_llm); V and W both have it
    width: int = 512  # bottleneck width in which attention runs (queries, keys, values)
    heads: int = 8  # attention heads; must divide ``width``
    null_slot: bool = False  # an extra learned key with a zero value, so a token can attend to nothing and stay unchanged
    slot_value: bool = False  # with null_slot: that slot's value is learned too (a class-free write, e.g. the red-box marker)
    # Detector-guided attention (not in the paper): the attention logits of each visual token over W's rows
    # get + bias_scale * the detector's calibrated z-score of each class at the token's cell
    # (``class_bias`` [B, N, C]; see ``runtime.refine_mask.token_bias``); bias_scale is learned.
    detector_bias: bool = False
    # A region question's refinement lands in its box: the adapter's change only at the cells of the
    # asked box, and with detector_bias every token's bias is the box's mean z (``Pipeline.batch(regions=)``).
    region_box: bool = False
    # The runtime's default refinement mask (Pipeline.refine_mask_z): the adapter's change is kept only
    # at LLaVA's image-token cells where a class's calibrated detector z-score exceeds this; None:
    # every token refined (the paper). Written by ``rtrt calibrate --refine-mask-z``.
    refine_mask_z: float | None = None
    # Which classes' cells that mask keeps (Pipeline.refine_mask_classes): "any", a cell where any class's
    # z-score exceeds refine_mask_z; "reported", a cell whose best class (highest z) exceeds it and is one
    # the detector reports for the image (its detections); "unhinted", a cell whose best class exceeds it
    # and is not named by the prompt's hint (with hints off, every class), so the refinement adds what the
    # hints leave out instead of repeating them.
    # Written by ``rtrt calibrate --refine-mask-classes``.
    refine_mask_classes: str = "any"

    def __post_init__(self):
        if self.slot_value and not self.null_slot:
            raise ValueError("adapter slot_value needs null_slot")
        if self.refine_mask_classes not in REFINE_MASK_CLASSES:
            raise ValueError(f"adapter refine_mask_classes must be one of {', '.join(REFINE_MASK_CLASSES)}, "
                             f"not {self.refine_mask_classes!r}")


@dataclass
class DetectorConfig:
    """Shape and decision rule of a ``RareObjectDetector``; saved in the bundle manifest."""

    d_vfm: int  # width of the VFM's patch tokens (384 for DINOv3 ViT-S)
    d_llm: int  # width of W (the LLM hidden size)
    proj_hidden: int = 0  # hidden width of the projection MLP; 0 means a single linear layer
    threshold: float = 0.3  # cosine score above which a class is reported (without calibration)
    top_k: int = 5  # at most this many classes are reported (and put into the prompt)
    # Calibration (``rtrt calibrate``, fitted on a held-out split); all None: the raw threshold above.
    score_mean: list[float] | None = None  # per class: mean of its score over the calibration images
    score_std: list[float] | None = None  # per class: standard deviation of its score there
    z_threshold: float | None = None  # a class is reported when (score - mean) / std exceeds this
    # Region questions (``region_detection``): the box's best class is hinted when the z-score of its
    # mean similarity over the box exceeds this; None: always. Written by ``rtrt calibrate`` (region boxes of the split).
    region_z_threshold: float | None = None

    @property
    def calibrated(self) -> bool:
        return self.score_mean is not None and self.score_std is not None and self.z_threshold is not None

    def decision_scores(self, scores) -> np.ndarray:
        """What the decision compares with its threshold: z-scores when calibrated, else the raw scores."""
        s = np.asarray(scores, dtype=np.float64)
        if not self.calibrated:
            return s
        mean, std = np.asarray(self.score_mean, dtype=np.float64), np.asarray(self.score_std, dtype=np.float64)
        if mean.shape != s.shape[-1:] or std.shape != s.shape[-1:]:
            raise ValueError(f"calibration has {mean.shape[0]} classes, the scores {s.shape[-1]}")
        return (s - mean) / np.maximum(std, 1e-6)

    @property
    def decision_threshold(self) -> float:
        return float(self.z_threshold) if self.calibrated else float(self.threshold)


@dataclass(frozen=True)
class Detection:
    """One detected rare class, and where it is."""

    name: str  # class name as in the bundle (``traffic_cone``)
    score: float  # max cosine similarity over patches, in [-1, 1]
    index: int = field(default=-1, compare=False)  # row of W
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 in input-image pixels (None: no map given)
    peak: tuple[float, float] | None = None  # x, y of the map's peak in input-image pixels (None: no map given)

    @property
    def label(self) -> str:
        """The name as people read it (``garbage bag``): what the text output and the picture print."""
        return display_name(self.name)

    def to_dict(self) -> dict:
        """``{"name", "label", "score", "box", "peak"}``, as ``rtrt infer --json`` prints it."""
        return {
            "name": self.name,
            "label": self.label,
            "score": round(float(self.score), 6),
            "box": None if self.box is None else [round(float(v), 2) for v in self.box],
            "peak": None if self.peak is None else [round(float(v), 2) for v in self.peak],
        }


def select_detections(
    scores,
    names: Sequence[str],
    top_k: int,
    threshold: float,
    similarity=None,
    image_size: tuple[int, int] | None = None,
    rank_by=None,
) -> list[Detection]:
    """Top-k classes of one image whose score is above ``threshold``, best first.

    ``scores`` is a 1-D array-like [C]. Ties break by class index so the result is deterministic.
    ``rank_by`` [C] (e.g. a calibrated detector's z-scores, ``DetectorConfig.decision_scores``)
    replaces the scores for the ranking and the threshold; detections still carry the raw score.
    With ``similarity`` [C, gh, gw] (the per-patch map) and ``image_size`` (width, height of the
    input image) every detection also gets its ``box`` and ``peak`` (``locate``).
    """
    vals = [float(s) for s in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    if len(vals) != len(names):
        raise ValueError(f"{len(vals)} scores for {len(names)} classes")
    key = vals if rank_by is None else [float(v) for v in (rank_by.tolist() if hasattr(rank_by, "tolist") else rank_by)]
    if len(key) != len(names):
        raise ValueError(f"{len(key)} ranking values for {len(names)} classes")
    order = sorted(range(len(key)), key=lambda i: (-key[i], i))
    chosen = [i for i in order[: max(top_k, 0)] if key[i] > threshold]
    if similarity is None or image_size is None:
        return [Detection(names[i], vals[i], i) for i in chosen]
    sim = similarity.detach().float().cpu().numpy() if hasattr(similarity, "detach") else np.asarray(similarity)
    if sim.ndim != 3 or sim.shape[0] != len(names):
        raise ValueError(f"similarity of shape {sim.shape} is not [{len(names)}, gh, gw]")
    out = []
    for i in chosen:
        box, peak = locate(sim[i], image_size[0], image_size[1])
        out.append(Detection(names[i], vals[i], i, box, peak))
    return out


@functools.lru_cache(maxsize=16)
def _interp_matrix(n: int, factor: int) -> np.ndarray:
    """[n * factor, n] linear-interpolation weights along one axis (each row sums to 1; cached, read-only).

    Fine cell k has its centre at patch coordinate (k + 0.5) / factor - 0.5 (the half-pixel
    convention of ``align_corners=False``), clamped at the edges, so the fine grid tiles the image.
    """
    c = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0.0, n - 1)
    lo = np.floor(c).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    w = np.zeros((n * factor, n))
    rows = np.arange(n * factor)
    np.add.at(w, (rows, lo), 1.0 - (c - lo))
    np.add.at(w, (rows, hi), c - lo)
    w.flags.writeable = False
    return w


def _upsample(m: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsampling by ``factor`` per side (separable: two small matrix products)."""
    return _interp_matrix(m.shape[0], factor) @ m @ _interp_matrix(m.shape[1], factor).T


def _grow(mask: np.ndarray, i: int, j: int) -> tuple[list[int], list[int]]:
    """Rows and columns of the 4-connected cells of ``mask`` reachable from (i, j) (a depth-first fill)."""
    gh, gw = mask.shape
    flat = mask.ravel().tolist()
    seen = bytearray(gh * gw)
    start = i * gw + j
    seen[start] = 1
    stack, rows, cols = [start], [i], [j]
    while stack:
        k = stack.pop()
        r, c = divmod(k, gw)
        for n, inside in ((k - gw, r > 0), (k + gw, r < gh - 1), (k - 1, c > 0), (k + 1, c < gw - 1)):
            if inside and flat[n] and not seen[n]:
                seen[n] = 1
                stack.append(n)
                rows.append(n // gw)
                cols.append(n % gw)
    return rows, cols


def locate(
    similarity,
    width: int,
    height: int,
    *,
    cut: float = BOX_CUT,
    upsample: int = BOX_UPSAMPLE,
    level: float | None = None,
) -> tuple[tuple[float, float, float, float], tuple[float, float]]:
    """Box [x0, y0, x1, y1] and peak [x, y] of one class, in input-image pixels, from its map [gh, gw].

    The map is upsampled (``upsample`` times per side, bilinear; 1 keeps the patch grid), its peak
    cell found (first in row-major order on ties), and the 4-connected region around the peak of
    cells at or above ``median + cut * (peak - median)`` grown; the box is that region's extent.
    The VFM sees the whole image resized to S x S, so cell (i, j) of an n x m grid covers input
    pixels x in [j * width / m, (j + 1) * width / m) and y in [i * height / n, (i + 1) * height / n);
    the peak is its cell's centre. ``level`` replaces the relative cut by a fixed cosine (e.g. the
    decision threshold; measured worse, kept for comparison). Numpy only, deterministic, cheap
    (a 14 x 14 map, 56 x 56 cells: ~0.15 ms on one CPU core).
    """
    m = np.asarray(similarity, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"a similarity map must be 2-D [gh, gw], got shape {m.shape}")
    if upsample < 1:
        raise ValueError(f"upsample must be at least 1, got {upsample}")
    m = np.where(np.isfinite(m), m, -1.0)  # cosines lie in [-1, 1]: a non-finite value counts as the lowest
    if upsample > 1:
        m = _upsample(m, upsample)
    gh, gw = m.shape
    pi, pj = divmod(int(np.argmax(m)), gw)
    top = float(m[pi, pj])
    med = float(np.median(m))
    level = min(med + cut * (top - med) if level is None else float(level), top)  # min: the peak is always in
    rows, cols = _grow(m >= level, pi, pj)
    sx, sy = width / gw, height / gh
    box = (float(min(cols) * sx), float(min(rows) * sy), float((max(cols) + 1) * sx), float((max(rows) + 1) * sy))
    return box, (float((pj + 0.5) * sx), float((pi + 0.5) * sy))


def check_region(box, width: int, height: int) -> tuple[float, float, float, float]:
    """``box`` as four floats [x0, y0, x1, y1] in pixels of a ``width`` x ``height`` image, or a ``ValueError``
    naming what is wrong (not four finite numbers, empty, or outside the image)."""
    try:
        if isinstance(box, (str, bytes)):
            raise TypeError
        vals = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"a region is four numbers x0, y0, x1, y1 in pixels, got {box!r}") from None
    if len(vals) != 4 or not all(np.isfinite(vals)):
        raise ValueError(f"a region is four finite numbers x0, y0, x1, y1 in pixels, got {box!r}")
    x0, y0, x1, y1 = vals
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"region {list(vals)} is empty (it needs x1 > x0 and y1 > y0)")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise ValueError(f"region {list(vals)} lies outside the {width}x{height} image")
    return vals


def _box_cells(similarity, box: Sequence[float], image_size: tuple[int, int]):
    """``(cells [C, r, c], rows, cols, cx, cy)``: the map's cells whose centre lies inside ``box`` (at least the cell holding its centre)."""
    sim = similarity.detach().float().cpu().numpy() if hasattr(similarity, "detach") else np.asarray(similarity)
    if sim.ndim != 3:
        raise ValueError(f"similarity of shape {sim.shape} is not [C, gh, gw]")
    width, height = image_size
    x0, y0, x1, y1 = check_region(box, width, height)
    _, gh, gw = sim.shape
    cx = (np.arange(gw) + 0.5) * width / gw
    cy = (np.arange(gh) + 0.5) * height / gh
    cols = (cx >= x0) & (cx <= x1)
    rows = (cy >= y0) & (cy <= y1)
    if not cols.any():
        cols[int(np.argmin(np.abs(cx - (x0 + x1) / 2)))] = True
    if not rows.any():
        rows[int(np.argmin(np.abs(cy - (y0 + y1) / 2)))] = True
    return np.where(np.isfinite(sim), sim, -1.0)[:, rows][:, :, cols], rows, cols, cx, cy


def region_means(similarity, box: Sequence[float], image_size: tuple[int, int]) -> np.ndarray:
    """[C]: each class's mean similarity over the cells of ``box`` (see ``region_detection``)."""
    cells = _box_cells(similarity, box, image_size)[0]
    return cells.reshape(cells.shape[0], -1).mean(-1)


def region_detection(
    similarity,
    box: Sequence[float],
    image_size: tuple[int, int],
    names: Sequence[str],
    rank=None,
    threshold: float | None = None,
) -> Detection | None:
    """The one rare class a region question is about: the class whose mean similarity over the box stands out most.

    ``similarity`` [C, gh, gw] is the detector's per-patch map of the frame *without* the red box
    (a drawn box is not part of the scene: on the demo's val split it lowers the right class's
    share of rare boxes from 0.69 to 0.40), ``box`` [x0, y0, x1, y1] in the frame's pixels
    (``image_size`` = width, height). The cells whose centre lies inside the box count (at least
    the cell holding the box's centre); ``rank`` maps the per-class means [C] to what is compared
    (a calibrated detector's ``DetectorConfig.decision_scores``: per-class z-scores, since classes'
    similarities differ in level); None compares the means. ``threshold``: None is returned when the
    best class's compared value does not exceed it (a calibrated detector's ``region_z_threshold``: a
    box holding nothing rare gets no hint); None always gives the best class. One class, not more:
    on the demo's val split the two best classes instead of one lowered text hints' rare F1 from
    35.6 to 17.0. The detection carries the mean as its score, the box as its box, and the centre
    of the class's best cell in the box as its peak.
    """
    if np.ndim(similarity) != 3 or np.shape(similarity)[0] != len(names):
        raise ValueError(f"similarity of shape {tuple(np.shape(similarity))} is not [{len(names)}, gh, gw]")
    cells, rows, cols, cx, cy = _box_cells(similarity, box, image_size)
    means = cells.reshape(len(names), -1).mean(-1)
    key = np.asarray(means if rank is None else rank(means), dtype=np.float64)
    i = int(np.argmax(key))  # first on ties: deterministic
    if threshold is not None and not key[i] > threshold:
        return None
    ri, ci = divmod(int(np.argmax(cells[i])), cells.shape[2])
    pr, pc = np.flatnonzero(rows)[ri], np.flatnonzero(cols)[ci]
    return Detection(names[i], float(means[i]), i, check_region(box, *image_size), (float(cx[pc]), float(cy[pr])))
