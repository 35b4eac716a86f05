"""Running a serialized TensorRT engine on torch CUDA tensors, and what identifies this platform.

Shared by the runtime's ``trt`` backend and the exporter's engine cache (which keys engines by the
same ``platform_info``). ``tensorrt`` is imported inside functions only, so importing this module
costs nothing on a machine without it. The tensor API of TensorRT 10, unchanged in 11, is used
(``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3``; 11 removed the weak-typing
builder APIs, not these); inputs and outputs are torch tensors on the engine's GPU, bound by their
data pointers, so nothing is copied through the host. Engines of fp16 graphs keep fp32 inputs and
outputs (``rtrt.export.fp16``); the dtype table below maps whatever the engine declares.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import torch

from .errors import BackendUnavailableError, EngineMismatchError

__all__ = ["PlatformInfo", "default_cache_dir", "tensorrt_status", "import_tensorrt", "platform_info", "TrtEngine"]


@dataclass(frozen=True)
class PlatformInfo:
    """What an engine is tied to: recorded at build, compared at load."""

    trt_version: str  # tensorrt.__version__
    gpu_name: str  # torch.cuda.get_device_name
    compute_capability: str  # "major.minor"

    def to_dict(self) -> dict[str, str]:
        return {"trt_version": self.trt_version, "gpu_name": self.gpu_name, "compute_capability": self.compute_capability}


def default_cache_dir() -> Path:
    """Root of the local TensorRT caches: ``$RTRT_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/rtrt/engines`` (``~/.cache/rtrt/engines``).

    rtrt's own engines (``rtrt.runtime.engine_cache``) live directly in it, ONNX Runtime's
    TensorRT EP's engines and timing cache in its ``ort-trt`` folder (``rtrt.runtime.backends``).
    """
    env = os.environ.get("RTRT_ENGINE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rtrt" / "engines"


def tensorrt_status() -> str | None:
    """None when TensorRT engines can run here, else the reason ("TensorRT not installed", "no CUDA GPU")."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # ImportError, or the bindings failing to find their libraries
        return "TensorRT not installed"
    try:
        import torch
    except ImportError:
        return "torch not installed (the trt backend runs on torch CUDA tensors; pip install rtrt[torch])"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def import_tensorrt():
    """The ``tensorrt`` module, or ``BackendUnavailableError`` with the reason."""
    reason = tensorrt_status()
    if reason:
        raise BackendUnavailableError(f"TensorRT backend unavailable: {reason}")
    import tensorrt

    return tensorrt


def platform_info(device: int | None = None) -> PlatformInfo:
    """TensorRT version and GPU of this machine (``BackendUnavailableError`` when either is missing)."""
    import torch

    trt = import_tensorrt()
    dev = torch.cuda.current_device() if device is None else device
    major, minor = torch.cuda.get_device_capability(dev)
    return PlatformInfo(str(trt.__version__), torch.cuda.get_device_name(dev), f"{major}.{minor}")


# TensorRT ``DataType`` aliases on the module (10 and 11 both) -> torch dtype; looked up by name
# because a version may lack some (fp8 since 8.6, int64 since 10; 11 adds sub-byte types torch
# cannot hold, which an engine of rtrt's graphs never has at its inputs or outputs).
_TRT_TO_TORCH = (
    ("float32", "float32"),
    ("float16", "float16"),
    ("bfloat16", "bfloat16"),
    ("int32", "int32"),
    ("int64", "int64"),
    ("int8", "int8"),
    ("uint8", "uint8"),
    ("bool", "bool"),
    ("fp8", "float8_e4m3fn"),
)


def _torch_dtype(trt, dt) -> "torch.dtype":
    import torch

    table = {}
    for trt_name, torch_name in _TRT_TO_TORCH:
        if hasattr(trt, trt_name) and hasattr(torch, torch_name):
            table[getattr(trt, trt_name)] = getattr(torch, torch_name)
    if dt not in table:
        raise BackendUnavailableError(f"TensorRT tensor type {dt} has no torch equivalent")
    return table[dt]


class TrtEngine:
    """A deserialized engine with one execution context; ``engine(feeds) -> outputs`` on CUDA tensors.

    Calls are serialised by a lock (one context cannot run two shapes at once); make one
    ``TrtEngine`` per thread for parallelism.
    """

    def __init__(self, engine: bytes | str | os.PathLike, device: int | None = None):
        import torch

        trt = import_tensorrt()
        self._trt = trt
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        data = engine if isinstance(engine, (bytes, bytearray, memoryview)) else open(engine, "rb").read()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(bytes(data))
            if self.engine is None:
                raise EngineMismatchError("TensorRT could not deserialize the engine (built by another TensorRT version or for another GPU?)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_in[n]]
        self.output_names = [n for n in names if not is_in[n]]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._lock = threading.Lock()

    def __call__(self, feeds: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        import torch

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"engine inputs missing: {missing}")
        with self._lock, torch.cuda.device(self.device):
            keep = []  # converted inputs must stay alive until the stream has consumed them
            for n in self.input_names:
                t = feeds[n]
                if t.device != self.device or t.dtype != self.dtypes[n] or not t.is_contiguous():
                    t = t.to(self.device, self.dtypes[n]).contiguous()
                keep.append(t)
                if not self.context.set_input_shape(n, tuple(t.shape)):
                    raise ValueError(f"input {n} shape {tuple(t.shape)} is outside the engine's optimisation profile")
                self.context.set_tensor_address(n, t.data_ptr())
            out = {}
            for n in self.output_names:
                shape = tuple(self.context.get_tensor_shape(n))
                o = torch.empty(shape, dtype=self.dtypes[n], device=self.device)
                out[n] = o
                self.context.set_tensor_address(n, o.data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            # Outputs are ordered on the current stream, so torch consumers need no sync; the
            # inputs we converted are recorded so their memory is not reused too early.
            for t in keep:
                t.record_stream(stream)
        return out
