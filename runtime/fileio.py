"""Crash-safe file writing and hashing, with no heavy imports.

Every file rtrt writes (bundle files, manifests, engines' metadata, annotations, predictions)
goes through ``atomic_write_bytes``: a temporary file in the same directory, fsync, rename. A
reader sees the old file or the whole new one, never a part of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["sha256_file", "atomic_write_bytes", "atomic_write_text", "atomic_write_json"]

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, writer: Callable[[IO[bytes], bytes], Any] | None = None) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``.

    ``writer(f, data)`` writes the bytes (default ``f.write(data)``); the temporary file is removed
    if it raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            (writer or _write_all)(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_all(f: IO[bytes], data: bytes) -> None:
    f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))
