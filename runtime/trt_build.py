"""TensorRT 10 and 11 engines from the exported ONNX graphs, with the Python builder API (no trtexec).

``EngineBuilder.build(onnx_path, profile, precision)`` parses the ONNX (every parser error is
collected and reported before it fails), configures precision the way the installed TensorRT
wants it (``TrtFlavor``), adds one optimisation profile derived from the graph's dynamic axes,
reuses and updates a timing cache, and returns the serialized engine.

TensorRT 10 and 11 differ in one place, ``TrtFlavor.of(trt)``:

- TensorRT 10 (weakly typed): ``create_network(0)``; fp16 sets ``BuilderFlag.FP16`` on the fp32
  graph; int8 sets ``FP16`` + ``INT8`` on the Q/DQ graph ``<graph>.qdq.onnx`` (scales from its
  Q/DQ nodes; no calibrator).
- TensorRT >= 11 (strongly typed; the precision flags and ``platform_has_fast_fp16`` are gone):
  ``create_network(1 << STRONGLY_TYPED)`` (ignored but accepted by 11, where strong typing is
  always on), no precision flag; fp16 is built from the fp16 graph ``<graph>.fp16.onnx``
  (``rtrt.export.fp16``), int8 from the Q/DQ graph. An fp32 graph asked to give fp16 is refused.
- Both: fp32 clears ``BuilderFlag.TF32`` (on by default; it would break the 1e-4 fp32 parity).

Profiles (``derive_profile``): every input dimension the ONNX declares dynamic is looked up in
``rtrt.runtime.names`` (``DETECTOR``/``ADAPTER`` dynamic axes) to get its symbol; the symbol's
(min, opt, max) comes from ``dim_ranges`` = ``rtrt.runtime.profiles.graph_ranges``: per graph,
from the bundle's image-token layout (``ADAPTER_CALL``: the adapter sees one row of all images'
tokens), its classes and ``max_batch``. ``build_bundle_engine`` ties it together for a bundle
through the content-keyed ``EngineCache``; ``rtrt export --backend trt`` and the runtime's
``on_engine_mismatch="rebuild"`` both call it. ``tensorrt`` is imported inside functions only.

The builder lives in the runtime because building an engine for this GPU is a deployment-time job
(a vehicle rebuilds a mismatched engine on its first start); the exporter imports it from here.
Only ``float16_kinds`` (which precision an ONNX graph carries) needs the ``onnx`` package.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from filelock import FileLock

from .engine_cache import EngineCache, engine_key
from .errors import EngineBuildError
from .fileio import atomic_write_bytes
from .exports import EngineExport
from .names import ADAPTER, ADAPTER_BIASED, DETECTOR, PRECISIONS, GraphSpec, engine_file
from .names import source_graph as _source_graph
from .profiles import graph_ranges
from .trt_engine import import_tensorrt, platform_info

__all__ = [
    "TrtFlavor",
    "source_graph",
    "dim_ranges",
    "derive_profile",
    "gpu_has_fast_fp16",
    "float16_kinds",
    "EngineBuilder",
    "build_engine",
    "build_bundle_engine",
]


@dataclass(frozen=True)
class TrtFlavor:
    """How the installed TensorRT makes a network and an engine of a precision (see the module docstring)."""

    major: int  # TensorRT major version
    strongly_typed: bool  # precision comes from the graph's types (>= 11), not from builder flags

    @classmethod
    def of(cls, trt) -> "TrtFlavor":
        """The flavour of the ``tensorrt`` module ``trt``."""
        try:
            major = int(str(trt.__version__).split(".")[0])
        except ValueError:
            raise EngineBuildError(f"cannot read the TensorRT version {trt.__version__!r}") from None
        if major < 10:
            raise EngineBuildError(f"TensorRT {trt.__version__} is too old: rtrt builds with TensorRT 10 or 11")
        return cls(major=major, strongly_typed=major >= 11)

    def network_flags(self, trt) -> int:
        """The ``create_network`` argument."""
        if not self.strongly_typed:
            return 0  # explicit batch is the only mode since TensorRT 10
        flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)

    def builder_flags(self, precision: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(``BuilderFlag`` names to set, names to clear where the flag exists) for ``precision``."""
        clear = ("TF32",) if precision == "fp32" else ()
        if self.strongly_typed or precision == "fp32":
            return (), clear
        return (("FP16",) if precision == "fp16" else ("FP16", "INT8")), clear

    def check_graph(self, onnx_path: str | os.PathLike, precision: str) -> None:
        """``EngineBuildError`` when the graph at ``onnx_path`` cannot give ``precision`` on this TensorRT."""
        name = Path(onnx_path).name
        if precision == "int8" and "qdq" not in float16_kinds(onnx_path):
            raise EngineBuildError(f"{name}: an int8 engine needs a Q/DQ graph (<graph>.qdq.onnx from `rtrt export --precision int8 --backend trt`); this one has no QuantizeLinear/DequantizeLinear")
        if precision == "fp16" and self.strongly_typed and "fp16" not in float16_kinds(onnx_path):
            raise EngineBuildError(f"{name}: TensorRT {self.major} is strongly typed and builds fp16 only from an fp16 graph (<graph>.fp16.onnx from `rtrt export --precision fp16 --backend trt`); this graph is fp32")


