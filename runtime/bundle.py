"""The rtrt bundle: one directory, copied to a vehicle as it is.

Layout::

    bundle/
      manifest.json            schema version, rtrt version, classes, dimensions, model references,
                               and every file below with its sha256 and size
      embeddings.safetensors   W and the phase-1 projections
      adapter.safetensors      the cross-attention adapter
      detector.safetensors     the detector's projection of VFM patch tokens
      vfm/ vlm/                optional: models carried inside the bundle
      *.onnx, engines/         added by `rtrt export` (file names: rtrt.runtime.names; recorded in
                               manifest.exports, typed by rtrt.runtime.exports)

Loading verifies the schema and the hash of every listed file and refuses, with a one-line
``BundleError`` naming the file, anything missing, altered, of a newer schema, or outside the
bundle directory.

Model references (``manifest.vlm.ref``, ``manifest.vfm.ref``) cannot point elsewhere by accident
(``Bundle.resolve_ref``): a reference is a path carried inside the bundle, an absolute local path
(allowed, e.g. a model kept on the vehicle's disk; the bundle's hashes do not cover it), or a hub id
``org/name`` pinned to a 40-hex commit (the spec's ``revision``). Anything else, a relative path
not carried in the bundle, ``..``, a hub id without a pinned revision, is refused.

Writing is crash-safe at every step (``rtrt.runtime.fileio``): ``write_bundle`` builds the whole
bundle in a temporary sibling directory, manifest last; ``Bundle.add_files`` builds the complete
new version the same way (unchanged files hard-linked where the filesystem allows); either then
swaps it with the old directory in one atomic step and deletes the old version. A crash at any
point leaves the old bundle or the new one at the path. Where the OS cannot swap directories
(``fileio.replace_dir``), a crash between its two renames leaves no directory at the path, and
``load_bundle`` says which ``mv`` restores it. Weights are safetensors only; nothing here can
unpickle.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from . import fileio as _fio
from .errors import BundleError, InputError
from .exports import Exports
from .fileio import atomic_write_bytes, atomic_write_json, sha256_file  # re-exported; writes below go through _fio
from .detection import AdapterConfig, DetectorConfig

if TYPE_CHECKING:  # torch is optional (the lean install runs without it); imported where a module is built
    import torch

    from .modules import ClassEmbeddings, CrossAttentionAdapter, RareObjectDetector

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "DEFAULT_IMAGE_SIZE",
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
    "check_revision",
    "split_pinned",
    "pinned_source",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_IMAGE_SIZE = 448  # square VFM/detector input side in pixels when nothing else says (Manifest.image_size)

# A hub repository id ``org/name`` (no ``..``, no leading dot or dash) and a pinned git commit.
_HUB_ID = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


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
    ref: str  # "vlm" (carried, relative to the bundle), a hub id "org/name" (needs revision), or an absolute path
    hidden_size: int  # language-model hidden size; must equal the adapter's d_model
    image_token_layout: dict[str, Any] = field(default_factory=dict)  # from VLMFamily.image_token_layout()
    revision: str | None = None  # hub commit (40 hex) a hub-id ref is pinned to; None for carried and absolute refs

    def __post_init__(self) -> None:
        check_revision(self.revision)


@dataclass
class VFMSpec:
    """The vision foundation model (DINOv3) whose patch tokens feed the detector."""

    kind: str  # "timm" or "transformers"
    ref: str  # carried directory/file relative to the bundle, hub id "org/name" (needs revision), or absolute path
    arch: str = ""  # timm architecture name (kind "timm"), e.g. "vit_small_patch16_dinov3"
    image_size: int = DEFAULT_IMAGE_SIZE  # square input side in pixels
    patch_size: int = 16  # pixels per patch side
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # normalisation mean (RGB)
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # normalisation std (RGB)
    dim: int = 384  # width of the patch tokens
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm create_model overrides (depth, embed_dim, ...) for custom sizes
    resample: str = "bicubic"  # Pillow filter of the resize to image_size (timm ``interpolation``, HF ``resample``)
    reducing_gap: float | None = None  # Pillow's two-step resize (box reduction first); None: one exact pass
    revision: str | None = None  # hub commit (40 hex) a hub-id ref is pinned to; None for carried and absolute refs

    def __post_init__(self) -> None:
        from .image import check_resize

        check_revision(self.revision)
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
    exports: Exports = field(default_factory=Exports)  # ONNX/TensorRT artifacts and parity reports (rtrt.runtime.exports)
    training: dict[str, Any] = field(default_factory=dict)  # provenance: configs, seeds, final metrics
    schema_version: int = SCHEMA_VERSION  # refused on load when newer than this code
    rtrt_version: str = field(default_factory=_rtrt_version)  # version that wrote the bundle

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def image_size(self, exported: bool = True) -> int:
        """Square detector input side in pixels, one rule for every reader: the size the ONNX graphs
        were exported for (``exported=True``, and the bundle has them), else the VFM's, else
        ``DEFAULT_IMAGE_SIZE``. The PyTorch modules and a new export take ``exported=False``."""
        vfm = self.vfm.image_size if self.vfm is not None else DEFAULT_IMAGE_SIZE
        return self.exports.image_size(vfm) if exported else int(vfm)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(dataclasses.replace(self, exports=Exports()))
        d["exports"] = self.exports.to_dict()
        if d.get("adapter") is not None:
            # Written only when set: a bundle without them keeps the manifest bytes older rtrt wrote and reads.
            for key in ("null_slot", "slot_value", "detector_bias", "region_box"):
                if not d["adapter"].get(key):
                    d["adapter"].pop(key, None)
            if d["adapter"].get("refine_mask_z") is None:
                d["adapter"].pop("refine_mask_z", None)
            if d["adapter"].get("refine_mask_classes") == "any":
                d["adapter"].pop("refine_mask_classes", None)
        return d

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
            d_llm = d["d_llm"]
            if not isinstance(d_llm, int) or isinstance(d_llm, bool) or d_llm <= 0:
                raise TypeError("d_llm must be a positive integer")
            return cls(
                classes=[_build(ClassInfo, c) for c in d["classes"]],
                d_llm=d_llm,
                vlm=sub("vlm", VLMSpec),
                vfm=sub("vfm", VFMSpec),
                adapter=sub("adapter", AdapterConfig),
                detector=sub("detector", DetectorConfig),
                files={str(k): _build(FileEntry, v) for k, v in files.items()},
                exports=Exports.from_dict(d.get("exports")),
                training=dict(d.get("training") or {}),
                schema_version=version,
                rtrt_version=str(d.get("rtrt_version", "")),
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as e:
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
        if f.type in ("bool", bool) and not isinstance(v, bool):
            raise TypeError(f"{typ.__name__}.{f.name} must be true or false")
        if f.type in ("str", str) and not isinstance(v, str):
            raise TypeError(f"{typ.__name__}.{f.name} must be a string")
        if f.type in ("float", float) and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            raise TypeError(f"{typ.__name__}.{f.name} must be a finite number")
        if f.type == "float | None" and v is not None and (
                not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            raise TypeError(f"{typ.__name__}.{f.name} must be a finite number or null")
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


def check_revision(revision: object) -> None:
    """A pinned hub revision is None or a 40-hex commit sha; else ValueError (a malformed manifest)."""
    if revision is not None and not (isinstance(revision, str) and _COMMIT.match(revision)):
        raise ValueError(f"revision {revision!r} is not a 40-hex commit sha")


def split_pinned(ref: str) -> tuple[str, str | None]:
    """``"org/name@<rev>"`` -> ``("org/name", "<rev>")``; anything else (a path, an unpinned id) -> ``(ref, None)``."""
    name, sep, rev = ref.rpartition("@")
    if sep and _HUB_ID.match(name):
        return name, rev
    return ref, None


def pinned_source(ref: str | os.PathLike, revision: str | None = None, *, error: type[Exception] = InputError,
                  what: str = "model") -> tuple[str, str | None]:
    """Where a model named on a command line (or by ``Bundle.resolve_ref``) is loaded from: ``(source, revision)``.

    - ``org/name@<commit>``, or ``org/name`` with ``revision``: a hub id pinned to a 40-hex commit ->
      ``("org/name", commit)``; always the hub, even if a folder of that name exists here.
    - an existing local path -> ``(path, None)``: loaded offline.

    Anything else, an unpinned hub id (there is no network here to resolve a branch to a commit),
    a malformed revision, a path that does not exist, is a one-line ``error``.
    """
    ref = os.fspath(ref)
    name, at = split_pinned(ref)
    if at is not None and revision is not None and at != revision:
        raise error(f"{ref}: two different revisions given ({at} and {revision})")
    revision = at if at is not None else revision
    if revision is not None:
        if not _HUB_ID.match(name):
            raise error(f"{ref}: a hub revision is given but {name!r} is not a hub id org/name")
        if not (isinstance(revision, str) and _COMMIT.match(revision)):
            raise error(f"{ref}: hub revision {revision!r} is not a 40-hex commit sha; pin the {what} as {name}@<commit sha>")
        return name, revision
    path = Path(ref).expanduser()
    if path.exists():
        return str(path), None
    if _HUB_ID.match(ref):
        raise error(f"{ref}: no such local path, and as a hub id it has no pinned revision; "
                    f"pass {ref}@<40-hex commit sha> (a branch cannot be resolved offline)")
    raise error(f"{ref}: {what} not found")


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

    def resolve_ref(self, ref: str, revision: str | None = None) -> str:
        """Where to load a model reference of this bundle from; anything that could point elsewhere is a ``BundleError``.

        - a path carried in the bundle (a listed file, or a folder of listed files) -> its absolute path;
        - an absolute local path -> unchanged (a model kept outside the bundle; not covered by its hashes);
        - a hub id ``org/name`` pinned to a 40-hex commit (``revision``, else the ``revision`` the manifest
          records beside this ref in ``vlm``/``vfm``) -> ``"org/name@<commit>"``, which ``load_vlm`` and
          ``load_vfm`` load at exactly that commit.

        Refused: a relative path not carried in the bundle (it would open relative to the current
        directory), ``..``, a hub id without a pinned revision (whatever the hub holds today).
        """
        if not isinstance(ref, str) or not ref:
            raise BundleError(f"{ref!r}: empty model reference in {MANIFEST_NAME}")
        if os.path.isabs(ref):
            return ref
        name, at = split_pinned(ref)
        if at is None:
            rel = ref.rstrip("/")
            try:
                check_relpath(rel)
            except BundleError:
                raise BundleError(f"{ref}: model reference leaves the bundle; carry the model in it "
                                  "(--carry-vlm/--carry-vfm) or give an absolute path or a pinned hub id") from None
            if rel in self.manifest.files or any(k.startswith(rel + "/") for k in self.manifest.files):
                return str(self.root / rel)
            if revision is None:
                revision = self._recorded_revision(ref)
        elif revision is not None and revision != at:
            raise BundleError(f"{ref}: two different revisions ({at} and {revision})")
        pinned = at if at is not None else revision
        if _HUB_ID.match(name) and pinned is not None:
            if not _COMMIT.match(pinned):
                raise BundleError(f"{ref}: hub revision {pinned!r} is not a 40-hex commit sha; pin it to a commit")
            return f"{name}@{pinned}"
        if _HUB_ID.match(ref):
            raise BundleError(f"{ref}: not carried in the bundle, and as a hub id it has no pinned revision; record the "
                              "40-hex commit (vlm/vfm revision, e.g. train with --vlm org/name@<commit>) or carry the model")
        raise BundleError(f"{ref}: model reference is neither carried in the bundle, an absolute path, nor a pinned "
                          "hub id org/name; carry the model in the bundle (--carry-vlm/--carry-vfm)")

    def _recorded_revision(self, ref: str) -> str | None:
        for spec in (self.manifest.vlm, self.manifest.vfm):
            if spec is not None and spec.ref == ref and spec.revision is not None:
                return spec.revision
        return None

    def tensors(self, rel: str) -> dict[str, "torch.Tensor"]:
        """The safetensors file ``rel`` as torch tensors (needs torch)."""
        from safetensors.torch import load_file

        return self._read_safetensors(rel, load_file)

    def arrays(self, rel: str) -> dict[str, np.ndarray]:
        """The safetensors file ``rel`` as numpy arrays (no torch needed)."""
        from safetensors.numpy import load_file

        return self._read_safetensors(rel, load_file)

    def _read_safetensors(self, rel: str, load_file) -> dict:
        try:
            return load_file(str(self.path(rel)))
        except BundleError:
            raise
        except Exception as e:
            raise BundleError(f"{rel}: cannot read safetensors ({e})") from None

    def class_embedding_matrix(self) -> np.ndarray:
        """W [C, D_llm] float32 as numpy, checked against the manifest (no torch needed)."""
        t = self.arrays("embeddings.safetensors")
        if "W" not in t:
            raise BundleError("embeddings.safetensors: tensor 'W' missing")
        m = self.manifest
        if tuple(t["W"].shape) != (len(m.classes), m.d_llm):
            raise BundleError(f"embeddings.safetensors: W has shape {tuple(t['W'].shape)}, manifest says ({len(m.classes)}, {m.d_llm})")
        return np.ascontiguousarray(t["W"], dtype=np.float32)

    def class_embeddings(self) -> "ClassEmbeddings":
        """W as the trainers' ``ClassEmbeddings`` module, with names and synonyms (needs torch)."""
        import torch

        from .modules import ClassEmbeddings

        m = self.manifest
        W = torch.from_numpy(self.class_embedding_matrix())
        return ClassEmbeddings(m.class_names, m.d_llm, {c.name: c.synonyms for c in m.classes}, W)

    def adapter(self) -> "CrossAttentionAdapter":
        from .modules import CrossAttentionAdapter

        if self.manifest.adapter is None:
            raise BundleError(f"{self.root}: bundle has no adapter")
        module = CrossAttentionAdapter.from_config(self.manifest.adapter)
        _load_state(module, self.tensors("adapter.safetensors"), "adapter.safetensors")
        return module.eval()

    def detector(self) -> "RareObjectDetector":
        from .modules import RareObjectDetector

        if self.manifest.detector is None:
            raise BundleError(f"{self.root}: bundle has no detector")
        module = RareObjectDetector.from_config(self.manifest.detector)
        _load_state(module, self.tensors("detector.safetensors"), "detector.safetensors")
        return module.eval()

    def add_files(self, files: Mapping[str, bytes | os.PathLike | str], exports: Exports | None = None) -> None:
        """Add or replace files (bytes, or a path to copy) and, when given, replace the manifest's ``exports``.

        The complete new version is built in a temporary sibling directory (every file of the old
        one hard-linked where the filesystem allows, else copied; the new files; the manifest last)
        and swapped with the old directory in one atomic step (``fileio.replace_dir``), so a crash
        at any point leaves the old bundle or the new one at ``root``. ``root`` stays the path
        of the bundle, and ``manifest`` changes only once the new version is in place.
        """
        for rel in files:
            check_relpath(rel)
            if rel == MANIFEST_NAME:
                raise BundleError(f"{rel}: the manifest is written by the bundle itself, not added as a file")
        manifest = copy.deepcopy(self.manifest)
        target = Path(os.path.realpath(self.root))  # a symlinked bundle keeps its link; its target is replaced
        tmp = _fio.make_temp_dir(target, ".partial")
        try:
            _fio.copy_tree(target, tmp, link=True, skip=lambda rel: rel == MANIFEST_NAME or rel in files)
            for rel, src in files.items():
                dst = tmp / rel
                if isinstance(src, (bytes, bytearray)):
                    _fio.atomic_write_bytes(dst, bytes(src))
                else:
                    _fio.atomic_copy_file(Path(src), dst)
                manifest.files[rel] = FileEntry(sha256_file(dst), dst.stat().st_size)
            if exports is not None:
                manifest.exports = copy.deepcopy(exports)
            _fio.atomic_write_json(tmp / MANIFEST_NAME, manifest.to_dict())
            _fio.replace_dir(tmp, target)
        except BaseException:
            _fio.remove_tree(tmp)  # the unfinished new version, or (after a swap) the old one
            raise
        self.manifest = manifest


