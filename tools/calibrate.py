"""``rtrt calibrate``: per-class hint decisions fitted on a held-out split, written into the bundle.

    rtrt calibrate --bundle B --data WORLD --split val             # fit, report, write
    rtrt calibrate --bundle B --data WORLD --split val --dry-run   # report only

The detector's raw cosine scores are not comparable across classes (on the demo bundle absent
classes score 0.48 on average, so the 0.3 threshold never applies and every image gets ``top_k``
hints). Calibration standardises each class's score by its mean and standard deviation over the
split's images, and a class is hinted when its z-score exceeds one threshold, at most ``k`` per
image, best z first (``rtrt.runtime.modules.select_detections``). ``--z`` and ``--max-hints``
default to ``auto``: the pair with the best micro hint F1 against the detector's classes each
image's annotation holds, on this split; ``--min-precision P``: instead, the pair with the highest
hint recall at a precision of at least P there. Fit on a split you do not report (val), then measure on
another (``rtrt eval`` on test). The statistics, the threshold and ``k`` land in the manifest's
``detector`` section in one atomic bundle update. ``--refine-mask-z Z`` also sets the bundle's default
refinement mask (``manifest.adapter.refine_mask_z``, see ``Pipeline.refine_mask_z``), which the
calibrated z-scores decide; ``off`` removes it; ``--refine-mask-classes reported|unhinted`` keeps only the cells
whose best class the detector reports for the image, or the hint does not name
(``manifest.adapter.refine_mask_classes``). Region questions (``Pipeline(..., region=box)``) are
hinted with the box's best class (``region_detection``) when its z-score exceeds
``detector.region_z_threshold``, fitted by the same rule over the split's region boxes (``--region-z``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from rtrt.runtime.names import REFINE_MASK_CLASSES

__all__ = ["fit_calibration", "fit_region_threshold", "hint_quality", "parse_args", "main"]

_Z_GRID = tuple(round(0.1 * i, 1) for i in range(0, 41))  # 0.0 .. 4.0
_REGION_Z_GRID = tuple(round(0.1 * i, 1) for i in range(-40, 41))  # -4.0 .. 4.0 (a box's mean sits below an image's max)


def hint_quality(hinted: Sequence[Sequence[int]], present: Sequence[set[int]]) -> dict[str, float]:
    """Micro precision, recall and F1 (0-100) of hinted class indices, and the share of images
    without any rare class that get no hint."""
    tp = fp = fn = 0
    empty_ok = empty = 0
    for h, truth in zip(hinted, present):
        h = set(h)
        tp, fp, fn = tp + len(h & truth), fp + len(h - truth), fn + len(truth - h)
        if not truth:
            empty += 1
            empty_ok += not h
    p = 100.0 * tp / (tp + fp) if tp + fp else 0.0
    r = 100.0 * tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "per_image": (tp + fp) / max(len(hinted), 1), "no_hint_when_nothing_rare": 100.0 * empty_ok / empty if empty else None}


def _hinted(values: np.ndarray, threshold: float, k: int) -> list[list[int]]:
    """Hinted class indices per row, by the runtime's own rule (``select_detections``), so the fit is what runs."""
    from rtrt.runtime.modules import select_detections

    names = [str(i) for i in range(values.shape[-1])]
    return [[d.index for d in select_detections(row, names, k, threshold)] for row in values]


