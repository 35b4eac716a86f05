"""Execution backends for the detector and adapter graphs: one interface, chosen by name.

``make_backend(name, bundle, ...)`` returns a ``Backend`` with

- ``detect(pixel_values [B, 3, S, S], class_embeddings [C, D] = bundle W) -> DetectOutput``
  (``scores [B, C]``, ``similarity [B, C, P]``; ranked and cut at ``top_k``/threshold by
  ``select_detections``);
- ``refine(visual_tokens [B, N, D], class_embeddings [C, D] = bundle W) -> refined [B, N, D]``.

Backends:
- ``torch``: the PyTorch modules of the bundle (the reference every other backend is checked against).
- ``ort``: ONNX Runtime on the exported ``detector.onnx``/``adapter.onnx`` (``precision="int8"``:
  the ``*.int8.onnx`` variants); providers TensorRT EP -> CUDA EP -> CPU EP, as installed.
- ``trt``: native TensorRT engines recorded in the bundle's ``manifest.exports.engines``, run on
  torch CUDA tensors (no host copy). An engine whose TensorRT version, GPU or source ONNX differs
  from this machine's is detected before it is deserialized, and ``on_engine_mismatch`` decides:
  ``rebuild`` (default: build a matching engine into the local engine cache with
  ``rtrt.runtime.trt_build``, imported only then; it needs the ``onnx`` package), ``fallback`` (warn and return an ``ort`` backend),
  ``fail`` (``EngineMismatchError``).

Importing this module imports neither torch, ``onnx``, ``tensorrt`` nor the engine builder;
torch, ``onnxruntime`` and ``tensorrt`` are imported when their backend is made, so the ``ort``
backend runs in the lean, torch-free install. Its outputs are of the type of its inputs: numpy
arrays in, numpy arrays out; torch tensors in (the transformers VLM path), torch tensors out.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .bundle import Bundle, load_bundle
from .devices import available_devices, check_device
from .errors import BackendUnavailableError, BundleError, EngineMismatchError, InputError
from .exports import EngineExport
from .machine import cores
from .names import ADAPTER, ADAPTER_BIASED, BACKENDS, DETECTOR, GRAPHS, MISMATCH_POLICIES, PRECISIONS, engine_name, graph_key, ort_variant, source_graph
from .trt_engine import TrtEngine, default_cache_dir, platform_info, tensorrt_status

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "MISMATCH_POLICIES",
    "DetectOutput",
    "Backend",
    "TorchBackend",
    "OrtBackend",
    "TrtBackend",
    "make_backend",
    "available_backends",
    "precision_support",
    "check_precision",
    "ort_providers",
    "session_options",
    "engine_mismatch",
]

# BACKENDS, PRECISIONS and MISMATCH_POLICIES are defined in rtrt.runtime.names (light enough for --help) and re-exported here.


class DetectOutput(NamedTuple):
    """The detector graph's outputs, in ``rtrt.runtime.names.DETECTOR`` order."""

    scores: Any  # [B, C] max cosine over patches (numpy array or torch tensor, as the inputs were)
    similarity: Any  # [B, C, P] per-patch cosine map


