"""``rtrt infer``: answer a question about images with the plug-in, from the command line.

    rtrt infer --image scene.png                       # the embedded demo bundle
    rtrt infer --image a.jpg b.jpg --json              # one JSON line per image, in the order given
    rtrt infer --image DIR --json                      # a folder's images, in name order
    rtrt infer --image scene.png --viz out.png         # each detection's box, label and score drawn on the image
    rtrt infer --image scene.png --viz out.png --viz-class stroller   # ... over that class's similarity map
    rtrt infer --image scene.png --warmup 3            # timings of a warm pipeline

The models load once for all images. Bad input prints one line naming the problem and exits with
code 2 (``rtrt --debug infer`` shows the traceback); a bad image stops a single-image run before
any model loads. In a run over several images a bad one does not stop the others: it prints one
line naming it on stderr (and, with ``--json``, an ``{"image", "error"}`` line in its place), and
the run exits with code 2 at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from rtrt.runtime.assets import default_bundle
from rtrt.runtime.errors import ImageError, InputError
from rtrt.runtime.names import BACKENDS, MISMATCH_POLICIES, PRECISIONS, REFINE_MASK_CLASSES, VLM_BACKENDS, VLM_PRECISIONS

__all__ = ["IMAGE_SUFFIXES", "REFINE_MASK_HELP", "REFINE_CLASSES_HELP", "image_paths", "refine_mask_arg", "parse_args", "main"]

# Files of a folder given to --image that are read as images (a file named directly is always tried).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")


REFINE_MASK_HELP = (
    "where the adapter's change is kept: Z = only at the image-token cells where a class's calibrated z-score of the "
    "detector's similarity exceeds Z (an addition to the paper's method: common objects and background reach the VLM "
    "unrefined; LLaVA grids); off = every visual token refined (the paper); bundle = the bundle's own setting "
    "(rtrt calibrate --refine-mask-z; the demo bundle's is 0) (default: bundle)")
REFINE_CLASSES_HELP = (
    "whose cells that mask keeps: any = a cell where any class's z-score exceeds Z; reported = a cell whose best class "
    "(highest z-score) exceeds Z and is one the detector reports for the image; unhinted = a cell whose best class "
    "exceeds Z and is not named by the prompt's hint (every class with --no-hints); bundle = the bundle's own setting "
    "(rtrt calibrate --refine-mask-classes) (default: bundle)")


def refine_mask_arg(text: str, default: str = "bundle") -> float | str | None:
    """``--refine-mask-z``: ``default`` (``bundle``: the bundle's setting), ``off`` (None: every token
    refined) or a finite number."""
    if text in (default, "off"):
        return None if text == "off" else text
    try:
        z = float(text)
    except ValueError:
        z = float("nan")
    if not math.isfinite(z):
        raise argparse.ArgumentTypeError(f"expected a finite number, off or {default}, not {text!r}")
    return z


def region_arg(text: str) -> tuple[float, float, float, float]:
    """``--region X0,Y0,X1,Y1``: four numbers (pixels)."""
    parts = [t.strip() for t in text.split(",")]
    try:
        vals = tuple(float(t) for t in parts)
    except ValueError:
        vals = ()
    if len(vals) != 4:
        raise argparse.ArgumentTypeError(f"expected X0,Y0,X1,Y1 (four numbers, pixels), got {text!r}")
    return vals  # type: ignore[return-value]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rtrt infer", description=__doc__.split("\n")[0].strip("`"))
    p.add_argument("--image", required=True, nargs="+", metavar="IMAGE",
                   help="image files (PNG, JPEG, ...) or folders (their images in name order); the models load once")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the embedded demo bundle)")
    p.add_argument("--question", default=None,
                   help="question to ask (default: CODA-LM's general-perception question; with --region its region question)")
    p.add_argument("--region", default=None, metavar="X0,Y0,X1,Y1", type=region_arg,
                   help="ask about this box (pixels of the image, which shows no box): the VLM sees it drawn in red as in "
                        "CODA-LM, and the hint is the one class the detector sees in it")
    p.add_argument("--backend", default="ort", choices=BACKENDS, help="detector/adapter backend (default: ort)")
    p.add_argument("--vlm", default=None, help="override the bundle's VLM (local directory or hub id; torch VLM backend)")
    p.add_argument("--refine-mask-z", type=refine_mask_arg, default="bundle", metavar="{Z,off,bundle}", help=REFINE_MASK_HELP)
    p.add_argument("--refine-mask-classes", default="bundle", choices=(*REFINE_MASK_CLASSES, "bundle"), help=REFINE_CLASSES_HELP)
    p.add_argument("--vlm-backend", default=None, choices=VLM_BACKENDS,
                   help="how the VLM runs: ort = the bundle's exported VLM on ONNX Runtime (no torch needed), torch = "
                        "transformers (default: ort when the bundle carries the exported VLM, else torch)")
    p.add_argument("--vlm-precision", default="fp32", choices=VLM_PRECISIONS,
                   help="the exported VLM's decoder: int8 = its int8 weight-only graph (ort VLM backend; default: fp32)")
    p.add_argument("--device", default="cpu",
                   help="torch device for the VLM (and ONNX Runtime's GPU providers when not cpu), e.g. cpu or cuda:0; "
                        "one that is not on this machine is refused (default: cpu)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line per image {image, answer, detections, timings_ms, warmup, backend, "
                        "precision, providers, vlm_backend}; each detection {name, label, score, box, peak}")
    p.add_argument("--viz", default=None, metavar="OUT.png",
                   help="write a picture with each detection's box, label and score; with several images, an existing "
                        "folder that gets IMAGE_STEM.viz.png per image (a missing folder is refused, never created)")
    p.add_argument("--viz-class", default=None, metavar="NAME",
                   help="also blend this class's similarity map under the boxes (machine name or label, e.g. garbage_bag)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed calls on the first image before the reported ones, so timings are warm (default: 0)")
    p.add_argument("--no-hints", action="store_true", help="do not put detected names into the prompt")
    p.add_argument("--no-refine", action="store_true", help="do not refine the visual tokens with the adapter")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer length limit in tokens (default: 96)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="graph precision: int8 uses the bundle's *.int8.onnx graphs (rtrt export --precision int8) "
                        "or int8 TensorRT engines; fp16 needs TensorRT (the engines or onnxruntime's TensorRT provider "
                        "on a GPU); one the backend cannot run here is refused, never run as fp32 (default: fp32)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads of the detector and adapter, and of the exported VLM (default: every core this process may use)")
    p.add_argument(
        "--on-engine-mismatch", default="rebuild", choices=MISMATCH_POLICIES,
        help="what to do when a cached TensorRT engine was built for another GPU/TensorRT (default: rebuild)",
    )
    p.add_argument("--verbose", action="store_true",
                   help="let third-party libraries print their logs, warnings and progress bars (rtrt silences them)")
    return p.parse_args(argv)


def image_paths(items: Sequence[str]) -> list[Path]:
    """The images ``--image`` names: files as given, each folder's image files in name order."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                raise InputError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            out += found
        else:
            out.append(p)
    return out


