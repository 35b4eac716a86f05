"""ONNX graph input/output names and dynamic axes, defined once.

The exporter, the runtime backends and the TensorRT engine builder all read
these, so a renamed tensor cannot silently disconnect one of them.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GraphSpec", "ADAPTER", "DETECTOR"]


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

# Detector: normalised image [B, 3, H, W] and W [C, D] -> per-class scores,
# classes sorted by score, and the per-patch cosine map [B, C, P].
DETECTOR = GraphSpec(
    inputs=("pixel_values", "class_embeddings"),
    outputs=("scores", "topk_scores", "topk_indices", "similarity"),
    dynamic_axes={
        "pixel_values": {0: "batch"},
        "class_embeddings": {0: "num_classes"},
        "scores": {0: "batch", 1: "num_classes"},
        "topk_scores": {0: "batch", 1: "num_classes"},
        "topk_indices": {0: "batch", 1: "num_classes"},
        "similarity": {0: "batch", 1: "num_classes", 2: "num_patches"},
    },
)
