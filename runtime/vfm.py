"""The vision foundation model (DINOv3) behind the detector: loading and patch-token extraction.

Two sources are supported, both offline when the files are local: a timm DINOv3 (``Eva``
with RoPE, e.g. ``vit_small_patch16_dinov3``) from a safetensors file, and a transformers
``DINOv3ViTModel`` from a ``save_pretrained`` directory. A hub id is loaded only pinned to a
40-hex commit (``org/name@<commit>`` or ``VFMSpec.revision``), and only its safetensors weights.
timm is imported only when a timm VFM is actually loaded, so ``import rtrt.runtime`` stays light.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .bundle import VFMSpec, pinned_source
from .errors import BundleError, ModelMismatchError

__all__ = ["VFMBackbone", "load_vfm", "create_timm_vfm"]


class VFMBackbone(nn.Module):
    """``forward(pixel_values [B, 3, H, W]) -> patch tokens [B, P, dim]`` (CLS and registers dropped)."""

    def __init__(self, model: nn.Module, kind: str, num_prefix_tokens: int):
        super().__init__()
        self.model = model
        self.kind = kind
        self.num_prefix_tokens = int(num_prefix_tokens)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.kind == "timm":
            tokens = self.model.forward_features(pixel_values)
        else:
            tokens = self.model(pixel_values=pixel_values).last_hidden_state
        return tokens[:, self.num_prefix_tokens :]


def create_timm_vfm(arch: str, image_size: int, **kwargs) -> nn.Module:
    """A randomly initialised timm DINOv3 of the given architecture (weights are loaded separately)."""
    import timm  # heavy; only needed for timm VFMs

    if arch not in timm.list_models("*dinov3*") and arch not in timm.list_models():
        raise ModelMismatchError(f"unknown timm architecture {arch!r}")
    return timm.create_model(arch, pretrained=False, img_size=image_size, num_classes=0, **kwargs)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def load_vfm(spec: VFMSpec, resolve: Callable[[str], str] = lambda r: r) -> VFMBackbone:
    """Build the VFM named by ``spec``; ``resolve`` maps a carried reference to a local path.

    A hub id (``org/name`` with ``spec.revision``, or ``org/name@<commit>`` from ``Bundle.resolve_ref``)
    is loaded at that commit; an unpinned one is refused (``rtrt.runtime.bundle.pinned_source``).
    """
    if spec.kind not in ("timm", "transformers"):
        raise BundleError(f"VFM kind {spec.kind!r} is not supported (timm or transformers)")
    source, revision = pinned_source(resolve(spec.ref), spec.revision, error=BundleError, what="VFM weights")
    if spec.kind == "timm":
        from safetensors.torch import load_file

        model = create_timm_vfm(spec.arch, spec.image_size, **spec.kwargs)
        if revision is not None:  # e.g. "timm/vit_small_patch16_dinov3.lvd1689m": its safetensors file at that commit
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(source, "model.safetensors", revision=revision))
            except Exception as e:
                raise BundleError(f"{source}@{revision}: cannot fetch model.safetensors ({_one_line(e)})") from None
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "model.safetensors"
            if not path.is_file():
                raise BundleError(f"{spec.ref}: VFM weights not found (a timm VFM needs model.safetensors)")
        state = load_file(str(path))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BundleError(f"{spec.ref}: weights do not fit timm {spec.arch} ({str(e).splitlines()[0]})") from None
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        dim = int(model.embed_dim)
    else:
        from transformers import DINOv3ViTModel

        try:
            model = DINOv3ViTModel.from_pretrained(source, revision=revision, local_files_only=revision is None,
                                                   use_safetensors=True)
        except OSError as e:  # e.g. only a pytorch_model.bin: rtrt never unpickles weights
            raise BundleError(f"{spec.ref}: cannot load the VFM's safetensors weights (safetensors are required; "
                              f"{_one_line(e)})") from None
        prefix = 1 + int(getattr(model.config, "num_register_tokens", 0))
        dim = int(model.config.hidden_size)
    if dim != spec.dim:
        raise ModelMismatchError(f"VFM {spec.ref} gives {dim}-wide patch tokens, the bundle expects {spec.dim}")
    model.eval().requires_grad_(False)
    return VFMBackbone(model, spec.kind, prefix).eval()
