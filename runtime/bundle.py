"""The rtrt bundle: one directory, copied to a vehicle as it is.

Layout::

    bundle/
      manifest.json            schema version, rtrt version, classes, dimensions, model references,
                               and every file below with its sha256 and size
      embeddings.safetensors   W and the phase-1 projections
      adapter.safetensors      the cross-attention adapter
      detector.safetensors     the detector's projection of VFM patch tokens
      vfm/ vlm/                optional: models carried inside the bundle
      *.onnx, engines/         added by `rtrt export`

Loading verifies the schema and the hash of every listed file and refuses, with a one-line
``BundleError`` naming the file, anything missing, altered, of a newer schema, or outside the
bundle directory. Writing is atomic: a new bundle is built in a temporary sibling directory
and renamed into place; files added to an existing bundle are each written to a temporary
name and renamed, and the manifest, written last the same way, is the commit point.
Weights are safetensors only; nothing here can unpickle.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from .errors import BundleError
from .fileio import atomic_write_bytes, atomic_write_json, sha256_file
from .modules import AdapterConfig, ClassEmbeddings, CrossAttentionAdapter, DetectorConfig, RareObjectDetector

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "ClassInfo",
    "VLMSpec",
    "VFMSpec",
    "FileEntry",
    "Manifest",
    "Bundle",
    "load_bundle",
    "write_bundle",
    "sha256_file",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_relpath",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


def _rtrt_version() -> str:
    try:
        from importlib.metadata import version

        return version("rtrt")
    except Exception:  # running from a source tree that was never installed
        return "0.0.0+unknown"


@dataclass
class ClassInfo:
    """One rare class."""

    name: str  # identifier, e.g. "traffic_cone"; written into prompts with spaces
    synonyms: list[str] = field(default_factory=list)  # LLM-generated synonyms and short descriptions


@dataclass
class VLMSpec:
    """The frozen VLM the adapter was trained for."""

    family: str  # "llava" | "qwen2_5_vl" | "internvl"
    ref: str  # "vlm" (carried, relative to the bundle), a hub id, or an absolute path
    hidden_size: int  # language-model hidden size; must equal the adapter's d_model
    image_token_layout: dict[str, Any] = field(default_factory=dict)  # from VLMFamily.image_token_layout()


@dataclass
class VFMSpec:
    """The vision foundation model (DINOv3) whose patch tokens feed the detector."""

    kind: str  # "timm" or "transformers"
    ref: str  # carried directory/file relative to the bundle, hub id, or absolute path
    arch: str = ""  # timm architecture name (kind "timm"), e.g. "vit_small_patch16_dinov3"
    image_size: int = 448  # square input side in pixels
    patch_size: int = 16  # pixels per patch side
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # normalisation mean (RGB)
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # normalisation std (RGB)
    dim: int = 384  # width of the patch tokens
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm create_model overrides (depth, embed_dim, ...) for custom sizes
    resample: str = "bicubic"  # Pillow filter of the resize to image_size (timm ``interpolation``, HF ``resample``)
    reducing_gap: float | None = None  # Pillow's two-step resize (box reduction first); None: one exact pass

    def __post_init__(self) -> None:
        from .image import check_resize

        if self.reducing_gap is not None:
            self.reducing_gap = float(self.reducing_gap)
        check_resize(self.resample, self.reducing_gap)


@dataclass
class FileEntry:
    """A file of the bundle and what it must hash to."""

    sha256: str  # hex digest of the file's bytes
    size: int  # bytes


@dataclass
class Manifest:
    """Everything about a bundle except the tensors themselves."""

    classes: list[ClassInfo]  # one entry per row of W, in order
    d_llm: int  # width of W
    vlm: VLMSpec | None = None  # frozen VLM reference (None for a detector-only bundle)
    vfm: VFMSpec | None = None  # VFM reference for the detector
    adapter: AdapterConfig | None = None  # present when adapter.safetensors is
    detector: DetectorConfig | None = None  # present when detector.safetensors is
    files: dict[str, FileEntry] = field(default_factory=dict)  # relative POSIX path -> hash
    exports: dict[str, Any] = field(default_factory=dict)  # ONNX/TensorRT artifacts and parity reports
    training: dict[str, Any] = field(default_factory=dict)  # provenance: configs, seeds, final metrics
    schema_version: int = SCHEMA_VERSION  # refused on load when newer than this code
    rtrt_version: str = field(default_factory=_rtrt_version)  # version that wrote the bundle

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        """Build from parsed JSON; missing optional keys take defaults, wrong types raise BundleError."""
        if not isinstance(d, Mapping):
            raise BundleError(f"{MANIFEST_NAME}: top level must be a JSON object")
        version = d.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError(f"{MANIFEST_NAME}: schema_version missing or not an integer")
        if version > SCHEMA_VERSION:
            raise BundleError(
                f"{MANIFEST_NAME}: schema version {version} is newer than this rtrt supports ({SCHEMA_VERSION}); upgrade rtrt"
            )
        try:
            def sub(key, typ):
                v = d.get(key)
                return None if v is None else _build(typ, v)

            files = d.get("files") or {}
            if not isinstance(files, Mapping):
                raise TypeError("files must be an object")
            return cls(
                classes=[_build(ClassInfo, c) for c in d["classes"]],
                d_llm=int(d["d_llm"]),
                vlm=sub("vlm", VLMSpec),
                vfm=sub("vfm", VFMSpec),
                adapter=sub("adapter", AdapterConfig),
                detector=sub("detector", DetectorConfig),
                files={str(k): _build(FileEntry, v) for k, v in files.items()},
                exports=dict(d.get("exports") or {}),
                training=dict(d.get("training") or {}),
                schema_version=version,
                rtrt_version=str(d.get("rtrt_version", "")),
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{MANIFEST_NAME}: malformed ({type(e).__name__}: {e})") from None


def _build(typ, value):
    """Dataclass from a JSON object, ignoring unknown keys (forward compatible within a schema)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{typ.__name__} must be an object")
    names = {f.name for f in dataclasses.fields(typ)}
    obj = typ(**{k: v for k, v in value.items() if k in names})
    for f in dataclasses.fields(typ):
        v = getattr(obj, f.name)
        if f.type in ("int", int) and (not isinstance(v, int) or isinstance(v, bool)):
            raise TypeError(f"{typ.__name__}.{f.name} must be an integer")
        if f.type in ("str", str) and not isinstance(v, str):
            raise TypeError(f"{typ.__name__}.{f.name} must be a string")
    return obj