class Backend:
    """Common input checks and defaults; subclasses implement ``_detect``/``_refine``."""

    name = "base"
    precision = "fp32"  # the graphs' precision this backend runs (set per instance by ORT and TensorRT)
    providers: list[str] = []  # ONNX Runtime execution providers the sessions use ([] for torch and trt)

    def __init__(self, bundle: Bundle, image_size: int):
        self.bundle = bundle
        self.image_size = int(image_size)
        self.d_llm = int(bundle.manifest.d_llm)
        self.class_embeddings = bundle.class_embedding_matrix()  # W [C, D] float32 numpy (torch tensors on torch/trt)
        self.has_detector = bundle.manifest.detector is not None and bundle.manifest.vfm is not None
        self.has_adapter = bundle.manifest.adapter is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.bundle.root)!r})"

    def _w(self, class_embeddings):
        w = self.class_embeddings if class_embeddings is None else _array(class_embeddings)
        if len(w.shape) != 2 or w.shape[1] != self.d_llm or w.shape[0] < 1:
            raise InputError(f"class_embeddings must be [C, {self.d_llm}] with C >= 1, got {list(w.shape)}")
        return w

    def detect(self, pixel_values, class_embeddings=None) -> DetectOutput:
        if not self.has_detector:
            raise BundleError(f"{self.bundle.root}: bundle has no detector")
        px = _array(pixel_values)
        s = self.image_size
        if len(px.shape) != 4 or px.shape[1] != 3 or px.shape[2] != s or px.shape[3] != s:
            raise InputError(f"pixel_values must be [B, 3, {s}, {s}], got {list(px.shape)}")
        return self._detect(px, self._w(class_embeddings))

    def refine(self, visual_tokens, class_embeddings=None, class_bias=None):
        """Refined tokens [B, N, D]. ``class_bias`` [B, N, C]: the detector's z-scores at each token
        (``refine_mask.token_bias``), needed by an adapter trained with ``detector_bias`` and refused by others."""
        if not self.has_adapter:
            raise BundleError(f"{self.bundle.root}: bundle has no adapter")
        v = _array(visual_tokens)
        if len(v.shape) != 3 or v.shape[2] != self.d_llm:
            raise InputError(f"visual_tokens must be [B, N, {self.d_llm}], got {list(v.shape)}")
        w = self._w(class_embeddings)
        biased = bool(getattr(self.bundle.manifest.adapter, "detector_bias", False))
        if biased != (class_bias is not None):
            raise InputError(f"{self.bundle.root}: the adapter was trained with detector_bias: pass class_bias [B, N, C]" if biased
                             else f"{self.bundle.root}: class_bias given, but the adapter was trained without detector_bias")
        if class_bias is None:
            return self._refine(v, w)
        b = _array(class_bias)
        want = [v.shape[0], v.shape[1], w.shape[0]]
        if list(b.shape) != want:
            raise InputError(f"class_bias must be {want} (batch, tokens, classes), got {list(b.shape)}")
        return self._refine_biased(v, w, b)

    def _refine_biased(self, v, w, b):
        raise BundleError(f"{self.bundle.root}: the {getattr(self, 'name', '?')} backend cannot run an adapter trained with "
                          "detector_bias yet (its exported graph takes no class_bias); use backend='torch'")

    def _detect(self, px, w) -> DetectOutput:
        raise NotImplementedError

    def _refine(self, v, w):
        raise NotImplementedError


def _array(x):
    """``x`` as it is when it is a numpy array or a torch tensor, else as a numpy array."""
    return x if isinstance(x, np.ndarray) or _is_tensor(x) else np.asarray(x)


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _torch(x):
    """``x`` (numpy array or torch tensor) as a torch tensor; the torch and trt backends' inputs."""
    import torch

    return x if _is_tensor(x) else torch.as_tensor(x)


class TorchBackend(Backend):
    """The bundle's PyTorch modules; the reference."""

    name = "torch"

    def __init__(self, bundle: Bundle, device=None):
        import torch

        m = bundle.manifest
        super().__init__(bundle, m.image_size(exported=False))
        from .graphs import AdapterGraph, DetectorGraph

        self.class_embeddings = torch.from_numpy(self.class_embeddings)
        self.device = torch.device(device or "cpu")
        self._detector = None
        self._adapter = None
        if self.has_detector:
            from .vfm import load_vfm

            vfm = load_vfm(m.vfm, bundle.resolve_ref)
            self._detector = DetectorGraph(vfm, bundle.detector()).eval().to(self.device)
        if self.has_adapter:
            self._adapter = AdapterGraph(bundle.adapter()).eval().to(self.device)

    def _detect(self, px, w):
        import torch

        with torch.inference_mode():
            out = self._detector(_torch(px).to(self.device, torch.float32), _torch(w).to(self.device, torch.float32))
        return DetectOutput(*out)

    def _refine(self, v, w):
        import torch

        with torch.inference_mode():
            return self._adapter(_torch(v).to(self.device), _torch(w).to(self.device))

    def _refine_biased(self, v, w, b):
        import torch

        with torch.inference_mode():
            return self._adapter(_torch(v).to(self.device), _torch(w).to(self.device), _torch(b).to(self.device))


ORT_TRT_CACHE = "ort-trt"  # folder of the engine cache root holding the ORT TensorRT EP's engines and timing cache


