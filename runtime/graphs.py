"""The two deployed graphs as PyTorch modules: the reference the exporter traces and the backends compare to.

- ``DetectorGraph``: ``(pixel_values [B, 3, S, S], class_embeddings [C, D])`` ->
  ``(scores [B, C], topk_scores [B, C], topk_indices [B, C], similarity [B, C, P])``:
  DINOv3 patch tokens -> ``RareObjectDetector`` -> per-class max -> every class sorted by score.
- ``AdapterGraph``: ``(visual_tokens [B, N, D], class_embeddings [C, D]) -> refined_tokens [B, N, D]``.

Input/output order follows ``rtrt.runtime.names`` (``DETECTOR``, ``ADAPTER``). The sort is written
as a rank computation (compare every pair of classes, count, one-hot gather) rather than
``torch.sort``/``topk``: ``topk`` with a K that depends on the dynamic class count exports to an
ONNX ``TopK`` whose K is not an initializer, which TensorRT's ONNX parser has rejected ("only
supports input K as an initializer"). C is a few dozen classes, so the [B, C, C] comparison is
negligible next to the ViT. Ties break by lower class index, as ``select_detections`` does.
"""
from __future__ import annotations

import torch
from torch import nn

from .modules import CrossAttentionAdapter, RareObjectDetector

__all__ = ["DetectorGraph", "AdapterGraph", "sort_scores"]


def sort_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort ``scores [B, C]`` descending along C: ``(sorted_scores, indices)``, ties by lower index.

    Exports to Range, Greater/Equal/Less, And/Or, Cast, Where and ReduceSum: no TopK, no control flow.
    """
    c = scores.shape[-1]
    idx = torch.arange(c, device=scores.device)
    si = scores.unsqueeze(-1)  # [B, C, 1]: candidate i
    sj = scores.unsqueeze(-2)  # [B, 1, C]: competitor j
    # j beats i when it is larger, or equal with a lower index.
    beats = (sj > si) | ((sj == si) & (idx.view(1, 1, -1) < idx.view(1, -1, 1)))
    rank = beats.to(torch.int64).sum(-1)  # [B, C], a permutation of 0..C-1
    onehot = rank.unsqueeze(-2) == idx.view(1, -1, 1)  # [B, r, i]: class i has rank r
    indices = (onehot.to(torch.int64) * idx.view(1, 1, -1)).sum(-1)  # [B, C]
    # Exactly one non-zero term per row, so the gather through a masked sum is exact.
    sorted_scores = torch.where(onehot, scores.unsqueeze(-2), torch.zeros((), dtype=scores.dtype)).sum(-1)
    return sorted_scores, indices


class DetectorGraph(nn.Module):
    """VFM backbone + ``RareObjectDetector`` + full descending sort of the class scores."""

    def __init__(self, vfm: nn.Module, detector: RareObjectDetector):
        super().__init__()
        self.vfm = vfm
        self.detector = detector

    def forward(self, pixel_values: torch.Tensor, class_embeddings: torch.Tensor):
        tokens = self.vfm(pixel_values)
        scores, similarity = self.detector(tokens, class_embeddings)
        topk_scores, topk_indices = sort_scores(scores)
        return scores, topk_scores, topk_indices, similarity


class AdapterGraph(nn.Module):
    """The cross-attention adapter with the graph's input/output names as its signature."""

    def __init__(self, adapter: CrossAttentionAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, visual_tokens: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        return self.adapter(visual_tokens, class_embeddings)
