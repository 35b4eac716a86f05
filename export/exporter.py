"""The export pipeline behind ``rtrt export``: ONNX graphs, int8 variants, reference data, TensorRT engines.

``export_bundle(bundle, ...)`` does the work; ``rtrt.export.cli`` parses the command line and
calls it (that module stays light so ``rtrt export --help`` loads no torch).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from rtrt.runtime.bundle import Bundle, load_bundle
from rtrt.runtime.errors import BackendUnavailableError, RtrtError
from rtrt.runtime.exports import EngineExport, Exports, GraphExport, OnnxExports, ReferenceExport, ReferenceGraph, VlmExport
from rtrt.runtime.fileio import sha256_file
from rtrt.runtime.names import (DETECTOR, PRECISIONS, REFERENCE_FILE, SPECS, VLM_ONNX_DIR, VLM_PRECISIONS, adapter_spec,
                                engine_file, engine_name, graph_key, onnx_file)
from rtrt.runtime.trt_build import build_engine, dim_ranges, source_graph

from .common import BACKEND_CHOICES, VLM_TOLERANCE, ExportError
from .onnx_export import OPSET, export_adapter, export_detector, graph_info
from .parity import (
    TOLERANCES,
    ParityReport,
    Tolerance,
    adapter_case_from_tokens,
    adapter_cases,
    cross_validate,
    with_class_bias,
    detector_cases,
    ort_runner,
    parity_pil_images,
    torch_runner,
)
from .quantize import METHODS, quantize_dynamic, quantize_static
from .fp16 import FP32_OPS, convert_to_fp16

__all__ = ["export_bundle"]

def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


class _Progress:
    """One line per step on stderr, with the elapsed time of the previous one."""

    def __init__(self, log: Callable[[str], None], total: int):
        self.log, self.total, self.i, self.t = log, total, 0, time.monotonic()

    def step(self, msg: str) -> None:
        self.i += 1
        self.t = time.monotonic()
        self.log(f"[{self.i}/{self.total}] {msg} ...")

    def done(self, msg: str = "done") -> None:
        self.log(f"      {msg} ({time.monotonic() - self.t:.1f} s)")


def _trt_runner(engine, spec):
    import torch

    def run(feeds):
        out = engine({n: torch.from_numpy(np.asarray(feeds[n])).cuda() for n in spec.inputs})
        return {n: out[n].float().cpu().numpy() if out[n].is_floating_point() else out[n].cpu().numpy() for n in spec.outputs}

    return run


def _capture_visual_tokens(b: Bundle, vlm_ref: str | None, images: list, log: Callable[[str], None]) -> tuple[np.ndarray | None, str]:
    """Visual tokens [T, D] of ``images`` from the bundle's VLM (or ``vlm_ref``), in the order the pipeline
    hands them to the adapter; ``(None, why)`` when no VLM can be loaded here."""
    m = b.manifest
    if vlm_ref is None and m.vlm is None:
        return None, "the bundle names no VLM"
    from rtrt.runtime.pipeline import DEFAULT_QUESTION
    from rtrt.runtime.vlm import load_vlm

    try:
        ref = vlm_ref if vlm_ref is not None else b.resolve_ref(m.vlm.ref)
        family = load_vlm(ref)
        if int(family.hidden_size) != int(m.d_llm):
            return None, f"the VLM's hidden size {family.hidden_size} is not the bundle's {m.d_llm}"
        import torch

        with torch.inference_mode():
            tokens = family.visual_tokens(family.prepare(list(images), [DEFAULT_QUESTION] * len(images)))
        return tokens.detach().float().cpu().numpy(), f"visual tokens of {len(images)} image(s) from the bundle's VLM ({family.name})"
    except RtrtError as e:
        log(f"      note: synthetic visual tokens for the adapter (cannot load the VLM: {e})")
        return None, f"cannot load the VLM ({e})"


def _reference_file(path: Path, refs: dict, cases: dict[str, dict], sources: dict[str, str], specs=SPECS) -> ReferenceExport:
    """Write ``reference.safetensors``: every graph's reference feeds and PyTorch outputs; returns the manifest entry."""
    from safetensors.numpy import save_file

    from rtrt.runtime.check import REFERENCE_FORMAT, reference_key

    tensors: dict[str, np.ndarray] = {}
    meta = {}
    entry = ReferenceExport(file=path.name, format=REFERENCE_FORMAT)
    for g, feeds in cases.items():
        out = torch_runner(refs[g], specs[g])(feeds)
        for n in specs[g].inputs:
            tensors[reference_key(g, n)] = np.ascontiguousarray(feeds[n])
        for n in specs[g].outputs:
            tensors[reference_key(g, n)] = np.ascontiguousarray(out[n])
        meta[g] = sources[g]
        entry.graphs[g] = ReferenceGraph(inputs=sources[g], shapes={n: list(np.shape(feeds[n])) for n in specs[g].inputs})
    # One metadata key holding sorted JSON: safetensors writes a metadata map in no fixed order,
    # and the shipped bundle must rebuild byte for byte.
    save_file(tensors, str(path), metadata={"rtrt": json.dumps({"format": REFERENCE_FORMAT, "inputs": meta}, sort_keys=True)})
    return entry