def fit_calibration(scores: np.ndarray, present: Sequence[set[int]], *, z: float | None = None, max_hints: int | None = None,
                    top_k: int = 5, min_precision: float | None = None, stats: str = "all") -> dict:
    """Per-class mean/std of ``scores`` [N, C] and the (z threshold, k) with the best hint F1 (or the given ones).

    ``min_precision`` (0-100): instead of the best F1, the pair with the highest hint recall whose
    precision on this split is at least that (ties: the higher precision); when no pair reaches it,
    the best F1 as without it (``quality["min_precision_met"]`` says which).
    ``stats``: ``"all"`` standardises each class by its scores on every image; ``"absent"`` by its
    scores on the images that do not hold it (one threshold then means one false-hint rate per class,
    whatever the class's prevalence; a class with fewer than 2 such images falls back to every image)."""
    if stats not in ("all", "absent"):
        raise ValueError(f"stats must be 'all' or 'absent', not {stats!r}")
    scores = np.asarray(scores, dtype=np.float64)
    mean = scores.mean(axis=0)
    std = np.maximum(scores.std(axis=0), 1e-6)
    if stats == "absent":
        for c in range(scores.shape[1]):
            absent = np.array([c not in p for p in present], dtype=bool)
            if absent.sum() >= 2:
                mean[c] = scores[absent, c].mean()
                std[c] = max(scores[absent, c].std(), 1e-6)
    zs = (scores - mean) / std
    ks = [max_hints] if max_hints else list(range(1, max(top_k, 1) + 1))
    thresholds = [z] if z is not None else list(_Z_GRID)
    best = None
    for k in ks:
        for t in thresholds:
            q = hint_quality(_hinted(zs, t, k), present)
            met = min_precision is not None and q["precision"] >= min_precision
            key = (1, q["recall"], q["precision"], -k, t) if met else (0, q["f1"], q["precision"], -k, t)
            if best is None or key > best[0]:
                best = (key, t, k, q)
    key, t, k, q = best
    if min_precision is not None:
        q = {**q, "min_precision": float(min_precision), "min_precision_met": bool(key[0])}
    return {"score_mean": [float(v) for v in mean], "score_std": [float(v) for v in std], "z_threshold": float(t),
            "top_k": int(k), "stats": stats, "quality": q}


def region_quality(z: np.ndarray, right: np.ndarray, rare: np.ndarray, threshold: float | None) -> dict[str, float]:
    """Precision and recall (0-100) of region hints: hinted = the box's best class's z-score above ``threshold``
    (None: every box); precision over the hinted boxes, recall over the boxes holding a rare class."""
    on = np.ones_like(right, dtype=bool) if threshold is None else np.asarray(z) > threshold
    tp = int((on & right).sum())
    p = 100.0 * tp / on.sum() if on.sum() else 0.0
    r = 100.0 * tp / rare.sum() if rare.sum() else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "per_region": float(on.mean()) if on.size else 0.0, "regions": int(on.size), "rare_regions": int(rare.sum())}


