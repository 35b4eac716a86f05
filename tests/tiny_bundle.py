"""A tiny, complete, deterministic rtrt bundle for tests (export, backends, pipeline).

``make_tiny_bundle(out_dir)`` writes in well under a second, with nothing downloaded:

- ``vfm/model.safetensors``: a carried timm DINOv3 (``vit_tiny_patch16_dinov3_qkvb`` shrunk to
  depth 2, width 64, 2 heads; RoPE, 4 registers, patch 16), random weights with the layer-scale
  gammas raised from 1e-5 to 0.5 so the transformer blocks actually change the tokens (with the
  stock 1e-5 a broken block would go unnoticed);
- ``detector.safetensors``: a ``RareObjectDetector`` with an MLP projection (64 -> 96 -> d_llm);
- ``adapter.safetensors``: a ``CrossAttentionAdapter`` (width 32, 4 heads) whose gate is opened
  (0.5), so it is *not* the identity;
- ``embeddings.safetensors``: random W [C, d_llm].

The manifest has no VLM unless ``vlm=`` is given (pipeline tests pass their own ``VLMSpec``).
``exported_tiny_bundle(base)`` is the default tiny bundle after ``rtrt export`` (fp32 detector and
adapter ONNX), built once per ``base`` directory and then reused, so several test modules of one
session share one export (about 10 s on two cores). ``exported_tiny_bundle_int8(base)`` is a copy of
it after ``rtrt export --precision int8``, for the int8 tests only: an int8 parity failure on some
CPU fails those tests and never the fp32 ones. Treat both as read-only; copy before changing.
Everything is a function of the arguments and ``seed``: the same call gives the same bytes of
tensors. Keep this stable; other test files build on it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rtrt.runtime.bundle import ClassInfo, Manifest, VFMSpec, VLMSpec, write_bundle
from rtrt.runtime.modules import CrossAttentionAdapter, RareObjectDetector
from rtrt.runtime.vfm import create_timm_vfm

__all__ = ["TINY_CLASSES", "TINY_VFM_ARCH", "TINY_VFM_KWARGS", "make_tiny_bundle", "exported_tiny_bundle", "exported_tiny_bundle_int8"]

TINY_CLASSES = ("traffic_cone", "barrier", "bollard", "debris", "dog", "tire", "stroller", "concrete_block")
TINY_VFM_ARCH = "vit_tiny_patch16_dinov3_qkvb"
TINY_VFM_KWARGS = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def make_tiny_bundle(
    out_dir: str | Path,
    *,
    d_llm: int = 64,
    classes: Sequence[str] = TINY_CLASSES,
    image_size: int = 64,
    seed: int = 0,
    vlm: VLMSpec | None = None,
    with_detector: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the tiny bundle to ``out_dir`` (must not exist unless ``overwrite``) and return its path.

    ``with_detector=False`` leaves out the VFM and the detector (an adapter-only bundle, quick to export).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # timm initialises from the global generator
    vfm = create_timm_vfm(TINY_VFM_ARCH, image_size, **TINY_VFM_KWARGS).eval()
    with torch.no_grad():
        for name, p in vfm.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                p.fill_(0.5)
    detector = RareObjectDetector(d_vfm=vfm.embed_dim, d_llm=d_llm, proj_hidden=96, threshold=0.1, top_k=5)
    adapter = CrossAttentionAdapter(d_llm, width=32, heads=4)
    with torch.no_grad():
        for module in (detector, adapter):
            for p in module.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        adapter.norm_q.weight.fill_(1.0)
        adapter.norm_kv.weight.fill_(1.0)
        adapter.gate.fill_(0.5)
    w = torch.randn(len(classes), d_llm, generator=g)
    manifest = Manifest(
        classes=[ClassInfo(name=c, synonyms=[c.replace("_", " ")]) for c in classes],
        d_llm=d_llm,
        vlm=vlm,
        vfm=None if not with_detector else VFMSpec(
            kind="timm",
            ref="vfm/model.safetensors",
            arch=TINY_VFM_ARCH,
            image_size=image_size,
            patch_size=16,
            dim=vfm.embed_dim,
            kwargs=dict(TINY_VFM_KWARGS),
        ),
        adapter=adapter.config,
        detector=detector.config if with_detector else None,
        training={"note": "tests/tiny_bundle.py: random weights", "seed": seed},
    )
    tensors = {"embeddings.safetensors": {"W": w}, "adapter.safetensors": adapter.state_dict()}
    if with_detector:
        tensors["detector.safetensors"] = detector.state_dict()
        tensors["vfm/model.safetensors"] = vfm.state_dict()
    write_bundle(out_dir, manifest, tensors, overwrite=overwrite)
    return Path(out_dir)


def _export_once(base: str | Path, name: str, build) -> Path:
    """``build(path)`` under ``base/name`` unless a previous call of this session finished it."""
    from filelock import FileLock

    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    path = base / name
    done = base / f".{name}.done"
    with FileLock(str(base / f".{name}.lock")):
        if not done.is_file():
            build(path)
            done.touch()
    return path


def exported_tiny_bundle(base: str | Path) -> Path:
    """``make_tiny_bundle`` + ``rtrt export`` (fp32 graphs) under ``base/tiny-exported``, built once."""
    from rtrt.export.cli import main

    def build(path: Path) -> None:
        make_tiny_bundle(path, overwrite=True)
        if main(["--bundle", str(path)]) != 0:
            raise RuntimeError("rtrt export of the tiny bundle failed")

    return _export_once(base, "tiny-exported", build)


def exported_tiny_bundle_int8(base: str | Path) -> Path:
    """A copy of ``exported_tiny_bundle`` + ``rtrt export --precision int8`` under ``base/tiny-exported-int8``."""
    import shutil

    from rtrt.export.cli import main

    src = exported_tiny_bundle(base)

    def build(path: Path) -> None:
        if path.exists():
            shutil.rmtree(path)
        shutil.copytree(src, path)
        if main(["--bundle", str(path), "--precision", "int8"]) != 0:
            raise RuntimeError("rtrt export --precision int8 of the tiny bundle failed")

    return _export_once(base, "tiny-exported-int8", build)
