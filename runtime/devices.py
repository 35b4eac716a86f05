"""Which torch devices this machine has, and the one check every entry point runs on a device name.

``check_device("cuda:3")`` on a machine with one GPU raises ``BackendUnavailableError`` naming the
devices there are ("device 'cuda:3' is not available on this machine (available: cpu, cuda:0)"),
so ``make_backend``, ``Pipeline.from_bundle`` and the commands refuse it in one line instead of
failing deep inside torch or onnxruntime with a traceback. rtrt runs on ``cpu`` and ``cuda``
devices only; any other torch device type counts as not available.
"""
from __future__ import annotations

import torch

from .errors import BackendUnavailableError, InputError

__all__ = ["available_devices", "check_device"]


def available_devices() -> list[str]:
    """``["cpu", "cuda:0", ...]``: the devices rtrt can run on here."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(n))]


def check_device(device: str | torch.device | None) -> torch.device | None:
    """The ``torch.device`` for ``device`` (None stays None: each backend's natural device).

    A name torch cannot parse is an ``InputError``; a device this machine does not have (cuda
    without a CUDA GPU, an index past the last GPU, a device type rtrt does not run on) is a
    ``BackendUnavailableError``. Both messages list the available devices.
    """
    if device is None:
        return None
    avail = available_devices()
    listed = f"(available: {', '.join(avail)})"
    if not isinstance(device, (str, torch.device)):
        raise InputError(f"device must be a name such as 'cpu' or 'cuda:0', not {device!r} {listed}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"device {str(device)!r} is not a device name {listed}") from None
    name = str(device)
    if dev.type == "cpu" and dev.index in (None, 0):
        return dev
    if dev.type == "cuda" and (dev.index is None and len(avail) > 1 or f"cuda:{dev.index}" in avail):
        return dev
    raise BackendUnavailableError(f"device {name!r} is not available on this machine {listed}")
