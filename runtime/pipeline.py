"""The embeddable rtrt pipeline: image + question -> detections, hints, refined tokens, answer.

    from rtrt.runtime import Pipeline
    pipe = Pipeline.from_bundle("path/to/bundle", backend="ort")   # or "trt", "torch"
    res = pipe(image, question="...")     # path, bytes, PIL image or HxWx3 uint8 array
    res.answer; res.detections; res.timings_ms

Everything is loaded once in ``from_bundle``; a call reads nothing from disk (except an image
given as a path). The frozen VLM runs in one of two ways (``vlm_backend``): ``"torch"``, the
transformers model (the reference), or ``"ort"``, the bundle's exported VLM (``rtrt export --vlm``)
on ONNX Runtime with numpy preprocessing, which needs neither torch nor transformers; the default
is ``"ort"`` when the bundle carries the exported VLM. With ``"ort"`` the adapter runs inside the
refined vision encoder graph (W baked in), so ``backend`` only runs the detector. Decoding is greedy, so the same frame gives the same answer. Calls are safe
from several threads: the detector backends run concurrently and the VLM stage is serialised
by a lock (a transformers model and its tokenizer are not re-entrant), so results equal
serial calls. ``hints=False`` / ``refine=False`` switch off the two remedies; the four
combinations are the method's ablation.
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .bundle import Bundle, load_bundle
from .errors import BundleError, InputError, ModelMismatchError, RtrtError
from .image import ImageInput, draw_region, load_image, spec_pixels
from .detection import Detection, check_region, region_detection, select_detections
from .names import REFINE_MASK_CLASSES, VLM_BACKENDS

__all__ = ["DEFAULT_QUESTION", "REGION_QUESTION", "VLM_BACKENDS", "DetectResult", "Result", "Pipeline"]

# CODA-LM's general-perception question: the default question of `rtrt infer`.
DEFAULT_QUESTION = (
    "There is an image of traffic captured from the perspective of the ego car. Please focus on objects that "
    "have a great influence on ego car driving behavior in the scene, describe these objects and the reasons "
    "why they influence ego car driving."
)

# CODA-LM's region-perception question, about the object in a red box (``Pipeline(..., region=box)``).
REGION_QUESTION = "Please describe the object inside the red rectangle in the image and explain why it affect ego car driving."


@dataclass
class DetectResult:
    """The detector's view of one image."""

    detections: list[Detection]  # top-k classes above the threshold, best first
    scores: np.ndarray  # [C] max cosine per class
    similarity: np.ndarray  # [C, gh, gw] per-patch cosine map, for visualisation
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage

    def to_dict(self) -> dict[str, Any]:
        """Detections (``{"name", "label", "score", "box", "peak"}`` each) and timings, as JSON."""
        return {
            "detections": [d.to_dict() for d in self.detections],
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
        }


@dataclass
class Result:
    """The answer to one (image, question)."""

    answer: str  # the VLM's greedy answer
    detections: list[Detection]  # what the detector found (also when hints are off)
    hints: list[str]  # class names put into the prompt ([] when hints are off)
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage
    similarity: np.ndarray | None = None  # [C, gh, gw], as in DetectResult
    backend: str | None = None  # backend that ran the detector/adapter ("ort" after a trt->ort fallback); None: plugin=False
    precision: str | None = None  # the graphs' precision that ran (None: plugin=False)
    providers: list[str] = field(default_factory=list)  # ONNX Runtime execution providers used ([] for torch/trt)
    vlm_backend: str | None = None  # how the VLM ran: "torch" (transformers) or "ort" (exported graphs)
    refine_mask_z: float | None = None  # the refinement mask that ran (Pipeline.refine_mask_z); None: every token, or no refinement
    region: Detection | None = None  # a region question's box class (``region_detection``; its box is the region; hinted when hints are on); None: no region, or nothing stands out in it
    refine_mask_classes: str | None = None  # whose cells that mask kept (Pipeline.refine_mask_classes); None when refine_mask_z is

    def to_dict(self) -> dict[str, Any]:
        """The ``rtrt infer --json`` object (``region`` only for a region question)."""
        return {
            "answer": self.answer,
            "detections": [d.to_dict() for d in self.detections],  # name, label, score, box, peak
            **({"region": self.region.to_dict()} if self.region is not None else {}),
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
            "backend": self.backend,
            "precision": self.precision,
            "providers": list(self.providers),
            "vlm_backend": self.vlm_backend,
            "refine_mask_z": self.refine_mask_z,
            "refine_mask_classes": self.refine_mask_classes,
        }