def check_relpath(rel: str) -> PurePosixPath:
    """A bundle file name must be a relative POSIX path without ``..``; else BundleError."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise BundleError(f"{rel!r}: not a valid bundle path")
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise BundleError(f"{rel}: absolute paths are not allowed in a bundle")
    if any(part == ".." for part in p.parts):
        raise BundleError(f"{rel}: '..' is not allowed in a bundle path")
    return p


class Bundle:
    """A loaded, verified bundle. Build it with ``load_bundle``."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}, classes={len(self.manifest.classes)}, files={len(self.manifest.files)})"

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    def path(self, rel: str) -> Path:
        """Absolute path of a listed file (verified at load)."""
        if rel not in self.manifest.files:
            raise BundleError(f"{rel}: not listed in {MANIFEST_NAME} of {self.root}")
        return self.root / rel

    def has(self, rel: str) -> bool:
        return rel in self.manifest.files

    def resolve_ref(self, ref: str) -> str:
        """A model reference: a carried path (inside the bundle) becomes absolute; hub ids and absolute paths pass."""
        if os.path.isabs(ref):
            return ref
        prefix = ref.rstrip("/") + "/"
        if ref in self.manifest.files or any(k.startswith(prefix) for k in self.manifest.files):
            return str(self.root / ref)
        return ref  # hub id

    def tensors(self, rel: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.path(rel)))
        except BundleError:
            raise
        except Exception as e:
            raise BundleError(f"{rel}: cannot read safetensors ({e})") from None

    def class_embeddings(self) -> ClassEmbeddings:
        t = self.tensors("embeddings.safetensors")
        if "W" not in t:
            raise BundleError("embeddings.safetensors: tensor 'W' missing")
        m = self.manifest
        if tuple(t["W"].shape) != (len(m.classes), m.d_llm):
            raise BundleError(f"embeddings.safetensors: W has shape {tuple(t['W'].shape)}, manifest says ({len(m.classes)}, {m.d_llm})")
        return ClassEmbeddings(m.class_names, m.d_llm, {c.name: c.synonyms for c in m.classes}, t["W"])

    def adapter(self) -> CrossAttentionAdapter:
        if self.manifest.adapter is None:
            raise BundleError(f"{self.root}: bundle has no adapter")
        module = CrossAttentionAdapter.from_config(self.manifest.adapter)
        _load_state(module, self.tensors("adapter.safetensors"), "adapter.safetensors")
        return module.eval()

    def detector(self) -> RareObjectDetector:
        if self.manifest.detector is None:
            raise BundleError(f"{self.root}: bundle has no detector")
        module = RareObjectDetector.from_config(self.manifest.detector)
        _load_state(module, self.tensors("detector.safetensors"), "detector.safetensors")
        return module.eval()

    def add_files(self, files: Mapping[str, bytes | os.PathLike | str], exports: Mapping[str, Any] | None = None) -> None:
        """Add or replace files (bytes, or a path to copy) and merge ``exports`` into the manifest.

        Each file lands atomically; the manifest, rewritten last, is the commit point, so a crash
        leaves the previous bundle valid (at worst with an unlisted stray file).
        """
        for rel, src in files.items():
            check_relpath(rel)
            dst = self.root / rel
            if isinstance(src, (bytes, bytearray)):
                atomic_write_bytes(dst, bytes(src))
            else:
                _atomic_copy(Path(src), dst)
            self.manifest.files[rel] = FileEntry(sha256_file(dst), dst.stat().st_size)
        if exports:
            self.manifest.exports.update(exports)
        atomic_write_json(self.root / MANIFEST_NAME, self.manifest.to_dict())


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], rel: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "state mismatch"
        raise BundleError(f"{rel}: does not fit the manifest's shapes ({first})") from None


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read and verify a bundle directory; every problem is a one-line ``BundleError``."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    manifest = Manifest.from_dict(raw)
    real_root = root.resolve()
    for rel, entry in manifest.files.items():
        check_relpath(rel)
        f = root / rel
        try:
            real = f.resolve()
        except (OSError, RuntimeError):
            raise BundleError(f"{rel}: cannot resolve path") from None
        if real != real_root and real_root not in real.parents:
            raise BundleError(f"{rel}: points outside the bundle directory")
        if not f.is_file():
            raise BundleError(f"{rel}: listed in {MANIFEST_NAME} but missing from {root}")
        if verify:
            if f.stat().st_size != entry.size:
                raise BundleError(f"{rel}: size {f.stat().st_size} differs from manifest ({entry.size}); file altered")
            if sha256_file(f) != entry.sha256:
                raise BundleError(f"{rel}: sha256 mismatch; file altered or corrupt")
    for name in ("embeddings.safetensors",):
        if name not in manifest.files:
            raise BundleError(f"{name}: missing from {MANIFEST_NAME} of {root}")
    if manifest.adapter is not None:
        if "adapter.safetensors" not in manifest.files:
            raise BundleError(f"adapter.safetensors: missing from {MANIFEST_NAME} of {root}")
        if manifest.adapter.d_model != manifest.d_llm:
            raise BundleError(f"{MANIFEST_NAME}: adapter d_model {manifest.adapter.d_model} != d_llm {manifest.d_llm}")
    if manifest.detector is not None and "detector.safetensors" not in manifest.files:
        raise BundleError(f"detector.safetensors: missing from {MANIFEST_NAME} of {root}")
    return Bundle(root, manifest)


def write_bundle(
    out_dir: str | os.PathLike,
    manifest: Manifest,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    files: Mapping[str, str | os.PathLike] | None = None,
    dirs: Mapping[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Write a complete bundle atomically and return it loaded.

    ``tensors``: file name -> state dict (saved as safetensors). ``files``: bundle name -> source
    file to copy. ``dirs``: bundle folder -> source directory copied whole (a carried VLM or VFM).
    The manifest's ``files`` is filled here. Nothing appears at ``out_dir`` unless all succeeds.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise BundleError(f"{out}: already exists (pass overwrite=True / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        for rel, state in tensors.items():
            check_relpath(rel)
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(dst))
        for rel, src in (files or {}).items():
            check_relpath(rel)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        for rel, src in (dirs or {}).items():
            check_relpath(rel)
            shutil.copytree(src, tmp / rel, symlinks=False)
        manifest = dataclasses.replace(manifest, files={})
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            manifest.files[rel] = FileEntry(sha256_file(f), f.stat().st_size)
        atomic_write_json(tmp / MANIFEST_NAME, manifest.to_dict())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(out)