def _viz_targets(viz: str, images: Sequence[Path]) -> list[Path]:
    """Where each image's picture goes: ``viz`` itself for one image, ``viz/STEM.viz.png`` when it is a folder."""
    target = Path(viz)
    if target.is_dir():
        paths = [target / f"{p.stem}.viz.png" for p in images]
        seen: set[Path] = set()
        for p, img in zip(paths, images):
            if p in seen:
                raise InputError(f"--viz {viz}: two images would both write {p.name} (the second is {img})")
            seen.add(p)
        return paths
    if len(images) > 1:
        raise InputError(f"--viz {viz}: {len(images)} images need an existing folder for their pictures")
    if not target.parent.is_dir():
        raise InputError(f"--viz {viz}: folder {target.parent} does not exist")
    return [target]


def _print_text(res, warmup: int) -> None:
    print(res.answer)
    print()
    if res.detections:
        print("rare objects:")
        for d in res.detections:
            where = "" if d.box is None else " at [" + ", ".join(f"{v:.0f}" for v in d.box) + "]"
            print(f"  {d.label} ({d.score:.2f}){where}")
    else:
        print("rare objects: none above threshold")
    if res.region is not None:
        print("in the region [" + ", ".join(f"{v:.0f}" for v in res.region.box) + f"]: {res.region.label} ({res.region.score:.2f})")
    warm = f", after {warmup} warm-up call{'s' if warmup != 1 else ''}" if warmup else ""
    print(f"timings (ms{warm}): " + ", ".join(f"{k} {v:.1f}" for k, v in res.timings_ms.items()))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    if args.warmup < 0:
        raise InputError("--warmup must be at least 0")
    if args.viz_class is not None and args.viz is None:
        raise InputError("--viz-class needs --viz OUT.png")
    paths = image_paths(args.image)
    viz = _viz_targets(args.viz, paths) if args.viz else [None] * len(paths)
    bundle = Path(args.bundle) if args.bundle else default_bundle()
    from rtrt.runtime.image import load_image
    from rtrt.runtime.pipeline import Pipeline

    heat = None
    if args.viz_class is not None:  # refused before the models load: the manifest names the classes
        from rtrt.runtime.bundle import load_bundle
        from rtrt.tools.viz import class_index

        heat = class_index(args.viz_class, load_bundle(bundle, verify=False).manifest.class_names)
    several = len(paths) > 1
    first = None if several else load_image(paths[0])  # one image: fail fast on it before loading models
    pipe = Pipeline.from_bundle(
        bundle, backend=args.backend, vlm=args.vlm, device=args.device,
        max_new_tokens=args.max_new_tokens, on_engine_mismatch=args.on_engine_mismatch, precision=args.precision,
        threads=args.threads, vlm_backend=args.vlm_backend, vlm_precision=args.vlm_precision,
        refine_mask_z=args.refine_mask_z, refine_mask_classes=args.refine_mask_classes,
    )
    options = {"hints": not args.no_hints, "refine": not args.no_refine}
    question = args.question
    if args.region is not None:
        options["region"] = args.region
        if question is None:
            from rtrt.runtime.pipeline import REGION_QUESTION

            question = REGION_QUESTION
    failed = 0
    warm = args.warmup == 0
    if several:
        from tqdm import tqdm

        # A bar only for a person watching: never into a log or a pipe (a successful run's stderr stays empty).
        items = tqdm(paths, unit="image", disable=not sys.stderr.isatty())
    else:
        items = paths
    def skip(path, error: str, shown: str) -> None:
        """One image fails (one line on stderr, an error line with --json); the others still run."""
        print(f"rtrt infer: error: {shown}", file=sys.stderr)
        if args.json:
            print(json.dumps({"image": str(path), "error": error}), flush=True)

    for k, (path, out) in enumerate(zip(items, viz)):
        try:
            image = first if first is not None else load_image(path)
        except ImageError as e:
            failed += 1
            skip(path, str(e), str(e))
            continue
        if args.region is not None and several:  # a box that misses one image of several: that image fails, the rest run
            from rtrt.runtime.detection import check_region

            try:
                check_region(args.region, *image.size)
            except ValueError as e:
                failed += 1
                skip(path, str(e), f"{path}: {e}")
                continue
        if not warm:  # untimed calls on the first good image
            for _ in range(args.warmup):
                pipe(image, question, **options)
            warm = True
        res = pipe(image, question, **options)
        if out is not None:
            from rtrt.tools.viz import save_viz

            save_viz(out, image, res.detections, res.similarity, heat)
        if args.json:
            print(json.dumps({"image": str(path), **res.to_dict(), "warmup": args.warmup}), flush=True)
            continue
        if several:
            print(f"\n== {path} ==" if k else f"== {path} ==")
        _print_text(res, args.warmup)
        if out is not None:
            print(f"picture written to {out}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
