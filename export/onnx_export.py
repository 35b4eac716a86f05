"""ONNX export of the two deployed graphs, made TensorRT-friendly and checked node by node.

- ``export_detector``: DINOv3 backbone + ``RareObjectDetector`` + per-class max + similarity map (``rtrt.runtime.graphs.DetectorGraph``); inputs ``pixel_values [B, 3, S, S]`` and
  ``class_embeddings [C, D]``; B and C dynamic, the image side S fixed at export.
- ``export_adapter``: ``CrossAttentionAdapter``; ``visual_tokens [B, N, D]``, ``class_embeddings
  [C, D]``; B, N and C dynamic.

Names and dynamic axes come from ``rtrt.runtime.names`` (the runtime and the engine builder read
the same table). Export uses torch's dynamo exporter (the TorchScript one fails on timm DINOv3 and
bakes C into the adapter, see /work/shared/NOTES.md) at opset 18, the lowest it implements, with
the weights inside the ``.onnx`` (``external_data=False``).

TensorRT traps handled here:
- DINOv3 RoPE: transformers' ``DINOv3ViTRopePositionEmbedding`` builds its table with ``tile``
  from the input's shape, the construct reported to export to an ``If`` that TensorRT rejects or
  computes wrongly; timm's version is also computed per call. With the image size fixed, the dynamo
  exporter folds either into a constant today (checked with torch 2.15: no ``If`` for timm or
  transformers DINOv3, frozen or not); ``freeze_rope`` makes that independent of the exporter's
  constant folding by replacing the RoPE module with the table precomputed for the export grid
  (the same numbers; parity is checked against the unpatched model).
- Sorting: the graph returns the C class scores unsorted; the runtime ranks them on the host
  (``select_detections``). A ``TopK`` with K equal to the dynamic class count has been refused by
  TensorRT's parser, and a rank computation adds int64 Range/Equal/Where ops for no reader.
- ``tensorrt_problems`` walks every node: no control flow (``If``/``Loop``/``Scan``), no sequence
  ops, no data-dependent shapes (``NonZero``/``Unique``), no ``TopK`` with a computed K, no float64,
  no custom domains, no subgraphs. The export refuses a graph with any of them.

Run as part of ``rtrt export``; the functions are usable on their own.
"""
from __future__ import annotations

import collections
import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtrt.runtime.graphs import AdapterGraph, DetectorGraph
from rtrt.runtime.modules import CrossAttentionAdapter, RareObjectDetector
from rtrt.runtime.names import ADAPTER, DETECTOR, GraphSpec, adapter_spec

from .common import ExportError

__all__ = [
    "OPSET",
    "FORBIDDEN_OPS",
    "ExportError",
    "GraphInfo",
    "freeze_rope",
    "export_detector",
    "export_adapter",
    "tensorrt_problems",
    "check_tensorrt_friendly",
    "graph_info",
]

OPSET = 18  # lowest opset torch's dynamo exporter implements; TensorRT 10's parser reads it

# Ops TensorRT cannot build, builds only with data-dependent shapes, or that signal a trap.
FORBIDDEN_OPS = frozenset(
    {
        "If", "Loop", "Scan",  # control flow (DINOv3 RoPE `tile` -> If)
        "SequenceConstruct", "SequenceAt", "SequenceEmpty", "SequenceErase", "SequenceInsert",
        "SequenceLength", "SplitToSequence", "ConcatFromSequence", "SequenceMap",
        "NonZero", "Unique", "Compress",  # data-dependent output shapes
        "Optional", "OptionalGetElement", "OptionalHasElement",
    }
)


