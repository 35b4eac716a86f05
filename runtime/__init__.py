"""rtrt runtime: the lean, in-vehicle part of rtrt.

Plug-in modules (``ClassEmbeddings``, ``CrossAttentionAdapter``, ``RareObjectDetector``), the
bundle format (``load_bundle``, ``write_bundle``), image decoding, the frozen-VLM families and
the ``Pipeline``, and ``version()``. Names are imported on first use (PEP 562), so ``import rtrt.runtime.errors``
does not load torch; importing this package never imports timm, open_clip, onnx or rtrt.trainer.
"""
from __future__ import annotations

import importlib

# public name -> submodule that defines it
_EXPORTS = {
    "Bundle": "bundle",
    "Manifest": "bundle",
    "load_bundle": "bundle",
    "write_bundle": "bundle",
    "load_image": "image",
    "AdapterConfig": "modules",
    "ClassEmbeddings": "modules",
    "CrossAttentionAdapter": "modules",
    "Detection": "modules",
    "DetectorConfig": "modules",
    "RareObjectDetector": "modules",
    "select_detections": "modules",
    "make_backend": "backends",
    "Pipeline": "pipeline",
    "Result": "pipeline",
    "DetectResult": "pipeline",
    "RtrtError": "errors",
    "BundleError": "errors",
    "ImageError": "errors",
    "InputError": "errors",
    "ModelMismatchError": "errors",
    "EngineMismatchError": "errors",
    "BackendUnavailableError": "errors",
    "ParityError": "errors",
    "check_bundle": "check",
    "CheckReport": "check",
    "machine_info": "machine",
}

__all__ = sorted([*_EXPORTS, "version"])


def version() -> str:
    """The installed rtrt distribution's version (``rtrt --version``, the C++ API's ``rtrt::version()``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("rtrt")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
