"""Phase 1, ``rtrt train embeddings``: the multi-modal class embeddings W and both projections.

Data: the annotated regions (``box`` + ``category_name``) of CODA-LM annotation files, as DINOv3
region features (``features.py``), and each class's name plus its synonyms and short descriptions,
as frozen text features (``text.py``).

Model: ``RareObjectDetector.proj`` maps region features into the LLM space (the detector reuses
exactly this projection at inference), a second ``Projection`` maps text features there, and W
[C, D_llm] holds one row per class, initialised from the class means of the (normalised) projected
region features.

Loss, all in cosine space with one temperature:
- contrastive alignment: each region against the text prototypes (mean projected text of each
  class) of all classes — its own class is the positive;
- classification: each region, and each text, against the rows of W.
After every optimizer step W moves by an exponential moving average toward the batch's class
centres (mean of the class's projected regions and its text prototype), with momentum ``ema``.

Per-region terms are summed and divided by the global batch size, so gradients averaged by
DistributedDataParallel equal those of one process with the same global batch.

    rtrt train embeddings --annotations data/CODA-LM/Train --images data --synonyms synonyms.json \\
        --vfm dinov3_vits16.safetensors --vfm-arch vit_small_patch16_dinov3 --text-encoder openclip:ViT-B-32 \\
        --text-weights open_clip_vit_b32.safetensors --d-llm 4096 --out bundles/phase1
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rtrt.runtime.bundle import ClassInfo, Manifest, write_bundle
from rtrt.runtime.errors import InputError
from rtrt.runtime.modules import ClassEmbeddings, Projection, RareObjectDetector

from . import loop
from .features import RegionFeatureExtractor, vfm_spec
from .text import class_texts, load_text_encoder

__all__ = ["EmbeddingsConfig", "EmbeddingModel", "RegionSet", "collect_regions", "train_embeddings", "default_cache_dir"]


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/rtrt/region-features`` (``~/.cache/...``): shared by every run, keyed by content."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rtrt", "region-features")


@dataclass
class EmbeddingsConfig:
    """Phase-1 settings; saved as config.json beside every checkpoint and in the bundle's manifest.training."""

    annotations: str  # directory of CODA-LM annotation files (one JSON per image)
    images: str  # dataset root that CODA-LM image paths ("val/images/0001.jpg") are relative to
    out: str  # bundle directory to write
    d_llm: int  # hidden size of the VLM's language model: the width of W
    synonyms: str = ""  # JSON file {class: [synonyms, short descriptions]} (rtrt synonyms); "" = class names only
    classes: list[str] = field(default_factory=list)  # rows of W; empty: the synonyms file's classes, else every category in the data
    vfm_kind: str = "timm"  # "timm" or "transformers"
    vfm: str = ""  # VFM weights: timm safetensors file/dir, transformers save_pretrained dir, or a hub id
    vfm_arch: str = "vit_small_patch16_dinov3"  # timm architecture (vfm_kind "timm")
    vfm_kwargs: dict = field(default_factory=dict)  # timm create_model overrides for custom sizes (depth, embed_dim, ...)
    image_size: int = 448  # square VFM input side; the detector sees images at this size too
    carry_vfm: bool = False  # copy the VFM into the bundle (vfm/) instead of referencing it by path
    text_encoder: str = "openclip:ViT-B-32"  # openclip:NAME (or openclip:config.json) or hf:PATH_OR_ID
    text_weights: str = ""  # open_clip checkpoint file for an openclip: encoder; "" = random (tests only)
    cache: str = ""  # region-feature cache directory; "" = no cache
    proj_hidden: int = 0  # hidden width of both projection MLPs; 0 = one linear layer
    epochs: int = 20  # passes over the regions (the paper trains 20)
    batch_size: int = 64  # global batch (regions per step over all processes)
    lr: float = 1e-3  # peak AdamW learning rate (cosine decay to lr/10)
    warmup_steps: int = 0  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay of the projections (never on W)
    temperature: float = 0.07  # softmax temperature of every cosine logit
    ema: float = 0.99  # momentum of the EMA update of W toward the batch's class centres; 1 = off
    w_contrastive: float = 1.0  # weight of the region-text contrastive loss
    w_classification: float = 1.0  # weight of the region and text classification losses against W
    threshold: float = 0.3  # detector: cosine score above which a class is reported (saved in the bundle)
    top_k: int = 5  # detector: at most this many classes go into the prompt (saved in the bundle)
    seed: int = 0  # seeds the projections' initialisation and every epoch's order
    feature_batch: int = 8  # images per VFM forward when extracting region features
    device: str = "auto"  # auto, cpu or cuda
    skip_bad: bool = False  # skip missing or unreadable images (reported) instead of failing
    resume: bool = False  # continue from <out>.ckpt/ when it holds a checkpoint of the same settings
    overwrite: bool = False  # replace an existing --out