@dataclass
class GraphInfo:
    """What the node walk found in one ONNX file (recorded in the manifest's exports)."""

    opset: int  # default-domain opset of the model
    nodes: int  # number of top-level nodes
    op_counts: dict[str, int] = field(default_factory=dict)  # op type -> count
    inputs: dict[str, list[Any]] = field(default_factory=dict)  # name -> dims (int or symbolic name)
    outputs: dict[str, list[Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # TensorRT-unfriendly constructs; empty is good


class _FrozenTimmRope(nn.Module):
    """Stands in for a timm RoPE module: the table for one grid, precomputed."""

    def __init__(self, embed: torch.Tensor, grid: tuple[int, int]):
        super().__init__()
        self.register_buffer("embed", embed.detach().clone(), persistent=False)
        self.grid = tuple(int(g) for g in grid)
        self.feat_shape = list(self.grid)  # Eva checks for this attribute on its static-size path

    def get_embed(self, shape=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if shape is not None and tuple(int(s) for s in shape) != self.grid:
            raise ExportError(f"RoPE was frozen for a {self.grid} patch grid, the graph asks for {tuple(shape)}")
        return self.embed if dtype is None else self.embed.to(dtype)


class _FrozenHFRope(nn.Module):
    """Stands in for transformers' ``DINOv3ViTRopePositionEmbedding`` (whose ``tile`` is the trap)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, hw: tuple[int, int]):
        super().__init__()
        self.register_buffer("cos", cos.detach().clone(), persistent=False)
        self.register_buffer("sin", sin.detach().clone(), persistent=False)
        self.hw = hw

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(pixel_values.shape[-2:]) != self.hw:
            raise ExportError(f"RoPE was frozen for {self.hw} images, got {tuple(pixel_values.shape[-2:])}")
        return self.cos.to(pixel_values.dtype), self.sin.to(pixel_values.dtype)


def freeze_rope(model: nn.Module, image_size: int, patch_size: int = 16) -> int:
    """Replace every DINOv3 RoPE module under ``model`` by its precomputed table; returns how many.

    Call on an eval-mode model (training-time coordinate jitter must be off). The image side is
    fixed per export, so the table is a constant of the graph.
    """
    grid = (image_size // patch_size, image_size // patch_size)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            cls = type(child).__name__
            if cls.startswith("RotaryEmbedding") and hasattr(child, "get_embed"):  # timm Eva family
                with torch.no_grad():
                    embed = child.get_embed(shape=list(grid))
                setattr(parent, name, _FrozenTimmRope(embed, grid))
                count += 1
            elif cls == "DINOv3ViTRopePositionEmbedding":  # transformers
                with torch.no_grad():
                    cos, sin = child(torch.zeros(1, 3, image_size, image_size))
                setattr(parent, name, _FrozenHFRope(cos, sin, (image_size, image_size)))
                count += 1
    return count


def _dynamic_shapes(spec: GraphSpec) -> dict[str, dict[int, Any]]:
    dims: dict[str, Any] = {}
    out = {}
    for name in spec.inputs:
        axes = spec.dynamic_axes.get(name, {})
        out[name] = {ax: dims.setdefault(sym, torch.export.Dim(sym, min=1, max=1 << 20)) for ax, sym in axes.items()}
    return out


def _export(module: nn.Module, args: tuple, spec: GraphSpec, path: Path, opset: int, metadata: dict[str, str], verbose: bool) -> Path:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = io.StringIO()
    # The dynamo exporter prints its progress and optimiser chatter; keep it unless asked
    # (failures still raise, with their first line in the ExportError).
    quiet = contextlib.ExitStack()
    if not verbose:
        quiet.enter_context(contextlib.redirect_stdout(sink))
        quiet.enter_context(contextlib.redirect_stderr(sink))
    try:
        with quiet, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_shapes=_dynamic_shapes(spec),
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except ExportError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{path.name}: torch.onnx.export failed ({type(e).__name__}: {first})") from e
    model = onnx.load(str(path))
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=str(v))
    # The exporter tags every node with its Python stack trace: this machine's paths and line
    # numbers in a shipped graph, changing with any edit of the source. The graph does not need them.
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    check_tensorrt_friendly(path)
    return path


def export_detector(
    vfm: nn.Module,
    detector: RareObjectDetector,
    path: str | os.PathLike,
    *,
    image_size: int,
    patch_size: int = 16,
    opset: int = OPSET,
    verbose: bool = False,
) -> Path:
    """Export ``DetectorGraph(vfm, detector)`` for ``image_size`` square images to ``path``.

    ``vfm`` is patched in place by ``freeze_rope`` (pass a fresh copy if the caller still needs
    the original module; the numbers are unchanged either way).
    """
    vfm.eval()
    freeze_rope(vfm, image_size, patch_size)
    graph = DetectorGraph(vfm, detector).eval()
    d = detector.config.d_llm
    args = (torch.randn(2, 3, image_size, image_size), torch.randn(3, d))
    meta = {"rtrt.graph": "detector", "rtrt.image_size": str(image_size), "rtrt.d_llm": str(d)}
    return _export(graph, args, DETECTOR, Path(path), opset, meta, verbose)


def export_adapter(adapter: CrossAttentionAdapter, path: str | os.PathLike, *, opset: int = OPSET, verbose: bool = False) -> Path:
    """Export ``AdapterGraph(adapter)`` with dynamic B, N, C to ``path``."""
    graph = AdapterGraph(adapter).eval()
    d = adapter.config.d_model
    spec = adapter_spec(adapter.config)
    args = (torch.randn(2, 7, d), torch.randn(3, d))
    if adapter.config.detector_bias:  # the detector's z-scores, a third input (ADAPTER_BIASED)
        args = args + (torch.randn(2, 7, 3),)
    meta = {"rtrt.graph": "adapter", "rtrt.d_llm": str(d)}
    return _export(graph, args, spec, Path(path), opset, meta, verbose)


def _dims(value_info) -> list[Any]:
    return [d.dim_param if d.dim_param else int(d.dim_value) for d in value_info.type.tensor_type.shape.dim]


def tensorrt_problems(model) -> list[str]:
    """Every TensorRT-unfriendly construct in an ``onnx.ModelProto`` (or a path), one line each."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    g = model.graph
    problems: list[str] = []
    constants = {i.name for i in g.initializer}
    constants.update(o for n in g.node if n.op_type == "Constant" for o in n.output)
    double = onnx.TensorProto.DOUBLE
    for t in g.initializer:
        if t.data_type == double:
            problems.append(f"initializer {t.name} is float64")
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == double:
            problems.append(f"tensor {vi.name} is float64")
    for n in g.node:
        where = f"{n.op_type} node {n.name or '?'}"
        if n.op_type in FORBIDDEN_OPS:
            problems.append(f"{where}: {n.op_type} is not TensorRT-friendly")
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {n.domain!r}")
        if n.op_type == "TopK" and (len(n.input) < 2 or n.input[1] not in constants):
            problems.append(f"{where}: K is computed at run time (TensorRT wants an initializer)")
        if n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == double:
                    problems.append(f"{where}: casts to float64")
        for a in n.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                problems.append(f"{where}: has a subgraph attribute {a.name!r}")
    return problems


def check_tensorrt_friendly(path: str | os.PathLike) -> None:
    """Raise ``ExportError`` listing every problem ``tensorrt_problems`` finds in the file."""
    problems = tensorrt_problems(path)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ExportError(f"{Path(path).name}: not TensorRT-friendly: {shown}")


def graph_info(path: str | os.PathLike) -> GraphInfo:
    """Opset, node counts, I/O shapes and problems of an ONNX file."""
    import onnx

    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return GraphInfo(
        opset=int(opset),
        nodes=len(model.graph.node),
        op_counts=dict(sorted(counts.items())),
        inputs={i.name: _dims(i) for i in model.graph.input},
        outputs={o.name: _dims(o) for o in model.graph.output},
        problems=tensorrt_problems(model),
    )
