"""The plug-in's overhead against bigger language models: timing only, random weights.

    python -m rtrt.tools.benchmarks.scaling                                 # demo VFM, LMs 192x2 (the demo's), 512x4, 1024x8
    python -m rtrt.tools.benchmarks.scaling --sizes 192x2,768x12 --runs 5 --precision int8 --json
    python -m rtrt.tools.benchmarks.scaling --vlm-backends ort,torch   # also export the VLM; each backend in its own process

The demo bundle's VLM is a 2.8 M-parameter toy, so the plug-in (a DINOv3 pass, the adapter, ~23
hint tokens) is a large share of its answer. This script keeps everything of the demo but the
language model: for each ``HIDDENxLAYERS`` it builds a LLaVA with the demo VLM's vision tower,
processor and tokenizer and a bigger Llama (random weights, ``save_pretrained`` to a work
directory), and a bundle with the demo's VFM and classes and a random detector projection, W and
adapter of that width (threshold -1, so every frame gets the demo's 5 hints), exports its graphs,
and runs ``rtrt bench``'s side-by-side measurement on it (``bench_pipeline``: plug-in vs
``plugin=False``, runs alternating, the same number of new tokens on both sides).

The answers are noise; only the times mean something. The same VFM, image and hint count as the
demo make the plug-in's own cost comparable across rows; what changes is the VLM it rides on.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["LMSize", "parse_sizes", "scaled_vlm", "scaled_bundle", "bench_scaling", "parse_args", "main"]

_PROCESSOR_FILES = ("chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json")


@dataclass(frozen=True)
class LMSize:
    """Width and depth of the language model (heads of 64, Llama's 8/3 MLP rounded to 64)."""

    hidden: int
    layers: int

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 64)

    @property
    def intermediate(self) -> int:
        return max(64, round(self.hidden * 8 / 3 / 64) * 64)

    def __str__(self) -> str:
        return f"{self.hidden}x{self.layers}"


def parse_sizes(text: str) -> list[LMSize]:
    """``"192x2,1024x8"`` -> sizes; one-line ``ValueError`` on anything else."""
    out = []
    for part in text.split(","):
        try:
            h, l = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"size {part.strip()!r} is not HIDDENxLAYERS (e.g. 1024x8)") from None
        if h < 16 or l < 1 or h % 16:
            raise ValueError(f"size {part.strip()!r}: hidden must be a multiple of 16 (>= 16), layers >= 1")
        out.append(LMSize(h, l))
    if not out:
        raise ValueError("no sizes given")
    return out


def scaled_vlm(src: str | Path, out: str | Path, size: LMSize, seed: int = 0) -> Path:
    """The VLM of ``src`` (a LLaVA directory) with its language model replaced by a random one of ``size``."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    src, out = Path(src), Path(out)
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    if config.model_type != "llava":
        raise ValueError(f"{src}: the scaling benchmark rebuilds LLaVA VLMs, this is {config.model_type!r}")
    tc = config.text_config
    tc.hidden_size, tc.num_hidden_layers, tc.intermediate_size = size.hidden, size.layers, size.intermediate
    tc.num_attention_heads = tc.num_key_value_heads = size.heads
    tc.head_dim = size.hidden // size.heads
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    for name in _PROCESSOR_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


def scaled_bundle(demo: str | Path, vlm_dir: str | Path, out: str | Path, hidden: int, seed: int = 0) -> Path:
    """The demo bundle's classes and VFM with a random detector projection, W and adapter of width ``hidden``."""
    import dataclasses

    import torch

    from rtrt.runtime.bundle import VLMSpec, load_bundle, write_bundle
    from rtrt.runtime.modules import CrossAttentionAdapter, RareObjectDetector

    b = load_bundle(demo)
    m = b.manifest
    if m.vfm is None or m.adapter is None or m.vlm is None:
        raise ValueError(f"{demo}: needs a VFM, an adapter and a VLM")
    g = torch.Generator().manual_seed(seed)
    detector = RareObjectDetector(d_vfm=m.vfm.dim, d_llm=hidden, proj_hidden=0, threshold=-1.0, top_k=m.detector.top_k)
    adapter = CrossAttentionAdapter(hidden, width=m.adapter.width, heads=m.adapter.heads)
    with torch.no_grad():
        for module in (detector, adapter):
            for p in module.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        adapter.gate.fill_(0.1)
    w = torch.randn(len(m.classes), hidden, generator=g)
    manifest = dataclasses.replace(
        # Only the language model changed: the demo's image-token layout still holds (the pipeline
        # checks it against the loaded VLM), so the VLM is not loaded here just to read it.
        m, d_llm=hidden, vlm=VLMSpec("llava", str(Path(vlm_dir).resolve()), hidden, dict(m.vlm.image_token_layout or {})),
        adapter=adapter.config, detector=detector.config, files={},
        training={"note": "rtrt.tools.benchmarks.scaling: random weights, for timing only", "seed": seed})
    write_bundle(out, manifest, {"embeddings.safetensors": {"W": w}, "adapter.safetensors": adapter.state_dict(),
                                 "detector.safetensors": detector.state_dict()},
                 files={k: str(b.root / k) for k in m.files if k == m.vfm.ref or k.startswith(m.vfm.ref.rstrip("/") + "/")},
                 overwrite=True)
    return Path(out)


