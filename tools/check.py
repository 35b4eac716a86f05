"""``rtrt check``: does a bundle still hold on this machine? Every graph, every backend, against its reference.

    rtrt check                                   # the embedded demo bundle, every backend available here
    rtrt check --bundle B --backend ort --precision int8
    rtrt check --bundle B --backend trt          # on the vehicle / GPU workstation: validates the TensorRT paths
    rtrt check --bundle B --json                 # one JSON object for CI and fleet logs

Reruns the bundle's graphs on the reference inputs stored at export (``reference.safetensors``) and
prints graph, backend, precision, what ran it, max error, top-5 agreement and verdict, with this
machine's CPU model, ISA flags, GPU and runtime versions. Exit 0 when everything passes, 1 when a
parity fails, 2 for bad input (no such bundle, a backend or precision this machine or bundle
cannot run, a bundle exported before references existed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from rtrt.runtime.names import BACKENDS, MISMATCH_POLICIES, PRECISIONS

__all__ = ["parse_args", "main"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rtrt check", description=__doc__.split("\n")[0].strip("`"))
    p.add_argument("--bundle", default=None, help="bundle directory (default: the embedded demo bundle)")
    p.add_argument("--backend", choices=BACKENDS, action="append", default=None,
                   help="check only this backend (repeatable; default: every backend available on this machine)")
    p.add_argument("--precision", choices=PRECISIONS, action="append", default=None,
                   help="check only this precision (repeatable; default: every precision the bundle carries)")
    p.add_argument("--device", default=None, help="device for every backend, e.g. cpu or cuda:0 (default: torch/ORT on the CPU, TensorRT on the GPU)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: every core this process may use)")
    p.add_argument("--on-engine-mismatch", default="rebuild", choices=MISMATCH_POLICIES,
                   help="a recorded TensorRT engine built for another GPU/TensorRT: rebuild it here (default), fall back to ort, or fail")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object instead of the table")
    p.add_argument("--verbose", action="store_true",
                   help="let third-party libraries print their logs, warnings and progress bars (the rtrt command line silences them)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from rtrt.runtime.check import check_bundle
    from rtrt.runtime.errors import InputError

    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be at least 1")
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        from rtrt.runtime.assets import default_bundle

        bundle = default_bundle()
    report = check_bundle(bundle, args.backend, args.precision, device=args.device, threads=args.threads,
                          on_engine_mismatch=args.on_engine_mismatch)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report.table())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
