"""Tiny CODA-LM-format datasets and tiny models for the trainer tests (nothing downloaded).

``make_dataset(root)`` writes the layout of CODA-LM and of ``rtrt.tools.world``: annotation files
``root/CODA-LM/train/train_XXXX.json``, images ``root/train/images/XXXX.jpg`` (and
``root/train/images_w_boxes/`` for region questions) and the three task files in
``root/CODA-LM/train/vqa_anno/`` (image paths relative to ``root``). Each class is drawn as a filled rectangle of its own colour on a noisy background,
so even a random DINOv3 gives class-dependent region features.

``tiny_vfm(path)`` saves a random timm DINOv3 (depth 2, width 32, 64 px input) and returns the CLI
flags that load it; ``tiny_clip_config(dir)`` writes a tiny open_clip model config (width 32).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from rtrt.trainer.coda import CodaAnnotation, RegionItem, TaskRecord, draw_region_box, save_annotation, write_tasks

__all__ = ["CLASSES", "COLOURS", "make_dataset", "annotations_dir", "tasks_dir", "tiny_vfm", "tiny_vfm_flags",
           "tiny_clip_config", "phase1_args"]

CLASSES = ("traffic_cone", "dog", "barrier")
COLOURS = {"traffic_cone": (250, 120, 0), "dog": (120, 70, 30), "barrier": (230, 230, 230), "debris": (90, 90, 90)}
VFM_ARCH = "vit_tiny_patch16_dinov3_qkvb"
VFM_KWARGS = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def make_dataset(root: str | Path, n_images: int = 8, classes: Sequence[str] = CLASSES, size=(96, 64), seed: int = 0) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    ann_dir, task_dir = annotations_dir(root), tasks_dir(root)
    task_dir.mkdir(parents=True, exist_ok=True)
    (root / "train" / "images").mkdir(parents=True, exist_ok=True)
    (root / "train" / "images_w_boxes").mkdir(parents=True, exist_ok=True)
    general, region, suggestion = [], [], []
    for i in range(n_images):
        w, h = size
        pixels = rng.integers(40, 90, size=(h, w, 3), dtype=np.uint8)
        regions = []
        for k in range(2):
            name = classes[(i + k) % len(classes)]
            bw, bh = int(rng.integers(14, 30)), int(rng.integers(12, 24))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y:y + bh, x:x + bw] = COLOURS[name]
            regions.append(RegionItem(f"a {name.replace('_', ' ')} on the road", (x, y, bw, bh), name))
        image = Image.fromarray(pixels, "RGB")
        image_id = f"{i:04d}"
        image.save(root / "train" / "images" / f"{image_id}.jpg", quality=95)
        names = " and ".join(r.category_name.replace("_", " ") for r in regions)
        ann = CodaAnnotation(general_summary=f"There is a {names}.", region_perception=regions,
                             driving_suggestion="Slow down and keep away from the objects.")
        save_annotation(ann_dir / f"train_{image_id}.json", ann, image_size=size)
        rel = f"train/images/{image_id}.jpg"
        general.append(TaskRecord(i, rel, "Describe the objects on the road.", ann.general_summary))
        suggestion.append(TaskRecord(i, rel, "What should the ego car do?", ann.driving_suggestion))
        boxed = f"train/images_w_boxes/{image_id}_0.jpg"
        draw_region_box(image, regions[0].box).save(root / boxed, quality=95)
        region.append(TaskRecord(i, boxed, "Describe the object in the red box.", regions[0].description_and_explanation))
    write_tasks(task_dir / "general_perception.jsonl", general)
    write_tasks(task_dir / "region_perception.jsonl", region)
    write_tasks(task_dir / "driving_suggestion.jsonl", suggestion)
    return root


def annotations_dir(root: Path) -> Path:
    return Path(root) / "CODA-LM" / "train"


def tasks_dir(root: Path) -> Path:
    return Path(root) / "CODA-LM" / "train" / "vqa_anno"


def tiny_vfm(path: str | Path, seed: int = 0) -> list[str]:
    """Save a random tiny timm DINOv3 to ``path`` and return the phase-1 flags that load it."""
    from safetensors.torch import save_file

    from rtrt.runtime.vfm import create_timm_vfm

    torch.manual_seed(seed)
    model = create_timm_vfm(VFM_ARCH, 64, **VFM_KWARGS)
    with torch.no_grad():  # open the layer-scale gammas so the blocks change the tokens
        for name, p in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                p.fill_(0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return ["--vfm", str(path), "--vfm-arch", VFM_ARCH, "--vfm-kwargs", json.dumps(VFM_KWARGS), "--image-size", "64"]


def tiny_clip_config(directory: str | Path) -> str:
    """A tiny open_clip model config (text width 32, one layer); returns its path for ``openclip:PATH``."""
    path = Path(directory) / "rtrt-tiny-clip.json"
    path.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    return str(path)


def phase1_args(root: Path, work: Path, out: Path, *extra: str, epochs: int = 4, batch: int = 4) -> list[str]:
    """Flags of a small phase-1 run on ``make_dataset(root)`` with the tiny models kept in ``work``."""
    vfm = work / "vfm.safetensors"
    flags = tiny_vfm(vfm) if not vfm.exists() else tiny_vfm_flags(vfm)
    synonyms = work / "synonyms.json"
    if not synonyms.exists():
        synonyms.write_text(json.dumps({"traffic_cone": ["orange cone", "pylon"], "dog": ["puppy"], "barrier": ["road barrier", "fence"]}))
    return [
        "embeddings", "--annotations", str(annotations_dir(root)), "--images", str(root), "--d-llm", "64",
        "--synonyms", str(synonyms), *flags, "--text-encoder", f"openclip:{tiny_clip_config(work)}",
        "--cache", str(work / "cache"), "--epochs", str(epochs), "--batch-size", str(batch), "--lr", "3e-3",
        "--device", "cpu", "--out", str(out), *extra,
    ]


def tiny_vfm_flags(path: Path) -> list[str]:
    return ["--vfm", str(path), "--vfm-arch", VFM_ARCH, "--vfm-kwargs", json.dumps(VFM_KWARGS), "--image-size", "64"]