def _export_whole_vlm(b: Bundle, tmp: Path, images: list, source: str, w: np.ndarray, precision: str, tolerance: float,
                      verbose: bool, log: Callable[[str], None]) -> tuple[dict[str, Path], VlmExport, list[str]]:
    """The bundle's VLM in ONNX under ``tmp/vlm_onnx`` (``rtrt.export.vlm_onnx``), checked on ``images``:
    (files by bundle path, the ``exports.vlm`` record, parity failures)."""
    import torch
    import transformers

    from rtrt.runtime.pipeline import DEFAULT_QUESTION
    from rtrt.runtime.vlm import load_vlm

    from .vlm_onnx import export_vlm, vlm_parity, vlm_record

    m = b.manifest
    ref = b.resolve_ref(m.vlm.ref)
    family = load_vlm(ref, dtype=torch.float32)
    if family.name != m.vlm.family:
        raise ExportError(f"{m.vlm.ref}: the bundle says a {m.vlm.family} VLM, the model is {family.name}")
    adapter = b.adapter() if m.adapter is not None else None
    W = torch.from_numpy(np.ascontiguousarray(w)) if adapter is not None else None
    files = export_vlm(family, tmp, source=ref, adapter=adapter, W=W, quantized=precision == "int8", verbose=verbose, log=log)
    # Two prompts of different lengths: the batch is left-padded, as the pipeline's batches are.
    batch = images[:2]
    parity = vlm_parity(family, tmp, batch, [DEFAULT_QUESTION, "What is in the image?"][: len(batch)],
                        adapter=adapter, W=W, tolerance=tolerance, inputs=f"the first {len(batch)} of {source}")
    log(f"      {parity.summary()}")
    record = vlm_record(family, files, parity, vlm_ref=m.vlm.ref, precision=precision,
                        versions={**_versions(), "transformers": transformers.__version__})
    return files, record, [f"vlm: {f}" for f in parity.failures]


def _entry(path: Path, rep: ParityReport, **extra) -> GraphExport:
    """The manifest entry of one exported graph: its file, the node walk, ``extra`` (image_size, method), its parity."""
    info = graph_info(path)
    return GraphExport(file=path.name, sha256=sha256_file(path), size=path.stat().st_size, **dataclasses.asdict(info),
                       **extra, parity=rep.to_dict())