def float16_kinds(path: str | os.PathLike) -> set[str]:
    """What reduced precision the ONNX graph at ``path`` carries: ``{"fp16", "qdq"}``, either or none.

    ``fp16``: any fp16 initializer, graph input/output or Cast to fp16; ``qdq``: any
    QuantizeLinear/DequantizeLinear node. The TensorRT builder uses it to refuse a graph that
    cannot give the precision asked for.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    half = onnx.TensorProto.FLOAT16
    kinds: set[str] = set()
    if any(t.data_type == half for t in g.initializer) or any(
        v.type.tensor_type.elem_type == half for v in (*g.input, *g.output, *g.value_info)
    ):
        kinds.add("fp16")
    for node in g.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            kinds.add("qdq")
        elif node.op_type == "Cast" and any(a.name == "to" and a.i == half for a in node.attribute):
            kinds.add("fp16")
    return kinds


def source_graph(graph: str, precision: str, trt=None) -> str:
    """Key of the exported graph ("adapter", "adapter.fp16", "adapter.qdq") an engine is built from with
    this TensorRT (``rtrt.runtime.names.source_graph`` for its flavour)."""
    return _source_graph(graph, precision, TrtFlavor.of(trt if trt is not None else import_tensorrt()).strongly_typed)


def dim_ranges(
    layout: Mapping[str, Any] | None, num_classes: int, max_batch: int = 4, family: str | None = None
) -> dict[str, dict[str, tuple[int, int, int]]]:
    """{"detector": ranges, "adapter": ranges}: (min, opt, max) of every symbolic dimension per graph.

    ``layout``: the bundle's ``manifest.vlm.image_token_layout`` (None for a bundle without a VLM);
    ``family`` overrides its family. See ``rtrt.runtime.profiles``.
    """
    return graph_ranges(layout, num_classes, max_batch, family)


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
                raise EngineBuildError(f"input {name} axis {axis} is dynamic but has no range (symbol {sym!r})")
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

    try:
        major, minor = torch.cuda.get_device_capability()
    except Exception:  # no CUDA device to ask: nothing to warn about
        return True
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
            raise EngineBuildError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
        trt = import_tensorrt()
        flavor = TrtFlavor.of(trt)
        flavor.check_graph(onnx_path, precision)
        logger = trt.Logger(trt.Logger.VERBOSE if self.verbose else trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(flavor.network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [_format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            for e in errors:
                self.log(f"TensorRT ONNX parser: {e}")
            raise EngineBuildError(f"{Path(onnx_path).name}: TensorRT could not parse the ONNX ({len(errors)} error(s)): " + " | ".join(errors))
        names = {network.get_input(i).name for i in range(network.num_inputs)}
        if names != set(profile):
            raise EngineBuildError(f"{Path(onnx_path).name}: network inputs {sorted(names)} do not match the profile's {sorted(profile)}")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gb * (1 << 30)))
        if precision in ("fp16", "int8") and not gpu_has_fast_fp16(builder):
            warnings.warn("this GPU has no fast fp16; an fp16 engine may be slower than fp32", RuntimeWarning, stacklevel=2)
        if precision == "int8" and hasattr(builder, "platform_has_fast_int8") and not builder.platform_has_fast_int8:
            warnings.warn("this GPU has no fast int8", RuntimeWarning, stacklevel=2)
        set_flags, clear_flags = flavor.builder_flags(precision)
        for name in clear_flags:
            if hasattr(trt.BuilderFlag, name):  # TF32 (on by default) would break fp32 parity at 1e-4
                config.clear_flag(getattr(trt.BuilderFlag, name))
        for name in set_flags:
            config.set_flag(getattr(trt.BuilderFlag, name))

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

        typing = "strongly typed" if flavor.strongly_typed else "flags " + ("+".join(set_flags) or "none")
        self.log(f"TensorRT {trt.__version__}: building {Path(onnx_path).name} ({precision}, {typing}); profile {dict(profile)}")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"{Path(onnx_path).name}: TensorRT failed to build the engine (see the TensorRT log above)")
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
) -> tuple[Path, EngineExport]:
    """Load or build the engine of one exported graph through the ``EngineCache``.

    ``input_dims``: the ONNX inputs' dims (``GraphInfo.inputs``; symbols where dynamic).
    ``ranges``: this graph's entry of ``dim_ranges`` (the whole ``dim_ranges`` result is accepted too).
    Returns the cached engine's path and its manifest entry (key, platform, profile).
    """
    if isinstance(ranges.get(graph), Mapping):
        ranges = ranges[graph]
    spec = DETECTOR if graph == "detector" else ADAPTER_BIASED if ADAPTER_BIASED.inputs[2] in input_dims else ADAPTER
    profile = derive_profile(input_dims, spec, ranges)
    plat = platform_info()
    key = engine_key(onnx_path, precision, profile, plat)
    cache = EngineCache(cache_dir)
    timing = cache.root / f"timing.trt{plat.trt_version}.sm{plat.compute_capability}.cache"
    builder = EngineBuilder(workspace_gb=workspace_gb, timing_cache=timing, log=log)
    res = cache.load_or_build(key, lambda: builder.build(onnx_path, profile, precision), name=f"{graph}.{precision}")
    meta = EngineExport(
        file=engine_file(graph, precision),
        key=key.digest,
        precision=precision,
        onnx_sha256=key.onnx_sha256,
        profile={k: [list(s) for s in v] for k, v in profile.items()},
        built=res.built,
        **plat.to_dict(),
    )
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
) -> tuple[Path, EngineExport]:
    """``build_engine`` for the ``graph`` ("detector"/"adapter") exported into ``bundle``.

    The source is the ONNX recorded in ``manifest.exports.onnx`` that this TensorRT builds the
    precision from (``source_graph``: the graph itself, ``<graph>.fp16`` on TensorRT >= 11, or
    ``<graph>.qdq`` for int8); ranges come from the bundle's image-token layout and classes.
    """
    source = source_graph(graph, precision)
    entry = bundle.manifest.exports.graph(source)
    if entry is None:
        hint = f" --precision {precision} --backend trt" if source != graph else ""
        raise EngineBuildError(f"{bundle.root}: no exported {source} graph to build from; run `rtrt export --bundle {bundle.root}{hint}`")
    m = bundle.manifest
    layout = m.vlm.image_token_layout if m.vlm else None
    fam = family or (m.vlm.family if m.vlm else None)
    ranges = dim_ranges(layout, len(m.classes), max_batch, fam)[graph]
    path, meta = build_engine(bundle.path(entry.file), graph, precision, entry.inputs, ranges, cache_dir=cache_dir, workspace_gb=workspace_gb, log=log)
    meta.source_graph = source
    return path, meta
