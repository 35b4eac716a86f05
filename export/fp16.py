"""fp16 ONNX graphs for TensorRT >= 11, whose strongly typed networks take precision from the graph.

TensorRT 11 removed ``BuilderFlag.FP16``: an fp16 engine is built from a graph whose tensors are
fp16. ``convert_to_fp16(src, dst)`` converts an exported fp32 graph with ONNX Runtime's
``onnxruntime.transformers.float16.convert_float_to_float16``:

- inputs and outputs stay fp32 (``keep_io_types``), so every backend feeds and reads the same
  tensors; Cast nodes at the borders convert;
- ``FP32_OPS`` stay fp32: LayerNormalization (DINOv3's fp16 overflow is in its variance),
  Softmax and ReduceL2 (sums of many squares), on top of the converter's own block list.

The result is type-checked (strict ONNX shape inference, ``onnx.checker``) and written
atomically. ``rtrt export --backend trt --precision fp16`` writes ``<graph>.fp16.onnx`` on every
TensorRT version, so a bundle exported on TensorRT 10 can be rebuilt on 11
(``on_engine_mismatch="rebuild"``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from rtrt.runtime.fileio import atomic_write_bytes

from .common import ExportError

__all__ = ["FP32_OPS", "convert_to_fp16"]

# Ops kept in fp32 besides the converter's DEFAULT_OP_BLOCK_LIST (why: see the module docstring).
FP32_OPS: tuple[str, ...] = ("LayerNormalization", "Softmax", "ReduceL2")


def convert_to_fp16(src: str | os.PathLike, dst: str | os.PathLike, *, keep_fp32_ops: Sequence[str] = FP32_OPS) -> Path:
    """Write the fp16 version of the fp32 graph ``src`` to ``dst`` (fp32 inputs/outputs); returns ``dst``."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    try:
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
        _toposort(converted.graph)  # the converter appends the input Casts after their consumers
        # Its value_info keeps stale types (fp16 for initializers it left in fp32): drop them and
        # infer them again, strictly, so that every tensor's type is consistent.
        del converted.graph.value_info[:]
        converted = onnx.shape_inference.infer_shapes(converted, check_type=True, strict_mode=True)
        onnx.checker.check_model(converted)
    except Exception as err:  # the converter and the checker raise assorted types
        raise ExportError(f"{Path(src).name}: fp16 conversion failed: {' '.join(str(err).split())}") from err
    dst = Path(dst)
    atomic_write_bytes(dst, converted.SerializeToString())
    return dst


def _toposort(graph) -> None:
    """Reorder ``graph.node`` in place so that every node follows the producers of its inputs."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in known for i in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or an undefined input: leave it for the checker to name
            ordered.extend(rest)
            break
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)
