"""Does the demo's one command build the same bundle on another CPU? Build, fingerprint, compare.

    python -m rtrt.tools.demo.repro --out DIR [--preset tiny] [--threads 1] [--isa native|avx2]
                                    [--json FP.json] [--compare REF.json]
    python -m rtrt.tools.demo.repro --fingerprint DIR [--json FP.json] [--compare REF.json]

The first form runs ``python -m rtrt.tools.demo.build --out DIR --seed 0`` in a child process (its
output in ``DIR.log``). With
``--isa avx2`` the child's CPU kernels are pinned to AVX2 before torch loads: ATen's dispatch
(``ATEN_CPU_CAPABILITY=avx2``), MKL's conditional numerical reproducibility
(``MKL_CBWR=AVX2,STRICT``) and oneDNN's ISA ceiling (``ONEDNN_MAX_CPU_ISA=AVX2``); ``native``
(default) leaves them as the CPU picks. The second form fingerprints a build already there.

The fingerprint is the SHA-256 of every file of ``DIR/bundle`` (the models, graphs and check
reference; the manifest by its ``detector`` and ``adapter`` sections, the calibration, since its
other fields hold paths and times; ``vlm/demo_vlm.json`` left out for the same reason) and of
``DIR/examples``, with the CPU model, its ISA flags, the pinned variables and the library versions.
``--compare`` prints the files whose hashes differ from a fingerprint made elsewhere and exits 1 when
any does (0 when all agree; a version mismatch is printed, since other library versions round
otherwise). Same CPU model, same command: the build repeats byte for byte (tests); across CPU
models the weights differ unpinned, and whether a pinned build repeats is what this measures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from rtrt.tools.demo.build import ISA_PINS as PINS  # --isa VALUE -> the environment the build runs under
from rtrt.tools.demo.build import isa_refusal

__all__ = ["PINS", "fingerprint", "compare", "main"]

SKIPPED = ("manifest.json", "vlm/demo_vlm.json")  # paths and times; the manifest's calibration is hashed on its own
LIBRARIES = ("torch", "numpy", "onnxruntime", "transformers", "timm")


def _cpu() -> dict:
    from rtrt.runtime.machine import cpu_flags, cpu_model

    return {"model": cpu_model(), "machine": platform.machine(), "flags": cpu_flags()}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def fingerprint(build_dir: str | Path) -> dict:
    """The hashes of a demo build's bundle and examples (module docstring), with where it was made."""
    from rtrt.runtime.fileio import sha256_file

    build_dir = Path(build_dir)
    bundle = build_dir / "bundle"
    if not (bundle / "manifest.json").is_file():
        raise FileNotFoundError(f"{bundle}: no demo bundle (manifest.json) to fingerprint")
    files = {}
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle).as_posix()
        if p.is_file() and rel not in SKIPPED:
            files[f"bundle/{rel}"] = sha256_file(p)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for section in ("detector", "adapter"):
        files[f"bundle/manifest.json#{section}"] = hashlib.sha256(json.dumps(manifest.get(section), sort_keys=True).encode()).hexdigest()
    for p in sorted((build_dir / "examples").glob("*")):
        if p.is_file():
            files[f"examples/{p.name}"] = sha256_file(p)
    report = build_dir / "build_report.json"
    meta = json.loads(report.read_text()) if report.is_file() else {}
    return {"cpu": _cpu(), "versions": _versions(), "isa_env": meta.get("isa_env", {}), "preset": meta.get("preset"),
            "seed": meta.get("seed"), "threads": meta.get("threads"), "files": files}


def compare(a: dict, b: dict) -> tuple[list[str], list[str]]:
    """(files whose hashes differ or exist in one only, notes on what else differs: versions, pins, plan)."""
    fa, fb = a["files"], b["files"]
    differ = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    notes = [f"{key}: {a.get(key)} vs {b.get(key)}" for key in ("versions", "isa_env", "preset", "seed", "threads")
             if a.get(key) != b.get(key)]
    return differ, notes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rtrt.tools.demo.repro",
                                description="Build the demo (the tiny preset by default) with the CPU kernels pinned or not, "
                                            "fingerprint the bundle and compare it with a fingerprint made on another machine.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="build into this directory (python -m rtrt.tools.demo.build --out DIR --seed 0)")
    what.add_argument("--fingerprint", metavar="DIR", help="fingerprint a demo build already in DIR (its bundle/ and examples/)")
    p.add_argument("--preset", default="tiny", choices=("full", "small", "tiny"), help="the build's preset (default: tiny, seconds)")
    p.add_argument("--threads", type=int, default=1, help="the build's torch threads (default 1)")
    p.add_argument("--isa", choices=tuple(PINS), default="native",
                   help="avx2: pin ATen, MKL and oneDNN to AVX2 in the build's process (x86-64 only); native: as the CPU picks")
    p.add_argument("--json", help="write the fingerprint here")
    p.add_argument("--compare", metavar="REF", help="a fingerprint JSON made elsewhere: print the files that differ, exit 1 if any")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out:
        refusal = isa_refusal(args.isa)
        if refusal:
            print(f"rtrt demo repro: error: {refusal}", file=sys.stderr)
            return 2
        # The pins are set here (and native strips any), so the build runs them in its own process.
        env = {k: v for k, v in os.environ.items() if k not in PINS["avx2"]} | PINS[args.isa]
        cmd = [sys.executable, "-m", "rtrt.tools.demo.build", "--out", str(args.out), "--seed", "0", "--preset", args.preset,
               "--threads", str(args.threads), "--isa", args.isa, "--quiet"]
        log = Path(str(args.out) + ".log")
        with open(log, "wb") as f:
            done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            print(f"rtrt demo repro: error: the build failed (exit {done.returncode}; its output in {log}): {' '.join(cmd)}",
                  file=sys.stderr)
            return 2
    build_dir = Path(args.out or args.fingerprint)
    try:
        fp = fingerprint(build_dir)
    except FileNotFoundError as e:
        print(f"rtrt demo repro: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        from rtrt.runtime.fileio import atomic_write_json

        atomic_write_json(args.json, fp)
    print(f"{len(fp['files'])} files fingerprinted ({fp['cpu']['model']}; pinned: {fp['isa_env'] or 'no'})")
    if not args.compare:
        return 0
    try:
        ref = json.loads(Path(args.compare).read_text())
    except (OSError, ValueError) as e:
        print(f"rtrt demo repro: error: --compare {args.compare}: {e}", file=sys.stderr)
        return 2
    differ, notes = compare(fp, ref)
    for note in notes:
        print(f"note: {note}")
    for name in differ:
        print(f"differs: {name}")
    print(f"{len(fp['files']) - len([d for d in differ if d in fp['files']])} of {len(fp['files'])} files equal to "
          f"{args.compare} (made on {ref.get('cpu', {}).get('model')})")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
