"""ONNX export of Qwen2.5-VL's vision encoder (stock, or refined by the adapter with W baked in).

The stock tower (``Qwen2_5_VisionTransformerPretrainedModel``) cannot be exported as it is: its
forward derives its indices from ``image_grid_thw`` in Python loops, and its attention splits the
patches with ``cu_seqlens.tolist()``. ``QwenVisionEncoder`` runs the same modules on the same
weights with those indices as graph inputs (``QWEN_VISION_INPUTS``, computed by the runtime in
numpy: ``rtrt.runtime.vlm_ort.qwen_vision``):

- patch embedding, rotary embedding, norms, qkv/proj, MLPs and the merger are the stock modules,
  the rotary and attention math the stock functions (``apply_rotary_pos_emb_vision``,
  ``eager_attention_forward``);
- what differs is how attention stays within an image (full-attention blocks) or a window (the
  others): a block-diagonal additive mask built in the graph from ``cu_seqlens`` /
  ``cu_window_seqlens`` instead of a Python loop over segments;
- the window order is undone with a scatter through ``window_index`` (the stock ``argsort``
  would be a TopK over all tokens, which TensorRT caps at 3840).

Output ``image_features`` [T_total, D]: every image's tokens in image-token order, what
``VLMFamily.visual_tokens`` gives. ``export_qwen_vision(family, path)`` writes the stock encoder;
with ``adapter`` and ``W`` it writes the refined one (all tokens through the adapter as one row
[1, T_total, D], as ``Pipeline`` refines them). The patch count, the image count and the window
count are dynamic. The mask costs O(patches**2) memory per graph run, as full attention over all
images at once does.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rtrt.runtime.modules import CrossAttentionAdapter
from rtrt.runtime.names import QWEN_VISION_INPUTS, VISION_ENCODER, VISION_ENCODER_REFINED, VLM_VISION_OUTPUTS

from .common import ExportError
from .onnx_export import check_tensorrt_friendly

__all__ = ["QwenVisionEncoder", "export_qwen_vision"]


def _segment_mask(cu_seqlens: torch.Tensor, length, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, L, L]: 0 where two positions share a segment of ``cu_seqlens``, else the dtype's min."""
    pos = torch.arange(length, device=cu_seqlens.device)
    # Segment of each position: how many segment ends lie at or before it.
    segment = (pos[:, None] >= cu_seqlens[None, 1:]).sum(-1)
    same = segment[:, None] == segment[None, :]
    zero = torch.zeros((), dtype=dtype, device=cu_seqlens.device)
    return zero.masked_fill(~same, torch.finfo(dtype).min)[None, None]


def _block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``Qwen2_5_VLVisionBlock.forward`` with the attention restricted by ``mask`` instead of a loop over segments."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision, eager_attention_forward

    attn = block.attn
    n = x.shape[0]
    q, k, v = attn.qkv(block.norm1(x)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *rope)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, head_dim]
    out, _ = eager_attention_forward(attn, q, k, v, attention_mask=mask, scaling=attn.scaling)
    x = x + attn.proj(out.reshape(n, -1))
    return x + block.mlp(block.norm2(x))


