"""rtrt runtime: the lean, in-vehicle part of rtrt.

Plug-in modules (``ClassEmbeddings``, ``CrossAttentionAdapter``, ``RareObjectDetector``), the
bundle format (``load_bundle``, ``write_bundle``), image decoding and the frozen-VLM families.
Importing this package never imports timm, open_clip, onnx or rtrt.trainer.
"""
from __future__ import annotations

from .bundle import Bundle, Manifest, load_bundle, write_bundle
from .errors import (
    BackendUnavailableError,
    BundleError,
    EngineMismatchError,
    ImageError,
    InputError,
    ModelMismatchError,
    RtrtError,
)
from .image import load_image
from .modules import (
    AdapterConfig,
    ClassEmbeddings,
    CrossAttentionAdapter,
    Detection,
    DetectorConfig,
    RareObjectDetector,
    select_detections,
)

__all__ = [
    "Bundle",
    "Manifest",
    "load_bundle",
    "write_bundle",
    "load_image",
    "AdapterConfig",
    "ClassEmbeddings",
    "CrossAttentionAdapter",
    "Detection",
    "DetectorConfig",
    "RareObjectDetector",
    "select_detections",
    "RtrtError",
    "BundleError",
    "ImageError",
    "InputError",
    "ModelMismatchError",
    "EngineMismatchError",
    "BackendUnavailableError",
]
