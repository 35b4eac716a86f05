"""Does this bundle still hold on this machine? Rerun every graph against the reference outputs it carries.

``rtrt export`` stores a few reference inputs and the PyTorch outputs for them in the bundle
(``reference.safetensors``, hashed like every bundle file): for the detector, preprocessed images
and W; for the adapter, visual tokens captured from the bundle's own VLM on those images (in the
adapter's call convention, ``[1, all tokens of the batch, D]``) and W. ``check_bundle`` reruns each
graph on every backend and precision this machine can run (PyTorch, ONNX Runtime fp32/int8,
TensorRT engines) and judges the outputs with the export's own rule (``rtrt.runtime.parity``):
the same tolerance, the same top-k agreement, the machine recorded beside the numbers.

    report = check_bundle("bundle")           # every backend available here
    print(report.table()); report.passed

``rtrt check`` prints the table (exit 0 pass, 1 a parity failed, 2 bad input);
``Pipeline.from_bundle(..., verify=True)`` runs ``verify_backend`` for the backend it loaded.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import BackendUnavailableError, BundleError, InputError, ParityError
from .machine import machine_info, machine_summary
from .names import ADAPTER, BACKENDS, DETECTOR, PRECISIONS, REFERENCE_FILE, SPECS, adapter_spec
from .parity import TOLERANCES, cross_validate

__all__ = [
    "REFERENCE_FILE",
    "REFERENCE_FORMAT",
    "SPECS",
    "reference_key",
    "load_reference",
    "CheckRow",
    "CheckReport",
    "planned_checks",
    "check_backend",
    "check_bundle",
    "verify_backend",
]

REFERENCE_FORMAT = "rtrt-reference/1"


def reference_key(graph: str, tensor: str) -> str:
    """Name of a reference tensor in ``reference.safetensors``: ``detector.pixel_values``, ``adapter.refined_tokens``."""
    return f"{graph}.{tensor}"


def load_reference(bundle) -> dict[str, dict[str, Any]]:
    """{graph: {"feeds", "outputs", "inputs" (where they came from)}} from the bundle's reference file.

    ``BundleError`` when the bundle carries none (exported before references existed): re-export it.
    """
    from safetensors import safe_open

    if not bundle.has(REFERENCE_FILE):
        raise BundleError(f"{bundle.root}: no {REFERENCE_FILE} (reference inputs and outputs); "
                          f"re-export with `rtrt export --bundle {bundle.root}` to add them")
    path = bundle.path(REFERENCE_FILE)
    try:
        with safe_open(str(path), framework="np") as f:
            meta = json.loads((f.metadata() or {}).get("rtrt", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise BundleError(f"{REFERENCE_FILE}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != REFERENCE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise BundleError(f"{REFERENCE_FILE}: format {got!r}, this rtrt reads {REFERENCE_FORMAT!r}")
    sources = meta.get("inputs") if isinstance(meta.get("inputs"), dict) else {}
    out: dict[str, dict[str, Any]] = {}
    specs = {**SPECS, "adapter": adapter_spec(bundle.manifest.adapter)}  # a detector_bias adapter's has class_bias
    for graph, spec in specs.items():
        names = list(spec.inputs) + list(spec.outputs)
        have = [reference_key(graph, n) in tensors for n in names]
        if not any(have):
            continue
        if not all(have):
            missing = [reference_key(graph, n) for n, h in zip(names, have) if not h]
            raise BundleError(f"{REFERENCE_FILE}: {graph} reference incomplete (missing {', '.join(missing)})")
        out[graph] = {
            "feeds": {n: tensors[reference_key(graph, n)] for n in spec.inputs},
            "outputs": {n: tensors[reference_key(graph, n)] for n in spec.outputs},
            "inputs": str(sources.get(graph, "")),
        }
    return out


@dataclass
class CheckRow:
    """One graph on one backend at one precision."""

    graph: str  # "detector" or "adapter"
    backend: str  # "torch", "ort" or "trt": the backend that actually ran
    precision: str  # "fp32", "fp16" or "int8"
    device: str = ""  # what ran it: ORT execution providers, a CUDA device, "cpu"
    max_abs_error: dict[str, float] = field(default_factory=dict)  # per output, vs the stored reference
    topk_agreement: float | None = None  # detector: tie-aware top-k overlap with the reference ranking
    verdict: str = "pass"  # "pass", "FAIL" or "skipped"
    detail: str = ""  # failures, or why it was skipped

    @property
    def failed(self) -> bool:
        return self.verdict == "FAIL"


@dataclass
class CheckReport:
    """Every row of one ``check_bundle`` run and the machine it ran on."""

    bundle: str  # bundle directory
    machine: dict[str, Any]  # rtrt.runtime.machine.machine_info()
    rows: list[CheckRow] = field(default_factory=list)
    reference_inputs: dict[str, str] = field(default_factory=dict)  # graph -> where the reference inputs came from

    @property
    def passed(self) -> bool:
        """True when no row failed and at least one ran."""
        return any(r.verdict == "pass" for r in self.rows) and not any(r.failed for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def table(self) -> str:
        """The report as a fixed-width table, with the machine on top."""
        head = ("graph", "backend", "precision", "ran on", "max abs error", "top-5", "verdict")
        body = []
        for r in self.rows:
            err = max(r.max_abs_error.values()) if r.max_abs_error else None
            body.append((
                r.graph, r.backend, r.precision, r.device or "-",
                "-" if err is None else f"{err:.2e}",
                "-" if r.topk_agreement is None else f"{r.topk_agreement:.0%}",
                r.verdict + (f": {r.detail}" if r.detail else ""),
            ))
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
        fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        lines = [f"bundle:  {self.bundle}", f"machine: {machine_summary(self.machine)}", "", fmt(head),
                 fmt(tuple("-" * w for w in widths))]
        lines += [fmt(row) for row in body]
        n_fail = sum(r.failed for r in self.rows)
        n_pass = sum(r.verdict == "pass" for r in self.rows)
        lines += ["", f"{n_pass} passed, {n_fail} failed, {len(self.rows) - n_pass - n_fail} skipped"]
        return "\n".join(lines)


def planned_checks(bundle, backends: Sequence[str] | None = None, precisions: Sequence[str] | None = None,
                   device: str | None = None) -> list[tuple[str, str, str | None]]:
    """(backend, precision, reason to skip or None) for every combination to report.

    Without ``backends``: torch, ort, and trt where TensorRT and a GPU are there (else a skipped row).
    Without ``precisions``: what the bundle carries (ort: what ``backends.precision_support`` allows
    on ``device``, default the CPU; trt: the precisions of its recorded engines, else fp32). Explicitly asked-for combinations the
    machine or the bundle cannot run raise ``BackendUnavailableError`` (a bad request, exit 2).
    """
    from .backends import precision_support
    from .trt_engine import tensorrt_status

    for b in backends or ():
        if b not in BACKENDS:
            raise InputError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    for p in precisions or ():
        if p not in PRECISIONS:
            raise InputError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    explicit_backends = bool(backends)
    exports = bundle.manifest.exports
    plan: list[tuple[str, str, str | None]] = []
    for b in backends or BACKENDS:
        if b == "torch":
            have = ["fp32"]
        elif b == "ort":
            support = precision_support("ort", bundle, device or "cpu")  # the backends' own matrix
            have = [p for p in PRECISIONS if support[p] is None]
            for p in precisions or ():
                if support[p] is not None and explicit_backends:
                    raise BackendUnavailableError(f"backend ort cannot run {p} here: {support[p]}")
            if not have:
                if explicit_backends:
                    raise BackendUnavailableError(f"backend ort: {support['fp32']}")
                plan.append((b, "fp32", support["fp32"]))
                continue
        else:
            reason = tensorrt_status()
            if reason:
                if explicit_backends:
                    raise BackendUnavailableError(f"--backend trt: {reason} on this machine")
                plan.append((b, "-", reason))
                continue
            have = sorted({e.precision for e in exports.engines.values()}) or ["fp32"]
        want = list(precisions) if precisions else have
        for p in want:
            if p not in have and not (b == "trt" and precisions):
                if precisions and explicit_backends:
                    raise BackendUnavailableError(f"{bundle.root}: backend {b} has no {p} graphs in this bundle (it has {', '.join(have)})")
                if precisions:
                    plan.append((b, p, f"the bundle has no {p} graphs for {b}"))
                continue
            plan.append((b, p, None))
    return plan


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _runner(backend, graph: str):
    """Feeds (numpy) -> outputs (numpy) through the backend's public detect/refine."""

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph == "detector":
            out = backend.detect(feeds["pixel_values"], feeds["class_embeddings"])
            return {n: _as_numpy(v) for n, v in zip(DETECTOR.outputs, out)}
        refined = backend.refine(feeds["visual_tokens"], feeds["class_embeddings"], class_bias=feeds.get("class_bias"))
        return {ADAPTER.outputs[0]: _as_numpy(refined)}

    return run


