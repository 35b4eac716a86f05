"""Parity checks between a reference (PyTorch) and an exported graph (ORT fp32/int8, TensorRT).

``cross_validate(reference, candidate, cases, tol)`` runs both on every case and reports the max
abs error of every float output and, for the detector, the top-k agreement of the class ranking;
``passed`` says whether everything is inside the tolerance. The tolerance table ``TOLERANCES`` is
per precision; ``rtrt export`` refuses to write a graph whose report did not pass.

Inputs are real where the bundle has them: its own W rows as class embeddings (subsets for other
C), its own VFM preprocessing on images from ``--images`` (or, without them, procedurally drawn
road scenes from ``synthetic_scene``). Visual tokens for the adapter come from no VLM at export
time; ``adapter_cases`` draws them around the class embeddings (mixtures of W rows plus noise of
W's scale), so attention is peaked the way it is on real tokens rather than uniform.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from rtrt.runtime.names import ADAPTER, DETECTOR, GraphSpec

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
    "detector_cases",
    "adapter_cases",
]

Feeds = Mapping[str, np.ndarray]
Runner = Callable[[Feeds], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class Tolerance:
    """What a candidate graph must meet against the reference."""

    atol: float  # |candidate - reference| <= atol + rtol * |reference| for every float output element
    rtol: float = 0.0  # relative part of the bound (0 for fp32: a plain max-abs-error bound)
    topk_agreement: float = 1.0  # minimum mean overlap of the detector's top-k classes (tie-aware)
    k: int = 5  # the k of top-k (the prompt gets at most this many class names)


# fp32 is the 1e-4. fp16/int8 bound the error elementwise (atol + rtol*|ref|) and the
# tie-aware top-5 agreement (a swap of classes whose reference scores are within atol does not
# count against it). The issue's >= 95% int8 top-5 target on a trained detector is reported
# strictly (no tie allowance) by `rtrt bench`.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=0.0, topk_agreement=1.0),
    "fp16": Tolerance(atol=2e-2, rtol=2e-2, topk_agreement=0.9),
    "int8": Tolerance(atol=5e-2, rtol=5e-2, topk_agreement=0.9),
}


@dataclass
class ParityReport:
    """Result of ``cross_validate``; stored as a dict in the manifest's exports."""

    graph: str  # "detector" or "adapter"
    precision: str  # precision of the candidate
    max_abs_error: dict[str, float] = field(default_factory=dict)  # per float output, over all cases
    topk_agreement: float | None = None  # detector: mean tie-aware overlap of top-k, in [0, 1]
    top1_agreement: float | None = None  # detector: share of images whose best class agrees
    cases: list[dict[str, list[int]]] = field(default_factory=list)  # input shapes of every case
    tolerance: dict = field(default_factory=dict)  # the Tolerance applied
    failures: list[str] = field(default_factory=list)  # one line per violated bound
    inputs: str = ""  # where the inputs came from

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs_error.items())
        top = "" if self.topk_agreement is None else f", top-{self.tolerance.get('k', 5)} agreement {self.topk_agreement:.1%}"
        return f"{self.graph} {self.precision}: max abs error {errs}{top} -> {'ok' if self.passed else 'FAILED'}"


