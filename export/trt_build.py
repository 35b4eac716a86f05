"""TensorRT 10 engines from the exported ONNX graphs, with the Python builder API (no trtexec).

``EngineBuilder.build(onnx_path, profile, precision)`` parses the ONNX (every parser error is
collected and reported before it fails), sets the precision flags (fp16; int8 on an explicitly
quantised QDQ graph, with fp16 allowed for the layers left in float), adds one optimisation
profile derived from the graph's dynamic axes, reuses and updates a timing cache, and returns the
serialized engine. It warns when the GPU has no fast fp16 (or int8) and the flag was asked for.

Profiles (``derive_profile``): every input dimension the ONNX declares dynamic is looked up in
``rtrt.runtime.names`` (``DETECTOR``/``ADAPTER`` dynamic axes) to get its symbol, and the symbol's
(min, opt, max) comes from ``dim_ranges``: batch from ``max_batch``, classes around the bundle's
C, visual tokens from the VLM family (LLaVA-1.5: 576; Qwen2.5-VL: 4..16384 with opt at the
image size; InternVL3: 256 per 448 tile, up to 13 tiles). ``build_bundle_engine`` ties it
together for a bundle through the content-keyed ``EngineCache``; ``rtrt export --backend trt`` and
the runtime's ``on_engine_mismatch="rebuild"`` both call it. ``tensorrt`` is imported inside
functions only.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

from filelock import FileLock

from rtrt.runtime.bundle import atomic_write_bytes
from rtrt.runtime.names import ADAPTER, DETECTOR, GraphSpec
from rtrt.runtime.trt_engine import import_tensorrt, platform_info

from .engine_cache import EngineCache, engine_key
from .onnx_export import ExportError

__all__ = [
    "PRECISIONS",
    "VLM_TOKEN_RANGES",
    "dim_ranges",
    "derive_profile",
    "gpu_has_fast_fp16",
    "EngineBuilder",
    "build_engine",
    "build_bundle_engine",
]

PRECISIONS = ("fp32", "fp16", "int8")

# Visual tokens per image, (min, max), by VLM family; the opt comes from the image size.
VLM_TOKEN_RANGES: dict[str, tuple[int, int]] = {
    "llava": (576, 576),  # LLaVA-1.5: 24x24 patches of a 336 px CLIP, always 576
    "qwen2_5_vl": (4, 16384),  # one token per 28x28 px; processor min 56x56 px, max 12.8 Mpx
    "internvl": (256, 256 * 13),  # 256 per 448 px tile, up to 12 tiles + a thumbnail
}


def _opt_tokens(family: str | None, image_size: int) -> int:
    if family == "llava":
        return 576
    if family == "qwen2_5_vl":
        return max(4, (image_size // 28) ** 2)
    if family == "internvl":
        tiles = math.ceil(image_size / 448) ** 2
        return 256 * (tiles + (1 if tiles > 1 else 0))
    return 576


def dim_ranges(family: str | None, image_size: int, num_classes: int, max_batch: int = 4) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic dimension in ``rtrt.runtime.names``."""
    lo, hi = VLM_TOKEN_RANGES.get(family or "", (1, 4096))
    opt = min(max(_opt_tokens(family, image_size), lo), hi)
    c = max(1, int(num_classes))
    return {
        "batch": (1, 1, max(1, int(max_batch))),
        "num_classes": (1, c, max(c, 256)),
        "num_tokens": (lo, opt, hi),
        "num_patches": (1, (image_size // 16) ** 2, (image_size // 16) ** 2),
    }


def derive_profile(
    input_dims: Mapping[str, Sequence[int | str]],
    spec: GraphSpec,
    ranges: Mapping[str, tuple[int, int, int]],
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """{input: (min, opt, max) shape}. A dim is dynamic when it is -1/None/a symbol name."""
    profile = {}
    for name, dims in input_dims.items():
        lo, opt, hi = [], [], []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                lo.append(d), opt.append(d), hi.append(d)
                continue
            sym = spec.dynamic_axes.get(name, {}).get(axis) or (d if isinstance(d, str) else None)
            if sym not in ranges:
                raise ExportError(f"input {name} axis {axis} is dynamic but has no range (symbol {sym!r})")
            a, b, c = ranges[sym]
            lo.append(a), opt.append(b), hi.append(c)
        profile[name] = (tuple(lo), tuple(opt), tuple(hi))
    return profile


def gpu_has_fast_fp16(builder=None) -> bool:
    """``builder.platform_has_fast_fp16`` where TensorRT still offers it, else by compute capability."""
    if builder is not None and hasattr(builder, "platform_has_fast_fp16"):
        try:
            return bool(builder.platform_has_fast_fp16)
        except Exception:
            pass
    import torch

    major, minor = torch.cuda.get_device_capability()
    return (major, minor) >= (5, 3) and (major, minor) != (6, 1)  # consumer Pascal runs fp16 at 1/64


def _format_parser_error(err) -> str:
    parts = [f"[{err.code()}] {err.desc()}"]
    for attr in ("node_name", "node_operator"):
        fn = getattr(err, attr, None)
        if fn is not None:
            try:
                v = fn()
                if v:
                    parts.append(f"{attr.split('_')[1]}={v}")
            except Exception:
                pass
    try:
        parts.append(f"node#{err.node()}")
    except Exception:
        pass
    return " ".join(parts)


class EngineBuilder:
    """Builds one engine per call; see the module docstring."""

    def __init__(
        self,
        *,
        workspace_gb: float = 4.0,
        timing_cache: str | os.PathLike | None = None,
        verbose: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        self.workspace_gb = workspace_gb
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self.verbose = verbose
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def build(self, onnx_path: str | os.PathLike, profile: Mapping[str, tuple], precision: str = "fp16") -> bytes:
        """Serialized engine for ``onnx_path`` with one optimisation ``profile`` ({input: (min, opt, max)})."""
        if precision not in PRECISIONS:
            raise ExportError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
        trt = import_tensorrt()
        logger = trt.Logger(trt.Logger.VERBOSE if self.verbose else trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [_format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            for e in errors:
                self.log(f"TensorRT ONNX parser: {e}")
            raise ExportError(f"{Path(onnx_path).name}: TensorRT could not parse the ONNX ({len(errors)} error(s)): " + " | ".join(errors))
        names = {network.get_input(i).name for i in range(network.num_inputs)}
        if names != set(profile):
            raise ExportError(f"{Path(onnx_path).name}: network inputs {sorted(names)} do not match the profile's {sorted(profile)}")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gb * (1 << 30)))
        if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # TF32 (on by default) would break fp32 parity at 1e-4
        if precision in ("fp16", "int8"):
            if not gpu_has_fast_fp16(builder):
                warnings.warn("this GPU has no fast fp16; an fp16 engine may be slower than fp32", RuntimeWarning, stacklevel=2)
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            if hasattr(builder, "platform_has_fast_int8") and not builder.platform_has_fast_int8:
                warnings.warn("this GPU has no fast int8", RuntimeWarning, stacklevel=2)
            config.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's Q/DQ nodes

        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(opt_profile)

        lock = FileLock(str(self.timing_cache) + ".lock") if self.timing_cache else None
        if self.timing_cache is not None and self.timing_cache.is_file():
            blob = self.timing_cache.read_bytes()
        else:
            blob = b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

        self.log(f"TensorRT {trt.__version__}: building {Path(onnx_path).name} ({precision}); profile {dict(profile)}")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(f"{Path(onnx_path).name}: TensorRT failed to build the engine (see the TensorRT log above)")
        if self.timing_cache is not None and lock is not None:
            with lock:  # several builds may share one timing cache
                atomic_write_bytes(self.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        return bytes(memoryview(serialized))


def build_engine(
    onnx_path: str | os.PathLike,
    graph: str,
    precision: str,
    input_dims: Mapping[str, Sequence[int | str]],
    ranges: Mapping[str, tuple[int, int, int]],
    *,
    cache_dir: str | os.PathLike | None = None,
    workspace_gb: float = 4.0,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, dict]:
    """Load or build the engine of one exported graph through the ``EngineCache``.

    ``input_dims``: the ONNX inputs' dims (``GraphInfo.inputs``; symbols where dynamic).
    Returns the cached engine's path and its manifest entry (key, platform, profile).
    """
    spec = DETECTOR if graph == "detector" else ADAPTER
    profile = derive_profile(input_dims, spec, ranges)
    plat = platform_info()
    key = engine_key(onnx_path, precision, profile, plat)
    cache = EngineCache(cache_dir)
    timing = cache.root / f"timing.trt{plat.trt_version}.sm{plat.compute_capability}.cache"
    builder = EngineBuilder(workspace_gb=workspace_gb, timing_cache=timing, log=log)
    res = cache.load_or_build(key, lambda: builder.build(onnx_path, profile, precision), name=f"{graph}.{precision}")
    meta = {
        "file": f"engines/{graph}.{precision}.engine",
        "key": key.digest,
        "precision": precision,
        "onnx_sha256": key.onnx_sha256,
        "profile": {k: [list(s) for s in v] for k, v in profile.items()},
        "built": res.built,
        **plat.to_dict(),
    }
    return res.path, meta


def build_bundle_engine(
    bundle,
    graph: str,
    precision: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_batch: int = 4,
    family: str | None = None,
    workspace_gb: float = 4.0,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, dict]:
    """``build_engine`` for the ``graph`` ("detector"/"adapter") exported into ``bundle``.

    The source is the ONNX recorded in ``manifest.exports["onnx"]`` (for int8 the symmetric QDQ
    variant ``<graph>.qdq``); ranges come from the bundle's VLM family, image size and classes.
    """
    graphs = (bundle.manifest.exports.get("onnx") or {}).get("graphs", {})
    source = f"{graph}.qdq" if precision == "int8" else graph
    entry = graphs.get(source)
    if entry is None:
        hint = " --precision int8 --backend trt" if precision == "int8" else ""
        raise ExportError(f"{bundle.root}: no exported {source} graph to build from; run `rtrt export --bundle {bundle.root}{hint}`")
    m = bundle.manifest
    fam = family or (m.vlm.family if m.vlm else None)
    image_size = int((m.exports.get("onnx") or {}).get("image_size") or (m.vfm.image_size if m.vfm else 448))
    ranges = dim_ranges(fam, image_size, len(m.classes), max_batch)
    path, meta = build_engine(bundle.path(entry["file"]), graph, precision, entry["inputs"], ranges, cache_dir=cache_dir, workspace_gb=workspace_gb, log=log)
    meta["source_graph"] = source
    return path, meta