class QwenVisionEncoder(nn.Module):
    """The stock Qwen2.5-VL tower (+ the adapter with W) with its grid-dependent indices as inputs.

    ``forward(pixel_values [P, C*t*p*p], rotary_pos_ids [P, 2], window_index [P/m**2],
    cu_seqlens [frames+1], cu_window_seqlens [windows+1]) -> image_features [P/m**2, D]``.
    """

    def __init__(self, tower: nn.Module, adapter: CrossAttentionAdapter | None = None, W: torch.Tensor | None = None):
        super().__init__()
        if (adapter is None) != (W is None):
            raise ExportError("the refined Qwen2.5-VL encoder needs both the adapter and W")
        self.tower = tower
        self.adapter = adapter
        self.full_blocks = frozenset(int(i) for i in tower.fullatt_block_indexes)
        if W is not None:
            self.register_buffer("class_embeddings", W.detach().clone(), persistent=False)

    def forward(self, pixel_values, rotary_pos_ids, window_index, cu_seqlens, cu_window_seqlens) -> torch.Tensor:
        tower = self.tower
        x = tower.patch_embed(pixel_values)
        n = x.shape[0]
        # Stock order from here: tokens grouped window by window, rotary tables likewise.
        x = tower.permute_input_for_window_attn(x, window_index, n)
        rope = tuple(tower.permute_input_for_window_attn(t, window_index, n) for t in tower.rotary_pos_emb(x, rotary_pos_ids))
        # cu_seqlens count patches in the window order too: windows never cross an image.
        full = _segment_mask(cu_seqlens, n, x.dtype)
        windowed = _segment_mask(cu_window_seqlens, n, x.dtype)
        for i, block in enumerate(tower.blocks):
            x = _block(block, x, full if i in self.full_blocks else windowed, rope)
        merged = tower.merger(x)
        # Back to image-token order: row j of the window order is token window_index[j].
        features = torch.zeros_like(merged).index_copy(0, window_index, merged)
        if self.adapter is not None:
            features = self.adapter(features[None], self.class_embeddings.to(features.dtype))[0]
        return features


def _example_inputs(tower: nn.Module, config: dict) -> tuple[torch.Tensor, ...]:
    """Two images of different non-square grids, so no dynamic size equals another by chance."""
    import numpy as np

    from rtrt.runtime.vlm_ort.qwen_vision import qwen_vision_inputs

    m = tower.spatial_merge_size
    grid = np.array([[1, 2 * m, 4 * m], [1, 6 * m, 2 * m]])
    index = qwen_vision_inputs(grid, config)
    embed = tower.patch_embed
    width = embed.in_channels * embed.temporal_patch_size * embed.patch_size**2
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=torch.Generator().manual_seed(0), dtype=tower.dtype)
    return (pixels, *(torch.from_numpy(index[name]) for name in QWEN_VISION_INPUTS[1:]))


def _dynamic_shapes(merge: int) -> dict[str, dict]:
    Dim = torch.export.Dim
    tokens = Dim("image_tokens", min=1, max=1 << 20)
    patches = merge * merge * tokens  # the merger needs whole merge blocks
    return {
        "pixel_values": {0: patches},
        "rotary_pos_ids": {0: patches},
        "window_index": {0: tokens},
        "cu_seqlens": {0: Dim("frames_plus_one", min=2, max=1 << 16)},
        "cu_window_seqlens": {0: Dim("windows_plus_one", min=2, max=1 << 20)},
    }


def export_qwen_vision(
    family,
    path: str | os.PathLike,
    adapter: CrossAttentionAdapter | None = None,
    W: torch.Tensor | None = None,
    *,
    verbose: bool = False,
) -> Path:
    """Export a Qwen2.5-VL family's vision encoder to ``path`` (refined when ``adapter`` and ``W`` are given).

    ``family`` is a ``rtrt.runtime.vlm.Qwen2_5_VLFamily``; ``W`` [C, D] becomes a constant of the
    graph. Written by ``rtrt.export.vlm_onnx``'s exporter (weights past its ``EXTERNAL_DATA_BYTES``
    in ``<file>_data``) and checked for TensorRT-unfriendly ops. Returns ``path``.
    """
    from .vlm_onnx import _export  # the VLM graphs' one export-and-save step (it imports this module lazily)

    if family.name != "qwen2_5_vl":
        raise ExportError(f"export_qwen_vision exports Qwen2.5-VL, not {family.name!r}")
    tower = family.model.model.visual
    module = QwenVisionEncoder(tower, adapter, W).eval()
    args = _example_inputs(tower, family.model.config.to_dict())
    graph = VISION_ENCODER if adapter is None else VISION_ENCODER_REFINED
    path = _export(module, args, QWEN_VISION_INPUTS, VLM_VISION_OUTPUTS, _dynamic_shapes(tower.spatial_merge_size),
                   Path(path), graph, family.name, verbose)
    check_tensorrt_friendly(path)
    return path
