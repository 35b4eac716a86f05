"""How well detection boxes locate the objects: IoU with the annotated boxes on a generated world.

For every true detection (the detected class is annotated in the image) the box ``locate`` read
off the class's similarity map is compared with the annotated boxes of that class: IoU with the
best-matching instance, whether the box holds an instance's centre, whether the peak lies in an
instance's box. The boxes of every object come from the world generator's scene (re-sampled from
the split's seed, checked against the annotation's region boxes), so rows of cones and objects
beyond the annotation's four region questions count too.

The shipped rule (``BOX_CUT``, ``BOX_UPSAMPLE``) is measured together with the alternatives it was
chosen from (relative cuts, the decision threshold as a fixed cut, the patch grid without
upsampling)::

    python -m rtrt.tools.benchmarks.boxes                       # the demo test split (demo_test_world())
    python -m rtrt.tools.benchmarks.boxes --world data/world7   # any generated world (its test split)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["VARIANTS", "iou", "measure", "parse_args", "main"]

# (label, keyword arguments of ``locate``); None means the shipped defaults.
VARIANTS: list[tuple[str, dict | None]] = [
    ("shipped", None),
    ("grid, cut 0.5", {"cut": 0.5, "upsample": 1}),
    ("grid, cut 0.7", {"cut": 0.7, "upsample": 1}),
    ("grid, cut 0.8", {"cut": 0.8, "upsample": 1}),
    ("grid, threshold", {"upsample": 1, "level": "threshold"}),
    ("x4, cut 0.5", {"cut": 0.5, "upsample": 4}),
    ("x4, cut 0.7", {"cut": 0.7, "upsample": 4}),
    ("x4, cut 0.9", {"cut": 0.9, "upsample": 4}),
    ("x4, threshold", {"upsample": 4, "level": "threshold"}),
]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _scene_boxes(root: Path, split: str) -> dict[str, list[tuple[str, list[float]]]]:
    """image stem -> [(category, [x0, y0, x1, y1])] of every object the generator drew."""
    import numpy as np

    from rtrt.tools.demo.world import SPLITS, WorldConfig, sample_scene

    cfg = WorldConfig(**json.loads((root / "world.json").read_text())["config"])
    out = {}
    for p in sorted((root / split / "images").iterdir()):
        scene = sample_scene(cfg, np.random.default_rng([cfg.seed, SPLITS[split], int(p.stem)]))
        objs = [(o.category, [float(o.box[0]), float(o.box[1]), float(o.box[0] + o.box[2]), float(o.box[1] + o.box[3])])
                for o in scene.objects]
        ann = json.loads((root / "CODA-LM" / split / f"{split}_{p.stem}.json").read_text())
        for r in (ann.get("region_perception") or {}).values():  # the re-sampled scene is the annotated one
            x, y, w, h = r["box"]
            if (r["category_name"], [x, y, x + w, y + h]) not in objs:
                raise RuntimeError(f"{p}: annotated {r['category_name']} box {r['box']} is not in the re-sampled scene")
        out[p.name] = objs
    return out


def measure(world: Path, bundle: Path, split: str = "test", backend: str = "ort", progress: bool = True) -> dict:
    """Per variant: true detections, mean/median IoU, share with IoU >= 0.5, centre-in-box, peak-in-object."""
    import numpy as np
    from tqdm import tqdm

    from rtrt.runtime import Pipeline
    from rtrt.runtime.image import load_image
    from rtrt.runtime.modules import locate

    truth = _scene_boxes(world, split)
    pipe = Pipeline.from_bundle(bundle, backend, load_vlm_model=False)
    cfg = pipe.detector_cfg
    stats = {name: {"iou": [], "centre": [], "peak": []} for name, _ in VARIANTS}
    for name in tqdm(sorted(truth), desc="boxes", unit="img", disable=not progress):
        image = load_image(world / split / "images" / name)
        res = pipe.detect(image)
        width, height = image.size
        for det in res.detections:
            objs = [b for cat, b in truth[name] if cat == det.name]
            if not objs:
                continue  # a false detection: no box to compare with
            for label, kw in VARIANTS:
                if kw is None:
                    box, peak = det.box, det.peak
                    if (box, peak) != locate(res.similarity[det.index], width, height):
                        raise RuntimeError(f"{name}: the pipeline's box differs from locate()'s")
                else:
                    kw = dict(kw)
                    if kw.get("level") == "threshold":
                        kw["level"] = cfg.threshold
                    box, peak = locate(res.similarity[det.index], width, height, **kw)
                s = stats[label]
                s["iou"].append(max(iou(box, o) for o in objs))
                s["centre"].append(any(box[0] <= (o[0] + o[2]) / 2 <= box[2] and box[1] <= (o[1] + o[3]) / 2 <= box[3]
                                       for o in objs))
                s["peak"].append(any(o[0] <= peak[0] <= o[2] and o[1] <= peak[1] <= o[3] for o in objs))
    out = {}
    for label, s in stats.items():
        a = np.asarray(s["iou"], dtype=np.float64)
        out[label] = {
            "true_detections": int(a.size),
            "mean_iou": float(a.mean()) if a.size else None,
            "median_iou": float(np.median(a)) if a.size else None,
            "iou_ge_0.5": float((a >= 0.5).mean()) if a.size else None,
            "centre_in_box": float(np.mean(s["centre"])) if a.size else None,
            "peak_in_object": float(np.mean(s["peak"])) if a.size else None,
        }
    return out


def _table(results: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| rule | true detections | mean IoU | median IoU | IoU >= 0.5 | centre in box | peak in object |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['true_detections']} | {num(r['mean_iou'])} | {num(r['median_iou'])} | "
                     f"{pct(r['iou_ge_0.5'])} | {pct(r['centre_in_box'])} | {pct(r['peak_in_object'])} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m rtrt.tools.benchmarks.boxes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", default=None, help="a generated world's root (default: the demo test split, generated on first use)")
    ap.add_argument("--split", default="test", help="split of the world to measure (default: test)")
    ap.add_argument("--bundle", default=None, help="bundle to run (default: the shipped demo bundle)")
    ap.add_argument("--backend", default="ort", help="detector backend (default: ort)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from rtrt.runtime.modules import BOX_CUT, BOX_UPSAMPLE

    if args.world:
        world = Path(args.world)
    else:
        from rtrt.tools.eval import demo_test_world

        world = demo_test_world()
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        from rtrt.runtime.assets import default_bundle

        bundle = default_bundle()
    results = measure(world, bundle, args.split, args.backend)
    print(f"{world} ({args.split}); shipped rule: cut {BOX_CUT} of the way from median to peak, x{BOX_UPSAMPLE} upsampled")
    print(_table(results))
    if args.json:
        from rtrt.runtime.fileio import atomic_write_bytes

        atomic_write_bytes(Path(args.json), (json.dumps(results, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
