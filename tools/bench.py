"""``rtrt bench``: per-stage latency of the pipeline and the plug-in's overhead, side by side in one run.

    rtrt bench                          # the embedded demo bundle on scene_1.jpg, the README's bench image
    rtrt bench --bundle B --image I --runs 20 --json
    rtrt bench --graphs                 # also the exported-graph benchmark (ORT vs eager, see export issue)

The baseline is the same VLM answering the same frame without the plug-in (no detector, no hint,
no adapter): ``Pipeline.batch(..., plugin=False)``, the same code path (image decode, prompt
build, generate with the same per-token clock, detokenisation) less the plug-in's stages. Both
sides generate exactly ``--new-tokens`` tokens (min = max), so the difference is the plug-in's
cost and not a different answer length. Runs alternate (plug-in, baseline, plug-in,
...) so drift on a shared machine hits both alike. Reported: median and p95 per stage, end-to-end,
the overhead ratio, and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

from rtrt.runtime.names import BACKENDS, PRECISIONS

__all__ = ["DEFAULT_EXAMPLE", "bench_pipeline", "default_image", "parse_args", "main"]

# The shipped example `rtrt bench` answers when no --image is given: the one the README's bench commands name.
DEFAULT_EXAMPLE = "scene_1.jpg"


def default_image() -> Path:
    """The shipped example ``DEFAULT_EXAMPLE``."""
    from rtrt.runtime.assets import example_images
    from rtrt.runtime.errors import InputError

    for p in example_images():
        if p.name == DEFAULT_EXAMPLE:
            return p
    raise InputError(f"no --image given and the shipped example {DEFAULT_EXAMPLE} is missing")


def _pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_pipeline(bundle: str | Path, image: str | Path, *, backend: str = "ort", runs: int = 10,
                   warmup: int = 2, new_tokens: int = 32, question: str | None = None, precision: str = "fp32",
                   threads: int | None = None, device: str = "cpu") -> dict:
    """Measure the plug-in pipeline and the plain VLM on one frame; returns a JSON-able dict.

    ``backend``, ``precision`` and ``providers`` in it are what ran (``Pipeline.describe()``: "ort"
    after a trt->ort fallback), not what was asked for."""
    import torch

    from rtrt.runtime.image import load_image
    from rtrt.runtime.pipeline import DEFAULT_QUESTION, Pipeline

    torch.set_num_threads(torch.get_num_threads())
    pipe = Pipeline.from_bundle(bundle, backend=backend, max_new_tokens=new_tokens, precision=precision, threads=threads,
                                device=device)
    ran = pipe.describe()
    q = question or DEFAULT_QUESTION
    gen = {"min_new_tokens": new_tokens}

    def run(plugin: bool) -> tuple[float, dict]:
        t0 = time.perf_counter()
        img = load_image(image)
        res = pipe.batch([img], [q], max_new_tokens=new_tokens, generate_kwargs=gen, plugin=plugin)[0]
        return (time.perf_counter() - t0) * 1e3, dict(res.timings_ms)

    for _ in range(warmup):
        run(True)
        run(False)
    plug, base, stages, base_stages = [], [], {}, {}
    for _ in range(runs):
        for on, totals, per_stage in ((True, plug, stages), (False, base, base_stages)):
            t, st = run(on)
            totals.append(t)
            for k, v in st.items():
                per_stage.setdefault(k, []).append(v)
    p_med, b_med = statistics.median(plug), statistics.median(base)
    return {
        "bundle": str(bundle),
        "image": str(image),
        "backend": ran["backend"],
        "precision": ran["precision"],
        "providers": ran["providers"],
        "device": ran["device"],
        "ort_threads": threads,
        "runs": runs,
        "warmup": warmup,  # untimed runs of each side before the measured ones
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "stages_ms": {k: {"median": statistics.median(v), "p95": _pct(v, 0.95)} for k, v in stages.items()},
        "baseline_stages_ms": {k: {"median": statistics.median(v), "p95": _pct(v, 0.95)} for k, v in base_stages.items()},
        "end_to_end_ms": {"plugin": {"median": p_med, "p95": _pct(plug, 0.95)},
                          "baseline": {"median": b_med, "p95": _pct(base, 0.95)}},
        "overhead_ratio": (p_med - b_med) / b_med,  # on top of the VLM alone
        "overhead_share": (p_med - b_med) / p_med,  # of the plug-in pipeline's own end-to-end time
        "peak_rss_mb": _peak_rss_mb(),
    }


def _table(r: dict) -> str:
    providers = f" ({', '.join(r['providers'])})" if r.get("providers") else ""
    lines = [f"rtrt bench: {r['bundle']} on {r['image']}, backend {r['backend']} {r['precision']}{providers} on "
             f"{r.get('device', 'cpu')}, {r['runs']} runs after {r['warmup']} warm-up runs, "
             f"{r['new_tokens']} new tokens, {r['threads']} torch threads, "
             f"{r.get('ort_threads') or 'all-core'} ORT threads", "",
             "| stage | median ms | p95 ms | without plug-in: median ms |", "|---|---:|---:|---:|"]
    base = r.get("baseline_stages_ms", {})
    for k, v in r["stages_ms"].items():
        b = f"{base[k]['median']:.2f}" if k in base else "-"
        lines.append(f"| {k} | {v['median']:.2f} | {v['p95']:.2f} | {b} |")
    e = r["end_to_end_ms"]
    lines += [f"| **end-to-end with plug-in** | {e['plugin']['median']:.1f} | {e['plugin']['p95']:.1f} | |",
              f"| **end-to-end, same VLM without plug-in** | {e['baseline']['median']:.1f} | {e['baseline']['p95']:.1f} | |",
              "", f"plug-in overhead: {100 * r['overhead_ratio']:+.1f}% over the same VLM without it "
              f"({e['plugin']['median'] - e['baseline']['median']:.1f} ms, {100 * r['overhead_share']:.1f}% of the plug-in pipeline's "
              f"end-to-end time); peak RSS {r['peak_rss_mb']:.0f} MB"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rtrt bench", description="Per-stage latency and the plug-in's overhead, side by side.")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the embedded demo bundle)")
    p.add_argument("--image", default=None, help=f"image to answer (default: the shipped example {DEFAULT_EXAMPLE})")
    p.add_argument("--backend", default="ort", choices=BACKENDS, help="detector/adapter backend")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="graph precision (int8: the bundle's *.int8.onnx graphs; fp16: TensorRT) (default: fp32)")
    p.add_argument("--device", default="cpu", help="torch device for the VLM, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads of the detector and adapter (default: every core this process may use)")
    p.add_argument("--runs", type=int, default=10, help="measured runs of each side (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of each side before the measured ones (default: 2)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per answer, same on both sides (default: 32)")
    p.add_argument("--graphs", action="store_true", help="also benchmark the exported graphs (eager vs ORT fp32 vs int8)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--verbose", action="store_true",
                   help="let third-party libraries print their logs, warnings and progress bars (the rtrt command line silences them)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from rtrt.runtime.errors import InputError
    from rtrt.runtime.assets import default_bundle

    if args.runs < 1 or args.warmup < 0 or args.new_tokens < 1:
        raise InputError("--runs and --new-tokens must be at least 1, --warmup at least 0")
    bundle = Path(args.bundle) if args.bundle else default_bundle()
    image = args.image if args.image is not None else default_image()
    report = {"pipeline": bench_pipeline(bundle, image, backend=args.backend, runs=args.runs,
                                         warmup=args.warmup, new_tokens=args.new_tokens, precision=args.precision,
                                         threads=args.threads, device=args.device)}
    if args.graphs:
        from rtrt.tools.benchmarks import graphs as graph_bench

        report["graphs"] = graph_bench.run_benchmark()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_table(report["pipeline"]))
        if "graphs" in report:
            print()
            print(graph_bench.format_table(report["graphs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
