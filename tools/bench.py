"""``rtrt bench``: per-stage latency of the pipeline and the plug-in's overhead, side by side in one run.

    rtrt bench                          # the embedded demo bundle on scene_1.jpg, the README's bench image
    rtrt bench --bundle B --image I --runs 20 --json
    rtrt bench --graphs                 # also the exported-graph benchmark (ORT vs eager, see export issue)
    rtrt bench --vlm-backend ort torch  # the exported VLM on ONNX Runtime against transformers, each in its
                                        # own process (start-up, peak RSS), side by side in one run

The baseline is the same VLM answering the same frame without the plug-in (no detector, no hint,
no adapter): ``Pipeline.batch(..., plugin=False)``, the same code path (image decode, prompt
build, generate with the same per-token clock, detokenisation) less the plug-in's stages. Both
sides generate exactly ``--new-tokens`` tokens (min = max), so the difference is the plug-in's
cost and not a different answer length. Runs alternate (plug-in, baseline, plug-in,
...) so drift on a shared machine hits both alike. Reported: median and p95 per stage, end-to-end,
the overhead ratio, and peak RSS.

With several ``--vlm-backend`` values each backend runs in a fresh child process, one after the
other in the same run: start-up is the time from the child's start to its first answer, peak RSS is
the child's, and decode speed is set against this machine's memory-bandwidth roof (a numpy copy
measured in the same run; every decode step reads all the decoder's weights once).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from rtrt.runtime.names import BACKENDS, PRECISIONS, VLM_BACKENDS, VLM_PRECISIONS

__all__ = ["DEFAULT_EXAMPLE", "bench_pipeline", "bench_vlm_backends", "memory_bandwidth_gbs", "default_image", "parse_args", "main"]

_T0_ENV = "RTRT_BENCH_T0"  # the parent's clock when it started a child: the child's start-up is measured from it

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
    """This process's peak resident set in MB. Linux: ``VmHWM`` of its own address space (getrusage's
    ``ru_maxrss`` survives fork and exec, so a child started by a big parent would report the parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_pipeline(bundle: str | Path, image: str | Path, *, backend: str = "ort", runs: int = 10,
                   warmup: int = 2, new_tokens: int = 32, question: str | None = None, precision: str = "fp32",
                   threads: int | None = None, device: str = "cpu", vlm_backend: str | None = None,
                   vlm_precision: str = "fp32") -> dict:
    """Measure the plug-in pipeline and the plain VLM on one frame; returns a JSON-able dict.

    ``backend``, ``precision``, ``providers`` and ``vlm_backend`` in it are what ran
    (``Pipeline.describe()``: "ort" after a trt->ort fallback), not what was asked for."""
    from rtrt.runtime.image import load_image
    from rtrt.runtime.pipeline import DEFAULT_QUESTION, Pipeline

    pipe = Pipeline.from_bundle(bundle, backend=backend, max_new_tokens=new_tokens, precision=precision, threads=threads,
                                device=device, vlm_backend=vlm_backend, vlm_precision=vlm_precision)
    ran = pipe.describe()
    q = question or DEFAULT_QUESTION
    gen = {"min_new_tokens": new_tokens}

    def run(plugin: bool) -> tuple[float, dict]:
        t0 = time.perf_counter()
        img = load_image(image)
        res = pipe.batch([img], [q], max_new_tokens=new_tokens, generate_kwargs=gen, plugin=plugin)[0]
        return (time.perf_counter() - t0) * 1e3, dict(res.timings_ms)

    first_answer_s = None
    t0_env = os.environ.get(_T0_ENV)
    for i in range(warmup):
        run(True)
        if i == 0 and t0_env:
            first_answer_s = time.time() - float(t0_env)  # start-up: process start to first answer
        run(False)
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
    torch_threads = None
    if "torch" in sys.modules:
        torch_threads = sys.modules["torch"].get_num_threads()
    return {
        "bundle": str(bundle),
        "image": str(image),
        "backend": ran["backend"],
        "precision": ran["precision"],
        "providers": ran["providers"],
        "device": ran["device"],
        "vlm_backend": ran["vlm_backend"],
        "vlm_precision": ran["vlm_precision"],
        "torch_imported": "torch" in sys.modules,  # False: the run never loaded torch
        "startup_s": first_answer_s,  # process start to first answer (set when a parent started this run)
        "ort_threads": threads,
        "runs": runs,
        "warmup": warmup,  # untimed runs of each side before the measured ones
        "new_tokens": new_tokens,
        "threads": torch_threads,
        "stages_ms": {k: {"median": statistics.median(v), "p95": _pct(v, 0.95)} for k, v in stages.items()},
        "baseline_stages_ms": {k: {"median": statistics.median(v), "p95": _pct(v, 0.95)} for k, v in base_stages.items()},
        "end_to_end_ms": {"plugin": {"median": p_med, "p95": _pct(plug, 0.95)},
                          "baseline": {"median": b_med, "p95": _pct(base, 0.95)}},
        "overhead_ratio": (p_med - b_med) / b_med,  # on top of the VLM alone
        "overhead_share": (p_med - b_med) / p_med,  # of the plug-in pipeline's own end-to-end time
        "peak_rss_mb": _peak_rss_mb(),
    }


