"""Content-keyed cache of TensorRT engines: load-or-build under a file lock, written atomically.

The key is everything an engine depends on: the ONNX file's sha256, the precision, the
optimisation profile, the TensorRT version and the GPU (name and compute capability); a changed
ONNX therefore never reuses a stale engine (the TensorRT samples key by path and do).

``EngineCache.load_or_build(key, build)``:
1. the engine for the key exists -> use it;
2. else take ``<engine>.lock`` (``filelock``), then check again: another process may have built it
   while we waited -> use it;
3. else remove temporary files a crashed writer left, call ``build()`` (returns the serialized
   engine bytes), write them to a temporary name in the same directory, fsync, and rename onto the
   final name. Readers only ever see a complete engine: a crash mid-write leaves a ``.tmp`` file
   that is never looked up and is cleaned on the next build.

The sidecar ``<engine>.json`` records the key; it is written before the engine is renamed into
place. ``build`` is any callable, so tests inject a fake builder: those tests exercise this cache
(locking, atomicity, keys), not TensorRT.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from filelock import FileLock, Timeout

from .errors import EngineBuildError
from .fileio import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_file
from .trt_engine import PlatformInfo, default_cache_dir, platform_info

__all__ = ["EngineKey", "CacheResult", "EngineCache", "engine_key"]

_CHUNK = 1 << 20


def _canonical_profile(profile: Mapping[str, Any]) -> dict[str, list[list[int]]]:
    """{input: (min, opt, max) shapes} as plain nested lists, sorted by input name."""
    return {str(k): [[int(d) for d in shape] for shape in profile[k]] for k in sorted(profile)}


@dataclass(frozen=True)
class EngineKey:
    """Everything a TensorRT engine depends on."""

    onnx_sha256: str  # content of the ONNX file the engine was built from
    precision: str  # "fp32" | "fp16" | "int8"
    profile: str  # canonical JSON of {input: [min, opt, max] shapes}
    trt_version: str  # tensorrt.__version__
    gpu_name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # e.g. "9.0"

    @property
    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profile"] = json.loads(self.profile)
        d["digest"] = self.digest
        return d


def engine_key(onnx_path: str | os.PathLike, precision: str, profile: Mapping[str, Any], platform: PlatformInfo | None = None) -> EngineKey:
    """Key of an engine for ``onnx_path`` on this platform (or on ``platform`` when given)."""
    platform = platform or platform_info()
    return EngineKey(
        onnx_sha256=sha256_file(onnx_path),
        precision=str(precision),
        profile=json.dumps(_canonical_profile(profile), sort_keys=True, separators=(",", ":")),
        trt_version=platform.trt_version,
        gpu_name=platform.gpu_name,
        compute_capability=platform.compute_capability,
    )


@dataclass
class CacheResult:
    """What ``load_or_build`` did."""

    path: Path  # the engine file (complete)
    built: bool  # True when this call built it, False when it was reused
    waited_s: float  # time spent waiting for the lock


def _write_chunks(f, data: bytes) -> None:
    """Write ``data`` in chunks (a seam for the crash test, which interrupts it half-way)."""
    view = memoryview(data)
    for i in range(0, len(view), _CHUNK):
        f.write(view[i : i + _CHUNK])


class EngineCache:
    """A directory of engines named ``<name>.<digest[:16]>.engine`` with a ``.json`` sidecar each."""

    def __init__(self, root: str | os.PathLike | None = None, *, lock_timeout: float = 3600.0):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.lock_timeout = lock_timeout

    def path_for(self, key: EngineKey, name: str = "engine") -> Path:
        return self.root / f"{name}.{key.digest[:16]}.engine"

    def get(self, key: EngineKey, name: str = "engine") -> Path | None:
        """The cached engine for ``key`` or None."""
        p = self.path_for(key, name)
        return p if p.is_file() else None

    def load_or_build(self, key: EngineKey, build: Callable[[], bytes], name: str = "engine") -> CacheResult:
        """Return the engine for ``key``, building it with ``build()`` at most once across processes."""
        final = self.path_for(key, name)
        if final.is_file():
            return CacheResult(final, built=False, waited_s=0.0)
        self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        lock = FileLock(str(final) + ".lock", timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            raise EngineBuildError(f"{final.name}: timed out after {self.lock_timeout:.0f} s waiting for another build") from None
        try:
            waited = time.monotonic() - t0
            if final.is_file():  # built by whoever held the lock before us
                return CacheResult(final, built=False, waited_s=waited)
            for stale in self.root.glob(f".{final.name}.*.tmp"):  # a crashed writer's leftovers
                stale.unlink(missing_ok=True)
            data = build()
            if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
                raise EngineBuildError(f"{final.name}: the builder returned no engine")
            atomic_write_json(final.with_suffix(".json"), key.to_dict())
            atomic_write_bytes(final, bytes(data), writer=lambda f, d: _write_chunks(f, d))  # late-bound: the crash test's seam
            fsync_dir(self.root)
            return CacheResult(final, built=True, waited_s=waited)
        finally:
            lock.release()