def fit_region_threshold(z, right, rare, *, min_precision: float | None = None) -> dict:
    """The region-hint threshold by ``fit_calibration``'s rule, over the boxes of a split's region questions.

    ``z`` [R]: the z-score of each box's best class (its mean similarity over the box, standardised by
    the calibration's per-class statistics), ``right`` [R]: that class is the box's category, ``rare``
    [R]: the box holds one of the detector's classes. Candidates: no threshold (every box hinted) and
    -4.0 to 4.0 in steps of 0.1. ``min_precision``: the highest recall at a precision of at least that
    (ties: the higher precision, then the higher threshold), else (or when none reaches it) the best F1."""
    z, right, rare = (np.asarray(v) for v in (z, right, rare))
    if not (z.shape == right.shape == rare.shape) or z.ndim != 1:
        raise ValueError(f"z, right and rare must be 1-D of one length, got {z.shape}, {right.shape}, {rare.shape}")
    best = None
    for t in (None, *_REGION_Z_GRID):
        q = region_quality(z, right.astype(bool), rare.astype(bool), t)
        met = min_precision is not None and q["precision"] >= min_precision
        order = -1e9 if t is None else t
        key = (1, q["recall"], q["precision"], order) if met else (0, q["f1"], q["precision"], order)
        if best is None or key > best[0]:
            best = (key, t, q)
    key, t, q = best
    if min_precision is not None:
        q = {**q, "min_precision": float(min_precision), "min_precision_met": bool(key[0])}
    return {"region_z_threshold": None if t is None else float(t), "quality": q}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rtrt calibrate", description=__doc__.split("\n")[0].replace("``", ""))
    p.add_argument("--bundle", required=True, help="bundle directory to calibrate (its manifest's detector section is updated)")
    p.add_argument("--data", required=True, help="dataset root in CODA-LM layout (e.g. a world from rtrt world)")
    p.add_argument("--split", default="val", help="split folder under CODA-LM/ to fit on (default: val; never the split you report)")
    p.add_argument("--z", default="auto", help="z-score threshold, or auto: the best hint F1 on the split (default: auto)")
    p.add_argument("--max-hints", default="auto", help="at most this many hints per image, or auto (1 to the bundle's top_k; default: auto)")
    p.add_argument("--min-precision", type=float, default=None, metavar="P",
                   help="with auto --z/--max-hints: the highest hint recall whose precision on the split is at least P "
                        "percent, instead of the best F1 (falls back to the best F1, and says so, when none reaches P)")
    p.add_argument("--stats", choices=("all", "absent"), default="all",
                   help="each class's mean/std over every image of the split (all), or over the images that do not hold it "
                        "(absent: one z threshold then means one false-hint rate per class; an addition, ablated in the "
                        "README) (default: all)")
    p.add_argument("--region-z", default="auto", metavar="{auto,Z,off}",
                   help="region questions' hint (the box's best class) only when its z-score exceeds this: auto = fitted "
                        "on the split's region boxes by the same rule as the image hints (kept as it is when the split "
                        "has no rare region); off = always hinted (default: auto)")
    p.add_argument("--backend", choices=("ort", "torch", "trt"), default="ort", help="detector backend (default: ort)")
    p.add_argument("--batch-size", type=int, default=16, help="images per detector call (default: %(default)s)")
    p.add_argument("--refine-mask-z", type=_mask_arg, default="keep", metavar="{Z,off,keep}",
                   help="the bundle's default refinement mask (manifest adapter.refine_mask_z, what Pipeline and rtrt "
                        "infer/eval use unless told otherwise): Z = the adapter's change kept only at the image-token cells "
                        "where a class's calibrated z-score exceeds Z (an addition to the paper's method; LLaVA grids); "
                        "off = every token refined (the paper); keep = leave the bundle's setting (default: keep)")
    p.add_argument("--refine-mask-classes", default="keep", choices=(*REFINE_MASK_CLASSES, "keep"),
                   help="whose cells that mask keeps (manifest adapter.refine_mask_classes; an addition to the paper's "
                        "method): any = a cell where any class's z-score exceeds Z; reported = a cell whose best class "
                        "exceeds Z and is one the detector reports for the image; unhinted = a cell whose best class exceeds "
                        "Z and is not named by the prompt's hint (every class without hints); keep = leave the bundle's "
                        "setting (default: keep)")
    p.add_argument("--dry-run", action="store_true", help="print the fit and its hint quality without writing the bundle")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p.parse_args(argv)


def _mask_arg(text: str) -> float | str | None:
    from rtrt.tools.infer import refine_mask_arg

    return refine_mask_arg(text, default="keep")


