"""Lossless smaller ONNX files: float32 weights that are exactly float16 values stored as float16.

VLM checkpoints are usually saved in half precision (the demo VLM's safetensors are float16) and
loaded as float32, so most float32 initializers of an exported graph hold values that float16
represents exactly. ``store_exact_fp16(model)`` stores each such initializer as float16 and puts a
``Cast`` to float32 in front of its users; ONNX Runtime folds the casts when the session loads, so
the graph computes with bit-identical float32 weights while its file is about half the size. An
initializer that would lose anything in float16 stays float32. The result is plain ONNX (opset
ops only): any runtime that reads the graph reads this one.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["store_exact_fp16"]

_MIN_ELEMENTS = 1024  # smaller tensors are not worth a Cast node


def _exact_fp16(a: np.ndarray) -> np.ndarray | None:
    """``a`` as float16 when every value survives the round trip (NaN/inf included), else None."""
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    back = h.astype(np.float32)
    same = (back == a) | (np.isnan(back) & np.isnan(a))
    return h if bool(same.all()) else None


def store_exact_fp16(model: onnx.ModelProto, min_elements: int = _MIN_ELEMENTS) -> tuple[onnx.ModelProto, int]:
    """``model`` with its exactly-half float32 initializers stored as float16 (in place; also returned)
    and the number of bytes saved. Initializers in subgraphs are left as they are."""
    graph = model.graph
    casts = []
    saved = 0
    keep = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            keep.append(init)
            continue
        a = numpy_helper.to_array(init)
        h = _exact_fp16(a)
        if h is None:
            keep.append(init)
            continue
        half = numpy_helper.from_array(h, name=f"{init.name}__fp16")
        keep.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT, name=f"{init.name}__cast"))
        saved += a.nbytes - h.nbytes
    if not casts:
        return model, 0
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)  # the casts read initializers only: first keeps the graph sorted
    return model, saved
