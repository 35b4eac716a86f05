"""Phase 1, ``rtrt train embeddings``: the multi-modal class embeddings W and both projections.

Data: the annotated regions (``box`` + ``category_name``) of CODA-LM annotation files, as DINOv3
region features (``features.py``), and each class's name plus its synonyms and short descriptions,
as frozen text features (``text.py``).

Model: ``RareObjectDetector.proj`` maps region features into the LLM space (the detector reuses
exactly this projection at inference), a second ``Projection`` maps text features there, and W
[C, D_llm] holds one row per class, initialised from the class means of the (normalised) projected
region features (``w_init="regions"``, the paper), or from the class names' token embeddings in the
VLM (``w_init="names"``, our addition: the mean input-embedding row of each display name, what the
frozen LLM reads for that name; ``name_embeddings.py``).

Loss, all in cosine space with one temperature:
- contrastive alignment: each region against the text prototypes (mean projected text of each
  class) of all classes — its own class is the positive;
- classification: each region, and each text, against the rows of W.
After every optimizer step W moves by an exponential moving average toward the batch's class
centres (mean of the class's projected regions and its text prototype), with momentum ``ema``.

Optional name tie (``w_name_tie > 0``; our addition): ``w_name_tie`` * the mean over classes of
(1 - cosine of W's row and the class name's embedding), so W stays readable as the name by the LLM
while the regions pull it toward what the VFM sees. Both name options need the VLM (``vlm``).

Optional detection loss (``w_detection > 0``; our addition, the paper trains on regions only): the
detector scores single patches at inference (max cosine over patches against the threshold), so
phase 1 can also train on single patch cells, as the detector sees them: cells inside a region of
a W class are positives of that class, up to ``negatives_per_image`` cells outside every such
region (those on other objects first, then seeded random ones, images without a W class included)
are negatives of every class. Each cell's cosines to W, minus ``threshold``, over
``detection_temperature``, take a binary cross-entropy; positive and negative means count alike.

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
from rtrt.runtime.errors import InputError, ModelMismatchError
from rtrt.runtime.modules import ClassEmbeddings, Projection, RareObjectDetector

from . import loop
from .features import RegionFeatureExtractor, vfm_spec
from .text import class_texts, load_text_encoder

__all__ = ["EmbeddingsConfig", "EmbeddingModel", "RegionSet", "collect_regions", "detection_cells", "train_embeddings", "default_cache_dir"]


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
    vlm: str = ""  # the VLM (local dir or pinned hub id) whose input embeddings give the name embeddings; "" = none
    synonyms: str = ""  # JSON file {class: [synonyms, short descriptions]} (rtrt synonyms); "" = class names only
    classes: list[str] = field(default_factory=list)  # rows of W; empty: the synonyms file's classes, else every category in the data
    vfm_kind: str = "timm"  # "timm" or "transformers"
    vfm: str = ""  # VFM weights: timm safetensors file/dir, transformers save_pretrained dir, or a hub id
    vfm_arch: str = "vit_small_patch16_dinov3"  # timm architecture (vfm_kind "timm")
    vfm_kwargs: dict = field(default_factory=dict)  # timm create_model overrides for custom sizes (depth, embed_dim, ...)
    image_size: int = 448  # square VFM input side; the detector sees images at this size too
    vfm_reducing_gap: float | None = None  # Pillow two-step resize to image_size (as the VFM was trained); None: one exact pass
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
    w_init: str = "regions"  # "regions": class means of the projected regions (the paper); "names": the names' token embeddings (needs vlm)
    w_name_tie: float = 0.0  # weight of the tie of W to the names' token embeddings, mean (1 - cosine) (0: off, the paper; needs vlm)
    w_contrastive: float = 1.0  # weight of the region-text contrastive loss
    w_classification: float = 1.0  # weight of the region and text classification losses against W
    w_detection: float = 0.0  # weight of the patch-cell detection loss (0: off, the paper's recipe)
    negatives_per_image: int = 16  # background patch cells per image for the detection loss
    detection_temperature: float = 0.05  # scale of (cosine - threshold) in the detection loss
    threshold: float = 0.3  # detector: cosine score above which a class is reported (saved in the bundle)
    top_k: int = 5  # detector: at most this many classes go into the prompt (saved in the bundle)
    seed: int = 0  # seeds the projections' initialisation and every epoch's order
    feature_batch: int = 8  # images per VFM forward when extracting region features
    device: str = "auto"  # auto, cpu or cuda
    skip_bad: bool = False  # skip missing or unreadable images (reported) instead of failing
    resume: bool = False  # continue from <out>.ckpt/ when it holds a checkpoint of the same settings
    overwrite: bool = False  # replace an existing --out


W_INITS = ("regions", "names")

# Fields that may change between an interrupted run and its --resume without changing the result.
RESUME_FREE = ("resume", "overwrite", "device", "feature_batch", "cache")


@dataclass
class RegionSet:
    """The training regions: where they are and their class."""

    names: list[str]  # class names (rows of W)
    requests: list[tuple[str, list[tuple[float, float, float, float]]]]  # (image path, boxes) per image
    labels: list[list[int]]  # class index of every box, per image
    others: list[list[tuple[float, float, float, float]]] = field(default_factory=list)  # boxes of other categories, per image


def _image_of(root: Path, annotation_name: str, image_path_for) -> str:
    """The image of an annotation file: CODA-LM's ``.jpg``, else the same name as ``.png`` / ``.jpeg`` when only that exists."""
    first = root / image_path_for(annotation_name)
    for ext in (".png", ".jpeg"):
        other = first.with_suffix(ext)
        if not first.exists() and other.exists():
            return str(other)
    return str(first)


