"""Which devices this machine has, and the one check every entry point runs on a device name.

``check_device("cuda:3")`` on a machine with one GPU raises ``BackendUnavailableError`` naming the
devices there are ("device 'cuda:3' is not available on this machine (available: cpu, cuda:0)"),
so ``make_backend``, ``Pipeline.from_bundle`` and the commands refuse it in one line instead of
failing deep inside torch or onnxruntime with a traceback. rtrt runs on ``cpu`` and ``cuda``
devices only; any other device type counts as not available.

Where torch is installed it counts the GPUs and parses the names (a ``torch.device`` comes back).
In the lean, torch-free install a ``Device`` comes back, and a GPU is there when onnxruntime has its
CUDA execution provider (it cannot count them: ``cuda:0`` is listed).
"""
from __future__ import annotations

import re
import sys
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


def _parse(device):
    """``device`` as a torch.device (torch installed) or a ``Device``; ValueError when it is no device name."""
    if has_torch():
        import torch

        try:
            return torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(device) from None
    if not isinstance(device, str):
        raise ValueError(device)
    m = _NAME.match(device)
    if m:
        return Device(m.group(1), None if m.group(2) is None else int(m.group(2)))
    kind, _, index = device.partition(":")
    if kind in _OTHER_TYPES and (not index or index.isdigit()):
        return Device(kind, int(index) if index else None)
    raise ValueError(device)


def _cpu(name: str):
    """The CPU device for ``"cpu"``/``"cpu:0"`` without importing torch: a ``torch.device`` when torch is
    already loaded (the transformers path), else a ``Device`` (the ONNX Runtime path stays torch-free)."""
    m = _NAME.match(name)
    if not m or m.group(1) != "cpu" or m.group(2) not in (None, "0"):
        return None
    if "torch" in sys.modules:
        return sys.modules["torch"].device(name)
    return Device("cpu", None if m.group(2) is None else 0)


def _is_torch_device(obj) -> bool:
    if not has_torch():
        return False
    import torch

    return isinstance(obj, torch.device)


def check_device(device):
    """The parsed ``device`` (a ``torch.device``, or a ``Device`` without torch); None stays None
    (each backend's natural device).

    A name that is no device is an ``InputError``; a device this machine does not have (cuda
    without a CUDA GPU, an index past the last GPU, a device type rtrt does not run on) is a
    ``BackendUnavailableError``. Both messages list the available devices.
    """
    if device is None:
        return None
    if isinstance(device, (str, Device)):
        cpu = _cpu(str(device))  # the common case answers without listing GPUs (which imports torch)
        if cpu is not None:
            return cpu
    avail = available_devices()
    listed = f"(available: {', '.join(avail)})"
    if not isinstance(device, (str, Device)) and not _is_torch_device(device):
        raise InputError(f"device must be a name such as 'cpu' or 'cuda:0', not {device!r} {listed}")
    try:
        dev = _parse(device if not isinstance(device, Device) else str(device))
    except ValueError:
        raise InputError(f"device {str(device)!r} is not a device name {listed}") from None
    name = str(device)
    if dev.type == "cpu" and dev.index in (None, 0):
        return dev
    if dev.type == "cuda" and (dev.index is None and len(avail) > 1 or f"cuda:{dev.index}" in avail):
        return dev
    raise BackendUnavailableError(f"device {name!r} is not available on this machine {listed}")
