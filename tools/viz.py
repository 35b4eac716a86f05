"""Visualise the detector: the image under a heatmap of the top classes' similarity, with names and scores.

Pure numpy + PIL so it runs wherever the runtime does. One heatmap per image: for each patch
the highest similarity among the reported classes, coloured from transparent (low) to red (high),
and a legend box listing every reported class with its score.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rtrt.runtime.bundle import atomic_write_bytes
from rtrt.runtime.modules import Detection, display_name

__all__ = ["render_heatmap", "save_viz"]

# Distinct colours for the contour of each reported class (RGB).
_PALETTE = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (80, 220, 120), (220, 80, 255), (255, 140, 40)]


def _colormap(x: np.ndarray) -> np.ndarray:
    """A compact 'inferno'-like ramp: x in [0, 1] -> RGB uint8."""
    stops = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
    pos = np.clip(x, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    t = (pos - lo)[..., None]
    return (stops[lo] * (1 - t) + stops[lo + 1] * t).astype(np.uint8)


def render_heatmap(
    image: Image.Image,
    similarity: np.ndarray,
    detections: Sequence[Detection],
    threshold: float,
) -> Image.Image:
    """The picture ``rtrt infer --viz`` writes. ``similarity`` is [C, gh, gw]."""
    img = image.convert("RGB")
    w, h = img.size
    if detections:
        idx = [d.index for d in detections]
        heat = similarity[idx].max(axis=0)
    else:
        heat = similarity.max(axis=0)
    lo = min(float(threshold), float(heat.max()) - 1e-6)
    norm = np.clip((heat - lo) / max(float(heat.max()) - lo, 1e-6), 0, 1)
    hm = Image.fromarray((norm * 255).astype(np.uint8), "L").resize((w, h), Image.BILINEAR)
    a = np.asarray(hm, dtype=np.float32) / 255.0
    base = np.asarray(img, dtype=np.float32)
    col = _colormap(a).astype(np.float32)
    alpha = (0.15 + 0.55 * a)[..., None]
    out = Image.fromarray((base * (1 - alpha) + col * alpha).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    # Mark each reported class's strongest patch.
    gh, gw = similarity.shape[1:]
    for k, d in enumerate(detections):
        y, x = np.unravel_index(int(np.argmax(similarity[d.index])), (gh, gw))
        cx, cy = (x + 0.5) * w / gw, (y + 0.5) * h / gh
        r = max(w / gw, h / gh) * 0.8
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=_PALETTE[k % len(_PALETTE)], width=3)
    lines = [f"{display_name(d.name)}: {d.score:.2f}" for d in detections] or ["no rare object above threshold"]
    pad, lh = 4, 12
    box_w = max(draw.textlength(s, font=font) for s in lines) + 2 * pad + 14
    draw.rectangle([0, 0, box_w, pad * 2 + lh * len(lines)], fill=(0, 0, 0))
    for k, s in enumerate(lines):
        y = pad + k * lh
        if detections:
            draw.rectangle([pad, y + 2, pad + 8, y + 10], fill=_PALETTE[k % len(_PALETTE)])
        draw.text((pad + 14, y), s, fill=(255, 255, 255), font=font)
    return out


def save_viz(path: str | Path, image: Image.Image, similarity: np.ndarray, detections, threshold: float) -> None:
    """Render and write a PNG atomically."""
    import io

    buf = io.BytesIO()
    render_heatmap(image, similarity, detections, threshold).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