def bench_scaling(sizes: Sequence[LMSize], work: str | Path, *, demo: str | Path | None = None, image: str | Path | None = None,
                  runs: int = 5, warmup: int = 1, new_tokens: int = 32, precision: str = "fp32", threads: int | None = None,
                  backend: str = "ort", vlm_backends: Sequence[str] | None = None, vlm_precision: str = "fp32",
                  log=print) -> list[dict]:
    """One ``bench_pipeline`` result per size (``lm`` and ``lm_params`` added); see the module docstring.

    ``vlm_backends`` (e.g. ``["ort", "torch"]``): the VLM is exported too (``rtrt export --vlm``) and
    each row is instead ``bench_vlm_backends``' comparison (every VLM backend in its own process)."""
    from transformers import AutoConfig

    from rtrt.export.cli import export_bundle
    from rtrt.tools.bench import bench_pipeline, bench_vlm_backends
    from rtrt.runtime.assets import default_bundle, example_images

    demo = Path(demo) if demo else default_bundle()
    image = Path(image) if image else example_images()[0]
    work = Path(work)
    src_vlm = load_demo_vlm_dir(demo)
    rows = []
    for size in sizes:
        t0 = time.time()
        vlm_dir = scaled_vlm(src_vlm, work / f"vlm-{size}", size)
        bundle = scaled_bundle(demo, vlm_dir, work / f"bundle-{size}", size.hidden)
        if backend == "ort" or vlm_backends:
            export_bundle(bundle, precision="int8" if precision == "int8" or vlm_precision == "int8" else "fp32",
                          vlm_onnx=bool(vlm_backends), log=lambda _m: None)
        text = AutoConfig.from_pretrained(vlm_dir, local_files_only=True).text_config
        params = _lm_params(text)
        log(f"[scaling] LM {size} ({params / 1e6:.1f} M parameters): built in {time.time() - t0:.0f} s, measuring ...")
        if vlm_backends:
            r = bench_vlm_backends(bundle, image, list(vlm_backends), vlm_precision=vlm_precision, runs=runs,
                                   warmup=warmup, new_tokens=new_tokens, backend=backend, precision=precision, threads=threads)
        else:
            r = bench_pipeline(bundle, image, backend=backend, runs=runs, warmup=warmup, new_tokens=new_tokens,
                               precision=precision, threads=threads)
        r.update(lm=str(size), lm_params=params)
        rows.append(r)
    return rows


def load_demo_vlm_dir(demo: str | Path) -> Path:
    """The carried VLM directory of a bundle."""
    from rtrt.runtime.bundle import load_bundle

    b = load_bundle(demo)
    if b.manifest.vlm is None:
        raise ValueError(f"{demo}: names no VLM")
    return Path(b.resolve_ref(b.manifest.vlm.ref))