def _device_of(backend) -> str:
    """What ran the graphs: the ORT providers the sessions use, else the backend's device."""
    if backend.providers:
        return "ORT " + "+".join(p.replace("ExecutionProvider", "") for p in backend.providers)
    dev = getattr(backend, "device", None)
    return str(dev) if dev is not None else ""


def check_backend(backend, reference: Mapping[str, dict[str, Any]], precision: str) -> list[CheckRow]:
    """Rows for every graph of ``reference`` that ``backend`` has (detector, adapter)."""
    rows = []
    for graph, ref in reference.items():
        if not getattr(backend, f"has_{graph}", False):
            continue
        # Every backend takes numpy feeds and moves them where it runs (ORT host, torch/TensorRT device).
        rep = cross_validate(lambda _f, _r=ref: _r["outputs"], _runner(backend, graph), [ref["feeds"]], TOLERANCES[precision],
                             spec=adapter_spec(backend.bundle.manifest.adapter) if graph == "adapter" else SPECS[graph], graph=graph,
                             precision=precision, inputs=ref["inputs"])
        rows.append(CheckRow(graph, backend.name, precision, _device_of(backend), rep.max_abs_error, rep.topk_agreement,
                             "pass" if rep.passed else "FAIL", "; ".join(rep.failures)))
    return rows


