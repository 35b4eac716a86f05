"""The small, documented set of exceptions the rtrt runtime raises.

Every message is one line that names the problem (and the file, where there is
one), so a CLI can print it as is and a perception stack can log it.
"""
from __future__ import annotations

__all__ = [
    "RtrtError",
    "BundleError",
    "ImageError",
    "InputError",
    "ModelMismatchError",
    "EngineMismatchError",
    "EngineBuildError",
    "BackendUnavailableError",
    "ParityError",
]


class RtrtError(Exception):
    """Base class of every error rtrt raises on purpose."""


class BundleError(RtrtError):
    """A bundle is missing a file, has a file altered, a newer schema or an unsafe path."""


class ImageError(RtrtError):
    """An input image cannot be decoded or is outside the accepted limits."""


class InputError(RtrtError):
    """Any other bad input: a question too long for the model, a bad argument."""


class ModelMismatchError(RtrtError):
    """The VLM (or VFM) does not fit the bundle: hidden size, image-token layout."""


class EngineMismatchError(RtrtError):
    """A cached TensorRT engine was built for another TensorRT version or GPU."""


class EngineBuildError(RtrtError):
    """A TensorRT engine cannot be built: a graph TensorRT cannot parse or cannot give the precision, no range for a dynamic axis, the build failed or timed out."""


class BackendUnavailableError(RtrtError):
    """The requested backend (trt, ort provider, CUDA) is not usable on this machine."""


class ParityError(RtrtError):
    """A graph's outputs on this machine differ from the bundle's reference outputs beyond tolerance."""
