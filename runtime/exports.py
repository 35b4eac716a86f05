"""The typed schema of a bundle's ``manifest.exports``: what ``rtrt export`` wrote, read by everyone else.

``Manifest.from_dict`` parses the JSON once into ``Exports`` (``Exports.from_dict``: keys this rtrt
does not know are ignored, so a newer writer's extra fields do not break an older reader; a value
of the wrong type is a ``TypeError`` naming its path, which the manifest turns into a one-line
``BundleError``), and ``Manifest.to_dict`` writes it back as the same JSON (``Exports.to_dict``).
The backends, the engine builder, ``rtrt check`` and the exporter use the objects and their
accessors (``exports.graph("detector.int8")``, ``exports.engine("detector.fp16")``,
``exports.image_size(default)``); nobody reads the dict. Key and file names come from
``rtrt.runtime.names``. The JSON::

    "exports": {
      "onnx": {"opset", "image_size", "precision", "family", "exported_utc", "versions",
               "graphs": {"detector": GraphExport, "detector.int8": ..., "adapter": ..., ...}},
      "reference": {"file": "reference.safetensors", "format", "graphs": {"detector": {"inputs", "shapes"}}},
      "engines": {"detector.fp16": EngineExport, ...},
      "vlm": VlmExport (``rtrt export --vlm``: the whole VLM in ONNX under vlm_onnx/, what the torch-free runtime reads)
    }
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Mapping

from .names import vlm_onnx_file

__all__ = ["GraphExport", "OnnxExports", "EngineExport", "ReferenceGraph", "ReferenceExport", "VlmGraphExport", "VlmExport", "Exports"]

# Field metadata: the key is written only when the value is not None (or, for a dict, not empty),
# as the exporter has always written it (``image_size`` on the detector only, ``method`` on variants).
_OMIT = {"omit_empty": True}


@dataclass
class GraphExport:
    """One exported ONNX graph (``onnx.graphs[graph_key(g, variant)]``): its file, what the node walk found, its parity."""

    file: str  # bundle file, rtrt.runtime.names.onnx_file(graph, variant)
    sha256: str  # hex digest of the file; engines record it as onnx_sha256 to notice a re-export
    size: int = 0  # bytes
    opset: int = 0  # default-domain opset of the graph
    nodes: int = 0  # number of top-level nodes
    op_counts: dict[str, int] = field(default_factory=dict)  # op type -> count
    inputs: dict[str, list[Any]] = field(default_factory=dict)  # input name -> dims (int or symbolic name)
    outputs: dict[str, list[Any]] = field(default_factory=dict)  # output name -> dims (int or symbolic name)
    problems: list[str] = field(default_factory=list)  # TensorRT-unfriendly constructs found; empty is good
    image_size: int | None = field(default=None, metadata=_OMIT)  # detector graphs: square input side in pixels
    method: str | None = field(default=None, metadata=_OMIT)  # variants: how it was made ("dynamic", "static-symmetric-qdq", ...)
    parity: dict[str, Any] | None = field(default=None, metadata=_OMIT)  # rtrt.runtime.parity.ParityReport.to_dict() vs PyTorch


@dataclass
class OnnxExports:
    """The ONNX half of an export (``exports.onnx``): settings shared by every graph, and the graphs."""

    opset: int = 0  # opset the graphs were exported at
    image_size: int = 0  # square detector input side the graphs were exported for (pixels)
    precision: str = "fp32"  # --precision of the export that wrote them
    family: str | None = None  # VLM family the token-count profiles were derived for (None: no VLM)
    exported_utc: str = ""  # when, ISO 8601 UTC
    versions: dict[str, str] = field(default_factory=dict)  # torch/onnx/onnxruntime/onnxscript versions that exported
    graphs: dict[str, GraphExport] = field(default_factory=dict)  # graph_key -> graph


@dataclass
class EngineExport:
    """One TensorRT engine (``engines[engine_name(g, precision)]``), and what it is tied to."""

    file: str  # bundle file, rtrt.runtime.names.engine_file(graph, precision)
    key: str = ""  # engine-cache content key (rtrt.runtime.engine_cache.engine_key digest)
    precision: str = "fp32"  # fp32, fp16 or int8
    onnx_sha256: str = ""  # sha256 of the ONNX it was built from; differs from the graph's after a re-export
    profile: dict[str, list[list[int]]] = field(default_factory=dict)  # input -> [min, opt, max] shapes
    built: bool = False  # True when built by this export, False when reused from the engine cache
    trt_version: str = ""  # TensorRT that built it; another version cannot load it
    gpu_name: str = ""  # GPU it was built on
    compute_capability: str = ""  # "major.minor" of that GPU
    source_graph: str | None = field(default=None, metadata=_OMIT)  # graph_key it was built from ("detector.qdq"); None: the graph itself
    parity: dict[str, Any] | None = field(default=None, metadata=_OMIT)  # ParityReport.to_dict() on the GPU vs PyTorch


@dataclass
class ReferenceGraph:
    """Where one graph's reference inputs came from and their shapes (``reference.graphs[g]``)."""

    inputs: str = ""  # human-readable source ("4 image(s) (scene_1.jpg, ...)")
    shapes: dict[str, list[int]] = field(default_factory=dict)  # input name -> shape stored in the reference file