def _lm_params(text) -> int:
    """Parameters of a Llama text model from its config (embeddings tied, as in the demo)."""
    h, l, i, v = text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.vocab_size
    kv = text.num_key_value_heads * (text.head_dim or h // text.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return int(l * per_layer + v * h + h)


def _vlm_table(rows: list[dict]) -> str:
    lines = ["| language model | parameters | VLM backend | end-to-end (ms) | prefill (ms) | decode/token (ms) | "
             "decode tok/s (of roof) | plug-in overhead | start-up (s) | peak RSS (MB) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for name, r in row["runs"].items():
            st = r["stages_ms"]
            roof = f"{r['decode_tokens_per_s']:.0f} ({r['roof_fraction']:.2f})" if "roof_fraction" in r else "-"
            label = f"{name} {r.get('vlm_precision') or ''}".strip() if name == "ort" else name
            lines.append(f"| {row['lm']} | {row['lm_params'] / 1e6:.1f} M | {label} | {r['end_to_end_ms']['plugin']['median']:.1f} | "
                         f"{st.get('prefill', {}).get('median', float('nan')):.1f} | {st.get('decode_per_token', {}).get('median', float('nan')):.2f} | "
                         f"{roof} | {100 * r['overhead_ratio']:+.1f}% | "
                         f"{'-' if r.get('startup_s') is None else format(r['startup_s'], '.2f')} | {r['peak_rss_mb']:.0f} |")
        if "ort_speedup_end_to_end" in row:
            lines.append(f"| {row['lm']} | | ort vs torch | {row['ort_speedup_end_to_end']:.2f}x faster | | | | | | RSS {row['ort_rss_ratio']:.2f}x |")
    r0 = rows[0]
    lines.append(f"\nmemory bandwidth {r0['bandwidth_gbs']:.1f} GB/s (numpy copy, same run); random weights (timing only)")
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    if rows and isinstance(rows[0].get("runs"), dict):
        return _vlm_table(rows)
    lines = ["| language model | parameters | VLM alone (ms) | with the plug-in (ms) | plug-in cost (ms) | overhead |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        e = r["end_to_end_ms"]
        p, b = e["plugin"]["median"], e["baseline"]["median"]
        lines.append(f"| {r['lm']} | {r['lm_params'] / 1e6:.1f} M | {b:.1f} | {p:.1f} | {p - b:.1f} | {100 * r['overhead_ratio']:+.1f}% |")
    r0 = rows[0]
    lines.append(f"\n{r0['runs']} runs per side, {r0['new_tokens']} new tokens, backend {r0['backend']} {r0['precision']}, "
                 f"{r0['threads']} torch threads, {r0.get('ort_threads') or 'all-core'} ORT threads; random weights (timing only)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rtrt.tools.benchmarks.scaling",
                                description="Plug-in overhead against bigger (random-weight) language models.")
    p.add_argument("--sizes", default="192x2,512x4,1024x8", help="language models as HIDDENxLAYERS, comma-separated")
    p.add_argument("--bundle", default=None, help="bundle whose VFM, classes and VLM (vision tower, tokenizer) to keep (default: the demo)")
    p.add_argument("--image", default=None, help="image to answer (default: the first shipped example)")
    p.add_argument("--work", default=None, help="directory for the built VLMs and bundles (default: a temporary one)")
    p.add_argument("--runs", type=int, default=5, help="measured runs of each side per size (default: 5)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per answer, same on both sides (default: 32)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"], help="detector/adapter graphs (default: fp32)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: every core)")
    p.add_argument("--vlm-backends", default=None,
                   help="comma-separated VLM backends to compare, e.g. ort,torch: the VLM is exported too and each backend "
                        "runs in its own process (default: the bundle's default VLM backend only)")
    p.add_argument("--vlm-precision", default="fp32", choices=["fp32", "int8"], help="the exported VLM's decoder (default: fp32)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import tempfile

    args = parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as e:
        print(f"python -m rtrt.tools.benchmarks.scaling: {e}", file=sys.stderr)
        return 2
    if args.runs < 1 or args.new_tokens < 1:
        print("python -m rtrt.tools.benchmarks.scaling: --runs and --new-tokens must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rtrt-scaling-") as tmp:
        rows = bench_scaling(sizes, args.work or tmp, demo=args.bundle, image=args.image, runs=args.runs,
                             new_tokens=args.new_tokens, precision=args.precision, threads=args.threads,
                             vlm_backends=args.vlm_backends.split(",") if args.vlm_backends else None,
                             vlm_precision=args.vlm_precision, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