# Fields that may change between an interrupted run and its --resume without changing the result.
RESUME_FREE = ("resume", "overwrite", "device", "feature_batch", "cache")


@dataclass
class RegionSet:
    """The training regions: where they are and their class."""

    names: list[str]  # class names (rows of W)
    requests: list[tuple[str, list[tuple[float, float, float, float]]]]  # (image path, boxes) per image
    labels: list[list[int]]  # class index of every box, per image


def _image_of(root: Path, annotation_name: str, image_path_for) -> str:
    """The image of an annotation file: CODA-LM's ``.jpg``, else the same name as ``.png`` / ``.jpeg`` when only that exists."""
    first = root / image_path_for(annotation_name)
    for ext in (".png", ".jpeg"):
        other = first.with_suffix(ext)
        if not first.exists() and other.exists():
            return str(other)
    return str(first)


def collect_regions(annotations: str | os.PathLike, images: str | os.PathLike, classes: Sequence[str]) -> RegionSet:
    """Regions of ``classes`` (all categories with regions when empty) from every annotation file.

    An unknown category, in the data or in ``classes``, is a one-line error naming it.
    """
    from .coda import category_group, image_path_for, iter_annotations

    for name in classes:
        category_group(name)
    found = list(iter_annotations(annotations))
    if not found:
        raise InputError(f"{annotations}: no annotation files (*.json)")
    names = list(classes) or sorted({r.category_name for _, a in found for r in a.region_perception})
    index = {n: i for i, n in enumerate(names)}
    requests, labels = [], []
    for path, ann in found:
        keep = [r for r in ann.region_perception if r.category_name in index]
        if keep:
            requests.append((_image_of(Path(images), path.name, image_path_for), [tuple(r.box) for r in keep]))
            labels.append([index[r.category_name] for r in keep])
    return RegionSet(names, requests, labels)


class EmbeddingModel(nn.Module):
    """W, the detector (whose ``proj`` maps VFM features into the LLM space) and the text projection."""

    def __init__(self, names: Sequence[str], synonyms: dict[str, list[str]], d_vfm: int, d_text: int, cfg: EmbeddingsConfig):
        super().__init__()
        self.detector = RareObjectDetector(d_vfm, cfg.d_llm, cfg.proj_hidden, cfg.threshold, cfg.top_k)
        self.text_proj = Projection(d_text, cfg.d_llm, cfg.proj_hidden)
        self.embeddings = ClassEmbeddings(names, cfg.d_llm, synonyms)
        self.temperature = cfg.temperature

    @torch.no_grad()
    def init_weight(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """W = class means of the normalised projected region features (all of them, in chunks)."""
        c, dim = self.embeddings.weight.shape
        sums = torch.zeros(c, dim, device=feats.device)
        for i in range(0, len(feats), 4096):
            sums.index_add_(0, labels[i:i + 4096], F.normalize(self.detector.proj(feats[i:i + 4096]), dim=-1))
        counts = torch.bincount(labels, minlength=c).clamp(min=1).unsqueeze(1).to(sums.dtype)
        self.embeddings.weight.copy_(sums / counts)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, text_feats: torch.Tensor, text_owner: torch.Tensor):
        """Per-region losses (contrastive [b], classification [b]), the text classification loss (scalar),
        the normalised projected regions [b, D] and the class text prototypes [C, D]."""
        c = self.embeddings.num_classes
        z = F.normalize(self.detector.proj(feats), dim=-1)
        u = F.normalize(self.text_proj(text_feats), dim=-1)
        counts = torch.bincount(text_owner, minlength=c).clamp(min=1).unsqueeze(1).to(u.dtype)
        protos = F.normalize(torch.zeros(c, u.shape[1], device=u.device, dtype=u.dtype).index_add(0, text_owner, u) / counts, dim=-1)
        w = F.normalize(self.embeddings.weight, dim=-1)
        t = self.temperature
        contrastive = F.cross_entropy(z @ protos.T / t, labels, reduction="none")
        cls_regions = F.cross_entropy(z @ w.T / t, labels, reduction="none")
        cls_texts = F.cross_entropy(u @ w.T / t, text_owner)
        return contrastive, cls_regions, cls_texts, z, protos