def resolve_vlm_backend(bundle: Bundle, vlm_backend: str | None, vlm_override=None) -> str:
    """Which way the VLM runs: ``vlm_backend`` checked against the bundle and this install (``None``:
    ``"ort"`` when the bundle carries the exported VLM and no other VLM is asked for, else ``"torch"``)."""
    from importlib.util import find_spec

    from .errors import BackendUnavailableError

    if vlm_backend not in (None, *VLM_BACKENDS):
        raise InputError(f"unknown vlm_backend {vlm_backend!r}; choose from {', '.join(VLM_BACKENDS)}")
    exported = bundle.manifest.exports.vlm is not None
    if vlm_backend is None:
        vlm_backend = "ort" if exported and vlm_override is None else "torch"
    if vlm_backend == "ort":
        if vlm_override is not None:
            raise InputError("vlm=... names another VLM, which only the torch VLM backend can load; the ort one runs the bundle's exported VLM")
        if not exported:
            raise BackendUnavailableError(
                f"{bundle.root}: the bundle has no exported VLM for vlm_backend 'ort'; run `rtrt export --bundle {bundle.root} --vlm`")
    elif find_spec("torch") is None or find_spec("transformers") is None:
        raise BackendUnavailableError(
            "vlm_backend 'torch' needs torch and transformers (pip install 'rtrt[torch]'); "
            + ("this bundle's exported VLM runs without them: vlm_backend='ort'" if exported else "or export the VLM with `rtrt export --vlm`"))
    return vlm_backend


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3