def rank_classes(scores: np.ndarray) -> np.ndarray:
    """Class indices [B, C] best first, ties by lower index (the order ``select_detections`` uses)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=-1, kind="stable")


def topk_agreement(ref_scores: np.ndarray, cand_indices: np.ndarray, k: int, atol: float = 0.0) -> np.ndarray:
    """Per-row overlap of the candidate's top-k classes with the reference's, in [0, 1].

    A candidate class counts as agreeing when it is in the reference top-k, or when its reference
    score is within ``atol`` of the reference's k-th score (a tie the reference could order either way).
    """
    ref_scores = np.asarray(ref_scores, dtype=np.float64)
    k = min(k, ref_scores.shape[-1])
    out = []
    for s, ci in zip(ref_scores, np.asarray(cand_indices)):
        order = np.argsort(-s, kind="stable")
        kth = s[order[k - 1]]
        top = set(order[:k].tolist())
        ok = [int(i) in top or s[int(i)] >= kth - atol for i in ci[:k]]
        out.append(sum(ok) / k)
    return np.asarray(out)


def cross_validate(
    reference: Runner,
    candidate: Runner,
    cases: Sequence[Feeds],
    tol: Tolerance,
    *,
    spec: GraphSpec,
    graph: str,
    precision: str,
    inputs: str = "",
) -> ParityReport:
    """Run both on every case; fill and return a ``ParityReport`` (check ``.passed``)."""
    rep = ParityReport(graph=graph, precision=precision, tolerance=asdict(tol), inputs=inputs)
    agree: list[np.ndarray] = []
    top1: list[np.ndarray] = []
    for feeds in cases:
        rep.cases.append({k: list(np.shape(v)) for k, v in feeds.items()})
        ref = reference(feeds)
        got = candidate(feeds)
        for name in spec.outputs:
            r, c = np.asarray(ref[name]), np.asarray(got[name])
            if r.shape != c.shape:
                rep.failures.append(f"{name}: shape {c.shape} != reference {r.shape} for inputs {rep.cases[-1]}")
                continue
            if not np.issubdtype(r.dtype, np.floating):
                continue  # no graph has integer outputs today; they would need their own rule
            if not np.all(np.isfinite(c)):
                rep.failures.append(f"{name}: non-finite values for inputs {rep.cases[-1]}")
                continue
            err = np.abs(c.astype(np.float64) - r.astype(np.float64))
            rep.max_abs_error[name] = max(rep.max_abs_error.get(name, 0.0), float(err.max(initial=0.0)))
            bound = tol.atol + tol.rtol * np.abs(r.astype(np.float64))
            if np.any(err > bound):
                worst = float((err - bound).max())
                rep.failures.append(f"{name}: error exceeds atol={tol.atol:g} rtol={tol.rtol:g} by {worst:.3e} for inputs {rep.cases[-1]}")
        if "scores" in ref and "scores" in got and np.shape(ref["scores"]) == np.shape(got["scores"]):
            ranked = rank_classes(got["scores"])
            agree.append(topk_agreement(ref["scores"], ranked, tol.k, tol.atol))
            top1.append(ranked[:, 0] == np.argmax(np.asarray(ref["scores"]), axis=-1))
    if agree:
        rep.topk_agreement = float(np.concatenate(agree).mean())
        rep.top1_agreement = float(np.concatenate(top1).mean())
        if rep.topk_agreement < tol.topk_agreement:
            rep.failures.append(f"top-{tol.k} agreement {rep.topk_agreement:.3f} < {tol.topk_agreement:g}")
    # failures may repeat per case; keep the first of each output
    seen, uniq = set(), []
    for f in rep.failures:
        head = f.split(":")[0]
        if head not in seen:
            seen.add(head)
            uniq.append(f)
    rep.failures = uniq
    return rep


def torch_runner(module: torch.nn.Module, spec: GraphSpec, device: str = "cpu") -> Runner:
    """A ``Runner`` over a PyTorch graph module (the reference)."""

    def run(feeds: Feeds) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.asarray(feeds[n])).to(device) for n in spec.inputs]
        with torch.inference_mode():
            out = module(*args)
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


def parity_images(n: int, size: int, mean, std, images_dir: str | os.PathLike | None = None, seed: int = 0, *,
                  resample: str = "bicubic", reducing_gap: float | None = None) -> tuple[np.ndarray, str]:
    """``n`` preprocessed images [n, 3, size, size] and a description of their source (``vfm_pixels``'s resize)."""
    from rtrt.runtime.image import load_image, vfm_pixels

    if images_dir:
        files = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in _IMAGE_EXT)
        if files:
            picked = [files[i % len(files)] for i in range(n)]
            px = vfm_pixels([load_image(p) for p in picked], size, mean, std, resample=resample, reducing_gap=reducing_gap)
            return px.numpy(), f"{min(n, len(files))} image(s) from {images_dir}"
    rng = np.random.default_rng(seed)
    px = vfm_pixels([synthetic_scene(size, rng) for _ in range(n)], size, mean, std, resample=resample, reducing_gap=reducing_gap)
    return px.numpy(), "synthetic road scenes (no --images given)"


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