def collect_regions(annotations: str | os.PathLike, images: str | os.PathLike, classes: Sequence[str],
                    include_empty: bool = False) -> RegionSet:
    """Regions of ``classes`` (all categories with regions when empty) from every annotation file.

    ``include_empty`` keeps images without a region of ``classes`` too (no boxes; their other
    objects' boxes are in ``others``). An unknown category, in the data or in ``classes``, is a
    one-line error naming it.
    """
    from .coda import category_group, image_path_for, iter_annotations

    for name in classes:
        category_group(name)
    found = list(iter_annotations(annotations))
    if not found:
        raise InputError(f"{annotations}: no annotation files (*.json)")
    names = list(classes) or sorted({r.category_name for _, a in found for r in a.region_perception})
    index = {n: i for i, n in enumerate(names)}
    requests, labels, others = [], [], []
    for path, ann in found:
        keep = [r for r in ann.region_perception if r.category_name in index]
        if keep or include_empty:
            requests.append((_image_of(Path(images), path.name, image_path_for), [tuple(r.box) for r in keep]))
            labels.append([index[r.category_name] for r in keep])
            others.append([tuple(r.box) for r in ann.region_perception if r.category_name not in index])
    return RegionSet(names, requests, labels, others)


def _inside(cx: float, cy: float, box) -> bool:
    x, y, w, h = box
    return x <= cx < x + w and y <= cy < y + h


def detection_cells(image_wh: tuple[int, int], grid: int, boxes, labels, others, negatives: int, seed: int):
    """Patch cells of one image for the detection loss: ``(cell boxes, class index or -1)``.

    A cell whose centre lies inside a box of ``boxes`` is a positive of that box's class (the cell
    holding the box's centre when none does); up to ``negatives`` cells whose centres lie in no
    such box are negatives (-1): those on ``others`` (other objects) first, then random ones drawn
    with ``seed``.
    """
    import numpy as np

    iw, ih = image_wh
    cw, ch = iw / grid, ih / grid
    cell = lambda r, c: (c * cw, r * ch, cw, ch)  # noqa: E731
    centres = [((c + 0.5) * cw, (r + 0.5) * ch, r, c) for r in range(grid) for c in range(grid)]
    out_boxes, out_labels, taken = [], [], set()
    for box, lab in zip(boxes, labels):
        hits = [(r, c) for cx, cy, r, c in centres if _inside(cx, cy, box)]
        if not hits:
            x, y, w, h = box
            hits = [(min(grid - 1, int((y + h / 2) / ch)), min(grid - 1, int((x + w / 2) / cw)))]
        for rc in hits:
            if rc not in taken:
                taken.add(rc)
                out_boxes.append(cell(*rc))
                out_labels.append(int(lab))
    free = [(r, c) for cx, cy, r, c in centres if (r, c) not in taken and not any(_inside(cx, cy, b) for b in boxes)]
    hard = [rc for rc in free if any(_inside((rc[1] + 0.5) * cw, (rc[0] + 0.5) * ch, b) for b in others)]
    rng = np.random.default_rng(seed)
    pick = [hard[i] for i in rng.permutation(len(hard))[:negatives]]
    picked = set(pick)
    rest = [rc for rc in free if rc not in picked]
    pick += [rest[i] for i in rng.permutation(len(rest))[: max(0, negatives - len(pick))]]
    for rc in pick:
        out_boxes.append(cell(*rc))
        out_labels.append(-1)
    return out_boxes, out_labels


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

    def detection_loss(self, cells: torch.Tensor, cell_labels: torch.Tensor, threshold: float, temperature: float) -> torch.Tensor:
        """Binary cross-entropy of every cell's (cosine to W - threshold) / temperature: a positive cell
        (label >= 0) against its own class, a negative one (-1) against every class; the two means add."""
        z = F.normalize(self.detector.proj(cells), dim=-1)
        logits = (z @ F.normalize(self.embeddings.weight, dim=-1).T - threshold) / temperature
        pos = cell_labels >= 0
        loss = logits.new_zeros(())
        if pos.any():
            own = logits[pos].gather(1, cell_labels[pos].unsqueeze(1)).squeeze(1)
            loss = loss + F.binary_cross_entropy_with_logits(own, torch.ones_like(own))
        if (~pos).any():
            neg = logits[~pos]
            loss = loss + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))
        return loss

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, text_feats: torch.Tensor, text_owner: torch.Tensor,
                cells: torch.Tensor | None = None, cell_labels: torch.Tensor | None = None,
                threshold: float = 0.3, det_temperature: float = 0.05):
        """Per-region losses (contrastive [b], classification [b]), the text classification loss (scalar),
        the normalised projected regions [b, D], the class text prototypes [C, D] and, with ``cells``,
        the detection loss (scalar; else None)."""
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
        det = None if cells is None else self.detection_loss(cells, cell_labels, threshold, det_temperature)
        return contrastive, cls_regions, cls_texts, z, protos, det


