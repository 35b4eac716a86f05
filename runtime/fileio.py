"""Crash-safe file and directory writing and hashing, with no heavy imports.

The one place rtrt writes anything that must survive a crash:

- every file (bundle files, manifests, engines' metadata, annotations, predictions, caches) goes
  through ``atomic_write_bytes`` (or ``atomic_copy_file``): a temporary file in the same directory,
  fsync, rename. A reader sees the old file or the whole new one, never a part of it.
- every directory that replaces another (a bundle re-exported or overwritten, a generated world)
  goes through ``replace_dir``: the new version is built complete in a temporary sibling, then
  swapped with the old one in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``, macOS
  ``renamex_np(RENAME_SWAP)``), and the old version, now at the temporary name, is deleted. Where
  the OS or filesystem cannot swap, two renames leave a short gap with no directory at the path:
  the old version waits meanwhile at ``.NAME.<random>.old`` and the new one at
  ``.NAME.<random>.partial`` (``interrupted_versions`` lists them, so a reader can say which ``mv``
  restores the directory).

Every function that changes the filesystem is in ``MUTATORS``; the crash tests fail each call of
each of them in turn (tests/test_bundle_atomic.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

_CHUNK = 1 << 20

# The functions below that write, rename or delete (the rest only read); the crash tests wrap each.
MUTATORS = (
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_copy_file",
    "link_or_copy",
    "copy_tree",
    "make_temp_dir",
    "exchange_paths",
    "rename_path",
    "remove_tree",
    "replace_dir",
)

__all__ = ["sha256_file", "fsync_dir", "interrupted_versions", "MUTATORS", *MUTATORS]


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
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 minus the umask),
        # so a bundle copied to a vehicle is readable by the service that runs it.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            (writer or _write_all)(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask: from /proc on Linux (reading it with os.umask briefly changes it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_all(f: IO[bytes], data: bytes) -> None:
    f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def atomic_copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src``'s bytes to ``dst`` the way ``atomic_write_bytes`` writes (streamed, not read whole)."""

    def copy(f: IO[bytes], _: bytes) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, _CHUNK)

    atomic_write_bytes(dst, b"", writer=copy)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A hard link ``dst`` to ``src`` (a symlink is linked itself), else an atomic copy of its bytes.

    The link shares the file with ``src``: write a linked file only by replacing it
    (``atomic_write_bytes``), never in place.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # another filesystem, or one without hard links
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            atomic_copy_file(src, dst)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, *, link: bool = False,
              skip: Callable[[str], bool] = lambda rel: False) -> None:
    """Every file under ``src`` to the same place under ``dst`` (created if needed).

    ``link``: hard links (``link_or_copy``; symlinks kept as symlinks); else each file's bytes are
    copied (``atomic_copy_file``; symlinks followed). ``skip(rel)`` leaves out a file by its POSIX
    path relative to ``src``.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise NotADirectoryError(f"{src}: not a directory")
    for folder, dirs, names in os.walk(src, followlinks=not link):
        here = Path(folder)
        if link:  # a symlinked folder is not walked into; link the symlink itself
            names = names + [d for d in dirs if (here / d).is_symlink()]
        for name in sorted(names):
            rel = (here / name).relative_to(src).as_posix()
            if skip(rel):
                continue
            (link_or_copy if link else atomic_copy_file)(here / name, dst / rel)


def make_temp_dir(target: str | os.PathLike, suffix: str = ".partial") -> Path:
    """A new empty directory ``.NAME.<random><suffix>`` beside ``target`` (same filesystem, so renames are atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; once swapped in it is the bundle directory
    return tmp


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (where directories can be opened and synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_AT_FDCWD = -100
_SWAP_FLAG = 2  # Linux RENAME_EXCHANGE, macOS RENAME_SWAP: both 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}  # for a libc older than glibc 2.28 (no renameat2 wrapper)
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def _swap_call() -> Callable[[bytes, bytes], int] | None:
    """The libc call that swaps two paths atomically, or None on this OS."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") if sys.platform == "darwin" else None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux"):
        if hasattr(libc, "renameat2"):
            f = libc.renameat2
            f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            return lambda a, b: f(_AT_FDCWD, a, _AT_FDCWD, b, _SWAP_FLAG)
        nr = _SYS_RENAMEAT2.get(os.uname().machine)
        if nr is None or not hasattr(libc, "syscall"):
            return None
        s = libc.syscall
        return lambda a, b: s(ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a),
                              ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(b), ctypes.c_uint(_SWAP_FLAG))
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        f = libc.renamex_np
        f.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: f(a, b, _SWAP_FLAG)
    return None


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step; False (nothing changed) where the OS or filesystem cannot."""
    call = _swap_call()
    if call is None:
        return False
    if call(os.fsencode(os.fspath(a)), os.fsencode(os.fspath(b))) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def rename_path(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace``, made durable."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory tree (or a file); best effort, never raises."""
    p = Path(path)
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def replace_dir(new: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put the complete directory ``new`` (a sibling of ``dst``) at ``dst`` and delete what was there.

    A crash at any point leaves at ``dst`` the old version or the new one, except where no atomic
    swap exists (see the module docstring): then a crash between the two renames leaves ``dst``
    missing, the new version at ``new`` and the old one at ``.NAME.<random>.old``.
    """
    new, dst = Path(new), Path(dst)
    if not os.path.lexists(dst):
        rename_path(new, dst)
        return
    if exchange_paths(new, dst):
        fsync_dir(dst.parent)
        remove_tree(new)  # the old version, now at the temporary name
        return
    old = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.old")
    rename_path(dst, old)
    try:
        rename_path(new, dst)
    except BaseException:
        if not os.path.lexists(dst):
            os.replace(old, dst)  # put the old version back
        raise
    remove_tree(old)


def interrupted_versions(dst: str | os.PathLike) -> list[Path]:
    """Versions of ``dst`` left beside it by an interrupted ``replace_dir``: new ones (``.partial``) first, newest first."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        return []
    found = [p for p in dst.parent.glob(f".{dst.name}.*") if p.is_dir() and p.suffix in (".partial", ".old")]

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(found, key=lambda p: (p.suffix != ".partial", -mtime(p)))
