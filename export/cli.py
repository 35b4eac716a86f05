"""``rtrt export``: add ONNX graphs, int8 variants and TensorRT engines to a bundle, parity-checked.

    rtrt export --bundle B [--precision fp32|fp16|int8] [--image-size 448] [--backend onnx|trt|both]
                [--tolerance 1e-4] [--int8-topk-agreement 0.9] [--int8-method dynamic|static]
                [--images DIR] [--cache-dir DIR] [--vlm [--vlm-tolerance 1e-3]] [--tokens-vlm DIR]

Steps (each printed with its time):
1. ``detector.onnx`` (DINOv3 + detector + similarity map) and ``adapter.onnx``, each walked
   node by node for TensorRT-unfriendly constructs, then checked against the bundle's PyTorch
   modules in ONNX Runtime at several (B, C) / (B, N, C) on real inputs (``rtrt.export.parity``):
   images from ``--images`` and, for the adapter, visual tokens captured from the bundle's own VLM
   on those images (synthetic tokens when no VLM can be loaded).
   ``reference.safetensors``: the first ``--reference-images`` images, those tokens and W, with the
   PyTorch outputs for them, so that ``rtrt check`` can rerun every graph on the target machine.
2. ``--precision int8``: ``detector.int8.onnx`` / ``adapter.int8.onnx`` (ORT int8 for CPUs,
   ``--int8-method dynamic`` by default, or ``static``) with their own parity and top-5 agreement; with ``--backend trt|both`` also the
   symmetric QDQ graphs ``*.qdq.onnx`` TensorRT builds int8 engines from.
3. ``--backend trt|both``: engines via the content-keyed engine cache, then checked on the GPU.
4. ``--vlm``: the bundle's whole VLM in ONNX under ``vlm_onnx/`` (onnx-community layout: stock and
   refined vision encoders, token embedding, decoder with a KV cache; with ``--precision int8`` also
   the int8 weight-only decoder), checked against the torch VLM on two of the parity images: every
   graph within ``--vlm-tolerance`` times max(1, the output's largest magnitude), greedy tokens
   identical (``rtrt.export.vlm_onnx``); recorded as
   ``exports.vlm``. ``--precision fp16`` makes no VLM graphs and is refused with ``--vlm``.

Everything is produced in a temporary directory first. If any parity report is outside its
tolerance, the command fails (exit 2) and the bundle is untouched; otherwise the files are added
with ``Bundle.add_files`` and the reports land in ``manifest.exports`` (``rtrt.runtime.exports``:
``onnx``, ``reference``, ``engines``, ``vlm``) in the same manifest commit. File names: ``rtrt.runtime.names``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from rtrt.runtime.errors import run_cli
from rtrt.runtime.names import PRECISIONS
from rtrt.runtime.parity import TOLERANCES

from .common import BACKEND_CHOICES, INT8_METHODS, VLM_TOLERANCE

__all__ = ["parse_args", "main"]  # and export_bundle, loaded on first use (__getattr__)


def __getattr__(name: str):
    # ``export_bundle`` lives in the heavy module; importing it here lazily keeps --help fast.
    if name == "export_bundle":
        from .exporter import export_bundle

        return export_bundle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rtrt export", description="Export a bundle's detector and adapter to ONNX / TensorRT, parity-checked.")
    p.add_argument("--bundle", required=True, help="bundle directory to add the exported graphs to")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32: ONNX only (+ fp32 engines); fp16: + fp16 TensorRT engines; int8: + ORT int8 graphs (and int8 engines from QDQ)")
    p.add_argument("--image-size", type=int, default=None, help="square detector input side in pixels (default: the bundle's VFM image size)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="onnx", help="onnx: ONNX graphs only; trt or both: the ONNX graphs plus TensorRT engines built from them")
    p.add_argument("--tolerance", type=float, default=TOLERANCES["fp32"].atol, help="max abs error allowed for fp32 graphs vs PyTorch (default %(default)g)")
    p.add_argument("--fp16-tolerance", type=float, default=TOLERANCES["fp16"].atol, help="abs (and relative) error allowed for fp16 engines (default %(default)g)")
    p.add_argument("--int8-tolerance", type=float, default=TOLERANCES["int8"].atol, help="abs (and relative) error allowed for int8 graphs (default %(default)g)")
    p.add_argument("--int8-topk-agreement", type=float, default=TOLERANCES["int8"].topk_agreement,
                   help="minimum top-5 agreement of the int8 detector with PyTorch (default %(default)g)")
    p.add_argument("--images", default=None, help="directory of images for parity/calibration (default: synthetic road scenes)")
    p.add_argument("--int8-method", choices=INT8_METHODS, default="dynamic",
                   help="ORT int8 for CPUs: dynamic (weights only, no calibration; fastest here) or static (QDQ calibrated on --images)")
    p.add_argument("--family", choices=("llava", "qwen2_5_vl", "internvl"), default=None, help="VLM family for token-count profiles (default: the bundle's)")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch the TensorRT profiles accept (default %(default)s)")
    p.add_argument("--cache-dir", default=None, help="TensorRT engine cache (default $RTRT_ENGINE_CACHE or ~/.cache/rtrt/engines)")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace in GiB (default %(default)s)")
    p.add_argument("--tokens-vlm", default=None,
                   help="VLM (local directory) whose visual tokens feed the adapter's parity and reference cases (default: the bundle's)")
    p.add_argument("--vlm", action="store_true",
                   help="also export the bundle's whole VLM to ONNX under vlm_onnx/ (vision encoders, token embedding, decoder with KV "
                        "cache; with --precision int8 also an int8 weight-only decoder), parity-checked against PyTorch")
    p.add_argument("--vlm-tolerance", type=float, default=VLM_TOLERANCE,
                   help="max abs error of every fp32 VLM graph output vs PyTorch, logits included, times max(1, the output's largest magnitude) (default %(default)g)")
    p.add_argument("--reference-images", type=int, default=2,
                   help="how many parity images (and their VLM tokens) are stored in reference.safetensors for rtrt check (1-4, default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the exports written to the manifest as JSON on stdout")
    p.add_argument("--verbose", action="store_true", help="show the torch exporter's own output and third-party logs and warnings")
    p.add_argument("--debug", action="store_true", help="show the full traceback instead of a one-line error")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("rtrt export", lambda: _export(args), args.debug)


def _export(args: argparse.Namespace) -> int:
    tolerances = {
        "fp32": dataclasses.replace(TOLERANCES["fp32"], atol=args.tolerance),
        "fp16": dataclasses.replace(TOLERANCES["fp16"], atol=args.fp16_tolerance, rtol=args.fp16_tolerance),
        "int8": dataclasses.replace(TOLERANCES["int8"], atol=args.int8_tolerance, rtol=args.int8_tolerance, topk_agreement=args.int8_topk_agreement),
    }
    from .exporter import export_bundle

    exports = export_bundle(
        args.bundle,
        precision=args.precision,
        image_size=args.image_size,
        backend=args.backend,
        tolerances=tolerances,
        images=args.images,
        int8_method=args.int8_method,
        family=args.family,
        max_batch=args.max_batch,
        cache_dir=args.cache_dir,
        workspace_gb=args.workspace_gb,
        vlm=args.tokens_vlm,
        reference_images=args.reference_images,
        vlm_onnx=args.vlm,
        vlm_tolerance=args.vlm_tolerance,
        verbose=args.verbose,
    )
    if args.json:
        print(json.dumps(exports.to_dict(), indent=2))
    else:
        names = sorted(exports.graphs) + sorted(exports.engines) + (sorted(g.file for g in exports.vlm.graphs.values()) if args.vlm and exports.vlm else [])
        print(f"exported {', '.join(names)} into {args.bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