def _load_state(module: "torch.nn.Module", state: dict[str, "torch.Tensor"], rel: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "state mismatch"
        raise BundleError(f"{rel}: does not fit the manifest's shapes ({first})") from None


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read and verify a bundle directory; every problem is a one-line ``BundleError``."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found{_recovery_hint(root)}")
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


def _recovery_hint(root: Path) -> str:
    """Where no directory is at ``root`` but an interrupted overwrite left a complete, verified version beside it: the ``mv``."""
    if os.path.lexists(root):
        return ""
    for candidate in _fio.interrupted_versions(root):
        try:
            load_bundle(candidate, verify=True)
        except BundleError:
            continue
        return (f"; an interrupted overwrite left a complete version beside it: "
                f"mv {shlex.quote(str(candidate))} {shlex.quote(str(root))}")
    return ""


def write_bundle(
    out_dir: str | os.PathLike,
    manifest: Manifest,
    tensors: Mapping[str, Mapping[str, "torch.Tensor"]],
    files: Mapping[str, str | os.PathLike] | None = None,
    dirs: Mapping[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Write a complete bundle atomically and return it loaded.

    ``tensors``: file name -> state dict (saved as safetensors). ``files``: bundle name -> source
    file to copy. ``dirs``: bundle folder -> source directory copied whole (a carried VLM or VFM).
    The manifest's ``files`` is filled here. Everything is written in a temporary sibling directory,
    manifest last, then put at ``out_dir`` in one atomic step (``fileio.replace_dir``: an existing
    bundle is swapped out and deleted), so a crash at any point leaves the old bundle or the new one.
    """
    out = Path(out_dir)
    if os.path.lexists(out) and not overwrite:
        raise BundleError(f"{out}: already exists (pass overwrite=True / --overwrite)")
    for rel in [*tensors, *(files or {}), *(dirs or {})]:
        check_relpath(rel)
    tmp = _fio.make_temp_dir(out, ".partial")
    try:
        if tensors:
            from safetensors.torch import save
        for rel, state in tensors.items():
            _fio.atomic_write_bytes(tmp / rel, save({k: v.detach().contiguous().cpu() for k, v in state.items()}))
        for rel, src in (files or {}).items():
            _fio.atomic_copy_file(src, tmp / rel)
        for rel, src in (dirs or {}).items():
            _fio.copy_tree(src, tmp / rel)
        manifest = dataclasses.replace(manifest, files={})
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            manifest.files[rel] = FileEntry(sha256_file(f), f.stat().st_size)
        _fio.atomic_write_json(tmp / MANIFEST_NAME, manifest.to_dict())
        _fio.replace_dir(tmp, out)
    except BaseException:
        _fio.remove_tree(tmp)  # the unfinished new version, or (after a swap) the old one
        raise
    return load_bundle(out)
