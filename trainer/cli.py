"""``rtrt train embeddings|adapter``: the two training phases from the command line.

``main(argv)`` takes what follows ``rtrt train``. Flags map one to one onto ``EmbeddingsConfig`` /
``AdapterConfig`` fields (see those for every default and its meaning). One process::

    rtrt train embeddings --annotations ROOT/CODA-LM/Train --images ROOT --d-llm 4096 --vfm W.safetensors --out B1
    rtrt train adapter --bundle B1 --vlm llava-hf/llava-1.5-7b-hf@<commit> --tasks ROOT/CODA-LM/Train/vqa_anno --images ROOT --out B2

A model given as a hub id is pinned to a commit, ``org/name@<40-hex commit sha>``: the bundle records
that revision and every later load fetches exactly it (a bare ``org/name`` is refused: nothing here
resolves a branch to a commit). Local paths need no revision; weights are safetensors only.

Several processes (DistributedDataParallel; gloo on CPU, nccl on GPU)::

    torchrun --nproc_per_node=4 -m rtrt.trainer.cli adapter --bundle B1 --vlm ... --out B2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence

from rtrt.runtime.errors import InputError, run_cli

__all__ = ["main", "parse_args", "embeddings_config", "adapter_config", "vlm_hidden_size"]


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _common(p: argparse.ArgumentParser, epochs: int, batch: int, lr: float) -> None:
    p.add_argument("--out", required=True, help="bundle directory to write (atomically, at the end)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"passes over the data (default {epochs})")
    p.add_argument("--batch-size", type=int, default=batch, help=f"global batch over all processes (default {batch})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak AdamW learning rate, cosine decay to lr/10 (default {lr:g})")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of every epoch's order")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: this rank's GPU when CUDA is available")
    p.add_argument("--skip-bad", action="store_true", help="skip missing or unreadable images (each reported) instead of failing")
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt/ (checkpoint written at the end of every epoch)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rtrt train", description="Train the plug-in: class embeddings W (phase 1) or the adapter (phase 2).")
    sub = p.add_subparsers(dest="phase", required=True, metavar="{embeddings,adapter}")

    e = sub.add_parser("embeddings", help="phase 1: W and the projections from region features and synonyms",
                       description="Phase 1: multi-modal class embeddings W, the VFM and text projections.")
    e.add_argument("--annotations", required=True, help="directory of CODA-LM annotation files (one JSON per image)")
    e.add_argument("--images", required=True, help="dataset root the annotation's image paths are relative to")
    size = e.add_mutually_exclusive_group(required=True)
    size.add_argument("--d-llm", type=int, help="hidden size of the target VLM's language model (width of W)")
    size.add_argument("--vlm", help="read the hidden size from this VLM's config (local dir, or hub id pinned as "
                                    "org/name@<40-hex commit>; its weights are loaded only for --w-init names / --w-name-tie)")
    e.add_argument("--synonyms", default="", help="synonyms JSON from 'rtrt synonyms' (class -> list of strings)")
    e.add_argument("--classes", default="", help="comma-separated classes of W (default: the synonyms file's, else all in the data)")
    e.add_argument("--vfm-kind", choices=("timm", "transformers"), default="timm", help="where the DINOv3 comes from")
    e.add_argument("--vfm", required=True, help="VFM weights: timm safetensors file/dir, transformers dir, or a hub id "
                                                "pinned as org/name@<40-hex commit> (recorded as the bundle's vfm revision)")
    e.add_argument("--vfm-arch", default="vit_small_patch16_dinov3", help="timm architecture of the VFM")
    e.add_argument("--vfm-kwargs", type=_json_object, default={}, help='timm overrides as JSON, e.g. \'{"depth": 2}\'')
    e.add_argument("--image-size", type=int, default=448, help="square VFM input side in pixels")
    e.add_argument("--vfm-reducing-gap", type=float, default=None,
                   help="resize in two steps (Pillow's reducing_gap: box reduction first) as the VFM was trained; "
                        "faster on large frames (default: one exact pass)")
    e.add_argument("--carry-vfm", action="store_true", help="copy the VFM into the bundle instead of referencing its path")
    e.add_argument("--text-encoder", default="openclip:ViT-B-32", help="openclip:NAME, openclip:CONFIG.json or hf:PATH_OR_ID")
    e.add_argument("--text-weights", default="", help="open_clip checkpoint for an openclip: encoder (omit only in tests)")
    e.add_argument("--cache", default=None, help="region-feature cache directory (default: ~/.cache/rtrt/region-features)")
    e.add_argument("--no-cache", action="store_true", help="do not read or write the region-feature cache")
    e.add_argument("--feature-batch", type=int, default=8, help="images per VFM forward when extracting features")
    e.add_argument("--proj-hidden", type=int, default=0, help="hidden width of the projection MLPs (0: linear)")
    e.add_argument("--temperature", type=float, default=0.07, help="temperature of the cosine logits")
    e.add_argument("--ema", type=float, default=0.99, help="EMA momentum of W toward the batch's class centres (1: off)")
    e.add_argument("--w-init", choices=("regions", "names"), default="regions",
                   help="W's start: regions, the class means of the projected region features (default, the paper); "
                        "names, each class name's token embedding in the VLM (mean input-embedding row of its display "
                        "name; needs --vlm)")
    e.add_argument("--w-name-tie", type=float, default=0.0,
                   help="weight of a loss pulling each row of W toward its class name's token embedding, mean "
                        "(1 - cosine) (default: 0, off; needs --vlm)")
    e.add_argument("--w-contrastive", type=float, default=1.0, help="weight of the region-text contrastive loss")
    e.add_argument("--w-classification", type=float, default=1.0, help="weight of the classification losses against W")
    e.add_argument("--w-detection", type=float, default=0.0,
                   help="weight of the patch-cell detection loss (positives: cells in a region of a class; negatives: "
                        "cells outside, other objects first), which calibrates the threshold (default: 0, off)")
    e.add_argument("--negatives-per-image", type=int, default=16, help="background cells per image for --w-detection")
    e.add_argument("--detection-temperature", type=float, default=0.05, help="scale of (cosine - threshold) in that loss")
    e.add_argument("--threshold", type=float, default=0.3, help="detector score threshold stored in the bundle")
    e.add_argument("--top-k", type=int, default=5, help="detector top-k stored in the bundle")
    _common(e, epochs=20, batch=64, lr=1e-3)

    a = sub.add_parser("adapter", help="phase 2: the cross-attention adapter through the frozen VLM",
                       description="Phase 2: the cross-attention adapter, trained through the frozen VLM.")
    a.add_argument("--bundle", required=True, help="phase-1 bundle (W)")
    a.add_argument("--vlm", required=True, help="the frozen VLM: local directory, or hub id pinned as "
                                                "org/name@<40-hex commit> (recorded as the bundle's vlm revision)")
    a.add_argument("--tasks", required=True, help="directory of the CODA-LM task files (<task>.jsonl)")
    a.add_argument("--images", required=True, help="dataset root the task files' image paths are relative to")
    a.add_argument("--task", action="append", choices=("general_perception", "region_perception", "driving_suggestion"),
                   help="task file(s) to train on; repeatable (default: every one present)")
    a.add_argument("--width", type=int, default=512, help="attention width of the adapter")
    a.add_argument("--heads", type=int, default=8, help="attention heads of the adapter")
    a.add_argument("--null-slot", action="store_true",
                   help="give the adapter's attention a learned key with a zero value beside W's rows, so a token can "
                        "attend to nothing and stay unchanged (an addition to the paper's adapter; default: off); with "
                        "--attn-prior the prior is held against the rows' share renormalised")
    a.add_argument("--slot-value", action="store_true",
                   help="with --null-slot: learn that slot's value too (zero at first), a write that depends on no "
                        "class, for example the red-box marker region questions need (an addition; default: off)")
    a.add_argument("--w-reconstruction", type=float, default=1.0, help="weight of the reconstruction loss")
    a.add_argument("--recon", choices=("absolute", "relative"), default="absolute",
                   help="reconstruction distance: absolute, mean squared difference of every element (default, the "
                        "paper); relative, each token's squared distance over its own squared norm, mean over tokens")
    a.add_argument("--attn-prior", type=float, default=0.0,
                   help="weight of a KL term pulling the adapter's head-averaged attention over W's rows, at each "
                        "image token, toward softmax(detector similarity / --attn-prior-temperature) there "
                        "(default: 0, off; LLaVA-family VLMs)")
    a.add_argument("--w-keep", type=float, default=0.0,
                   help="weight of a relative reconstruction over only the image tokens whose cell the calibrated "
                        "detector finds no rare class in (an addition to the paper's recipe: the refinement is pushed "
                        "to leave common objects and background as they are; default: 0, off; LLaVA-family VLMs)")
    a.add_argument("--detector-bias", action="store_true",
                   help="detector-guided attention (not in the paper): each visual token's attention over W's rows gets "
                        "+ a learned scale times the calibrated detector's z-score of each class at the token's cell, so "
                        "the detector says which row to read (LLaVA only; needs a calibrated phase-1 bundle)")
    a.add_argument("--region-box", action="store_true",
                   help="region questions (region_perception): the adapter's change only at the asked box's cells, the "
                        "detector run on the frame without the red box, and with --detector-bias the box's mean z-score at "
                        "every token; the box is read from the annotation beside the frame (LLaVA only)")
    a.add_argument("--refine-mask-z", type=float, default=None, metavar="Z",
                   help="train as `rtrt infer --refine-mask-z Z` runs: the adapter's change kept only at the image tokens "
                        "whose cell the calibrated detector finds a rare class in (a class's z-score above Z; default: "
                        "off, every token; LLaVA-family VLMs)")
    a.add_argument("--keep-z", type=float, default=None,
                   help="with --w-keep: a token cell holds a rare class when the calibrated z-score of its own similarity "
                        "exceeds this (default: the detector's z threshold; an uncalibrated detector uses its raw threshold)")
    a.add_argument("--attn-prior-temperature", type=float, default=0.05,
                   help="temperature of the softmax over the detector's per-patch cosines (default 0.05)")
    a.add_argument("--hints", choices=("none", "detector"), default="none",
                   help="detector: train with the bundle detector's hint sentence in every prompt, as inference with "
                        "both remedies runs (default: none, the paper's recipe)")
    a.add_argument("--hint-share", type=float, default=1.0,
                   help="with --hints detector: the share of QA pairs (seeded draw) whose prompt carries the hint; "
                        "the rest train without (default: 1, every one)")
    a.add_argument("--max-answer-tokens", type=int, default=256, help="answers are cut to this many tokens")
    a.add_argument("--bf16", action="store_true", help="VLM weights in bfloat16 and its forward under bfloat16 autocast (for GPUs)")
    a.add_argument("--grad-checkpointing", action="store_true", help="recompute the VLM's layers in backward to save memory")
    a.add_argument("--cache-visual-tokens", action="store_true",
                   help="keep each image's visual tokens (the frozen vision tower and projector) after its first step "
                        "instead of recomputing them every epoch: faster where the tower is a large share of a step, "
                        "costs host memory of images x tokens x hidden size")
    a.add_argument("--carry-vlm", action="store_true", help="copy the VLM directory into the bundle (vlm/)")
    _common(a, epochs=10, batch=8, lr=1e-4)
    return p.parse_args(argv)


def _fields(cls, args: argparse.Namespace, **extra):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **extra)


def vlm_hidden_size(ref: str) -> int:
    """Hidden size of a VLM's language model, read from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    from rtrt.runtime.bundle import pinned_source

    source, revision = pinned_source(ref, what="VLM")
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, local_files_only=revision is None)
    except (OSError, ValueError) as e:
        raise InputError(f"{ref}: cannot read the VLM config ({str(e).splitlines()[0]})") from None
    return int(config.get_text_config().hidden_size)


def embeddings_config(args: argparse.Namespace):
    from .embeddings import EmbeddingsConfig, default_cache_dir

    d_llm = args.d_llm if args.d_llm is not None else vlm_hidden_size(args.vlm)
    cache = "" if args.no_cache else (args.cache or default_cache_dir())
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("d_llm", "cache", "classes", "vlm")})
    return _fields(EmbeddingsConfig, ns, d_llm=d_llm, cache=cache, classes=classes, vlm=args.vlm or "")


def adapter_config(args: argparse.Namespace):
    from .adapter import AdapterTrainConfig

    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "task"})
    return _fields(AdapterTrainConfig, ns, task_names=list(args.task or []))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase == "embeddings":
        from .embeddings import train_embeddings

        out = train_embeddings(embeddings_config(args))
    else:
        from .adapter import train_adapter

        out = train_adapter(adapter_config(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(out)
    return 0


if __name__ == "__main__":
    # torchrun -m rtrt.trainer.cli ...: the same one-line errors as the rtrt console script.
    sys.exit(run_cli("rtrt train", main))
