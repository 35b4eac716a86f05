"""ONNX graph input/output names and dynamic axes, defined once.

The exporter, the runtime backends and the TensorRT engine builder all read
these, so a renamed tensor cannot silently disconnect one of them.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GraphSpec", "ADAPTER", "ADAPTER_CALL", "DETECTOR"]


@dataclass(frozen=True)
class GraphSpec:
    """Names and dynamic axes of one exported graph."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    # tensor name -> {axis index: symbolic dimension name}
    dynamic_axes: dict[str, dict[int, str]]


# Adapter: visual tokens V [B, N, D] attend to class embeddings W [C, D].
ADAPTER = GraphSpec(
    inputs=("visual_tokens", "class_embeddings"),
    outputs=("refined_tokens",),
    dynamic_axes={
        "visual_tokens": {0: "batch", 1: "num_tokens"},
        "class_embeddings": {0: "num_classes"},
        "refined_tokens": {0: "batch", 1: "num_tokens"},
    },
)

# How the adapter is called, the same for the torch, ORT and TensorRT backends: once per VLM
# batch, with ALL visual tokens of every image of the batch concatenated in image-token order,
# as ONE row: ``refine(visual_tokens [1, T_total, D], class_embeddings [C, D] = the bundle's W)``
# (``Pipeline._answer``: ``backend.refine(v[None], W)``). So the graph's ``batch`` is always 1 and
# ``num_tokens`` runs from the fewest tokens one image can give to ``max_batch`` x the most
# tokens one image can give; ``rtrt.runtime.profiles.adapter_ranges`` computes that range from
# the bundle's image-token layout, and TensorRT engines are built for exactly that range.
ADAPTER_CALL = "refine(visual_tokens [1, T_total, D], class_embeddings [C, D]) -> refined_tokens [1, T_total, D]"

# Detector: normalised image [B, 3, H, W] and W [C, D] -> per-class scores [B, C] and the
# per-patch cosine map [B, C, P]. Ranking the C scores is left to the caller (a few dozen
# numbers; ``select_detections``), so the graph holds no integer sort TensorRT must handle.
DETECTOR = GraphSpec(
    inputs=("pixel_values", "class_embeddings"),
    outputs=("scores", "similarity"),
    dynamic_axes={
        "pixel_values": {0: "batch"},
        "class_embeddings": {0: "num_classes"},
        "scores": {0: "batch", 1: "num_classes"},
        "similarity": {0: "batch", 1: "num_classes", 2: "num_patches"},
    },
)