def check_bundle(
    bundle,
    backends: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    *,
    device: str | None = None,
    threads: int | None = None,
    on_engine_mismatch: str = "rebuild",
) -> CheckReport:
    """Rerun every graph of ``bundle`` (a ``Bundle`` or its directory) on every planned backend/precision.

    ``device``: passed to ``make_backend`` (None: each backend's natural device: torch and ORT on
    the CPU, TensorRT on the GPU). A backend that fails to load gives a FAIL row naming the error.
    """
    from .backends import make_backend
    from .bundle import Bundle, load_bundle
    from .errors import RtrtError

    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    reference = load_reference(b)
    report = CheckReport(str(b.root), machine_info(), reference_inputs={g: r["inputs"] for g, r in reference.items()})
    for name, precision, skip in planned_checks(b, backends, precisions, device):
        if skip:
            report.rows.append(CheckRow("*", name, precision, verdict="skipped", detail=skip))
            continue
        dev = device if device is not None else ("cpu" if name in ("torch", "ort") else None)
        try:
            backend = make_backend(name, b, device=dev, precision=precision, threads=threads, on_engine_mismatch=on_engine_mismatch)
        except RtrtError as e:
            report.rows.append(CheckRow("*", name, precision, verdict="FAIL", detail=f"cannot load: {e}"))
            continue
        report.rows.extend(check_backend(backend, reference, precision))
    return report


def verify_backend(bundle, backend, precision: str) -> list[CheckRow]:
    """``check_backend`` for a loaded backend; ``ParityError`` (one line) when a graph fails.

    What ``Pipeline.from_bundle(verify=True)`` runs at start-up.
    """
    rows = check_backend(backend, load_reference(bundle), precision)
    bad = [r for r in rows if r.failed]
    if bad:
        r = bad[0]
        raise ParityError(f"{r.graph} on {r.backend} {r.precision} ({r.device}) differs from the bundle's reference "
                          f"on this machine: {r.detail}; run `rtrt check --bundle {bundle.root}` for the full table")
    return rows
