"""The two deployed graphs as PyTorch modules: the reference the exporter traces and the backends compare to.

- ``DetectorGraph``: ``(pixel_values [B, 3, S, S], class_embeddings [C, D])`` ->
  ``(scores [B, C], similarity [B, C, P])``: DINOv3 patch tokens -> ``RareObjectDetector`` ->
  per-patch cosine map and its per-class max.
- ``AdapterGraph``: ``(visual_tokens [B, N, D], class_embeddings [C, D]) -> refined_tokens [B, N, D]``.

Input/output order follows ``rtrt.runtime.names`` (``DETECTOR``, ``ADAPTER``). Ranking the classes
is not part of the graph: ``select_detections`` does it on the C scores.
"""
from __future__ import annotations

import torch
from torch import nn

from .modules import CrossAttentionAdapter, RareObjectDetector

__all__ = ["DetectorGraph", "AdapterGraph"]


class DetectorGraph(nn.Module):
    """VFM backbone + ``RareObjectDetector``: per-class scores and the per-patch cosine map."""

    def __init__(self, vfm: nn.Module, detector: RareObjectDetector):
        super().__init__()
        self.vfm = vfm
        self.detector = detector

    def forward(self, pixel_values: torch.Tensor, class_embeddings: torch.Tensor):
        tokens = self.vfm(pixel_values)
        scores, similarity = self.detector(tokens, class_embeddings)
        return scores, similarity


class AdapterGraph(nn.Module):
    """The cross-attention adapter with the graph's input/output names as its signature."""

    def __init__(self, adapter: CrossAttentionAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, visual_tokens: torch.Tensor, class_embeddings: torch.Tensor, class_bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.adapter(visual_tokens, class_embeddings, class_bias=class_bias)
