"""Comparing a graph's outputs with reference outputs: tolerances, top-k agreement, parity reports.

``cross_validate(reference, candidate, cases, tol)`` runs both on every case and reports the max
abs error of every float output and, for the detector, the top-k agreement of the class ranking;
``passed`` says whether everything is inside the tolerance. ``TOLERANCES`` is per precision.
Used by ``rtrt export`` (reference: the bundle's PyTorch modules) and by ``rtrt check`` /
``Pipeline.from_bundle(verify=True)`` (reference: the outputs stored in the bundle), so the same
rule judges a graph at export and on the target machine. Every report records the machine it was
measured on (``rtrt.runtime.machine``). Only numpy is needed here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .machine import machine_info
from .names import GraphSpec

__all__ = ["Feeds", "Runner", "Tolerance", "TOLERANCES", "ParityReport", "rank_classes", "topk_agreement", "cross_validate"]

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
    machine: dict = field(default_factory=dict)  # rtrt.runtime.machine.machine_info() of the machine that ran both

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
    rep = ParityReport(graph=graph, precision=precision, tolerance=asdict(tol), inputs=inputs, machine=machine_info())
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