@dataclass
class ReferenceExport:
    """The reference file ``rtrt check`` reruns every graph against (``exports.reference``)."""

    file: str  # bundle file, rtrt.runtime.names.REFERENCE_FILE
    format: str = ""  # rtrt.runtime.check.REFERENCE_FORMAT it was written in
    graphs: dict[str, ReferenceGraph] = field(default_factory=dict)  # graph -> its reference inputs


@dataclass
class VlmGraphExport:
    """One graph of the exported VLM (``vlm.graphs[key]``, key = the file's stem: ``decoder_model_merged_quantized``)."""

    file: str  # bundle file, rtrt.runtime.names.vlm_onnx_file(graph, variant)
    sha256: str  # hex digest of the .onnx file
    size: int = 0  # bytes of the .onnx file (its external data not counted)
    external_data: str | None = field(default=None, metadata=_OMIT)  # bundle file of its weights ("<file>_data") for a graph over 2 GB; None: inside the .onnx
    opset: int = 0  # default-domain opset of the graph
    nodes: int = 0  # number of top-level nodes
    inputs: dict[str, list[Any]] = field(default_factory=dict)  # input name -> dims (int or symbolic name)
    outputs: dict[str, list[Any]] = field(default_factory=dict)  # output name -> dims (int or symbolic name)
    method: str | None = field(default=None, metadata=_OMIT)  # variants: how it was made ("int8 weight-only MatMulNBits ...")
    parity: dict[str, Any] | None = field(default=None, metadata=_OMIT)  # this graph's max errors vs PyTorch on the parity batch


@dataclass
class VlmExport:
    """The whole VLM in ONNX (``exports.vlm``, written by ``rtrt export --vlm``): everything the
    torch-free runtime needs besides the files under ``vlm_onnx/`` (``rtrt.runtime.names``)."""

    family: str  # VLM family: "llava", "qwen2_5_vl" or "internvl"
    vlm_ref: str = ""  # manifest.vlm.ref the graphs were exported from
    graphs: dict[str, VlmGraphExport] = field(default_factory=dict)  # file stem -> graph (vision_encoder, vision_encoder_refined, embed_tokens, decoder_model_merged[_quantized])
    config_files: list[str] = field(default_factory=list)  # bundle files of the VLM's configs copied to vlm_onnx/ (names.VLM_CONFIG_FILES it has)
    num_layers: int = 0  # decoder layers: past_key_values.{i}.key/.value for i < num_layers
    num_kv_heads: int = 0  # key/value heads: past/present tensors are [B, num_kv_heads, P, head_dim]
    head_dim: int = 0  # width of one key/value head
    hidden_size: int = 0  # D of inputs_embeds and image_features
    vocab_size: int = 0  # last dim of logits
    image_token_id: int = 0  # input_ids value at visual-token positions; image_features rows fill them in order
    eos_token_ids: list[int] = field(default_factory=list)  # greedy decoding ends a row at any of these (generation_config's)
    pad_token_id: int | None = None  # what a finished row emits, and the left-padding id
    position_rows: int = 1  # 1: position_ids [B, S] (attention_mask cumsum - 1); 3: Qwen2.5-VL's M-RoPE rows [3, B, S]
    context_length: int | None = None  # the text model's max_position_embeddings (None: not stated)
    precision: str = "fp32"  # --precision of the export: "int8" also wrote the int8 weight-only decoder
    opset: int = 0  # opset the graphs were exported at
    exported_utc: str = ""  # when, ISO 8601 UTC
    versions: dict[str, str] = field(default_factory=dict)  # torch/transformers/onnx/onnxruntime versions that exported
    parity: dict[str, Any] = field(default_factory=dict)  # rtrt.export.vlm_onnx.VlmParity.to_dict(): per-graph errors, first-step logits, greedy tokens vs torch, int8 agreement

    def graph(self, graph: str, variant: str = "") -> VlmGraphExport | None:
        """The exported graph ``graph`` (``names.VLM_GRAPHS``) of ``variant`` ("" or "quantized"), or None."""
        return self.graphs.get(PurePosixPath(vlm_onnx_file(graph, variant)).stem)