def _synonym_table(cfg: EmbeddingsConfig) -> dict[str, list[str]]:
    if not cfg.synonyms:
        return {}
    from .synonyms import load_synonyms

    return load_synonyms(cfg.synonyms)


def _image_size(path: str) -> tuple[int, int] | None:
    """Width and height from the image header (None when it cannot be read: the extractor reports it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            rotated = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientation: load_image transposes these
    except Exception:
        return None
    return (h, w) if rotated else (w, h)


def _load_name_embeddings(cfg: EmbeddingsConfig, names: Sequence[str]) -> torch.Tensor:
    """The names' token embeddings [C, d_llm] from ``cfg.vlm`` (loaded on the CPU, then dropped)."""
    from rtrt.runtime.vlm import load_vlm

    from .name_embeddings import name_embeddings

    vlm = load_vlm(cfg.vlm, device="cpu")
    if vlm.hidden_size != cfg.d_llm:
        raise ModelMismatchError(f"VLM {cfg.vlm} has hidden size {vlm.hidden_size}, W is {cfg.d_llm} wide")
    table = name_embeddings(vlm, names)
    del vlm
    return table


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
    if cfg.w_detection < 0 or cfg.negatives_per_image < 0 or cfg.detection_temperature <= 0:
        raise InputError("--w-detection and --negatives-per-image must be >= 0, --detection-temperature > 0")
    if cfg.w_init not in W_INITS:
        raise InputError(f"--w-init must be one of {', '.join(W_INITS)}, not {cfg.w_init!r}")
    if cfg.w_name_tie < 0:
        raise InputError(f"--w-name-tie must be >= 0, got {cfg.w_name_tie}")
    use_names = cfg.w_init == "names" or cfg.w_name_tie > 0
    if use_names and not cfg.vlm:
        raise InputError("--w-init names and --w-name-tie need --vlm (the VLM whose input embeddings hold the names)")
    detect = cfg.w_detection > 0
    synonyms = _synonym_table(cfg)
    regions = collect_regions(cfg.annotations, cfg.images, cfg.classes or sorted(synonyms), include_empty=detect)
    names = regions.names

    # Region features: each rank computes its share of the images into the shared cache, then
    # every rank reads all of them (cache hits), so every rank holds the same full feature table.
    spec = vfm_spec(cfg.vfm_kind, cfg.vfm, cfg.vfm_arch, cfg.image_size, cfg.vfm_kwargs, reducing_gap=cfg.vfm_reducing_gap)
    extractor = RegionFeatureExtractor(spec, cache_dir=cfg.cache or None, batch_size=cfg.feature_batch, device=d.device)
    requests, cell_labels_per_image = regions.requests, [[] for _ in regions.requests]
    if detect:  # the patch cells of every image ride along with its regions: one VFM pass per image
        grid = spec.image_size // spec.patch_size
        requests = []
        for i, ((path, boxes), labs, others) in enumerate(zip(regions.requests, regions.labels, regions.others)):
            wh = _image_size(path)
            cells, cell_labs = ([], []) if wh is None else detection_cells(
                wh, grid, boxes, labs, others, cfg.negatives_per_image, seed=cfg.seed * 1_000_003 + i)
            requests.append((path, list(boxes) + cells))
            cell_labels_per_image[i] = cell_labs
    if d.distributed and cfg.cache:
        extractor.extract(requests[d.rank::d.world_size], skip_bad=True, progress=d.is_main)
        d.barrier()
    per_image, bad = extractor.extract(requests, skip_bad=cfg.skip_bad, progress=d.is_main)
    for reason in bad:
        d.log(f"skipped: {reason}")
    if all(f is None for f in per_image):
        raise InputError(f"{cfg.annotations}: no usable image left after skipping {len(bad)} bad ones")
    kept = [(f, ls, cl) for f, ls, cl in zip(per_image, regions.labels, cell_labels_per_image) if f is not None]
    feats = torch.cat([f[: len(ls)] for f, ls, _ in kept]).to(d.device)
    labels = torch.tensor([c for _, ls, _ in kept for c in ls], device=d.device)
    cells = torch.cat([f[len(ls):] for f, ls, _ in kept]).to(d.device) if detect else None
    cell_labels = torch.tensor([c for _, _, cl in kept for c in cl], device=d.device, dtype=torch.long) if detect else None
    if detect:
        d.log(f"detection cells: {int((cell_labels >= 0).sum())} positive, {int((cell_labels < 0).sum())} negative")
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

    name_emb = None
    if use_names:
        name_emb = _load_name_embeddings(cfg, names).to(d.device)

    loop.seed_all(cfg.seed)
    model = EmbeddingModel(names, {n: synonyms.get(n, []) for n in names}, spec.dim, encoder.dim, cfg).to(d.device)
    if cfg.w_init == "names":
        with torch.no_grad():
            model.embeddings.weight.copy_(name_emb)
    else:
        model.init_weight(feats, labels)
    w_init = model.embeddings.weight.detach().clone()
    decay = [p for n, p in model.named_parameters() if not n.startswith("embeddings.")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": [model.embeddings.weight], "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    files = loop.RunFiles.for_output(out)
    config = loop.config_dict(cfg)
    ckpt = loop.Checkpoint(files.checkpoints, config, RESUME_FREE, defaults=loop.config_defaults(type(cfg)))
    start, history = ckpt.restore(model, optimizer, cfg.resume, d)
    metrics = loop.Metrics(files.metrics, d)
    metrics.log(kind="start", phase="embeddings", resumed_at=start, world_size=d.world_size, config=config)

    net = d.wrap(model)
    weight = model.embeddings.weight

    pos_cells = torch.nonzero(cell_labels >= 0).flatten().cpu() if detect else None
    neg_cells = torch.nonzero(cell_labels < 0).flatten().cpu() if detect else None

    def pick_cells(idx: list[int]) -> torch.Tensor:
        # As many positive cells as this batch has regions, four times as many negative ones (an image
        # has far more background than object cells), drawn with a seed that depends only on the
        # batch (so a resumed run draws the same cells).
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + sum(idx) * 7919 + len(idx))
        n = len(idx)
        parts = [pool[torch.randint(len(pool), (m,), generator=g)] for pool, m in ((pos_cells, n), (neg_cells, 4 * n)) if len(pool)]
        return torch.cat(parts).to(d.device)

    def step(idx: list[int], global_count: int) -> dict[str, float]:
        ix = torch.tensor(idx, device=d.device, dtype=torch.long)
        y = labels[ix]
        extra = {}
        if detect:
            cx = pick_cells(idx)
            extra = dict(cells=cells[cx], cell_labels=cell_labels[cx], threshold=cfg.threshold, det_temperature=cfg.detection_temperature)
        con, cls_r, cls_t, z, protos, det = net(feats[ix], y, text_feats, text_owner, **extra)
        # Sums over this rank's regions / global batch, times the world size that DDP's mean divides by.
        scale = d.world_size / global_count
        loss = (cfg.w_contrastive * con.sum() + cfg.w_classification * cls_r.sum()) * scale + cfg.w_classification * cls_t
        if det is not None:
            loss = loss + cfg.w_detection * det
        tie = None
        if cfg.w_name_tie > 0:  # the same on every rank, so DDP's mean leaves it as one process computes it
            tie = (1.0 - F.cosine_similarity(weight, name_emb, dim=-1)).mean()
            loss = loss + cfg.w_name_tie * tie
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
            + cfg.w_classification * cls_t.item() + (cfg.w_detection * det.item() if det is not None else 0.0)
            + (cfg.w_name_tie * tie.item() if tie is not None else 0.0),
            "contrastive": con.sum().item() / n,
            "cls_regions": cls_r.sum().item() / n,
            "cls_texts": cls_t.item(),
            **({"detection": det.item()} if det is not None else {}),
            **({"name_tie": tie.item()} if tie is not None else {}),
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
        if name_emb is not None:  # how readable W's rows are as their names, per class
            provenance["w_name_cosine"] = dict(zip(names, F.cosine_similarity(w, name_emb.cpu(), dim=-1).tolist()))
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
