"""Draw the detector's answer on the image for a person: each detection's box with its label and score on it.

``rtrt infer --viz OUT.png`` writes this picture; ``--viz-class NAME`` also blends that class's
similarity map underneath. Each detection gets its own colour: a rectangle at its ``box`` and a
filled tag with ``label score`` at the box's top edge (tags that would overlap are moved apart).
Numpy and Pillow only, so it runs wherever the runtime does.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rtrt.runtime.errors import InputError
from rtrt.runtime.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from rtrt.runtime.modules import Detection

__all__ = ["PALETTE", "Tag", "class_index", "font_size", "layout", "render", "save_viz"]

# One colour per detection, in order (RGB): saturated so that a box stands out from a road scene.
PALETTE = [(255, 48, 48), (0, 170, 255), (255, 210, 0), (0, 220, 110), (230, 60, 255), (255, 130, 0),
           (0, 235, 235), (255, 90, 170)]


@dataclass(frozen=True)
class Tag:
    """Where one detection is drawn."""

    box: tuple[int, int, int, int]  # rectangle x0, y0, x1, y1 (inclusive pixels) of the detection's box
    tag: tuple[int, int, int, int]  # filled label tag x0, y0, x1, y1 (inclusive pixels)
    colour: tuple[int, int, int]  # outline and tag fill (RGB)
    text: str  # "label score", written on the tag


def font_size(width: int, height: int) -> int:
    """Label text size in pixels: 1/40 of the longer side (16 px on a 640 px image), at least 14."""
    return max(14, round(max(width, height) / 40))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _pad(size: int) -> int:
    """Margin between a tag's edge and its text."""
    return max(2, size // 5)


def _tag_size(font, pad: int, text: str) -> tuple[int, int]:
    """Width and height of the tag holding ``text``; one height for every text (ascender to descender)."""
    l, _, r, _ = font.getbbox(text)
    _, t, _, b = font.getbbox("Agy|")
    return int(r - l) + 2 * pad, int(b - t) + 2 * pad


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def layout(size: tuple[int, int], detections: Sequence["Detection"]) -> list[Tag]:
    """Boxes and label tags of ``detections`` (those with a box) on an image of ``size`` (width, height).

    A tag sits on the box's top edge, above it when there is room; one that would cover an earlier
    tag moves down a tag height at a time (then up), so every label stays readable."""
    w, h = size
    fs = font_size(w, h)
    font, pad = _font(fs), _pad(fs)
    out: list[Tag] = []
    for k, d in enumerate(d for d in detections if d.box is not None):
        x0, y0, x1, y1 = (int(round(v)) for v in d.box)
        box = (min(max(x0, 0), w - 1), min(max(y0, 0), h - 1), min(max(x1 - 1, 0), w - 1), min(max(y1 - 1, 0), h - 1))
        text = f"{d.label} {d.score:.2f}"
        tw, th = _tag_size(font, pad, text)
        tx = min(box[0], max(w - tw, 0))
        start = box[1] - th if box[1] - th >= 0 else box[1]
        tag = (tx, start, tx + tw - 1, start + th - 1)
        for y in [*range(start, h - th + 1, th), *range(start - th, -1, -th)]:
            cand = (tx, y, tx + tw - 1, y + th - 1)
            if not any(_overlaps(cand, o.tag) for o in out):
                tag = cand
                break
        out.append(Tag(box, tag, PALETTE[k % len(PALETTE)], text))
    return out


def _colormap(x: np.ndarray) -> np.ndarray:
    """An 'inferno'-like ramp: x in [0, 1] -> RGB."""
    stops = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
    pos = np.clip(x, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    t = (pos - lo)[..., None]
    return stops[lo] * (1 - t) + stops[lo + 1] * t


def _heat(img: Image.Image, sim: np.ndarray) -> Image.Image:
    """Blend one class's map [gh, gw] over the image: transparent at its median, strongest at its peak."""
    med, top = float(np.median(sim)), float(sim.max())
    norm = np.clip((sim - med) / max(top - med, 1e-6), 0, 1).astype(np.float32)
    a = np.asarray(Image.fromarray(norm, "F").resize(img.size, Image.BILINEAR), dtype=np.float32)
    alpha = (0.6 * a)[..., None]
    base = np.asarray(img, dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + _colormap(a) * alpha).clip(0, 255).astype(np.uint8))


def class_index(name: str, class_names: Sequence[str]) -> int:
    """Row of ``class_names`` for a machine name (``garbage_bag``) or a label (``garbage bag``)."""
    for i, c in enumerate(class_names):
        if name in (c, c.replace("_", " ").strip()):
            return i
    raise InputError(f"--viz-class {name!r} is not a class of this bundle (classes: {', '.join(class_names)})")


def render(image: Image.Image, detections: Sequence["Detection"], similarity: np.ndarray | None = None,
           heat_index: int | None = None) -> Image.Image:
    """The picture: ``image`` (under class ``heat_index``'s map from ``similarity`` [C, gh, gw] when
    given), with every detection's box and label tag (``layout``)."""
    out = image.convert("RGB")
    if heat_index is not None and similarity is not None:
        out = _heat(out, np.asarray(similarity[heat_index], dtype=np.float32))
    draw = ImageDraw.Draw(out)
    fs = font_size(*out.size)
    font, pad = _font(fs), _pad(fs)
    tags = layout(out.size, detections)
    for g in reversed(tags):  # the best detection's outline drawn last, on top of overlapping ones
        draw.rectangle(g.box, outline=g.colour, width=max(2, round(max(out.size) / 320)))
    if not tags:
        text = "no rare object above threshold"
        tw, th = _tag_size(font, pad, text)
        tags = [Tag((0, 0, 0, 0), (0, 0, tw - 1, th - 1), (0, 0, 0), text)]
    for g in tags:
        draw.rectangle(g.tag, fill=g.colour)
        # Black text on light tags, white on dark ones (Rec. 601 luma).
        ink = (0, 0, 0) if 0.299 * g.colour[0] + 0.587 * g.colour[1] + 0.114 * g.colour[2] > 140 else (255, 255, 255)
        l, _, _, _ = font.getbbox(g.text)
        _, t, _, _ = font.getbbox("Agy|")
        draw.text((g.tag[0] + pad - l, g.tag[1] + pad - t), g.text, fill=ink, font=font)
    return out


def save_viz(path: str | Path, image: Image.Image, detections: Sequence["Detection"],
             similarity: np.ndarray | None = None, heat_index: int | None = None) -> None:
    """Render and write a PNG atomically; a folder that does not exist is refused, never created."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"--viz {path}: folder {path.parent} does not exist")
    buf = io.BytesIO()
    render(image, detections, similarity, heat_index).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
