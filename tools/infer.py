"""``rtrt infer``: answer a question about one image with the plug-in, from the command line.

    rtrt infer --image scene.png                       # the embedded demo bundle
    rtrt infer --image scene.png --bundle B --json     # one JSON object for machines
    rtrt infer --image scene.png --viz heat.png        # detector heatmap for a person

Bad input prints one line naming the problem and exits with code 2 (``rtrt --debug infer``
shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from rtrt.runtime.assets import default_bundle
from rtrt.runtime.errors import InputError
from rtrt.runtime.modules import display_name

__all__ = ["parse_args", "main"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rtrt infer", description=__doc__.split("\n")[0].strip("`"))
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the embedded demo bundle)")
    p.add_argument("--question", default=None, help="question to ask (default: CODA-LM's general-perception question)")
    p.add_argument("--backend", default="ort", choices=["ort", "trt", "torch"], help="detector/adapter backend (default: ort)")
    p.add_argument("--vlm", default=None, help="override the bundle's VLM (local directory or hub id)")
    p.add_argument("--device", default="cpu",
                   help="torch device for the VLM (and ONNX Runtime's GPU providers when not cpu), e.g. cpu or cuda:0; "
                        "one that is not on this machine is refused (default: cpu)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object {answer, detections, timings_ms, backend, precision, providers}")
    p.add_argument("--viz", default=None, metavar="OUT.png", help="write the detector heatmap with names and scores")
    p.add_argument("--no-hints", action="store_true", help="do not put detected names into the prompt")
    p.add_argument("--no-refine", action="store_true", help="do not refine the visual tokens with the adapter")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer length limit in tokens (default: 96)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="graph precision: int8 uses the bundle's *.int8.onnx graphs (rtrt export --precision int8) "
                        "or int8 TensorRT engines; fp16 needs TensorRT (the engines or onnxruntime's TensorRT provider "
                        "on a GPU); one the backend cannot run here is refused, never run as fp32 (default: fp32)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads of the detector and adapter (default: every core this process may use)")
    p.add_argument(
        "--on-engine-mismatch", default="rebuild", choices=["rebuild", "fallback", "fail"],
        help="what to do when a cached TensorRT engine was built for another GPU/TensorRT (default: rebuild)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    bundle = Path(args.bundle) if args.bundle else default_bundle()
    from rtrt.runtime.image import load_image
    from rtrt.runtime.pipeline import Pipeline

    image = load_image(args.image)  # fail fast on a bad image before loading models
    pipe = Pipeline.from_bundle(
        bundle, backend=args.backend, vlm=args.vlm, device=args.device,
        max_new_tokens=args.max_new_tokens, on_engine_mismatch=args.on_engine_mismatch, precision=args.precision,
        threads=args.threads,
    )
    res = pipe(image, args.question, hints=not args.no_hints, refine=not args.no_refine)
    if args.viz:
        from rtrt.tools.viz import save_viz

        save_viz(args.viz, image, res.similarity, res.detections, pipe.detector_cfg.threshold)
    if args.json:
        print(json.dumps(res.to_dict()))
        return 0
    print(res.answer)
    print()
    if res.detections:
        print("rare objects: " + ", ".join(f"{display_name(d.name)} ({d.score:.2f})" for d in res.detections))
    else:
        print("rare objects: none above threshold")
    print("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in res.timings_ms.items()))
    if args.viz:
        print(f"heatmap written to {args.viz}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
