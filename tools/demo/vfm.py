"""The demo VFM: a small timm DINOv3 trained on class-balanced world scenes.

It stands in for a foundation model that has seen everything: unlike the VLM's pretraining text,
its training signal covers every category equally. Scenes come straight from the world generator
(``rtrt.tools.demo.world.sample_scene`` / ``render_scene``, a seed stream of its own, every image holding
rare objects) with every object's box, named or not. The objective is per-patch classification
(background or one of the world's categories; a patch takes the front-most object whose box covers
its centre, a box smaller than a patch marks the patch holding its centre).

Balanced and cheap: the model runs at ``image_size`` (448, the world's resolution, so small objects
span a patch) but trains on ``train_crop`` crops at that scale (a quarter of the tokens), each crop
around a patch drawn by inverse class frequency, with the loss weighted by its square root.
DINOv3's RoPE works on normalised coordinates, so the crop-trained model runs on whole images.
LayerScale starts at ``init_values`` = 0.1 instead of DINOv3's 1e-5, which would keep the blocks
nearly off for most of a short schedule.

``train_vfm(world, out, cfg)`` writes ``vfm.safetensors`` (backbone only, float16) and
``vfm.json`` (a ``VFMSpec`` that ``rtrt.runtime.vfm.load_vfm`` reads). ``probe_vfm`` measures how
well patch tokens separate the categories: a linear probe on box-pooled patch tokens, trained on
the plug-in split's regions and tested on the test split's (which name every object).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = ["VFMConfig", "VFM_SEED_STREAM", "render_training_scenes", "train_vfm", "vfm_spec", "load_demo_vfm", "probe_vfm"]

# The world's splits use streams 0-3 (``rtrt.tools.demo.world.SPLITS``); the VFM's scenes use this one.
VFM_SEED_STREAM = 7


@dataclass
class VFMConfig:
    """Shape and training schedule of the demo VFM; saved in ``vfm.json``."""

    arch: str = "vit_small_patch16_dinov3"  # timm DINOv3 architecture, shrunk by the fields below
    image_size: int = 448  # square input side at inference (the world's images are resized to it)
    train_crop: int = 224  # training sees crops of this side at the inference scale (a multiple of 16)
    embed_dim: int = 160  # token width (the detector's d_vfm)
    depth: int = 5  # transformer blocks
    num_heads: int = 4  # attention heads (embed_dim / num_heads must be a multiple of 4 for RoPE)
    reducing_gap: float | None = None  # resize of the world's images to image_size (Pillow's two-step resize; None: one bicubic pass)
    init_values: float = 0.1  # LayerScale initial value (DINOv3's 1e-5 would keep the blocks near-off for a short schedule)
    scenes: int = 4000  # rendered training scenes
    epochs: int = 6  # passes over the scenes
    batch_size: int = 32  # scenes per step
    lr: float = 1e-3  # peak AdamW learning rate (linear warm-up, cosine decay to lr / 20)
    warmup_steps: int = 50  # linear warm-up steps
    weight_decay: float = 0.05  # AdamW weight decay (not on norms, biases, tokens)
    rare_prob: float = 1.0  # share of training scenes with rare objects
    max_rare: int = 3  # most rare placements per training scene
    workers: int = 2  # rendering processes
    seed: int = 0  # scenes, initialisation and batch order

    def __post_init__(self) -> None:
        if self.train_crop % 16 or self.image_size % 16 or not 16 <= self.train_crop <= self.image_size:
            raise ValueError(f"train_crop {self.train_crop} and image_size {self.image_size} must be multiples of 16, crop <= size")

    @property
    def kwargs(self) -> dict:
        """timm ``create_model`` overrides recorded in the ``VFMSpec``."""
        return {"embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads, "init_values": self.init_values}


def _world_config(world: Path):
    from rtrt.tools.demo.world import WorldConfig

    meta = json.loads((world / "world.json").read_text())
    fields = {f.name for f in dataclasses.fields(WorldConfig)}
    return WorldConfig(**{k: v for k, v in meta["config"].items() if k in fields})


def _render(job) -> tuple[np.ndarray, np.ndarray]:
    """One training scene: uint8 image [S, S, 3] at the VFM's inference size and patch labels [G, G]."""
    from rtrt.runtime.image import vfm_resize
    from rtrt.tools.demo.world import WORLD_CATEGORIES, render_scene, sample_scene

    wcfg, seed, index, size, patch, reducing_gap = job
    rng = np.random.default_rng([seed, VFM_SEED_STREAM, index])
    scene = sample_scene(wcfg, rng)
    img = vfm_resize(render_scene(scene, rng, wcfg.noise), size, "bicubic", reducing_gap)  # as the runtime's vfm_pixels
    return np.asarray(img, dtype=np.uint8), _patch_labels(scene.objects, wcfg.width, wcfg.height, size // patch, WORLD_CATEGORIES)


def _patch_labels(objects, width: float, height: float, grid: int, categories: Sequence[str],
                  boxes: Sequence[tuple[float, float, float, float]] | None = None) -> np.ndarray:
    """Per-patch class (0 background, 1 + index in ``categories``) on a ``grid`` x ``grid`` image of ``width`` x ``height``.

    Nearer objects win; an object covering no patch centre marks the patch holding its own centre
    (none if that centre is outside the image). ``boxes``: the objects' boxes in this image's
    pixels when they differ from ``o.box`` (after a resize and crop).
    """
    labels = np.zeros((grid, grid), dtype=np.int64)
    cx = (np.arange(grid) + 0.5) * width / grid
    cy = (np.arange(grid) + 0.5) * height / grid
    boxes = [o.box for o in objects] if boxes is None else list(boxes)
    for k in sorted(range(len(objects)), key=lambda k: -objects[k].z):  # far to near: nearer overwrite
        x, y, w, h = boxes[k]
        cls = 1 + categories.index(objects[k].category)
        cols = np.nonzero((cx >= x) & (cx < x + w))[0]
        rows = np.nonzero((cy >= y) & (cy < y + h))[0]
        if len(cols) and len(rows):
            labels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = cls
        elif 0 <= x + w / 2 < width and 0 <= y + h / 2 < height:  # smaller than a patch: the patch holding its centre
            labels[int((y + h / 2) * grid / height), int((x + w / 2) * grid / width)] = cls
    return labels


def render_training_scenes(world: str | Path, cfg: VFMConfig, count: int | None = None, offset: int = 0, progress: bool = True):
    """``(images uint8 [N, S, S, 3], labels [N, G, G])`` of the VFM's balanced scene stream."""
    wcfg = dataclasses.replace(_world_config(Path(world)), rare_prob=cfg.rare_prob, max_rare=cfg.max_rare)
    n = cfg.scenes if count is None else count
    jobs = [(wcfg, cfg.seed, offset + i, cfg.image_size, 16, cfg.reducing_gap) for i in range(n)]
    pool = ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else None
    try:
        it = pool.map(_render, jobs, chunksize=16) if pool else map(_render, jobs)
        out = list(tqdm(it, total=n, desc="vfm scenes", unit="img", file=sys.stderr, disable=not progress, leave=False))
    finally:
        if pool:
            pool.shutdown()
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def _crop_origins(labels: np.ndarray, weight: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """Top-left patch (row, col) of one crop per scene, balanced over classes.

    Each crop holds a foreground patch drawn with probability proportional to its class weight
    (inverse class frequency), placed uniformly inside the crop; a scene without objects gets a
    uniform crop.
    """
    n, grid, _ = labels.shape
    out = np.zeros((n, 2), dtype=np.int64)
    for i in range(n):
        fg = np.flatnonzero(labels[i] > 0)
        if len(fg):
            p = weight[labels[i].flat[fg]]
            r, c = divmod(int(fg[rng.choice(len(fg), p=p / p.sum())]), grid)
        else:
            r, c = (int(v) for v in rng.integers(0, grid, 2))
        out[i] = [np.clip(r - rng.integers(0, crop), 0, grid - crop), np.clip(c - rng.integers(0, crop), 0, grid - crop)]
    return out


def _normalise(u8: torch.Tensor) -> torch.Tensor:
    # The runtime's ``vfm_pixels`` normalisation (ImageNet mean and std), from NHWC uint8.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    # In place on one float copy (its strides as the permuted view's): the same operations, the same bits.
    return u8.permute(0, 3, 1, 2).to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)


def vfm_spec(cfg: VFMConfig, ref: str = "vfm.safetensors"):
    """The ``VFMSpec`` that loads the trained backbone."""
    from rtrt.runtime.bundle import VFMSpec

    return VFMSpec(kind="timm", ref=ref, arch=cfg.arch, image_size=cfg.image_size, patch_size=16,
                   dim=cfg.embed_dim, kwargs=cfg.kwargs, reducing_gap=cfg.reducing_gap)


def train_vfm(world: str | Path, out: str | Path, cfg: VFMConfig, progress: bool = True) -> dict:
    """Render the balanced scenes, train the backbone with a patch classifier, save it to ``out``."""
    from safetensors.torch import save_file

    from rtrt.runtime.vfm import create_timm_vfm
    from rtrt.tools.demo.world import WORLD_CATEGORIES

    out = Path(out)
    t0 = time.time()
    images, labels = render_training_scenes(world, cfg, progress=progress)
    t_render = time.time() - t0
    torch.manual_seed(cfg.seed)
    model = create_timm_vfm(cfg.arch, cfg.image_size, **cfg.kwargs)
    prefix = int(model.num_prefix_tokens)
    head = torch.nn.Linear(cfg.embed_dim, 1 + len(WORLD_CATEGORIES))
    counts = np.bincount(labels.reshape(-1), minlength=head.out_features).astype(np.float64)
    # Balance in two halves: crops are centred on patches drawn by inverse class frequency, and the
    # loss weighs classes by its square root (normalised to mean 1 over the classes present).
    inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    sqrt_inv = np.sqrt(inv)
    weight = torch.tensor(sqrt_inv / sqrt_inv[counts > 0].mean(), dtype=torch.float32)
    params = list(model.named_parameters()) + [("head." + n, p) for n, p in head.named_parameters()]
    decay = [p for n, p in params if p.ndim >= 2 and "token" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    crop_rng = np.random.default_rng([cfg.seed, VFM_SEED_STREAM])
    crop = cfg.train_crop // 16
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    step, losses, accs, epoch_losses = 0, [], [], []
    model.train()
    bar = tqdm(total=total, desc="vfm train", unit="step", file=sys.stderr, disable=not progress)
    for epoch in range(cfg.epochs):
        first = len(losses)
        order = torch.randperm(len(images), generator=gen).numpy()
        for i in range(0, len(order), cfg.batch_size):
            idx = np.sort(order[i : i + cfg.batch_size])
            origins = _crop_origins(labels[idx], inv, crop, crop_rng)
            xs, ys = [], []
            for k, (r, c) in zip(idx, origins):
                xs.append(images[k, r * 16 : (r + crop) * 16, c * 16 : (c + crop) * 16])
                ys.append(labels[k, r : r + crop, c : c + crop])
            x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
            flip = torch.rand(len(idx), generator=gen) < 0.5  # mirror half of the batch, labels too
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(2), x)
            y = torch.where(flip.view(-1, 1, 1), y.flip(2), y)
            lr = cfg.lr * (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else (
                cfg.lr / 20 + (cfg.lr - cfg.lr / 20) * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))))
            for g in opt.param_groups:
                g["lr"] = lr
            tokens = model.forward_features(_normalise(x))[:, prefix:]
            logits = head(tokens).flatten(0, 1)
            target = y.flatten()
            loss = F.cross_entropy(logits, target, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            fg = target > 0
            accs.append((logits.argmax(-1)[fg] == target[fg]).float().mean().item() if fg.any() else 0.0)
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-20:]):.3f}", fg_acc=f"{np.mean(accs[-20:]):.2f}")
        epoch_losses.append(float(np.mean(losses[first:])))
    bar.close()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(out / "vfm.safetensors"),
              metadata={"format": "pt"})
    spec = vfm_spec(cfg)
    report = {
        "config": dataclasses.asdict(cfg),
        "spec": dataclasses.asdict(spec),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "loss_first": float(np.mean(losses[:20])),
        "loss_last": float(np.mean(losses[-20:])),
        "epoch_losses": epoch_losses,
        "train_fg_patch_acc_last": float(np.mean(accs[-20:])),
        "seconds_render": round(t_render, 1),
        "seconds": round(time.time() - t0, 1),
    }
    (out / "vfm.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def load_demo_vfm(directory: str | Path):
    """The trained VFM of ``directory`` through the runtime's ``load_vfm`` (the bundle's path)."""
    from rtrt.runtime.bundle import VFMSpec
    from rtrt.runtime.vfm import load_vfm

    directory = Path(directory)
    spec = VFMSpec(**json.loads((directory / "vfm.json").read_text())["spec"])
    return load_vfm(spec, resolve=lambda ref: str(directory / ref)), spec


@torch.no_grad()
def _region_features(backbone, spec, world: Path, split: str, batch: int = 16) -> tuple[torch.Tensor, list[str]]:
    """Mean patch token inside every region box of ``split`` (the patch under the box centre at least)."""
    from PIL import Image

    from rtrt.runtime.image import spec_pixels
    from rtrt.trainer.coda import image_path_for, iter_annotations

    grid = spec.image_size // spec.patch_size
    items = []
    for path, ann in iter_annotations(world / "CODA-LM" / split):
        items += [(image_path_for(path.name), r.box, r.category_name) for r in ann.region_perception]
    feats, names = [], []
    wcfg = _world_config(world)
    sx, sy = grid / wcfg.width, grid / wcfg.height
    by_image: dict[str, list] = {}
    for p, box, name in items:
        by_image.setdefault(p, []).append((box, name))
    paths = sorted(by_image)
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        ext = "." + wcfg.image_format
        imgs = [Image.open(world / p.replace(".jpg", ext)).convert("RGB") for p in chunk]
        tokens = backbone(spec_pixels(imgs, spec))  # [B, P, D]
        tokens = tokens.view(len(chunk), grid, grid, -1)
        for b, p in enumerate(chunk):
            for (x, y, w, h), name in by_image[p]:
                c0, c1 = int(x * sx), min(grid - 1, int((x + w) * sx))
                r0, r1 = int(y * sy), min(grid - 1, int((y + h) * sy))
                feats.append(tokens[b, r0 : r1 + 1, c0 : c1 + 1].reshape(-1, tokens.shape[-1]).mean(0))
                names.append(name)
    return torch.stack(feats), names


def probe_vfm(backbone, spec, world: str | Path, train_split: str = "plugin", test_split: str = "test", epochs: int = 300) -> dict:
    """Linear-probe and nearest-class-mean accuracy (0-100) of box-pooled patch tokens on held-out regions."""
    from rtrt.tools.demo.world import RARE_CATEGORIES

    world = Path(world)
    xtr, ntr = _region_features(backbone, spec, world, train_split)
    xte, nte = _region_features(backbone, spec, world, test_split)
    classes = sorted(set(ntr))
    keep = [i for i, n in enumerate(nte) if n in classes]
    xte, nte = xte[keep], [nte[i] for i in keep]
    ytr = torch.tensor([classes.index(n) for n in ntr])
    yte = torch.tensor([classes.index(n) for n in nte])
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    ztr, zte = (xtr - mu) / sd, (xte - mu) / sd
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(ztr.shape[1], len(classes))
    torch.nn.init.normal_(lin.weight, std=0.01, generator=g)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    counts = torch.bincount(ytr, minlength=len(classes)).float()
    w = 1.0 / counts.clamp(min=1)
    for _ in range(epochs):  # full batch: a few hundred regions
        loss = F.cross_entropy(lin(ztr), ytr, weight=w / w.mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred_lin = lin(zte).argmax(-1)
        centres = F.normalize(torch.stack([ztr[ytr == c].mean(0) for c in range(len(classes))]), dim=-1)
        pred_ncm = (F.normalize(zte, dim=-1) @ centres.T).argmax(-1)
    rare = torch.tensor([n in RARE_CATEGORIES for n in nte])

    def acc(pred, mask=None):
        m = torch.ones_like(yte, dtype=torch.bool) if mask is None else mask
        return round(100.0 * (pred[m] == yte[m]).float().mean().item(), 1) if m.any() else None

    per_class = {c: acc(pred_lin, yte == i) for i, c in enumerate(classes) if (yte == i).any()}
    return {
        "train_regions": len(ntr), "test_regions": len(nte), "classes": len(classes),
        "linear": {"all": acc(pred_lin), "rare": acc(pred_lin, rare), "common": acc(pred_lin, ~rare)},
        "nearest_mean": {"all": acc(pred_ncm), "rare": acc(pred_ncm, rare), "common": acc(pred_ncm, ~rare)},
        "linear_per_class": per_class,
    }
