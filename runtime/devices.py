"""Which devices this machine has, and the one check every entry point runs on a device name.

``check_device("cuda:3")`` on a machine with one GPU raises ``BackendUnavailableError`` naming the
devices there are ("device 'cuda:3' is not available on this machine (available: cpu, cuda:0)"),
so ``make_backend``, ``Pipeline.from_bundle`` and the commands refuse it in one line instead of
failing deep inside torch or onnxruntime with a traceback. rtrt runs on ``cpu`` and ``cuda``
devices only; any other device type counts as not available.

Names are parsed without torch (a ``Device`` comes back; ``str(dev)`` is what torch and onnxruntime
take), so a cpu device never imports torch. Listing GPUs does: where torch is installed it counts
them; in the lean, torch-free install a GPU is there when onnxruntime has its CUDA execution
provider (it cannot count them: ``cuda:0`` is listed).
"""
from __future__ import annotations

import re
from importlib.util import find_spec
from typing import NamedTuple

from .errors import BackendUnavailableError, InputError

__all__ = ["Device", "available_devices", "check_device", "has_torch"]

_NAME = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
# Device types torch knows that rtrt does not run on: named, so they are "not available", not nonsense.
_OTHER_TYPES = ("mps", "meta", "xpu", "xla", "hip", "mtia", "privateuseone", "ipu", "hpu", "vulkan", "ve", "lazy", "fpga", "mkldnn", "opengl", "opencl", "ideep", "maia")


def has_torch() -> bool:
    """Whether torch is installed (the lean install has no torch)."""
    try:
        return find_spec("torch") is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a broken half-import
        return False


class Device(NamedTuple):
    """A device name parsed without torch (``type`` "cpu"/"cuda", ``index`` or None)."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


def available_devices() -> list[str]:
    """``["cpu", "cuda:0", ...]``: the devices rtrt can run on here."""
    if has_torch():
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    else:
        import onnxruntime as ort

        n = 1 if "CUDAExecutionProvider" in ort.get_available_providers() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(n))]


def _parse(name: str) -> Device:
    """``name`` as a ``Device``; ValueError when it is no device name (torch's grammar, lower case)."""
    m = _NAME.match(name)
    if m:
        return Device(m.group(1), None if m.group(2) is None else int(m.group(2)))
    kind, _, index = name.partition(":")
    if kind in _OTHER_TYPES and (not index or index.isdigit()):
        return Device(kind, int(index) if index else None)
    raise ValueError(name)


def check_device(device):
    """The parsed ``device`` (a ``Device``); None stays None (each backend's natural device).

    A name that is no device is an ``InputError``; a device this machine does not have (cuda
    without a CUDA GPU, an index past the last GPU, a device type rtrt does not run on) is a
    ``BackendUnavailableError``. Both messages list the available devices.
    """
    if device is None:
        return None
    # A name, a Device or a torch.device (read through its str(), so torch is not imported here).
    named = isinstance(device, (str, Device)) or type(device).__module__.startswith("torch")
    try:
        dev = _parse(str(device)) if named else None
    except ValueError:
        dev = None
    if dev is not None and dev.type == "cpu" and dev.index in (None, 0):
        return dev  # before listing GPUs, which imports torch where it is installed
    avail = available_devices()
    listed = f"(available: {', '.join(avail)})"
    if not named:
        raise InputError(f"device must be a name such as 'cpu' or 'cuda:0', not {device!r} {listed}")
    if dev is None:
        raise InputError(f"device {str(device)!r} is not a device name {listed}")
    if dev.type == "cuda" and (dev.index is None and len(avail) > 1 or f"cuda:{dev.index}" in avail):
        return dev
    raise BackendUnavailableError(f"device {str(device)!r} is not available on this machine {listed}")
