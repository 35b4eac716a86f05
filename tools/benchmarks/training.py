"""Training benchmark (not a test): phase-1 and phase-2 throughput and peak memory on this machine.

Both phases run through the trainers' own entry points (``train_embeddings``, ``train_adapter``)
on a procedural world split (``rtrt.tools.demo.world``), each in a fresh process so its peak RSS is its
own. Models are random (nothing is downloaded) but of the real shapes where it matters:

- phase 1: timm DINOv3 ViT-S/16 at 448 px, the open_clip ViT-B-32 text tower, W of width 4096
  (LLaVA-1.5-7B's hidden size). Reported: region-feature extraction (images/s, regions/s; the
  VFM forward dominates) and training on the cached features (regions/s).
- phase 2: the demo bundle's LLaVA (vision tower, processor, tokenizer) with a random Llama language
  model of ``--llm-hidden`` x ``--llm-layers`` (as ``rtrt.tools.benchmarks.scaling`` builds it; or any local VLM with ``--vlm``). Reported: QA
  pairs/s of adapter training through the frozen VLM.

Training throughput counts every epoch but the first (which pays for warm-up). Run::

    python -m rtrt.tools.benchmarks.training                 # defaults: 16 images, a few minutes on 2 CPU cores
    python -m rtrt.tools.benchmarks.training --json bench.json --images 32
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["bench_phase1", "bench_phase2", "scaled_llava", "parse_args", "main"]


def _throughput(history: list[dict]) -> float:
    """Samples per second over the epochs after the first (all of them when there is one)."""
    steady = history[1:] or history
    return round(sum(h["samples"] for h in steady) / max(sum(h["seconds"] for h in steady), 1e-9), 2)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _world(work: Path, images: int) -> Path:
    from rtrt.tools.demo.world import WorldConfig, generate_world

    root = work / "world"
    if not root.exists():
        generate_world(WorldConfig(seed=0, pretrain=0, plugin=images, val=0, test=0), root, progress=False)
    return root


def _vfm_weights(work: Path, arch: str, image_size: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from rtrt.runtime.vfm import create_timm_vfm

    path = work / f"{arch}-{image_size}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = create_timm_vfm(arch, image_size)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _phase1_config(work: Path, args: argparse.Namespace, d_llm: int, epochs: int, out: Path):
    from rtrt.trainer.embeddings import EmbeddingsConfig

    root = _world(work, args.images)
    return EmbeddingsConfig(
        annotations=str(root / "CODA-LM" / "plugin"), images=str(root), out=str(out), d_llm=d_llm,
        vfm=str(_vfm_weights(work, args.vfm_arch, args.image_size)), vfm_arch=args.vfm_arch, image_size=args.image_size,
        text_encoder=args.text_encoder, cache=str(work / "cache"), epochs=epochs, batch_size=args.batch_size,
        device=args.device, overwrite=True,
    )


def bench_phase1(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Feature extraction (no cache) and phase-1 training (cached features) on the world's plug-in split."""
    import torch

    from rtrt.runtime import load_bundle
    from rtrt.trainer.embeddings import collect_regions, train_embeddings
    from rtrt.trainer.features import RegionFeatureExtractor, vfm_spec

    cfg = _phase1_config(work, args, args.d_llm, args.epochs, work / "phase1")
    regions = collect_regions(cfg.annotations, cfg.images, [])
    n_regions = sum(len(b) for _, b in regions.requests)
    spec = vfm_spec("timm", cfg.vfm, cfg.vfm_arch, cfg.image_size)
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    extractor = RegionFeatureExtractor(spec, cache_dir=cfg.cache, batch_size=8, device=device)
    t0 = time.perf_counter()
    extractor.extract(regions.requests)
    seconds = time.perf_counter() - t0
    train_embeddings(cfg)
    history = load_bundle(cfg.out).manifest.training["embeddings"]["history"]
    return {
        "images": len(regions.requests), "regions": n_regions, "classes": len(regions.names),
        "feature_images_per_s": round(len(regions.requests) / seconds, 2),
        "feature_regions_per_s": round(n_regions / seconds, 2),
        "train_regions_per_s": _throughput(history), "final_loss": round(history[-1]["loss"], 4),
        "vfm": f"{cfg.vfm_arch}@{cfg.image_size}", "text_encoder": cfg.text_encoder, "d_llm": cfg.d_llm,
        "batch_size": cfg.batch_size, "epochs": cfg.epochs,
    }


def scaled_llava(out: Path, hidden: int, layers: int) -> Path:
    """The demo bundle's LLaVA (its vision tower, processor and tokenizer) with a random language model ``hidden`` wide and ``layers`` deep."""
    from rtrt.tools.benchmarks.scaling import LMSize, scaled_vlm
    from rtrt.runtime.assets import default_bundle

    return scaled_vlm(default_bundle() / "vlm", out, LMSize(hidden, layers))