def export_bundle(
    bundle: str | Path | Bundle,
    *,
    precision: str = "fp32",
    image_size: int | None = None,
    backend: str = "onnx",
    tolerances: dict[str, Tolerance] | None = None,
    images: str | Path | None = None,
    int8_method: str = "dynamic",
    family: str | None = None,
    max_batch: int = 4,
    cache_dir: str | Path | None = None,
    workspace_gb: float = 4.0,
    vlm: str | None = None,
    reference_images: int = 2,
    vlm_onnx: bool = False,
    vlm_tolerance: float = VLM_TOLERANCE,
    verbose: bool = False,
    log: Callable[[str], None] | None = None,
) -> Exports:
    """Export ``bundle`` (see the module docstring); returns the exports written to its manifest.

    ``vlm``: the VLM whose visual tokens feed the adapter's parity and reference cases (default: the
    bundle's own). ``reference_images``: how many parity images go into ``reference.safetensors``.
    ``vlm_onnx``: also the bundle's whole VLM under ``vlm_onnx/`` (``rtrt.export.vlm_onnx``), every
    fp32 output within ``vlm_tolerance`` of PyTorch and greedy tokens identical; recorded as
    ``exports.vlm`` (without it, a ``vlm`` record of an earlier export is kept: those files are unchanged).

    Raises ``ExportError`` (nothing written) when a parity report fails or a step breaks, and
    ``BackendUnavailableError`` before any work when ``backend`` needs TensorRT and it is missing.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if int8_method not in METHODS:
        raise ExportError(f"--int8-method {int8_method!r}: choose from {', '.join(METHODS)}")
    if backend not in BACKEND_CHOICES:
        raise ExportError(f"--backend {backend!r}: choose from {', '.join(BACKEND_CHOICES)}")
    if not 1 <= int(reference_images) <= 4:
        raise ExportError(f"--reference-images {reference_images}: choose 1 to 4 (they are stored in the bundle)")
    want_trt = backend in ("trt", "both")
    if want_trt:
        from rtrt.runtime.trt_engine import tensorrt_status

        reason = tensorrt_status()
        if reason:
            raise BackendUnavailableError(f"--backend {backend} needs TensorRT engines, but: {reason}")
    tol = dict(TOLERANCES)
    tol.update(tolerances or {})
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    m = b.manifest
    if vlm_onnx:
        if precision not in VLM_PRECISIONS:
            raise ExportError(f"--vlm with --precision {precision}: the VLM graphs come in {', '.join(VLM_PRECISIONS)} only")
        if m.vlm is None:
            raise ExportError(f"--vlm: {b.root} names no VLM to export")
    has_det = m.detector is not None and m.vfm is not None
    has_ad = m.adapter is not None
    if not (has_det or has_ad):
        raise ExportError(f"{b.root}: bundle has neither a detector nor an adapter to export")
    size = int(image_size or m.image_size(exported=False))
    if m.vfm is not None and size % m.vfm.patch_size:
        raise ExportError(f"--image-size {size} is not a multiple of the VFM patch size {m.vfm.patch_size}")
    fam = family or (m.vlm.family if m.vlm else None)
    # Per-graph (min, opt, max) from the bundle's image-token layout (rtrt.runtime.profiles).
    ranges = dim_ranges(m.vlm.image_token_layout if m.vlm else None, len(m.classes), max_batch, fam)

    import torch

    from rtrt.runtime.graphs import AdapterGraph, DetectorGraph
    from rtrt.runtime.image import vfm_pixels
    from rtrt.runtime.vfm import load_vfm

    # The same images feed the detector's parity, the VLM that gives the adapter real tokens, and the reference.
    pil_images, pil_source = parity_pil_images(4, size, images)
    w = b.class_embeddings().weight.detach().float().numpy()
    c = len(w)
    graphs_with = [g for g, ok in (("detector", has_det), ("adapter", has_ad)) if ok]
    specs = {"detector": DETECTOR, "adapter": adapter_spec(m.adapter)}  # a detector_bias adapter takes class_bias too
    steps = len(graphs_with) * (1 + (1 if precision == "int8" else 0) + (1 if precision == "int8" and want_trt else 0) + (1 if want_trt else 0)) + 1 + int(vlm_onnx)
    prog = _Progress(log, steps)
    failures: list[str] = []
    graphs: dict[str, GraphExport] = {}
    refs: dict[str, torch.nn.Module] = {}
    cases: dict[str, list] = {}
    sources: dict[str, str] = {}
    files: dict[str, Path] = {}
    engines: dict[str, EngineExport] = {}
    reference: dict[str, dict] = {}  # graph -> the feeds stored in reference.safetensors
    calibration: dict[str, list] = {}  # graph -> the feeds static int8 ranges are calibrated on

    def check(rep: ParityReport) -> ParityReport:
        log(f"      {rep.summary()}")
        failures.extend(f"{rep.graph} {rep.precision}: {f}" for f in rep.failures)
        return rep

    tmp = Path(tempfile.mkdtemp(prefix=".rtrt-export-"))
    try:
        if has_det:
            prog.step(f"detector.onnx: DINOv3 {m.vfm.arch or m.vfm.ref} at {size}x{size}, {c} classes")
            vfm = load_vfm(dataclasses.replace(m.vfm, image_size=size), b.resolve_ref)
            det = b.detector()
            refs["detector"] = DetectorGraph(vfm, det).eval()
            path = export_detector(copy.deepcopy(vfm), det, tmp / onnx_file("detector"), image_size=size, patch_size=m.vfm.patch_size, verbose=verbose)
            pixels = vfm_pixels(pil_images, size, m.vfm.mean, m.vfm.std, resample=m.vfm.resample,
                                reducing_gap=m.vfm.reducing_gap).numpy()
            sources["detector"] = pil_source
            reference["detector"] = detector_cases(pixels, w, [(reference_images, c)])[0]
            cases["detector"] = [reference["detector"]] + detector_cases(pixels, w, [(1, c), (2, max(1, c // 2)), (1, 1)])
            calibration["detector"] = cases["detector"]
            rep = check(cross_validate(torch_runner(refs["detector"], DETECTOR), ort_runner(path, DETECTOR), cases["detector"], tol["fp32"],
                                       spec=DETECTOR, graph="detector", precision="fp32", inputs=sources["detector"]))
            graphs["detector"] = _entry(path, rep, image_size=size)
            files[path.name] = path
            prog.done()
        if has_ad:
            n_lo, n_opt, _ = ranges["adapter"]["num_tokens"]
            prog.step(f"adapter.onnx: d_model {m.adapter.d_model}, width {m.adapter.width}, {m.adapter.heads} heads")
            refs["adapter"] = AdapterGraph(b.adapter()).eval()
            path = export_adapter(b.adapter(), tmp / onnx_file("adapter"), verbose=verbose)
            tokens, why = _capture_visual_tokens(b, vlm, pil_images[:reference_images], log)
            # Batch 1 only: the adapter is always called with one row of all images' tokens (ADAPTER_CALL).
            synthetic = adapter_cases(w, [(1, max(n_lo, min(n_opt, 37)), max(1, c // 2)), (1, n_lo, 1)])
            if tokens is not None:
                reference["adapter"] = adapter_case_from_tokens(tokens, w)
                sources["adapter"] = f"{why}, on the first {reference_images} of {pil_source}"
                calibration["adapter"] = [reference["adapter"]]  # int8 ranges from real tokens only
            else:
                reference["adapter"] = adapter_cases(w, [(1, n_opt, c)])[0]
                sources["adapter"] = f"synthetic visual tokens around the bundle's W ({why})"
                calibration["adapter"] = [reference["adapter"]] + synthetic
            if m.adapter.detector_bias:
                # z-scores as the calibrated detector gives them (standard normal, a few standing out), seeded
                reference["adapter"], *synthetic = with_class_bias([reference["adapter"]] + synthetic)
                calibration["adapter"] = [reference["adapter"]] + (synthetic if tokens is None else [])
                sources["adapter"] += "; class_bias: synthetic z-scores"
            cases["adapter"] = [reference["adapter"]] + synthetic
            spec = specs["adapter"]
            rep = check(cross_validate(torch_runner(refs["adapter"], spec), ort_runner(path, spec), cases["adapter"], tol["fp32"],
                                       spec=spec, graph="adapter", precision="fp32", inputs=sources["adapter"]))
            graphs["adapter"] = _entry(path, rep)
            files[path.name] = path
            prog.done()
        if precision == "int8":
            for g in graphs_with:
                if int8_method == "static":
                    prog.step(f"{onnx_file(g, 'int8')}: ONNX Runtime static int8 (QDQ, u8 activations calibrated on the parity inputs)")
                    q = quantize_static(tmp / onnx_file(g), tmp / onnx_file(g, "int8"), calibration[g])
                else:
                    prog.step(f"{onnx_file(g, 'int8')}: ONNX Runtime dynamic int8 (MatMul/Gemm weights per channel)")
                    q = quantize_dynamic(tmp / onnx_file(g), tmp / onnx_file(g, "int8"))
                rep = check(cross_validate(torch_runner(refs[g], specs[g]), ort_runner(q, specs[g]), cases[g], tol["int8"],
                                           spec=specs[g], graph=g, precision="int8", inputs=sources[g]))
                graphs[graph_key(g, "int8")] = _entry(q, rep, method=int8_method)
                files[q.name] = q
                prog.done()
                if want_trt:
                    prog.step(f"{onnx_file(g, 'qdq')}: symmetric static int8 (QDQ) for TensorRT, calibrated on the parity inputs")
                    q = quantize_static(tmp / onnx_file(g), tmp / onnx_file(g, "qdq"), calibration[g], symmetric=True)
                    rep = check(cross_validate(torch_runner(refs[g], specs[g]), ort_runner(q, specs[g]), cases[g], tol["int8"],
                                               spec=specs[g], graph=g, precision="int8", inputs=sources[g]))
                    graphs[graph_key(g, "qdq")] = _entry(q, rep, method="static-symmetric-qdq")
                    files[q.name] = q
                    prog.done()
        if want_trt and precision == "fp16":
            # TensorRT >= 11 builds fp16 only from an fp16 graph; written on 10 too, so that the
            # bundle can be rebuilt on 11 (on_engine_mismatch="rebuild"). Checked in ORT CPU.
            for g in graphs_with:
                log(f"      {onnx_file(g, 'fp16')}: fp16 graph for strongly typed TensorRT (fp32 inputs/outputs; {', '.join(FP32_OPS)} in fp32)")
                q = convert_to_fp16(tmp / onnx_file(g), tmp / onnx_file(g, "fp16"))
                rep = check(cross_validate(torch_runner(refs[g], specs[g]), ort_runner(q, specs[g]), cases[g], tol["fp16"],
                                           spec=specs[g], graph=g, precision="fp16", inputs=sources[g]))
                graphs[graph_key(g, "fp16")] = _entry(q, rep, method="onnxruntime float16, fp32 inputs/outputs, fp32 " + "/".join(FP32_OPS))
                files[q.name] = q
        if want_trt and not failures:
            from rtrt.runtime.trt_engine import TrtEngine

            for g in graphs_with:
                source = source_graph(g, precision)  # the graph itself, <g>.fp16 on TensorRT >= 11, or <g>.qdq
                prog.step(f"{engine_file(g, precision)}: TensorRT from {graphs[source].file}")
                epath, meta = build_engine(tmp / graphs[source].file, g, precision, graphs[source].inputs, ranges[g],
                                           cache_dir=cache_dir, workspace_gb=workspace_gb, log=log)
                meta.source_graph = source
                ref_gpu = refs[g].to("cuda")
                rep = check(cross_validate(torch_runner(ref_gpu, specs[g], device="cuda"), _trt_runner(TrtEngine(epath), specs[g]), cases[g],
                                           tol[precision], spec=specs[g], graph=g, precision=precision, inputs=sources[g]))
                refs[g].to("cpu")
                meta.parity = rep.to_dict()
                engines[engine_name(g, precision)] = meta
                files[meta.file] = epath
                prog.done("reused from the engine cache" if not meta.built else "built")
        vlm_record = m.exports.vlm
        if vlm_onnx and not failures:
            prog.step(f"{VLM_ONNX_DIR}/: the whole {m.vlm.family} VLM in ONNX" + (" + int8 weight-only decoder" if precision == "int8" else ""))
            vlm_files, vlm_record, vlm_failures = _export_whole_vlm(b, tmp, pil_images, pil_source, w, precision, vlm_tolerance, verbose, log)
            failures.extend(vlm_failures)
            files.update(vlm_files)
            prog.done()
        if failures:
            raise ExportError("parity outside tolerance, nothing was written: " + "; ".join(failures))

        files[REFERENCE_FILE] = tmp / REFERENCE_FILE
        reference_entry = _reference_file(files[REFERENCE_FILE], refs, reference, sources, specs)
        prog.step(f"writing {len(files)} file(s) into {b.root}")
        onnx = OnnxExports(opset=OPSET, image_size=size, precision=precision, family=fam,
                           exported_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), versions=_versions(), graphs=graphs)
        # Engines recorded before stay when they were built from one of the graphs just written (same bytes).
        shas = {e.sha256 for e in graphs.values()}
        kept = {k: v for k, v in m.exports.engines.items() if v.onnx_sha256 in shas}
        kept.update(engines)
        exports = Exports(onnx=onnx, reference=reference_entry, engines=kept, vlm=vlm_record)
        b.add_files(files, exports=exports)
        prog.done()
        return exports
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