@dataclass
class Exports:
    """Everything ``rtrt export`` recorded in the manifest; empty for a bundle never exported."""

    onnx: OnnxExports | None = field(default=None, metadata=_OMIT)  # ONNX graphs (None: not exported)
    reference: ReferenceExport | None = field(default=None, metadata=_OMIT)  # reference for rtrt check (None: exported before references existed)
    engines: dict[str, EngineExport] = field(default_factory=dict, metadata=_OMIT)  # engine_name -> TensorRT engine
    vlm: VlmExport | None = field(default=None, metadata=_OMIT)  # the whole VLM in ONNX (None: not exported)

    @classmethod
    def from_dict(cls, d: Any, where: str = "exports") -> "Exports":
        """Parse the manifest's ``exports`` (None is empty); unknown keys ignored, wrong types a ``TypeError`` naming the key."""
        return _parse(cls, {} if d is None else d, where)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, as the exporter writes it (absent optional keys stay absent)."""
        return _dump(self)

    @property
    def graphs(self) -> dict[str, GraphExport]:
        """Every exported ONNX graph by key (empty when none)."""
        return self.onnx.graphs if self.onnx is not None else {}

    def graph(self, key: str) -> GraphExport | None:
        """The exported graph ``key`` (``rtrt.runtime.names.graph_key``), or None."""
        return self.graphs.get(key)

    def engine(self, name: str) -> EngineExport | None:
        """The TensorRT engine ``name`` (``rtrt.runtime.names.engine_name``), or None."""
        return self.engines.get(name)

    def image_size(self, default: int) -> int:
        """The square input side the detector graphs were exported for, else ``default``."""
        return int(self.onnx.image_size) if self.onnx is not None and self.onnx.image_size else int(default)


def _parse(typ: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as ``typ``: dataclasses from objects (unknown keys ignored), checked leaves."""
    if typ is Any:
        return value
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(inner, value, where)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, Mapping):
            raise TypeError(f"{where} must be an object")
        hints = typing.get_type_hints(typ)
        kwargs = {}
        for f in dataclasses.fields(typ):
            if f.name in value:
                kwargs[f.name] = _parse(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"{where}.{f.name} missing")
        return typ(**kwargs)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise TypeError(f"{where} must be an object")
        return {str(k): _parse(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{where} must be a list")
        return [_parse(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, typ)
    if not ok:
        raise TypeError(f"{where} must be {_WHAT.get(typ, typ.__name__)}")
    return value


_WHAT = {bool: "true or false", int: "an integer", str: "a string"}


def _dump(value: Any) -> Any:
    """JSON-ready copy of a schema object: ``_OMIT`` fields left out while None or empty."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.metadata.get("omit_empty") and (v is None or v == {}):
                continue
            out[f.name] = _dump(v)
        return out
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value