def bench_phase2(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Adapter training through the frozen VLM on every QA pair of the world's plug-in split."""
    from rtrt.runtime import load_bundle
    from rtrt.trainer.adapter import AdapterTrainConfig, train_adapter
    from rtrt.trainer.cli import vlm_hidden_size
    from rtrt.trainer.embeddings import train_embeddings

    vlm = args.vlm or str(scaled_llava(work / "vlm", args.llm_hidden, args.llm_layers))
    hidden = vlm_hidden_size(vlm)
    phase1 = train_embeddings(_phase1_config(work, args, hidden, 1, work / "phase1-vlm"))
    root = _world(work, args.images)
    cfg = AdapterTrainConfig(
        bundle=str(phase1), vlm=vlm, tasks=str(root / "CODA-LM" / "plugin" / "vqa_anno"), images=str(root),
        out=str(work / "phase2"), epochs=args.phase2_epochs, batch_size=args.phase2_batch_size,
        max_answer_tokens=args.max_answer_tokens, bf16=args.bf16, grad_checkpointing=args.grad_checkpointing,
        device=args.device, overwrite=True,
    )
    train_adapter(cfg)
    info = load_bundle(cfg.out).manifest.training["adapter"]
    out = {
        "qa_pairs": info["qa_pairs"], "train_pairs_per_s": _throughput(info["history"]),
        "final_loss": round(info["history"][-1]["loss"], 4), "vlm": vlm if args.vlm else f"llava-scaled(hidden={hidden}, layers={args.llm_layers})",
        "llm_hidden": hidden, "batch_size": cfg.batch_size, "epochs": cfg.epochs, "bf16": cfg.bf16,
        "grad_checkpointing": cfg.grad_checkpointing,
    }
    import torch

    if torch.cuda.is_available() and args.device != "cpu":
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _child(fn: Callable[[Path, argparse.Namespace], dict], work: Path, args: argparse.Namespace) -> dict:
    import torch

    result = fn(work, args)
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    result["torch_threads"] = torch.get_num_threads()
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rtrt.tools.benchmarks.training", description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", choices=("1", "2", "all"), default="all", help="which phase(s) to measure")
    p.add_argument("--images", type=int, default=16, help="images in the world's plug-in split")
    p.add_argument("--epochs", type=int, default=20, help="phase-1 epochs (the paper's 20)")
    p.add_argument("--batch-size", type=int, default=64, help="phase-1 global batch (regions)")
    p.add_argument("--vfm-arch", default="vit_small_patch16_dinov3", help="timm DINOv3 architecture")
    p.add_argument("--image-size", type=int, default=448, help="VFM input side")
    p.add_argument("--text-encoder", default="openclip:ViT-B-32", help="text encoder reference (random weights)")
    p.add_argument("--d-llm", type=int, default=4096, help="width of W in phase 1")
    p.add_argument("--vlm", default="", help="a local VLM directory for phase 2 (default: the demo LLaVA with a random --llm-hidden x --llm-layers language model)")
    p.add_argument("--llm-hidden", type=int, default=512, help="hidden size of the scaled LLaVA's language model")
    p.add_argument("--llm-layers", type=int, default=4, help="decoder layers of the scaled LLaVA's language model")
    p.add_argument("--phase2-epochs", type=int, default=2, help="phase-2 epochs")
    p.add_argument("--phase2-batch-size", type=int, default=4, help="phase-2 global batch (QA pairs)")
    p.add_argument("--max-answer-tokens", type=int, default=64, help="answer tokens per QA pair in phase 2")
    p.add_argument("--bf16", action="store_true", help="phase 2 with bfloat16 VLM weights and autocast")
    p.add_argument("--grad-checkpointing", action="store_true", help="phase 2 with gradient checkpointing")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    p.add_argument("--work", default="", help="working directory (default: a temporary one, removed)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="rtrt-bench-train-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {}
        for name, fn in (("phase1", bench_phase1), ("phase2", bench_phase2)):
            if args.phase in ("all", name[-1]):
                with ctx.Pool(1) as pool:  # a fresh process: its peak RSS is this phase's alone
                    results[name] = pool.apply(_child, (fn, work, args))
                    pool.close()  # let the worker exit on its own, so its finalizers run
                    pool.join()
    if "phase1" in results:
        r = results["phase1"]
        print(f"phase 1 ({r['vfm']}, {r['text_encoder']}, d_llm {r['d_llm']}, {r['images']} images, {r['regions']} regions):")
        print(f"  region features: {r['feature_images_per_s']} images/s, {r['feature_regions_per_s']} regions/s")
        print(f"  training:        {r['train_regions_per_s']} regions/s (batch {r['batch_size']})")
        print(f"  peak RSS:        {r['peak_rss_mb']} MB")
    if "phase2" in results:
        r = results["phase2"]
        print(f"phase 2 ({r['vlm']}, {r['qa_pairs']} QA pairs, batch {r['batch_size']}, bf16 {r['bf16']}):")
        print(f"  training:        {r['train_pairs_per_s']} QA pairs/s")
        print(f"  peak RSS:        {r['peak_rss_mb']} MB" + (f", CUDA peak {r['cuda_peak_mb']} MB" if "cuda_peak_mb" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