def _synonym_table(cfg: EmbeddingsConfig) -> dict[str, list[str]]:
    if not cfg.synonyms:
        return {}
    from .synonyms import load_synonyms

    return load_synonyms(cfg.synonyms)


def train_embeddings(cfg: EmbeddingsConfig) -> Path:
    """Run phase 1 as configured (one process or a torchrun rank) and return the written bundle's path."""
    out = loop.check_output(cfg.out, cfg.overwrite)
    d = loop.setup(cfg.device)
    try:
        return _train(cfg, out, d)
    finally:
        loop.teardown(d)


def _train(cfg: EmbeddingsConfig, out: Path, d: loop.Dist) -> Path:
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise InputError("--epochs and --batch-size must be at least 1")
    if not 0.0 <= cfg.ema <= 1.0:
        raise InputError(f"--ema must be in [0, 1], got {cfg.ema}")
    synonyms = _synonym_table(cfg)
    regions = collect_regions(cfg.annotations, cfg.images, cfg.classes or sorted(synonyms))
    names = regions.names

    # Region features: each rank computes its share of the images into the shared cache, then
    # every rank reads all of them (cache hits), so every rank holds the same full feature table.
    spec = vfm_spec(cfg.vfm_kind, cfg.vfm, cfg.vfm_arch, cfg.image_size, cfg.vfm_kwargs)
    extractor = RegionFeatureExtractor(spec, cache_dir=cfg.cache or None, batch_size=cfg.feature_batch, device=d.device)
    if d.distributed and cfg.cache:
        extractor.extract(regions.requests[d.rank::d.world_size], skip_bad=True, progress=d.is_main)
        d.barrier()
    per_image, bad = extractor.extract(regions.requests, skip_bad=cfg.skip_bad, progress=d.is_main)
    for reason in bad:
        d.log(f"skipped: {reason}")
    if all(f is None for f in per_image):
        raise InputError(f"{cfg.annotations}: no usable image left after skipping {len(bad)} bad ones")
    feats = torch.cat([f for f in per_image if f is not None]).to(d.device)
    labels = torch.tensor([c for f, ls in zip(per_image, regions.labels) if f is not None for c in ls], device=d.device)
    counts = torch.bincount(labels, minlength=len(names)).tolist()
    for name, n in zip(names, counts):
        if n == 0:
            raise InputError(f"class {name!r} has no regions in {cfg.annotations}" + (" after skipping bad images" if bad else ""))

    loop.seed_all(cfg.seed)  # an encoder without weights is initialised randomly: the same on every rank
    encoder = load_text_encoder(cfg.text_encoder, cfg.text_weights or None, d.device)
    if not encoder.pretrained:
        d.log(f"warning: {cfg.text_encoder} has random weights (no --text-weights)")
    texts, owner = class_texts(names, synonyms)
    text_feats = encoder.encode(texts).to(d.device)
    text_owner = torch.tensor(owner, device=d.device)

    loop.seed_all(cfg.seed)
    model = EmbeddingModel(names, {n: synonyms.get(n, []) for n in names}, spec.dim, encoder.dim, cfg).to(d.device)
    model.init_weight(feats, labels)
    w_init = model.embeddings.weight.detach().clone()
    decay = [p for n, p in model.named_parameters() if not n.startswith("embeddings.")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": [model.embeddings.weight], "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    files = loop.RunFiles.for_output(out)
    config = loop.config_dict(cfg)
    ckpt = loop.Checkpoint(files.checkpoints, config, RESUME_FREE)
    start, history = ckpt.restore(model, optimizer, cfg.resume, d)
    metrics = loop.Metrics(files.metrics, d)
    metrics.log(kind="start", phase="embeddings", resumed_at=start, world_size=d.world_size, config=config)

    net = d.wrap(model)
    weight = model.embeddings.weight

    def step(idx: list[int], global_count: int) -> dict[str, float]:
        ix = torch.tensor(idx, device=d.device, dtype=torch.long)
        y = labels[ix]
        con, cls_r, cls_t, z, protos = net(feats[ix], y, text_feats, text_owner)
        # Sums over this rank's regions / global batch, times the world size that DDP's mean divides by.
        scale = d.world_size / global_count
        loss = (cfg.w_contrastive * con.sum() + cfg.w_classification * cls_r.sum()) * scale + cfg.w_classification * cls_t
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cfg.ema < 1.0:
            with torch.no_grad():
                sums = torch.zeros_like(weight).index_add_(0, y, z.detach())
                hits = torch.bincount(y, minlength=weight.shape[0]).to(weight.dtype)
                d.all_reduce(sums)
                d.all_reduce(hits)
                seen = hits > 0
                centre = 0.5 * sums[seen] / hits[seen].unsqueeze(1) + 0.5 * protos.detach()[seen]
                weight[seen] = cfg.ema * weight[seen] + (1.0 - cfg.ema) * centre
        n = max(len(idx), 1)
        return {
            "loss": (cfg.w_contrastive * con.sum().item() + cfg.w_classification * cls_r.sum().item()) / n
            + cfg.w_classification * cls_t.item(),
            "contrastive": con.sum().item() / n,
            "cls_regions": cls_r.sum().item() / n,
            "cls_texts": cls_t.item(),
        }

    history = loop.fit(
        d, num_samples=len(labels), global_batch=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed, optimizer=optimizer,
        lr=cfg.lr, warmup=cfg.warmup_steps, step=step,
        state=lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
        checkpoint=ckpt, metrics=metrics, desc="embeddings", start_epoch=start, history=history,
    )

    if d.is_main:
        w = model.embeddings.weight.detach().cpu()
        provenance = {
            "config": config,
            "world_size": d.world_size,
            "history": history,
            "regions_per_class": dict(zip(names, counts)),
            "skipped_images": bad,
            "texts": len(texts),
            "text_encoder": {"key": encoder.key, "dim": encoder.dim},
            "vfm_key": extractor.key,
            "w_moved": float((w - w_init.cpu()).norm() / w_init.norm().clamp(min=1e-12)),
        }
        vfm = spec
        carried: dict[str, str] = {}
        carried_dirs: dict[str, str] = {}
        if cfg.carry_vfm:
            src = Path(cfg.vfm)
            if spec.kind == "timm":
                carried["vfm/model.safetensors"] = str(src / "model.safetensors" if src.is_dir() else src)
            else:
                carried_dirs["vfm"] = str(src)
            vfm.ref = "vfm"
        elif os.path.exists(cfg.vfm):
            vfm.ref = os.path.abspath(cfg.vfm)
        manifest = Manifest(
            classes=[ClassInfo(n, list(synonyms.get(n, []))) for n in names],
            d_llm=cfg.d_llm,
            vfm=vfm,
            detector=model.detector.config,
            training={"embeddings": provenance},
        )
        tensors = {
            "embeddings.safetensors": {
                "W": w,
                **{f"vfm_proj.{k}": v for k, v in model.detector.proj.state_dict().items()},
                **{f"text_proj.{k}": v for k, v in model.text_proj.state_dict().items()},
            },
            "detector.safetensors": model.detector.state_dict(),
        }
        write_bundle(out, manifest, tensors, files=carried, dirs=carried_dirs, overwrite=cfg.overwrite)
        d.log(f"wrote {out} ({len(names)} classes, W moved {provenance['w_moved']:.3f} from its initialisation)")
    d.barrier()
    return out
