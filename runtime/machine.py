"""What machine a number was measured on: CPU model and ISA flags, GPU, runtime versions.

Parity reports (``rtrt export``), ``rtrt check`` and the benchmarks record ``machine_info()``, because
an int8 graph's error is a fact about the CPU that ran it (ONNX Runtime picks kernels by ISA: VNNI,
AVX-512, AVX2 only, ARM dot-product), and a TensorRT engine's about the GPU and TensorRT version.

Nothing heavy is imported to find out: TensorRT's version comes from the installed distribution's
metadata (importing ``tensorrt`` can take seconds or fail on a machine without its libraries), and
torch is asked about CUDA only when it is already importable.
"""
from __future__ import annotations

import functools
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["ISA_FLAGS", "cpu_model", "cpu_flags", "cores", "machine_info", "machine_summary"]

# The ISA features ONNX Runtime's int8/fp16 kernels dispatch on (x86-64, then ARM64).
ISA_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2",
)


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU's marketing name where the OS gives one (``model name`` on x86, ``Hardware``/``Model`` on ARM)."""
    for key in ("model name", "Hardware", "Model", "cpu model"):
        for line in _cpuinfo():
            if line.split(":", 1)[0].strip() == key and ":" in line:
                value = line.split(":", 1)[1].strip()
                if value:
                    return value
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The ``ISA_FLAGS`` this CPU reports (Linux ``flags``/``Features``; empty where the OS does not say)."""
    have: set[str] = set()
    for line in _cpuinfo():
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features") and ":" in line:
            have.update(line.split(":", 1)[1].split())
            break  # every core reports the same set
    return [f for f in ISA_FLAGS if f in have]


def cores() -> int:
    """Cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _gpu() -> dict[str, Any]:
    try:
        import torch
    except Exception:  # a torch-free runtime install
        return {"cuda": False}
    if not torch.cuda.is_available():
        return {"cuda": False}
    i = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(i)
    return {"cuda": True, "gpu": torch.cuda.get_device_name(i), "compute_capability": f"{major}.{minor}",
            "cuda_version": torch.version.cuda}


@functools.lru_cache(maxsize=1)
def _static_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "isa": cpu_flags(),
        "cores": cores(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    for key, dists in (("onnxruntime", ("onnxruntime", "onnxruntime-gpu")), ("torch", ("torch",)),
                       ("tensorrt", ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13_bindings", "tensorrt_cu12_bindings"))):
        v = _dist_version(*dists)
        if v:
            info[key] = v
    try:
        import onnxruntime

        info["onnxruntime_providers"] = list(onnxruntime.get_available_providers())
    except Exception:
        pass
    info.update(_gpu())
    return info


def machine_info() -> dict[str, Any]:
    """A JSON-able description of this machine (computed once per process)."""
    return dict(_static_info())


def machine_summary(info: dict[str, Any] | None = None) -> str:
    """One line: ``AMD EPYC (x86_64, 2 cores; avx2 fma f16c) | no GPU | onnxruntime 1.32.0 | TensorRT not installed``."""
    m = info if info is not None else machine_info()
    isa = " ".join(m.get("isa") or []) or "ISA flags unknown"
    gpu = f"GPU {m['gpu']} (sm {m['compute_capability']})" if m.get("cuda") else "no GPU"
    parts = [f"{m.get('cpu', '?')} ({m.get('arch', '?')}, {m.get('cores', '?')} cores; {isa})", gpu]
    parts.append(f"onnxruntime {m['onnxruntime']}" if m.get("onnxruntime") else "onnxruntime not installed")
    parts.append(f"TensorRT {m['tensorrt']}" if m.get("tensorrt") else "TensorRT not installed")
    if m.get("torch"):
        parts.append(f"torch {m['torch']}")
    return " | ".join(parts)