def memory_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """This machine's copy bandwidth in GB/s (bytes read + written), best of ``repeats`` numpy copies."""
    import numpy as np

    src = np.ones(mb * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def _decoder_bytes(bundle: Path, vlm_precision: str) -> int | None:
    """Bytes of the exported decoder's weights as ONNX Runtime holds them, each read once per decode step:
    the initializers' sizes, float16 ones that a Cast widens at load (``export/compact.py``) counted at float32."""
    import onnx

    from rtrt.runtime.bundle import load_bundle
    from rtrt.runtime.names import DECODER, vlm_onnx_file

    b = load_bundle(bundle, verify=False)
    rel = vlm_onnx_file(DECODER, "quantized" if vlm_precision == "int8" else "")
    if not b.has(rel):
        return None
    model = onnx.load(str(b.path(rel)), load_external_data=False)
    widened = {n.input[0] for n in model.graph.node if n.op_type == "Cast"
               and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)}
    total = 0
    for t in model.graph.initializer:
        count = 1
        for d in t.dims:
            count *= d
        size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type != onnx.TensorProto.STRING else 0
        total += count * (4 if t.name in widened else size)
    return total


def bench_vlm_backends(bundle: str | Path, image: str | Path, vlm_backends: Sequence[str], *, vlm_precision: str = "fp32",
                       runs: int = 10, warmup: int = 2, new_tokens: int = 32, backend: str = "ort",
                       precision: str = "fp32", threads: int | None = None, device: str = "cpu") -> dict:
    """Each VLM backend in a fresh child process (``bench_pipeline``), one after the other in this run;
    start-up, peak RSS and decode speed against the memory-bandwidth roof per backend."""
    out: dict = {"bandwidth_gbs": memory_bandwidth_gbs(), "runs": {}}
    for vb in vlm_backends:
        cmd = [sys.executable, "-m", "rtrt.tools.bench", "--json", "--bundle", str(bundle), "--image", str(image),
               "--vlm-backend", vb, "--runs", str(runs), "--warmup", str(max(1, warmup)), "--new-tokens", str(new_tokens),
               "--backend", backend, "--precision", precision, "--device", device]
        if vb == "ort":
            cmd += ["--vlm-precision", vlm_precision]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        env = {**os.environ, _T0_ENV: repr(time.time())}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            from rtrt.runtime.errors import InputError

            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise InputError(f"the {vb} VLM backend's benchmark failed: {last}")
        r = json.loads(proc.stdout)["pipeline"]
        weights = _decoder_bytes(Path(bundle), r.get("vlm_precision") or "fp32")
        per_token = r["stages_ms"].get("decode_per_token", {}).get("median")
        if weights and per_token:
            roof = out["bandwidth_gbs"] * 1e9 / weights  # tokens/s if each step only read the decoder's weights once
            r["decode_tokens_per_s"] = 1e3 / per_token
            r["roof_tokens_per_s"] = roof
            r["roof_fraction"] = r["decode_tokens_per_s"] / roof
        out["runs"][vb] = r
    if {"ort", "torch"} <= set(out["runs"]):
        o, t = out["runs"]["ort"], out["runs"]["torch"]
        out["ort_speedup_end_to_end"] = t["end_to_end_ms"]["plugin"]["median"] / o["end_to_end_ms"]["plugin"]["median"]
        out["ort_rss_ratio"] = o["peak_rss_mb"] / t["peak_rss_mb"]
    return out