def ort_providers(device: str | None = None, precision: str = "fp32", cache_dir: str | os.PathLike | None = None) -> list:
    """TensorRT EP -> CUDA EP -> CPU EP, those this onnxruntime has; ``device="cpu"`` keeps CPU only.

    The TensorRT EP caches its engines and its timing cache in ``<cache_dir>/ort-trt``
    (``cache_dir`` default: ``$RTRT_ENGINE_CACHE`` or ``~/.cache/rtrt/engines``), never in the
    current directory (the EP's default), which may be read-only or shared.
    """
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    out: list = []
    if device != "cpu":
        if "TensorrtExecutionProvider" in have:
            folder = Path(cache_dir if cache_dir else default_cache_dir()) / ORT_TRT_CACHE
            folder.mkdir(parents=True, exist_ok=True)
            opts: dict[str, Any] = {
                "trt_fp16_enable": precision == "fp16",
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(folder),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(folder),
            }
            out.append(("TensorrtExecutionProvider", opts))
        if "CUDAExecutionProvider" in have:
            out.append("CUDAExecutionProvider")
    out.append("CPUExecutionProvider")
    return out


def session_options(threads: int | None = None):
    """ONNX Runtime session options of every rtrt session: full graph optimisation, ``threads``
    intra-op threads (default: the cores this process may use), errors-only logging, and no spinning.
    The sessions run one after another (detector, then the VLM's vision, embedding and decoder
    graphs, or the torch VLM): a pool that spins after its run takes the cores from the next one
    (the ORT VLM's decode was 3-4x slower on 2 cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or cores())
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class OrtBackend(Backend):
    """ONNX Runtime sessions over the bundle's exported graphs."""

    name = "ort"

    def __init__(
        self,
        bundle: Bundle,
        device: str | None = None,
        precision: str = "fp32",
        threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        import onnxruntime as ort

        super().__init__(bundle, bundle.manifest.image_size())
        variant = ort_variant(precision)  # fp16 on ORT means the TensorRT EP's flag
        so = session_options(threads)
        self.threads = so.intra_op_num_threads
        self.precision = precision
        requested = ort_providers(device, precision, cache_dir)
        self.sessions: dict[str, Any] = {}
        for graph in _present_graphs(bundle):
            entry = bundle.manifest.exports.graph(graph_key(graph, variant))
            if entry is None:
                hint = f" --precision {precision}" if variant else ""
                raise BackendUnavailableError(f"{bundle.root}: no exported {graph_key(graph, variant)} graph; run `rtrt export --bundle {bundle.root}{hint}`")
            self.sessions[graph] = ort.InferenceSession(str(bundle.path(entry.file)), so, providers=requested)
        self.has_detector = "detector" in self.sessions
        self.has_adapter = "adapter" in self.sessions
        # What the sessions really registered (ORT drops an EP that fails to load with a warning only).
        self.providers = list(dict.fromkeys(p for sess in self.sessions.values() for p in sess.get_providers()))
        if precision == "fp16" and "TensorrtExecutionProvider" not in self.providers:
            raise BackendUnavailableError(
                f"precision 'fp16' is not available with the ort backend: onnxruntime's TensorRT execution provider "
                f"did not load (the sessions use {', '.join(self.providers) or 'none'})")

    @staticmethod
    def _np(t) -> np.ndarray:
        if _is_tensor(t):
            t = t.detach().float().cpu().numpy()
        return np.ascontiguousarray(t, dtype=np.float32)

    def _detect(self, px, w):
        out = self.sessions["detector"].run(list(DETECTOR.outputs), {DETECTOR.inputs[0]: self._np(px), DETECTOR.inputs[1]: self._np(w)})
        if _is_tensor(px):
            import torch

            out = [torch.from_numpy(o) for o in out]
        return DetectOutput(*out)

    def _refine(self, v, w):
        (out,) = self.sessions["adapter"].run(list(ADAPTER.outputs), {ADAPTER.inputs[0]: self._np(v), ADAPTER.inputs[1]: self._np(w)})
        if _is_tensor(v):
            import torch

            return torch.from_numpy(out).to(v.dtype)
        return out.astype(v.dtype, copy=False)

    def _refine_biased(self, v, w, b):
        names = [i.name for i in self.sessions["adapter"].get_inputs()]
        if ADAPTER_BIASED.inputs[2] not in names:
            raise BundleError(f"{self.bundle.root}: the exported adapter graph takes no class_bias (exported before the adapter "
                              f"was trained with detector_bias?); re-export it with `rtrt export --bundle {self.bundle.root}`")
        (out,) = self.sessions["adapter"].run(list(ADAPTER.outputs), {ADAPTER.inputs[0]: self._np(v), ADAPTER.inputs[1]: self._np(w),
                                                                     ADAPTER_BIASED.inputs[2]: self._np(b)})
        if _is_tensor(v):
            import torch

            return torch.from_numpy(out).to(v.dtype)
        return out.astype(v.dtype, copy=False)


def engine_mismatch(entry: EngineExport | None, bundle: Bundle, source: str, platform) -> str | None:
    """Why a recorded engine cannot be used here (None when it can); ``source``: the graph key it is built from."""
    if entry is None:
        return "no engine recorded in the bundle"
    if not bundle.has(entry.file):
        return f"engine file {entry.file!r} not in the bundle"
    for field_, here in (("trt_version", platform.trt_version), ("gpu_name", platform.gpu_name), ("compute_capability", platform.compute_capability)):
        if str(getattr(entry, field_)) != str(here):
            return f"built for {field_.replace('_', ' ')} {getattr(entry, field_)!r}, this machine has {here!r}"
    src = bundle.manifest.exports.graph(source)
    if src is not None and entry.onnx_sha256 != src.sha256:
        return f"built from an older {src.file} (re-exported since)"
    return None


def _engine_source(entry: EngineExport | None, graph: str, precision: str) -> str:
    """The graph key a recorded engine was built from, else the one TensorRT 10 would build it from."""
    return entry.source_graph if entry is not None and entry.source_graph else source_graph(graph, precision, strongly_typed=False)


class TrtBackend(Backend):
    """Native TensorRT engines on CUDA tensors; build with ``make_backend("trt", ...)``."""

    name = "trt"

    def __init__(self, bundle: Bundle, engines: dict[str, TrtEngine], image_size: int):
        import torch

        super().__init__(bundle, image_size)
        self.class_embeddings = torch.from_numpy(self.class_embeddings)
        self.engines = engines
        self.device = next(iter(engines.values())).device if engines else torch.device("cuda")
        self.has_detector = "detector" in engines
        self.has_adapter = "adapter" in engines

    def _detect(self, px, w):
        out = self.engines["detector"]({DETECTOR.inputs[0]: _torch(px), DETECTOR.inputs[1]: _torch(w)})
        return DetectOutput(*(out[n] for n in DETECTOR.outputs))

    def _refine(self, v, w):
        v = _torch(v)
        out = self.engines["adapter"]({ADAPTER.inputs[0]: v, ADAPTER.inputs[1]: _torch(w)})
        return out[ADAPTER.outputs[0]].to(v.dtype)

    def _refine_biased(self, v, w, b):
        if ADAPTER_BIASED.inputs[2] not in self.engines["adapter"].input_names:
            raise BundleError(f"{self.bundle.root}: the adapter engine takes no class_bias (built from a graph exported before the "
                              f"adapter was trained with detector_bias?); re-export with `rtrt export --bundle {self.bundle.root} --backend trt`")
        v = _torch(v)
        out = self.engines["adapter"]({ADAPTER.inputs[0]: v, ADAPTER.inputs[1]: _torch(w), ADAPTER_BIASED.inputs[2]: _torch(b)})
        return out[ADAPTER.outputs[0]].to(v.dtype)


def _present_graphs(bundle: Bundle) -> list[str]:
    """The graphs (``GRAPHS`` order) whose modules the bundle has: the detector needs its VFM too."""
    m = bundle.manifest
    present = {"detector": m.detector is not None and m.vfm is not None, "adapter": m.adapter is not None}
    return [g for g in GRAPHS if present[g]]


def available_backends() -> list[str]:
    """The backends this machine can run (``trt`` needs TensorRT and a CUDA GPU)."""
    return ["torch", "ort"] + ([] if tensorrt_status() else ["trt"])


def precision_support(
    name: str, bundle: Bundle, device: str | None = None, *, platform=None, on_engine_mismatch: str = "rebuild"
) -> dict[str, str | None]:
    """The precision/backend matrix, in one place: each of ``PRECISIONS`` -> None when backend
    ``name`` can run it for ``bundle`` on ``device`` here, else why not (one clause).

    - ``torch``: fp32 only (the bundle's modules run in float32);
    - ``ort``: fp32 / int8 when the bundle has the exported graphs (``*.int8.onnx`` for int8); fp16
      only through onnxruntime's TensorRT execution provider on a CUDA device (its CPU and CUDA
      providers would run the fp32 graphs and call it fp16);
    - ``trt``: a precision whose engines the bundle records for this TensorRT and GPU (``platform``,
      default: this machine's), or, with ``on_engine_mismatch="rebuild"``, that can be built from
      the bundle's ONNX (int8 from the ``*.qdq`` graphs) by ``rtrt.runtime.trt_build``.
    """
    graphs = _present_graphs(bundle)
    root = bundle.root
    if name == "torch":
        return {p: None if p == "fp32" else "it runs the bundle's modules in fp32" for p in PRECISIONS}
    if name == "ort":
        import onnxruntime as ort

        out: dict[str, str | None] = {}
        for p in ("fp32", "int8"):
            missing = [k for k in (graph_key(g, ort_variant(p)) for g in graphs) if bundle.manifest.exports.graph(k) is None]
            hint = f" --precision {p}" if ort_variant(p) else ""
            out[p] = f"the bundle has no exported {missing[0]} graph; run `rtrt export --bundle {root}{hint}`" if missing else None
        dev = None if device is None else check_device(device)
        if "TensorrtExecutionProvider" not in ort.get_available_providers():
            out["fp16"] = "fp16 runs only through onnxruntime's TensorRT execution provider, which this onnxruntime lacks"
        elif (dev is not None and dev.type != "cuda") or len(available_devices()) < 2:
            where = f"not {dev}" if dev is not None and dev.type != "cuda" else "and this machine has none"
            out["fp16"] = f"fp16 runs only through onnxruntime's TensorRT execution provider on a CUDA device, {where}"
        else:
            out["fp16"] = out["fp32"]
        return {p: out[p] for p in PRECISIONS}
    if name != "trt":
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if platform is None:
        reason = tensorrt_status()
        if reason:
            return {p: f"trt backend unavailable: {reason}" for p in PRECISIONS}
        platform = platform_info(None if device in (None, "cpu") else check_device(device).index)
    from importlib.util import find_spec

    # The builder reads each graph's precision with the onnx package (in the trt and export extras).
    can_build = on_engine_mismatch == "rebuild" and find_spec("onnx") is not None
    out = {}
    for p in PRECISIONS:
        out[p] = None
        for g in graphs:
            entry = bundle.manifest.exports.engine(engine_name(g, p))
            source = _engine_source(entry, g, p)
            why = engine_mismatch(entry, bundle, source, platform)
            if why is None or (can_build and bundle.manifest.exports.graph(source) is not None):
                continue
            if can_build:
                why += f" and no exported {source} graph to build one from"
            elif on_engine_mismatch == "rebuild":
                why += " and the engine builder needs the onnx package (pip install onnx) to rebuild it"
            out[p] = f"{g}.{p} engine: {why}"
            break
    return out


def check_precision(name: str, bundle: Bundle, precision: str, device: str | None = None, **kw) -> None:
    """``BackendUnavailableError`` naming the precisions that are available when ``precision`` is not
    (``precision_support``'s matrix; ``kw`` as it takes them)."""
    support = precision_support(name, bundle, device, **kw)
    why = support[precision]
    if why is not None:
        avail = [p for p, w in support.items() if w is None]
        raise BackendUnavailableError(
            f"precision {precision!r} is not available with the {name} backend: {why} (available: {', '.join(avail) or 'none'})")


def _make_ort(bundle: Bundle, device, precision: str, threads, cache_dir, fallback_from: str | None = None) -> "OrtBackend":
    """An ``OrtBackend`` once the matrix allows ``precision``; ``fallback_from``: why trt was left."""
    try:
        check_precision("ort", bundle, precision, device)
    except BackendUnavailableError as e:
        if fallback_from is None:
            raise
        raise BackendUnavailableError(f"{fallback_from}, and the ort fallback cannot run it: {e}") from None
    return OrtBackend(bundle, device=device, precision=precision, threads=threads, cache_dir=cache_dir)


def _make_trt(bundle: Bundle, device, precision: str, on_engine_mismatch: str, threads, cache_dir) -> Backend:
    reason = tensorrt_status()
    if reason:
        if on_engine_mismatch == "fallback":
            warnings.warn(f"trt backend unavailable ({reason}); falling back to ort", RuntimeWarning, stacklevel=3)
            return _make_ort(bundle, device, precision, threads, cache_dir, f"trt backend unavailable ({reason})")
        raise BackendUnavailableError(f"trt backend unavailable: {reason} (available backends: {', '.join(available_backends())})")
    import torch

    dev = torch.device(device) if device not in (None, "cpu") else torch.device("cuda")
    if dev.type != "cuda":
        raise BackendUnavailableError(f"trt backend runs on CUDA devices, not {dev}")
    plat = platform_info(dev.index)
    if on_engine_mismatch == "rebuild":
        # Refuse a precision that has no engine and cannot be built before building the other graph's.
        check_precision("trt", bundle, precision, str(dev), platform=plat, on_engine_mismatch="rebuild")
    engines: dict[str, TrtEngine] = {}
    for graph in _present_graphs(bundle):
        name = engine_name(graph, precision)
        entry = bundle.manifest.exports.engine(name)
        why = engine_mismatch(entry, bundle, _engine_source(entry, graph, precision), plat)
        path: Path | None = None if why else bundle.path(entry.file)
        if why:
            if on_engine_mismatch == "fail":
                raise EngineMismatchError(f"{name} engine: {why}")
            if on_engine_mismatch == "fallback":
                warnings.warn(f"{name} engine: {why}; falling back to the ort backend", RuntimeWarning, stacklevel=3)
                return _make_ort(bundle, device, precision, threads, cache_dir, f"{name} engine: {why}")
            # rebuild: the builder is imported only on this path.
            from .trt_build import build_bundle_engine

            warnings.warn(f"{name} engine: {why}; building a matching engine (this takes minutes once)", RuntimeWarning, stacklevel=3)
            path, _ = build_bundle_engine(bundle, graph, precision, cache_dir=cache_dir)
        engines[graph] = TrtEngine(path, device=dev.index)
    backend = TrtBackend(bundle, engines, bundle.manifest.image_size())
    backend.precision = precision
    return backend


def make_backend(
    name: str,
    bundle: Bundle | str | os.PathLike,
    *,
    device: str | None = None,
    precision: str = "fp32",
    on_engine_mismatch: str = "rebuild",
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Backend:
    """The backend ``name`` (``BACKENDS``) over ``bundle`` (a ``Bundle`` or its directory).

    ``device``: ``"cpu"``/``"cuda[:i]"``; None picks each backend's natural device. A device this
    machine lacks is refused (``check_device``), as is a precision the backend cannot run here
    (``precision_support``: torch fp32 only; ORT int8 needs the int8 graphs and fp16 the TensorRT
    EP on a GPU; TensorRT an engine of that precision or the means to build one), each with a
    ``BackendUnavailableError`` naming what is available, never a silent fp32 run.
    ``precision``: ``fp32``/``fp16``/``int8``; ORT uses int8 graphs for ``int8`` (fp16 only via the
    TensorRT EP); TensorRT picks the engine of that precision. ``threads``: ORT intra-op threads
    (default: the cores this process may use). ``cache_dir``: engine cache for rebuilds and the
    TensorRT EP (default ``$RTRT_ENGINE_CACHE`` or ``~/.cache/rtrt/engines``).
    """
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if on_engine_mismatch not in MISMATCH_POLICIES:
        raise InputError(f"on_engine_mismatch must be one of {', '.join(MISMATCH_POLICIES)}, not {on_engine_mismatch!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be a positive integer (or None for every core), not {threads!r}")
    dev = check_device(device)
    device = None if dev is None else "cpu" if dev.type == "cpu" else str(dev)  # "cpu:0" -> "cpu" for ort_providers
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    if name == "torch":
        check_precision("torch", bundle, precision, device)
        return TorchBackend(bundle, device=device)
    if name == "ort":
        return _make_ort(bundle, device, precision, threads, cache_dir)
    return _make_trt(bundle, device, precision, on_engine_mismatch, threads, cache_dir)
