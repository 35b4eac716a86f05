"""Region features for phase 1: DINOv3 patch tokens pooled inside each annotated box, cached on disk.

The whole image goes through the VFM once (resized to the VFM's square input, as the detector sees
it at inference); each box then averages the patch tokens it covers, every patch weighted by the
fraction of its area inside the box. A box smaller than a patch still gets the patch(es) it sits
in, and the features live in the same token space the detector scores at inference time (not a
resized crop, which the detector never sees).

The VFM is a timm DINOv3 (``vit_small_patch16_dinov3``-family, weights from a local safetensors
file) or a transformers ``DINOv3ViTModel`` (a ``save_pretrained`` directory), loaded through
``rtrt.runtime.vfm``. Features are cached per (model, image, box): the model key hashes the VFM
spec and its weights, the image key hashes the file's bytes, and one safetensors file per model
and image holds one tensor per box, so a second run reads them instead of running the VFM.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from rtrt.runtime.bundle import VFMSpec, pinned_source, sha256_file
from rtrt.runtime.fileio import atomic_write_bytes
from rtrt.runtime.errors import ImageError, InputError, ModelMismatchError
from rtrt.runtime.image import RESAMPLE, load_image, spec_pixels
from rtrt.runtime.vfm import VFMBackbone, create_timm_vfm, load_vfm

__all__ = ["POOLING", "Box", "vfm_spec", "model_key", "check_box", "box_weights", "RegionFeatureExtractor"]

# Changes whenever the pooling changes, so old cache entries are not reused.
POOLING = "patch-overlap-mean-v1"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

Box = tuple[float, float, float, float]  # x, y, w, h in pixels of the original image


# Pillow's integer filter codes (as HF preprocessor_config.json writes ``resample``) -> RESAMPLE names.
_PIL_CODES = {int(code): name for name, code in RESAMPLE.items()}


def vfm_spec(kind: str, ref: str, arch: str = "", image_size: int = 448, kwargs: dict[str, Any] | None = None,
             *, reducing_gap: float | None = None) -> VFMSpec:
    """The ``VFMSpec`` of a VFM (width, patch size, normalisation, resize filter read from the model's own config).

    ``reducing_gap``: Pillow's two-step resize (``rtrt.runtime.image.vfm_resize``), when the VFM was
    trained that way or the speed is worth the small difference; ``None`` resizes in one exact pass.

    ``kind`` is ``timm`` (``arch`` names the architecture, ``ref`` the weights file or directory, or a
    hub id) or ``transformers`` (``ref`` a ``save_pretrained`` directory or hub id). A hub id must be
    pinned, ``org/name@<40-hex commit>``: the spec's ``ref`` is then ``org/name`` and its ``revision``
    the commit; a bare ``org/name`` (that is not a local path) is an ``InputError``.
    """
    kwargs = dict(kwargs or {})
    source, revision = pinned_source(ref, what="VFM")
    if revision is not None:
        ref = source
    if kind == "timm":
        if not arch:
            raise InputError("a timm VFM needs --vfm-arch (e.g. vit_small_patch16_dinov3)")
        model = create_timm_vfm(arch, image_size, **kwargs)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        patch = model.patch_embed.patch_size
        return VFMSpec(
            kind="timm", ref=ref, revision=revision, arch=arch, image_size=image_size, patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
            mean=[float(v) for v in cfg.get("mean", IMAGENET_MEAN)], std=[float(v) for v in cfg.get("std", IMAGENET_STD)],
            dim=int(model.embed_dim), kwargs=kwargs, resample=_resample_name(cfg.get("interpolation")), reducing_gap=reducing_gap,
        )
    if kind == "transformers":
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(ref, revision=revision, local_files_only=revision is None)
        except (OSError, ValueError) as e:
            raise InputError(f"{ref}: cannot read the VFM config ({str(e).splitlines()[0]})") from None
        mean, std, resample = IMAGENET_MEAN, IMAGENET_STD, None
        pre = Path(ref) / "preprocessor_config.json"
        if revision is None and pre.is_file():  # a hub VFM keeps the ImageNet defaults (nothing fetched for them)
            p = json.loads(pre.read_text(encoding="utf-8"))
            mean, std, resample = p.get("image_mean", mean), p.get("image_std", std), p.get("resample")
        return VFMSpec(
            kind="transformers", ref=ref, revision=revision, image_size=image_size, patch_size=int(config.patch_size),
            mean=[float(v) for v in mean], std=[float(v) for v in std], dim=int(config.hidden_size),
            resample=_resample_name(resample), reducing_gap=reducing_gap,
        )
    raise InputError(f"VFM kind {kind!r} is not supported (timm or transformers)")


def _resample_name(value) -> str:
    """A config's resize filter (timm name, HF Pillow code) as a ``RESAMPLE`` name; bicubic when absent or unknown."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _PIL_CODES.get(value, "bicubic")
    return value if isinstance(value, str) and value in RESAMPLE else "bicubic"


def model_key(backbone: VFMBackbone, spec: VFMSpec) -> str:
    """Hash of everything that decides a region feature: the spec (minus where it was loaded from), the weights, the pooling."""
    h = hashlib.sha256()
    desc = {k: v for k, v in asdict(spec).items() if k != "ref"}
    h.update(json.dumps({"spec": desc, "pooling": POOLING}, sort_keys=True).encode())
    for name, t in sorted(backbone.model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_box(box: Sequence[float], image_wh: tuple[int, int], where: str) -> Box:
    """A box [x, y, w, h] that lies inside the image and has an area; else a one-line ``InputError``."""
    if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        raise InputError(f"{where}: box {list(box)!r} is not four finite numbers [x, y, w, h]")
    x, y, w, h = (float(v) for v in box)
    iw, ih = image_wh
    if w <= 0 or h <= 0:
        raise InputError(f"{where}: box {[x, y, w, h]} has zero area")
    if x < 0 or y < 0 or x + w > iw or y + h > ih:
        raise InputError(f"{where}: box {[x, y, w, h]} is outside the {iw}x{ih} image")
    return (x, y, w, h)


def box_weights(box: Box, image_wh: tuple[int, int], grid: int) -> torch.Tensor:
    """Pooling weights [grid * grid] (row-major patches, summing to 1): each patch's area inside the box."""
    x, y, w, h = box
    iw, ih = image_wh
    edges = torch.arange(grid + 1, dtype=torch.float64)

    def overlap(lo: float, hi: float) -> torch.Tensor:
        return (torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))).clamp(min=0)

    ox = overlap(x / iw * grid, (x + w) / iw * grid)
    oy = overlap(y / ih * grid, (y + h) / ih * grid)
    wts = torch.outer(oy, ox).flatten()
    return (wts / wts.sum()).float()