def _compare_table(c: dict) -> str:
    runs = c["runs"]
    names = list(runs)
    rows = [("end-to-end with plug-in, median ms", lambda r: f"{r['end_to_end_ms']['plugin']['median']:.1f}"),
            ("end-to-end without plug-in, median ms", lambda r: f"{r['end_to_end_ms']['baseline']['median']:.1f}"),
            ("plug-in overhead", lambda r: f"{100 * r['overhead_ratio']:+.1f}%"),
            ("prefill, median ms", lambda r: f"{r['stages_ms'].get('prefill', {}).get('median', float('nan')):.1f}"),
            ("decode per token, median ms", lambda r: f"{r['stages_ms'].get('decode_per_token', {}).get('median', float('nan')):.2f}"),
            ("start-up to first answer, s", lambda r: "-" if r.get("startup_s") is None else f"{r['startup_s']:.2f}"),
            ("peak RSS, MB", lambda r: f"{r['peak_rss_mb']:.0f}"),
            ("decode tokens/s (fraction of bandwidth roof)",
             lambda r: "-" if "roof_fraction" not in r else f"{r['decode_tokens_per_s']:.0f} ({r['roof_fraction']:.2f} of {r['roof_tokens_per_s']:.0f})"),
            ("torch imported", lambda r: "yes" if r.get("torch_imported") else "no")]
    first = runs[names[0]]
    lines = [f"rtrt bench: {first['bundle']} on {first['image']}, {first['runs']} runs after {first['warmup']} warm-up runs, "
             f"{first['new_tokens']} new tokens; memory bandwidth {c['bandwidth_gbs']:.1f} GB/s (numpy copy)", "",
             "| | " + " | ".join(f"VLM on {n}" + (f" ({runs[n].get('vlm_precision')})" if n == "ort" else "") for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(runs[n]) for n in names) + " |")
    if "ort_speedup_end_to_end" in c:
        lines += ["", f"ort vs torch: {c['ort_speedup_end_to_end']:.2f}x faster end to end, peak RSS {c['ort_rss_ratio']:.2f}x"]
    return "\n".join(lines)


def _table(r: dict) -> str:
    providers = f" ({', '.join(r['providers'])})" if r.get("providers") else ""
    lines = [f"rtrt bench: {r['bundle']} on {r['image']}, backend {r['backend']} {r['precision']}{providers} on "
             f"{r.get('device', 'cpu')}, {r['runs']} runs after {r['warmup']} warm-up runs, "
             f"{r['new_tokens']} new tokens, VLM on {r.get('vlm_backend')}, {r['threads'] or 'no'} torch threads, "
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
    p.add_argument("--device", default="cpu", help="device of the VLM, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--vlm-backend", nargs="+", default=None, choices=VLM_BACKENDS,
                   help="how the VLM runs (default: ort when the bundle carries the exported VLM, else torch); several: "
                        "each in its own process, side by side (start-up, peak RSS, decode vs the bandwidth roof)")
    p.add_argument("--vlm-precision", default="fp32", choices=VLM_PRECISIONS,
                   help="the exported VLM's decoder precision (ort VLM backend; default: fp32)")
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
    several = args.vlm_backend is not None and len(args.vlm_backend) > 1
    if several:
        report = {"vlm_backends": bench_vlm_backends(
            bundle, image, list(dict.fromkeys(args.vlm_backend)), vlm_precision=args.vlm_precision, runs=args.runs,
            warmup=args.warmup, new_tokens=args.new_tokens, backend=args.backend, precision=args.precision,
            threads=args.threads, device=args.device)}
    else:
        report = {"pipeline": bench_pipeline(bundle, image, backend=args.backend, runs=args.runs,
                                             warmup=args.warmup, new_tokens=args.new_tokens, precision=args.precision,
                                             threads=args.threads, device=args.device,
                                             vlm_backend=args.vlm_backend[0] if args.vlm_backend else None,
                                             vlm_precision=args.vlm_precision)}
    if args.graphs:
        from rtrt.tools.benchmarks import graphs as graph_bench

        report["graphs"] = graph_bench.run_benchmark()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_compare_table(report["vlm_backends"]) if several else _table(report["pipeline"]))
        if "graphs" in report:
            print()
            print(graph_bench.format_table(report["graphs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
