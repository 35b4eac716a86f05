"""Parity checks between a reference (PyTorch) and an exported graph (ORT fp32/int8, TensorRT).

The comparison itself (``cross_validate``, ``TOLERANCES``, ``ParityReport``, top-k agreement) lives
in ``rtrt.runtime.parity``, shared with ``rtrt check``; it is re-exported here. This module adds the
runners (PyTorch, ONNX Runtime) and the inputs; ``rtrt export`` refuses to write a graph whose
report did not pass.

Inputs are real where the bundle has them: its own W rows as class embeddings (subsets for other
C), its own VFM preprocessing on images from ``--images`` (or, without them, procedurally drawn
road scenes from ``synthetic_scene``). Visual tokens for the adapter are captured from the bundle's
own VLM on those images where it can be loaded (``adapter_case_from_tokens``: the adapter's call
convention, all tokens of the batch as one ``[1, T, D]`` sequence); for other shapes, or a bundle
without a loadable VLM, ``adapter_cases`` draws them around the class embeddings (mixtures of W
rows plus noise of W's scale), so attention is peaked the way it is on real tokens.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rtrt.runtime.names import ADAPTER, DETECTOR, GraphSpec
from rtrt.runtime.parity import (
    TOLERANCES,
    Feeds,
    ParityReport,
    Runner,
    Tolerance,
    cross_validate,
    rank_classes,
    topk_agreement,
)

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "ParityReport",
    "Runner",
    "cross_validate",
    "torch_runner",
    "ort_runner",
    "topk_agreement",
    "rank_classes",
    "synthetic_scene",
    "parity_images",
    "parity_pil_images",
    "adapter_case_from_tokens",
    "detector_cases",
    "adapter_cases",
    "synthetic_z",
    "with_class_bias",
]


def torch_runner(module: torch.nn.Module, spec: GraphSpec, device: str = "cpu") -> Runner:
    """A ``Runner`` over a PyTorch graph module (the reference).

    On a CUDA device the reference runs in IEEE fp32: TF32 (matmuls and cuDNN) is switched off for
    each call and restored afterwards, or an fp32 engine would be held to 1e-4 against a TF32
    reference that is itself ~1e-3 off.
    """

    def strict_fp32():
        # torch >= 2.9 has per-backend ``fp32_precision`` and refuses a mix with the legacy
        # ``allow_tf32`` flags, so the new API is used where it exists; returns the undo.
        cudnn = torch.backends.cudnn
        new = [o for o in (torch.backends.cuda.matmul, getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None))
               if o is not None and hasattr(o, "fp32_precision")]
        if new:
            saved = [(o, "fp32_precision", o.fp32_precision) for o in new]
            value = "ieee"
        else:
            saved = [(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32),
                     (cudnn, "allow_tf32", cudnn.allow_tf32)]
            value = False
        for o, attr, _ in saved:
            setattr(o, attr, value)

        def restore():
            for o, attr, old in reversed(saved):
                setattr(o, attr, old)

        return restore

    def run(feeds: Feeds) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.asarray(feeds[n])).to(device) for n in spec.inputs]
        restore = strict_fp32() if any(a.is_cuda for a in args) else None
        try:
            with torch.inference_mode():
                out = module(*args)
        finally:
            if restore is not None:
                restore()
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().cpu().numpy() for n, o in zip(spec.outputs, out)}

    return run


def ort_runner(path_or_session, spec: GraphSpec, threads: int | None = None) -> Runner:
    """A ``Runner`` over an ONNX file (CPU execution provider) or an existing ``InferenceSession``."""
    import onnxruntime as ort

    if isinstance(path_or_session, (str, os.PathLike)):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path_or_session), so, providers=["CPUExecutionProvider"])
    else:
        sess = path_or_session

    def run(feeds: Feeds) -> dict[str, np.ndarray]:
        out = sess.run(list(spec.outputs), {n: np.ascontiguousarray(feeds[n]) for n in spec.inputs})
        return dict(zip(spec.outputs, out))

    return run


def synthetic_scene(size: int, rng: np.random.Generator):
    """A procedurally drawn ego-view road scene (sky, road, lane marks, boxes, cones) as a PIL image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    horizon = int(size * rng.uniform(0.35, 0.55))
    sky = rng.integers(120, 230, 3)
    for y in range(horizon):  # vertical sky gradient
        f = y / max(horizon, 1)
        d.line([(0, y), (size, y)], fill=tuple(int(c * (1 - 0.3 * f)) for c in sky))
    d.rectangle([0, horizon, size, size], fill=tuple(int(v) for v in rng.integers(60, 110, 3)))
    mid = size // 2 + int(rng.integers(-size // 8, size // 8 + 1))
    d.polygon([(mid - size // 10, horizon), (mid + size // 10, horizon), (size, size), (0, size)], fill=(70, 70, 75))
    for i in range(6):  # dashed lane marking
        y0 = horizon + (size - horizon) * i / 6
        d.line([(mid, y0), (mid, y0 + (size - horizon) / 14)], fill=(230, 230, 230), width=max(1, size // 100))
    for _ in range(int(rng.integers(2, 7))):  # vehicles, barriers, cones
        w = int(rng.integers(size // 20, size // 4))
        x = int(rng.integers(0, size - w))
        y = int(rng.integers(horizon, size - w // 2))
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.4:
            d.polygon([(x + w // 2, y - w), (x, y), (x + w, y)], fill=col)
        else:
            d.rectangle([x, y - w // 2, x + w, y], fill=col)
    a = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp"}


def parity_pil_images(n: int, size: int, images_dir: str | os.PathLike | None = None, seed: int = 0) -> tuple[list, str]:
    """``n`` PIL images (the first files of ``images_dir`` in name order, cycled) and their source.

    Without a directory, or one without images, procedurally drawn road scenes of side ``size``.
    """
    from rtrt.runtime.image import load_image

    if images_dir:
        files = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in _IMAGE_EXT)
        if files:
            picked = [files[i % len(files)] for i in range(n)]
            names = ", ".join(p.name for p in files[: min(n, len(files))])
            return [load_image(p) for p in picked], f"{min(n, len(files))} image(s) ({names})"
    rng = np.random.default_rng(seed)
    return [synthetic_scene(size, rng) for _ in range(n)], "synthetic road scenes (no --images given)"


def parity_images(n: int, size: int, mean, std, images_dir: str | os.PathLike | None = None, seed: int = 0, *,
                  resample: str = "bicubic", reducing_gap: float | None = None) -> tuple[np.ndarray, str]:
    """``n`` preprocessed images [n, 3, size, size] and a description of their source (``vfm_pixels``'s resize)."""
    from rtrt.runtime.image import vfm_pixels

    pil, source = parity_pil_images(n, size, images_dir, seed)
    px = vfm_pixels(pil, size, mean, std, resample=resample, reducing_gap=reducing_gap)
    return px.numpy(), source


def detector_cases(pixels: np.ndarray, class_embeddings: np.ndarray, shapes: Sequence[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
    """Feeds for (B, C) pairs: B consecutive images of ``pixels``, the first C rows of W."""
    cases, at = [], 0
    w = np.asarray(class_embeddings, dtype=np.float32)
    for b, c in shapes:
        idx = [(at + i) % len(pixels) for i in range(b)]
        at += b
        cases.append({DETECTOR.inputs[0]: np.ascontiguousarray(pixels[idx]), DETECTOR.inputs[1]: np.ascontiguousarray(w[: max(1, min(c, len(w)))])})
    return cases


def adapter_cases(class_embeddings: np.ndarray, shapes: Sequence[tuple[int, int, int]], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Feeds for (B, N, C) triples; tokens are mixtures of W rows plus noise of W's scale."""
    rng = np.random.default_rng(seed)
    w = np.asarray(class_embeddings, dtype=np.float32)
    scale = float(w.std()) or 1.0
    cases = []
    for b, n, c in shapes:
        mix = rng.dirichlet(np.full(len(w), 0.3), size=(b, n)).astype(np.float32)
        tokens = mix @ w + rng.normal(0, scale, (b, n, w.shape[1])).astype(np.float32)
        rows = w if c <= len(w) else np.concatenate([w, rng.normal(0, scale, (c - len(w), w.shape[1])).astype(np.float32)])
        cases.append({ADAPTER.inputs[0]: tokens.astype(np.float32), ADAPTER.inputs[1]: np.ascontiguousarray(rows[:c])})
    return cases


def synthetic_z(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """float32 z-scores as a calibrated detector gives them: standard normal, a few (5%) standing out by 4."""
    z = rng.standard_normal(tuple(shape)).astype(np.float32)
    z[rng.random(tuple(shape)) < 0.05] += 4.0
    return z


def with_class_bias(cases: Sequence[dict[str, np.ndarray]], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``cases`` with the ``class_bias`` input of an adapter trained with ``detector_bias`` ([B, N, C],
    ``ADAPTER_BIASED``): ``synthetic_z``, seeded (the same cases every export)."""
    rng = np.random.default_rng(seed)
    return [{**case, "class_bias": synthetic_z((*case[ADAPTER.inputs[0]].shape[:2], case[ADAPTER.inputs[1]].shape[0]), rng)}
            for case in cases]


def adapter_case_from_tokens(tokens: np.ndarray, class_embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """The adapter's feeds for real visual tokens ``[T, D]`` in its call convention: ``[1, T, D]`` and all of W."""
    t = np.asarray(tokens, dtype=np.float32)
    return {ADAPTER.inputs[0]: np.ascontiguousarray(t.reshape(1, -1, t.shape[-1])),
            ADAPTER.inputs[1]: np.ascontiguousarray(np.asarray(class_embeddings, dtype=np.float32))}