def _box_name(box: Box) -> str:
    return "box:" + ",".join(repr(float(v)) for v in box)


def _file_sha256(path: str) -> str:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None


class RegionFeatureExtractor:
    """``extract([(image_path, [box, ...]), ...]) -> [Tensor [n_boxes, dim] | None, ...]``, cached on disk.

    ``cache_dir`` None disables the cache. ``computed`` / ``cached`` count boxes computed by the VFM
    and boxes read from the cache since construction.
    """

    def __init__(self, spec: VFMSpec, backbone: VFMBackbone | None = None, cache_dir: str | os.PathLike | None = None,
                 batch_size: int = 8, device: torch.device | str = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.backbone = (backbone or load_vfm(spec)).to(self.device).eval()
        self.key = model_key(self.backbone, spec)
        self.cache_dir = Path(cache_dir) / self.key[:32] if cache_dir is not None else None
        self.batch_size = max(1, int(batch_size))
        self.grid = spec.image_size // spec.patch_size
        self.computed = 0
        self.cached = 0

    def _cache_path(self, image_sha: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / image_sha[:2] / f"{image_sha}.safetensors"

    def _read_cache(self, image_sha: str) -> tuple[dict[str, torch.Tensor], tuple[int, int] | None]:
        path = self._cache_path(image_sha)
        if path is None or not path.is_file():
            return {}, None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, (int(meta["width"]), int(meta["height"]))
        except Exception:  # a damaged cache entry is recomputed, never trusted
            return {}, None

    def _write_cache(self, image_sha: str, feats: dict[str, torch.Tensor], image_wh: tuple[int, int]) -> None:
        path = self._cache_path(image_sha)
        if path is None:
            return
        from filelock import FileLock
        from safetensors.torch import save

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            merged, _ = self._read_cache(image_sha)
            merged.update({k: v.contiguous() for k, v in feats.items()})
            meta = {"width": str(image_wh[0]), "height": str(image_wh[1]), "model": self.key}
            atomic_write_bytes(path, save(merged, metadata=meta))

    @torch.no_grad()
    def _run(self, pending: list[tuple[int, str, Any, list[Box]]], out: list) -> None:
        images = [img for _, _, img, _ in pending]
        pixels = spec_pixels(images, self.spec).to(self.device)
        tokens = self.backbone(pixels).float().cpu()  # [B, P, dim]
        if tokens.shape[1] != self.grid * self.grid:
            raise ModelMismatchError(f"VFM gave {tokens.shape[1]} patch tokens, expected {self.grid}x{self.grid}")
        for b, (i, sha, img, boxes) in enumerate(pending):
            wts = torch.stack([box_weights(box, img.size, self.grid) for box in boxes])  # [n, P]
            feats = wts @ tokens[b]
            out[i] = feats
            self._write_cache(sha, {_box_name(box): f for box, f in zip(boxes, feats)}, img.size)
            self.computed += len(boxes)

    def extract(self, requests: Sequence[tuple[str, Sequence[Sequence[float]]]], skip_bad: bool = False,
                progress: bool = False) -> tuple[list[torch.Tensor | None], list[str]]:
        """Features of every box of every image, and the one-line reasons of images skipped.

        A missing or unreadable image raises ``ImageError`` naming it, unless ``skip_bad``: then its
        entry is None and the reason is returned. A box outside its image or of zero area always
        raises ``InputError``.
        """
        from tqdm import tqdm

        out: list[torch.Tensor | None] = [None] * len(requests)
        bad: list[str] = []
        pending: list[tuple[int, str, Any, list[Box]]] = []
        for i, (path, boxes) in enumerate(tqdm(requests, desc="region features", disable=not progress, leave=False)):
            path = str(path)
            try:
                sha = _file_sha256(path)
                hit, wh = self._read_cache(sha)
                img = None
                if wh is None:
                    img = load_image(path)
                    wh = img.size
            except ImageError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
                continue
            checked = [check_box(tuple(b), wh, f"{path} region {j + 1}") for j, b in enumerate(boxes)]
            if checked and all(_box_name(b) in hit for b in checked):
                out[i] = torch.stack([hit[_box_name(b)] for b in checked])
                self.cached += len(checked)
                continue
            if not checked:
                out[i] = torch.zeros(0, self.spec.dim)
                continue
            if img is None:
                try:
                    img = load_image(path)
                except ImageError as e:
                    if not skip_bad:
                        raise
                    bad.append(str(e))
                    continue
            pending.append((i, sha, img, checked))
            if len(pending) >= self.batch_size:
                self._run(pending, out)
                pending = []
        if pending:
            self._run(pending, out)
        return out, bad