class _TokenClock:
    """A logits processor that only records when each decoding step happens (prefill vs decode)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


class Pipeline:
    """Detector + adapter + frozen VLM, loaded once. Build with ``Pipeline.from_bundle``."""

    def __init__(self, bundle: Bundle, backend, vlm=None, *, max_new_tokens: int = 96, device: str = "cpu"):
        self.bundle = bundle
        self.backend = backend
        self.vlm = vlm
        # "ort": the exported VLM (rtrt.runtime.vlm_ort.OrtVLM); "torch": a transformers VLMFamily.
        self.vlm_backend = None if vlm is None else getattr(vlm, "backend", "torch")
        self.max_new_tokens = int(max_new_tokens)
        self.device = str(device)
        m = bundle.manifest
        self.class_names = m.class_names
        self.W = bundle.class_embedding_matrix()  # [C, D] float32 numpy; the torch VLM path moves it to its device
        if m.detector is None or m.vfm is None:
            raise ModelMismatchError(f"{bundle.root}: bundle has no detector/VFM; it cannot run the pipeline")
        self.detector_cfg = m.detector
        self.vfm_spec = m.vfm
        # An export may fix another input size than the VFM's default; the backend knows which.
        self.image_size = int(getattr(backend, "image_size", None) or m.image_size())
        self._vlm_lock = threading.Lock()
        self._refine_mask_z: float | None = None
        self._refine_mask_classes: str = "any"
        if vlm is not None:
            self._check_vlm(vlm)

    @property
    def refine_mask_z(self) -> float | None:
        """A number z: the adapter's change is kept only at the image-token cells where a class's
        calibrated z-score of the detector's similarity there exceeds z (``rtrt.runtime.refine_mask``;
        LLaVA's fixed token grid), so tokens of common objects and background reach the VLM as they
        are; an addition to the paper's method. None: the adapter changes every visual token (the
        paper). ``from_bundle`` sets the bundle's own value (``manifest.adapter.refine_mask_z``,
        written by ``rtrt calibrate --refine-mask-z``) unless told otherwise."""
        return self._refine_mask_z

    @refine_mask_z.setter
    def refine_mask_z(self, z: float | None) -> None:
        if z is not None:
            if isinstance(z, bool) or not isinstance(z, (int, float, np.integer, np.floating)) or not math.isfinite(z):
                raise InputError(f"refine_mask_z must be a finite number or None, not {z!r}")
            z = float(z)
            if not self.detector_cfg.calibrated:
                raise InputError(f"{self.bundle.root}: refine_mask_z needs a calibrated detector (rtrt calibrate)")
            self._grid_layout("refine_mask_z")
            if self.vlm_backend == "ort" and not self.vlm.takes_refine_mask:
                raise BundleError(f"{self.bundle.root}: the exported refined vision encoder takes no refinement mask (exported "
                                  f"by an older rtrt); re-export it with `rtrt export --bundle {self.bundle.root} --vlm`")
        self._refine_mask_z = z

    @property
    def refine_mask_classes(self) -> str:
        """Which classes' cells ``refine_mask_z``'s mask keeps (an addition to the paper's method):
        ``"any"``, a cell where any class's z-score exceeds z; ``"reported"``, a cell whose best class
        (highest z there) exceeds z and is one the detector reports for the image (an image with no
        detection is not refined); ``"unhinted"``, a cell whose best class exceeds z and is not named by
        the prompt's hint (with ``hints=False`` every class, as ``"any"``): the hint names what the
        detector is sure of, the refinement adds the rest instead of repeating it or overwriting it.
        Read only while ``refine_mask_z`` is set; a region question's box mask is its own.
        ``from_bundle`` sets the bundle's own value (``manifest.adapter.refine_mask_classes``, ``rtrt
        calibrate --refine-mask-classes``; ``"any"`` when absent)."""
        return self._refine_mask_classes

    @refine_mask_classes.setter
    def refine_mask_classes(self, which: str) -> None:
        if which not in REFINE_MASK_CLASSES:
            raise InputError(f"refine_mask_classes must be one of {', '.join(REFINE_MASK_CLASSES)}, not {which!r}")
        self._refine_mask_classes = which

    def refine_mask(self, image, region=None, hints: bool = False) -> np.ndarray | None:
        """Where the adapter may change ``image``'s visual tokens: [T] float32, 1 refined, 0 left as the
        vision tower gave it; None when every token is refined (no mask). ``refine_mask_z`` and
        ``refine_mask_classes`` set it (``hints``: as a call with hints on or off would run it), and
        for a region question (``region`` [x0, y0, x1, y1]) an adapter trained with ``region_box`` its box."""
        pil = load_image(image)
        regs = [None if region is None else self._region(region, pil)]
        if self._refine_mask_z is None and not self._box_regions(regs):
            return None
        dets = self._detect_images([pil], _Timer())
        hinted = [[d.name for d in dets[0].detections] if hints else []]
        return self._refine_masks([pil], dets, self._refine_mask_z, regs, classes=self._refine_mask_classes, hinted=hinted)

    def class_bias(self, image, region=None) -> np.ndarray | None:
        """The adapter's ``class_bias`` for ``image`` (and ``region``, a region question's box): [T, C] float32,
        the calibrated detector's z-score of each class at each visual token's cell (``refine_mask.token_bias``);
        None when the bundle's adapter was trained without ``detector_bias``."""
        pil = load_image(image)
        regs = [None if region is None else self._region(region, pil)]
        return self._class_biases([pil], self._detect_images([pil], _Timer()), regs)

    def _region(self, box, pil):
        try:
            return check_region(box, *pil.size)
        except ValueError as e:
            raise InputError(str(e)) from None

    def _adapter_flag(self, name: str) -> bool:
        a = self.bundle.manifest.adapter
        return bool(a is not None and getattr(a, name, False))

    def _box_regions(self, regs) -> bool:
        """Whether a region question's refinement lands in its box (the adapter's ``region_box``)."""
        return self._adapter_flag("region_box") and any(r is not None for r in regs)

    def _grid_layout(self, need: str) -> dict:
        per_image = ((self.vlm.image_token_layout() or {}) if self.vlm is not None else {}).get("tokens_per_image")
        if self.vlm is None or getattr(self.vlm, "name", None) != "llava" or not per_image:
            name = None if self.vlm is None else getattr(self.vlm, "name", "?")
            raise ModelMismatchError(f"{need} needs a loaded VLM with LLaVA's fixed image-token grid, not {name!r}")
        return self.vlm.image_token_layout()

    def _token_cells(self, i: int, im, r, need: str, sampled: dict) -> tuple:
        """``refine_mask.token_cells`` of image ``i`` of the batch, sampled once per batch (``sampled``: the cache)."""
        from .refine_mask import processor_geometry, token_cells

        if i not in sampled:
            sampled[i] = token_cells(r.similarity, im.size, self._grid_layout(need),
                                     processor_geometry(self.vlm.processor.image_processor), need)
        return sampled[i]

    def _refine_masks(self, pil, dets, z: float | None, regions=None, sampled: dict | None = None,
                      classes: str = "any", hinted=None) -> np.ndarray:
        """[T_total] float32 over the batch's visual tokens: 1 where the adapter may change the token
        (``refine_mask_z``'s cells, of the classes ``classes`` picks: see ``refine_mask_classes``;
        ``hinted``: each image's hinted class names, None for none; a region question's box cells when
        the adapter has ``region_box``). ``sampled``: the batch's token cells, shared with ``_class_biases``."""
        from .refine_mask import box_mask, hot_cells, processor_geometry

        regions = regions if regions is not None else [None] * len(pil)
        sampled = {} if sampled is None else sampled
        boxed = self._adapter_flag("region_box")
        layout = self._grid_layout("the adapter's region_box" if boxed and any(r is not None for r in regions) else "refine_mask_z")
        out = []
        for i, (im, r, box) in enumerate(zip(pil, dets, regions)):
            if boxed and box is not None:
                out.append(box_mask(box, im.size, layout, processor_geometry(self.vlm.processor.image_processor)))
            elif z is not None:
                per_image, offset, _, cells = self._token_cells(i, im, r, "refine_mask_z", sampled)
                mask = np.zeros(per_image, dtype=np.float32)
                mask[offset:] = hot_cells(cells, self.detector_cfg, z, self._mask_classes(classes, r, hinted, i))
                out.append(mask)
            else:
                out.append(np.ones(int(layout["tokens_per_image"]), dtype=np.float32))
        return np.concatenate(out)

    def _mask_classes(self, classes: str, det, hinted, i: int) -> list[int] | None:
        """The class indices whose cells the mask keeps for image ``i`` (None: every class)."""
        if classes == "reported":
            return [self._class_index(d) for d in det.detections]
        if classes == "unhinted":
            named = set(hinted[i]) if hinted is not None else set()
            return [c for c, name in enumerate(self.class_names) if name not in named]
        return None

    def _class_index(self, det) -> int:
        """The row of W of a detection (its ``index``, else its name's place in the bundle's classes)."""
        return det.index if det.index >= 0 else list(self.class_names).index(det.name)

    def _class_biases(self, pil, dets, regions=None, sampled: dict | None = None) -> np.ndarray | None:
        """[T_total, C] float32: the adapter's ``class_bias`` over the batch's visual tokens (``refine_mask.token_bias``);
        None without ``detector_bias``. ``sampled``: the batch's token cells, shared with ``_refine_masks``."""
        from .refine_mask import cells_bias

        if not self._adapter_flag("detector_bias"):
            return None
        if not self.detector_cfg.calibrated:
            raise ModelMismatchError("detector_bias needs a calibrated detector (rtrt calibrate): its z-scores are the bias")
        regions = regions if regions is not None else [None] * len(pil)
        sampled = {} if sampled is None else sampled
        boxed = self._adapter_flag("region_box")
        out = []
        for i, (im, r, box) in enumerate(zip(pil, dets, regions)):
            per_image, offset, centres, cells = self._token_cells(i, im, r, "the adapter's detector_bias", sampled)
            bias = np.zeros((per_image, cells.shape[1]), dtype=np.float32)
            bias[offset:] = cells_bias(cells, centres, im.size, self.detector_cfg, box if boxed else None)
            out.append(bias)
        return np.concatenate(out)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        backend: str = "ort",
        *,
        vlm: str | None = None,
        load_vlm_model: bool = True,
        device: str = "cpu",
        dtype=None,
        max_new_tokens: int = 96,
        on_engine_mismatch: str = "rebuild",
        precision: str = "fp32",
        threads: int | None = None,
        verify: bool = False,
        vlm_backend: str | None = None,
        vlm_precision: str = "fp32",
        refine_mask_z: float | str | None = "bundle",
        refine_mask_classes: str = "bundle",
    ) -> "Pipeline":
        """Load a bundle, its backend and (unless ``load_vlm_model=False``) its frozen VLM.

        ``vlm_backend``: ``"ort"`` runs the bundle's exported VLM on ONNX Runtime (no torch or
        transformers needed), ``"torch"`` the transformers model; None: ``"ort"`` when the bundle
        carries the exported VLM, else ``"torch"``. ``vlm_precision``: ``fp32``, or ``int8`` for the
        int8 weight-only decoder (ort only). ``dtype`` (a ``torch.dtype``): the torch VLM's dtype.

        ``vlm`` overrides the VLM reference in the manifest (local directory or hub id).
        ``precision``: the graphs' precision (``fp32``, ``int8``: the bundle's ``*.int8.onnx`` graphs
        on ORT or int8 engines on TensorRT, ``fp16``: TensorRT), as ``make_backend`` takes it.
        ``threads``: ONNX Runtime intra-op threads of the detector and adapter sessions (default: the
        cores this process may use); the VLM uses torch's own setting.
        A ``device`` this machine lacks, or a precision the backend cannot run here, is refused with
        ``BackendUnavailableError`` naming what is available (never a silent fp32/CPU run).
        ``refine_mask_z``: ``"bundle"`` (default) the bundle's refinement mask (``manifest.adapter.refine_mask_z``;
        none when the bundle has none or no VLM is loaded), a number another z, None every visual token
        refined (the paper's method); see ``Pipeline.refine_mask_z``. ``refine_mask_classes``: ``"bundle"``
        (default) the bundle's ``adapter.refine_mask_classes`` (``"any"`` when absent), or ``"any"``,
        ``"reported"`` or ``"unhinted"``; see ``Pipeline.refine_mask_classes``.
        ``verify=True`` reruns the loaded backend's graphs on the reference inputs the bundle carries
        (what ``rtrt check`` does for every backend) before anything else is loaded, and raises
        ``ParityError`` when one differs from the reference on this machine.
        """
        from .backends import make_backend
        from .devices import check_device

        check_device(device)  # before anything is loaded: no VLM or bundle read for a GPU that is not there
        bundle = load_bundle(path)
        be = make_backend(backend, bundle, device=device, precision=precision, on_engine_mismatch=on_engine_mismatch,
                          threads=threads)
        if verify:
            from .check import verify_backend

            verify_backend(bundle, be, getattr(be, "precision", precision))
        family = None
        if load_vlm_model:
            which = resolve_vlm_backend(bundle, vlm_backend, vlm)
            if which == "ort":
                from .vlm_ort import OrtVLM

                family = OrtVLM.from_bundle(bundle, device=device, precision=vlm_precision, threads=threads)
            else:
                if vlm_precision != "fp32":
                    raise InputError(f"vlm_precision {vlm_precision!r} needs vlm_backend='ort' (the torch VLM runs at its dtype)")
                from .vlm import load_vlm

                spec = bundle.manifest.vlm
                if vlm is None and spec is None:
                    raise ModelMismatchError(f"{bundle.root}: bundle names no VLM; pass vlm=...")
                ref = vlm if vlm is not None else bundle.resolve_ref(spec.ref)
                family = load_vlm(ref, dtype=dtype, device=device)
        pipe = cls(bundle, be, family, max_new_tokens=max_new_tokens, device=device)
        if refine_mask_classes == "bundle":
            adapter = bundle.manifest.adapter
            refine_mask_classes = adapter.refine_mask_classes if adapter is not None else "any"
        pipe.refine_mask_classes = refine_mask_classes
        if isinstance(refine_mask_z, str):
            if refine_mask_z != "bundle":
                raise InputError(f"refine_mask_z must be 'bundle', a finite number or None, not {refine_mask_z!r}")
            adapter = bundle.manifest.adapter
            own = adapter.refine_mask_z if adapter is not None and family is not None else None
            try:
                pipe.refine_mask_z = own
            except RtrtError as e:  # the bundle's own setting: say so, and how to run without it
                raise type(e)(f"the bundle's adapter.refine_mask_z {own:g}: {e}; pass refine_mask_z=None "
                              "(--refine-mask-z off) to refine every token") from None
            return pipe
        pipe.refine_mask_z = refine_mask_z  # checked: a calibrated detector and LLaVA's grid
        return pipe

    def _check_vlm(self, vlm) -> None:
        if self.vlm_backend == "ort":
            return  # the exported VLM is the bundle's own: OrtVLM.from_bundle checked its record
        m = self.bundle.manifest
        if int(vlm.hidden_size) != int(m.d_llm):
            raise ModelMismatchError(f"VLM hidden size {vlm.hidden_size} differs from the bundle's {m.d_llm}")
        if m.vlm is not None:
            if m.vlm.family and vlm.name != m.vlm.family:
                raise ModelMismatchError(f"VLM family {vlm.name!r} differs from the bundle's {m.vlm.family!r}")
            want, have = m.vlm.image_token_layout or {}, vlm.image_token_layout() or {}
            diff = sorted(k for k in want if k in have and want[k] != have[k])
            if diff:
                k = diff[0]
                raise ModelMismatchError(f"VLM image-token layout differs from the bundle's: {k} is {have[k]!r}, bundle has {want[k]!r}")

    # ------------------------------------------------------------------ detector
    def _detect_images(self, images, timer: _Timer) -> list[DetectResult]:
        with timer("detector"):
            spec = self.vfm_spec
            pixels = spec_pixels(images, spec, self.image_size, numpy=True)
            out = self.backend.detect(pixels, self.W)
            scores, sim = _to_numpy(out[0]), _to_numpy(out[-1])
            g = self.image_size // spec.patch_size
            cfg = self.detector_cfg
            results = []
            for i in range(len(images)):
                s = sim[i]
                if s.shape[-1] == g * g:
                    s = s.reshape(s.shape[0], g, g)
                # Boxes are in the input image's pixels: the VFM saw the whole image resized to S x S.
                # A calibrated detector ranks and thresholds per-class z-scores (rtrt calibrate).
                dets = select_detections(scores[i], self.class_names, cfg.top_k, cfg.decision_threshold,
                                         s if s.ndim == 3 else None, images[i].size, rank_by=cfg.decision_scores(scores[i]))
                results.append(DetectResult(dets, scores[i], s))
        return results

    def detect(self, image: ImageInput) -> DetectResult:
        """Run the detector only (no VLM call)."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[ImageInput]) -> list[DetectResult]:
        timer = _Timer()
        with timer("image_decode"):
            pil = [load_image(im) for im in images]
        res = self._detect_images(pil, timer)
        for r in res:
            r.timings_ms = dict(timer.ms)
        return res

    # ------------------------------------------------------------------ full call
    def __call__(
        self,
        image: ImageInput,
        question: str | None = None,
        *,
        hints: bool = True,
        refine: bool = True,
        max_new_tokens: int | None = None,
        region: Sequence[float] | None = None,
        region_image: ImageInput | None = None,
    ) -> Result:
        return self.batch([image], [question], hints=hints, refine=refine, max_new_tokens=max_new_tokens,
                          regions=None if region is None else [region],
                          region_images=None if region_image is None else [region_image])[0]

    def batch(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str | None] | None = None,
        *,
        hints: bool = True,
        refine: bool = True,
        max_new_tokens: int | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        plugin: bool = True,
        regions: Sequence[Sequence[float] | None] | None = None,
        region_images: Sequence[ImageInput | None] | None = None,
        detections: Sequence[DetectResult] | None = None,
    ) -> list[Result]:
        """Answer several (image, question) pairs in one VLM batch (left padding, greedy).

        Region questions (CODA-LM's "the object inside the red rectangle"): ``regions[i]`` is the box
        [x0, y0, x1, y1] in pixels of ``images[i]``, the frame *without* a box. The detector runs on
        that frame, and the hint is the one class whose mean similarity over the box stands out most
        (``region_detection``; ``Result.region``), not the image's classes, and none when its z-score
        does not exceed the calibrated ``region_z_threshold`` (``rtrt calibrate``); the VLM sees
        ``region_images[i]`` (the same frame with the box drawn, e.g. CODA-LM's ``images_w_boxes``;
        None: the box drawn in red, 2 pixels wide, as CODA-LM draws it). None in ``regions``: an
        ordinary question.

        ``generate_kwargs`` go to ``generate`` as they are (e.g. ``min_new_tokens`` for benchmarks).
        ``plugin=False`` is the frozen VLM alone through the same code path: no detector call, no
        hint, no adapter (``detections`` and ``hints`` empty; ``hints`` and ``refine`` are not
        read). Its answers equal ``hints=False, refine=False``; it is what ``rtrt bench`` compares
        against.

        ``detections``: ``detect_batch(images)`` of these same images from an earlier call (an
        ablation asks each frame several times); the detector is not run again and the answers are
        those it would give (its results depend only on the images). Their timings are not repeated.
        """
        if self.vlm is None:
            raise InputError("this pipeline was loaded without a VLM (load_vlm_model=False); use detect()")
        if not images:
            return []
        qs = list(questions) if questions is not None else [None] * len(images)
        if len(qs) != len(images):
            raise InputError(f"{len(images)} images but {len(qs)} questions")
        qs = [DEFAULT_QUESTION if q is None else q for q in qs]
        for q in qs:
            if not isinstance(q, str) or not q.strip():
                raise InputError("the question must be a non-empty string")
        new_tokens = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        regs = [None] * len(images) if regions is None else list(regions)
        if len(regs) != len(images):
            raise InputError(f"{len(images)} images but {len(regs)} regions")
        if region_images is not None and len(region_images) != len(images):
            raise InputError(f"{len(images)} images but {len(region_images)} region images")
        timer = _Timer()
        with timer("image_decode"):
            pil = [load_image(im) for im in images]
            seen = list(pil)  # what the VLM sees: a region question's frame with its box drawn
            for i, box in enumerate(regs):
                if box is None:
                    if region_images is not None and region_images[i] is not None:
                        raise InputError("a region image needs its region (the box it shows)")
                    continue
                regs[i] = box = self._region(box, pil[i])
                given = None if region_images is None else region_images[i]
                seen[i] = draw_region(pil[i], box) if given is None else load_image(given)
                if seen[i].size != pil[i].size:
                    raise InputError(f"the region image is {seen[i].size[0]}x{seen[i].size[1]}, its frame "
                                     f"{pil[i].size[0]}x{pil[i].size[1]}: they must be the same picture")
        if not plugin:
            with self._vlm_lock:
                answers = self._answer(seen, qs, None, None, new_tokens, timer, generate_kwargs or {})
            return [Result(a, [], [], dict(timer.ms), None, vlm_backend=self.vlm_backend) for a in answers]
        if detections is None:
            dets = self._detect_images(pil, timer)
        elif len(detections) != len(images):
            raise InputError(f"{len(images)} images but {len(detections)} detector results")
        else:
            dets = list(detections)
        cfg = self.detector_cfg
        if any(box is not None and np.ndim(r.similarity) != 3 for r, box in zip(dets, regs)):
            raise ModelMismatchError("region questions need the detector's similarity as a [C, gh, gw] map (a square VFM patch grid)")
        rank, cut = (cfg.decision_scores, cfg.region_z_threshold) if cfg.calibrated else (None, None)
        in_box = [None if box is None else region_detection(r.similarity, box, im.size, self.class_names, rank, cut)
                  for r, box, im in zip(dets, regs, pil)]
        hint_names = [([] if not hints else [d.name for d in r.detections] if box is None else [rd.name] if rd is not None else [])
                      for r, rd, box in zip(dets, in_box, regs)]
        mask, bias, z, which = None, None, self._refine_mask_z, self._refine_mask_classes  # read once: another thread may set them
        sampled: dict = {}  # each frame's token cells, sampled once for the mask and the bias
        if refine and (z is not None or self._box_regions(regs)):
            with timer("refine_mask"):
                mask = self._refine_masks(pil, dets, z, regs, sampled, which, hint_names)
        if refine and self._adapter_flag("detector_bias"):
            with timer("class_bias"):
                bias = self._class_biases(pil, dets, regs, sampled)
        with self._vlm_lock:
            answers = self._answer(seen, qs, hint_names if hints else None, refine, new_tokens, timer, generate_kwargs or {},
                                   mask, bias)
        ran = self.describe()
        return [
            Result(a, r.detections, h, dict(timer.ms), r.similarity, ran["backend"], ran["precision"], list(ran["providers"]),
                   self.vlm_backend, z if refine else None, rd, which if refine and z is not None else None)
            for a, r, h, rd in zip(answers, dets, hint_names, in_box)
        ]

    def _context_length(self) -> int | None:
        if self.vlm_backend == "ort":
            return self.vlm.context_length
        cfg = self.vlm.model.config
        text = getattr(cfg, "text_config", cfg)
        n = getattr(text, "max_position_embeddings", None)
        return int(n) if n else None

    def _answer(self, pil, questions, hints, refine: bool | None, new_tokens: int, timer: _Timer, gen: dict,
                mask: np.ndarray | None = None, bias: np.ndarray | None = None) -> list[str]:
        """Prompt, generate, detokenise. ``refine=None``: the VLM alone (no adapter stage at all).
        ``mask`` [T_total]: where the refinement applies (``refine_mask_z``); None: everywhere.
        ``bias`` [T_total, C]: the adapter's ``class_bias`` (``detector_bias``)."""
        ctx = self._context_length()
        if ctx is not None:
            # Cheap guard before tokenising: a token is at least one character of most text.
            longest = max(len(q) for q in questions)
            if longest > 64 * ctx:
                raise InputError(f"question of {longest} characters cannot fit the model's context of {ctx} tokens")
        if self.vlm_backend == "ort":
            extra = sorted(set(gen) - {"min_new_tokens"})
            if extra:
                raise InputError(f"generate_kwargs {', '.join(extra)} are transformers' and need vlm_backend='torch' "
                                 "(the ort VLM takes min_new_tokens only)")
            return self.vlm.answer(pil, list(questions), hints, refine=bool(refine), max_new_tokens=new_tokens, timer=timer,
                                   min_new_tokens=int(gen.get("min_new_tokens", 0)), refine_mask=mask, class_bias=bias)
        return self._answer_torch(pil, questions, hints, refine, new_tokens, timer, gen, mask, bias)

    def _answer_torch(self, pil, questions, hints, refine: bool | None, new_tokens: int, timer: _Timer, gen: dict,
                      mask: np.ndarray | None = None, bias: np.ndarray | None = None) -> list[str]:
        import torch

        ctx = self._context_length()
        with timer("prompt_build"):
            batch = self.vlm.prepare(pil, list(questions), hints)
        seq = int(batch["input_ids"].shape[1])
        if ctx is not None and seq + new_tokens > ctx:
            raise InputError(
                f"prompt of {seq} tokens plus {new_tokens} new tokens exceeds the model's context of {ctx} tokens"
            )
        W = torch.from_numpy(self.W).to(self.device)
        backend = self.backend
        marks: dict[str, float] = {}

        def transform(v: "torch.Tensor") -> "torch.Tensor":
            # Called by the family with all visual tokens [T, D] once the vision tower has run.
            marks["vision_done"] = time.perf_counter()
            if refine:
                if bias is not None and bias.shape[0] != v.shape[0]:
                    raise InputError(f"the class bias covers {bias.shape[0]} visual tokens, the VLM gave {v.shape[0]}")
                cb = None if bias is None else torch.from_numpy(bias).to(device=v.device, dtype=v.dtype)[None]
                # class_bias only when the adapter takes it: a plain adapter's call stays refine(v, W)
                out = backend.refine(v[None], W.to(v.dtype)) if cb is None else backend.refine(v[None], W.to(v.dtype), class_bias=cb)
                out = torch.as_tensor(out)[0].to(device=v.device, dtype=v.dtype)
                if mask is not None:
                    if mask.shape[0] != v.shape[0]:
                        raise InputError(f"the refinement mask covers {mask.shape[0]} visual tokens, the VLM gave {v.shape[0]}")
                    out = torch.where(torch.from_numpy(mask > 0).to(v.device)[:, None], out, v)
            else:
                out = v
            marks["adapter_done"] = time.perf_counter()
            return out

        clock = _TokenClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            tokens = self.vlm.generate(
                batch, transform=transform, max_new_tokens=new_tokens, logits_processor=[clock], **gen
            )
        t_end = time.perf_counter()
        if "vision_done" in marks:
            timer.ms["vision_tower"] = (marks["vision_done"] - t0) * 1e3
            if refine is not None:
                timer.ms["adapter"] = (marks["adapter_done"] - marks["vision_done"]) * 1e3
            start = marks["adapter_done"]
        else:
            start = t0
        if clock.stamps:
            timer.ms["prefill"] = (clock.stamps[0] - start) * 1e3
            steps = max(len(clock.stamps) - 1, 1)
            timer.ms["decode_per_token"] = (t_end - clock.stamps[0]) * 1e3 / steps
            timer.ms["decode"] = (t_end - clock.stamps[0]) * 1e3
        timer.ms["vlm_total"] = (t_end - t0) * 1e3
        return [a.strip() for a in self.vlm.decode(tokens)]

    # ------------------------------------------------------------------ helpers
    def describe(self) -> dict[str, Any]:
        """What is loaded and what actually runs (``backend`` is "ort" after a trt->ort fallback;
        ``providers``: the ONNX Runtime execution providers its sessions use), for logs, ``rtrt bench``
        and ``rtrt eval``."""
        m = self.bundle.manifest
        be = self.backend
        return {
            "bundle": str(self.bundle.root),
            "backend": getattr(be, "name", type(be).__name__),
            "precision": getattr(be, "precision", "fp32"),
            "providers": list(getattr(be, "providers", None) or []),
            "device": str(self.device),
            "classes": len(m.classes),
            "vlm": None if self.vlm is None else getattr(self.vlm, "name", "?"),
            "vlm_backend": self.vlm_backend,  # "torch" | "ort" | None (no VLM loaded)
            "vlm_precision": None if self.vlm is None else getattr(self.vlm, "precision", "fp32"),
            "threads": getattr(be, "threads", None),  # ONNX Runtime intra-op threads (None: torch/trt)
            "refine_mask_z": self._refine_mask_z,  # None: every visual token refined (the paper)
            "refine_mask_classes": self._refine_mask_classes,  # any | reported | unhinted: whose cells that mask keeps
        }