def _check_mask_bundle(bundle) -> None:
    """A bundle that can run a refinement mask: an adapter, a LLaVA VLM (its fixed token grid), and an
    exported refined vision encoder (if any) that takes the mask; else one-line InputError."""
    from rtrt.runtime.errors import InputError
    from rtrt.runtime.names import VISION_ENCODER_REFINED, VLM_REFINE_MASK

    m = bundle.manifest
    if m.adapter is None:
        raise InputError(f"{bundle.root}: the refinement mask (--refine-mask-z, --refine-mask-classes) needs a bundle with an adapter")
    family = m.vlm.family if m.vlm is not None else None
    if family not in (None, "", "llava"):
        raise InputError(f"{bundle.root}: the refinement mask (--refine-mask-z, --refine-mask-classes) needs LLaVA's fixed image-token grid, not a {family!r} VLM")
    refined = m.exports.vlm.graph(VISION_ENCODER_REFINED) if m.exports.vlm is not None else None
    if refined is not None and VLM_REFINE_MASK not in refined.inputs:
        raise InputError(f"{bundle.root}: its exported refined vision encoder takes no refinement mask; re-export it with "
                         f"`rtrt export --bundle {bundle.root} --vlm` first")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from rtrt.runtime.errors import InputError
    from rtrt.runtime.image import load_image
    from rtrt.runtime.detection import region_means
    from rtrt.runtime.pipeline import Pipeline
    from rtrt.trainer.coda import iter_annotations, read_tasks, task_file

    def number(value: str, kind, name: str):
        if value == "auto":
            return None
        try:
            v = kind(value)
        except ValueError:
            raise InputError(f"{name} must be a number or auto, not {value!r}") from None
        if kind is int and v < 1:
            raise InputError(f"{name} must be at least 1")
        return v

    z = number(args.z, float, "--z")
    region_z = None
    if args.region_z not in ("auto", "off"):
        try:
            region_z = float(args.region_z)
        except ValueError:
            region_z = math.nan
        if not math.isfinite(region_z):
            raise InputError(f"--region-z must be a finite number, auto or off, not {args.region_z!r}")
    k = number(args.max_hints, int, "--max-hints")
    if args.min_precision is not None and not 0.0 <= args.min_precision <= 100.0:
        raise InputError(f"--min-precision must be a percentage from 0 to 100, not {args.min_precision:g}")
    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    split_dir = Path(args.data) / "CODA-LM" / args.split
    if not split_dir.is_dir():
        raise InputError(f"{split_dir}: no CODA-LM split {args.split!r} under {args.data}")
    pipe = Pipeline.from_bundle(args.bundle, backend=args.backend, load_vlm_model=False)
    adapter = pipe.bundle.manifest.adapter
    if args.refine_mask_z not in ("keep", None) or args.refine_mask_classes not in ("keep", "any"):
        _check_mask_bundle(pipe.bundle)
    mask_z = (adapter.refine_mask_z if adapter is not None else None) if args.refine_mask_z == "keep" else args.refine_mask_z
    mask_classes = (adapter.refine_mask_classes if adapter is not None else "any") if args.refine_mask_classes == "keep" \
        else args.refine_mask_classes
    names = pipe.class_names
    refs = read_tasks(task_file(split_dir / "vqa_anno", "general_perception"))
    anns = [a for _, a in iter_annotations(split_dir)]
    if not refs or len(refs) != len(anns):
        raise InputError(f"{split_dir}: {len(refs)} general questions for {len(anns)} annotations")
    present = [{names.index(r.category_name) for r in a.region_perception if r.category_name in names} for a in anns]
    scores, box_means, box_cats = [], [], []  # box_*: each region box's per-class mean similarity and its category
    for i in tqdm(range(0, len(refs), args.batch_size), desc="detector", disable=not sys.stderr.isatty(), leave=False):
        chunk = refs[i: i + args.batch_size]
        frames = [load_image(Path(args.data) / r.image) for r in chunk]
        for res, frame, ann in zip(pipe.detect_batch(frames), frames, anns[i: i + args.batch_size]):
            scores.append(np.asarray(res.scores, dtype=np.float64))
            if args.region_z == "auto" and np.ndim(res.similarity) == 3:
                for reg in ann.region_perception:
                    x, y, w, h = (float(v) for v in reg.box)
                    box_means.append(region_means(res.similarity, (x, y, x + w, y + h), frame.size))
                    box_cats.append(reg.category_name)
    fit = fit_calibration(np.stack(scores), present, z=z, max_hints=k, top_k=pipe.detector_cfg.top_k,
                          min_precision=args.min_precision, stats=args.stats)
    before = hint_quality(_hinted(np.stack(scores), pipe.detector_cfg.threshold, pipe.detector_cfg.top_k), present)
    # Region hints: the box's best class by its z-score under the statistics just fitted (``region_detection``).
    region_fit, rare_boxes = None, [c in names for c in box_cats]
    if args.region_z == "auto" and any(rare_boxes):
        bz = (np.stack(box_means) - np.asarray(fit["score_mean"])) / np.asarray(fit["score_std"])
        top = bz.argmax(axis=1)
        region_fit = fit_region_threshold(bz[np.arange(len(top)), top], np.array([names[t] == c for t, c in zip(top, box_cats)]),
                                          np.array(rare_boxes), min_precision=args.min_precision)
        region_threshold = region_fit["region_z_threshold"]
    elif args.region_z == "auto":  # nothing to fit on: the bundle's own setting stays (said below)
        region_threshold = pipe.detector_cfg.region_z_threshold
    else:
        region_threshold = region_z
    result = {"split": args.split, "images": len(scores), "calibration": {k_: v for k_, v in fit.items() if k_ != "quality"},
              "hints_before": before, "hints_after": fit["quality"], "refine_mask_z": mask_z,
              "refine_mask_classes": mask_classes, "region_z_threshold": region_threshold, "region_hints": None if region_fit is None else region_fit["quality"],
              "written": not args.dry_run}
    if not args.dry_run:
        b = pipe.bundle
        b.manifest.detector = dataclasses.replace(b.manifest.detector, score_mean=fit["score_mean"], score_std=fit["score_std"],
                                                  z_threshold=fit["z_threshold"], top_k=fit["top_k"],
                                                  region_z_threshold=region_threshold)
        if adapter is not None:
            b.manifest.adapter = dataclasses.replace(adapter, refine_mask_z=mask_z, refine_mask_classes=mask_classes)
        b.manifest.training["calibration"] = {"data": Path(args.data).name, "split": args.split, "images": len(scores),
                                              "min_precision": args.min_precision, "hints_after": fit["quality"],
                                              **({} if region_fit is None else {"region_hints": region_fit["quality"]}),
                                              **({} if args.stats == "all" else {"stats": args.stats})}
        b.add_files({})  # rewrites the manifest in one atomic bundle update
    if args.json:
        print(json.dumps(result))
        return 0
    q0, q1 = before, fit["quality"]
    print(f"fitted on {len(scores)} images of {args.split}: z > {fit['z_threshold']:.1f}, at most {fit['top_k']} hint(s)")
    if args.min_precision is not None:
        print(f"  rule: the highest recall at precision >= {args.min_precision:g}" if fit["quality"]["min_precision_met"]
              else f"  rule: no threshold reaches precision {args.min_precision:g} on this split; the best F1 instead")
    for label, q in (("before (raw threshold)", q0), ("after (calibrated)", q1)):
        empty = "-" if q["no_hint_when_nothing_rare"] is None else f"{q['no_hint_when_nothing_rare']:.0f}%"
        print(f"  {label:<22} precision {q['precision']:.1f}  recall {q['recall']:.1f}  F1 {q['f1']:.1f}  "
              f"hints/image {q['per_image']:.2f}  no hint when nothing rare {empty}")
    if region_fit is not None:
        rq = region_fit["quality"]
        print(f"  region questions ({rq['regions']} boxes, {rq['rare_regions']} rare): the box's best class hinted "
              + ("always" if region_threshold is None else f"when its z-score > {region_threshold:.1f}")
              + f": precision {rq['precision']:.1f}  recall {rq['recall']:.1f}  hinted {100 * rq['per_region']:.0f}% of boxes")
    else:
        print("  region questions: the box's best class hinted " + ("always" if region_threshold is None else
              f"when its z-score > {region_threshold:.1f}") + (" (kept: no rare region box on this split to fit on; it "
                                                               "was fitted under the earlier statistics, refit it with "
                                                               "--region-z on a split that has some)"
                                                               if args.region_z == "auto" else ""))
    if adapter is not None:
        print("  refinement: every visual token (the paper)" if mask_z is None else
              f"  refinement: only the image-token cells where a class's z-score exceeds {mask_z:g} (--refine-mask-z)"
              + {"reported": ", of the classes the detector reports (--refine-mask-classes reported)",
                 "unhinted": ", of the classes the hint does not name (--refine-mask-classes unhinted)"}.get(mask_classes, ""))
    print(f"{'(dry run, nothing written)' if args.dry_run else 'written to ' + str(pipe.bundle.root / 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
