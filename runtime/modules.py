"""The plug-in's three PyTorch modules, shared by the trainers, the exporters and the runtime.

- ``ClassEmbeddings``: the multi-modal class embeddings W [C, D_llm] with class names and synonyms.
- ``CrossAttentionAdapter``: refines the VLM's visual tokens V [B, N, D_llm] by attending to W;
  a zero-initialised gate makes an untrained adapter exactly the identity.
- ``RareObjectDetector``: VFM patch tokens -> projection into the LLM space -> cosine with every
  row of W -> per-class score (max over patches), plus the per-patch similarity map.
- re-exported from ``rtrt.runtime.detection`` (torch-free): the configs, ``Detection``,
  ``select_detections`` and ``locate``.

Shapes B (batch), N (visual tokens) and C (classes) are dynamic everywhere, so the same module
serves LLaVA's fixed 576 tokens, Qwen2.5-VL's resolution-dependent token count and any class set.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .detection import (  # re-exported: the configs and the decision live in torch-free detection.py
    BOX_CUT,
    BOX_UPSAMPLE,
    AdapterConfig,
    Detection,
    DetectorConfig,
    display_name,
    locate,
    select_detections,
)

__all__ = [
    "AdapterConfig",
    "DetectorConfig",
    "Detection",
    "Projection",
    "ClassEmbeddings",
    "CrossAttentionAdapter",
    "RareObjectDetector",
    "select_detections",
    "locate",
    "BOX_CUT",
    "BOX_UPSAMPLE",
    "display_name",
]

class Projection(nn.Module):
    """Maps features of one space (VFM or text) into the LLM embedding space."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 0):
        super().__init__()
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
        else:
            self.net = nn.Sequential(nn.Linear(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ClassEmbeddings(nn.Module):
    """W [C, D_llm]: one learned vector per rare class, with the class names and synonyms."""

    def __init__(
        self,
        names: Sequence[str],
        dim: int,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        weight: torch.Tensor | None = None,
    ):
        super().__init__()
        names = [str(n) for n in names]
        if not names:
            raise ValueError("ClassEmbeddings needs at least one class")
        if len(set(names)) != len(names):
            raise ValueError("class names must be unique")
        self.names: list[str] = names
        self.synonyms: dict[str, list[str]] = {n: list((synonyms or {}).get(n, [])) for n in names}
        if weight is None:
            weight = torch.zeros(len(names), dim)
        if tuple(weight.shape) != (len(names), dim):
            raise ValueError(f"W has shape {tuple(weight.shape)}, expected ({len(names)}, {dim})")
        self.weight = nn.Parameter(weight.detach().clone().float())

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def forward(self) -> torch.Tensor:
        return self.weight


class CrossAttentionAdapter(nn.Module):
    """Visual tokens attend to the class embeddings; gated residual, identity at initialisation.

    ``forward(V [B, N, D], W [C, D]) -> V + tanh(gate) * out(attn(q(V), k(W), v(W)))``; with
    ``return_attention=True`` also the attention weights [B, heads, N, C] (for training losses on them).
    With ``null_slot`` the softmax also runs over one learned key per head whose value is zero (an
    addition to the paper's adapter): a token that attends to it gets no class's value, so the
    refinement can leave tokens of common objects and background as they are; the returned
    attention is then the share on the C classes (1 minus it is the null slot's). With ``slot_value``
    as well, that slot's value is learned too (zero at first, so it starts as the null slot): a write
    that depends on no class, for tokens whose query selects it (another addition, ablated in the README).
    With ``detector_bias`` (another addition, ablated in the README) ``forward`` also takes ``class_bias``
    [B, N, C], the phase-1 detector's calibrated z-score of each class at each token's cell, and adds
    ``bias_scale`` (learned, 1 at first) times it to the attention logits: the detector, which sees rare
    objects through the VFM, tells each token which row of W to read; the adapter still learns what to write.
    Attention is written with plain matmul/softmax (no fused kernel) so ONNX export keeps
    B, N and C dynamic and TensorRT sees only MatMul/Softmax/Reshape.
    """

    def __init__(self, d_model: int, width: int = 512, heads: int = 8, null_slot: bool = False, slot_value: bool = False,
                 detector_bias: bool = False, region_box: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"adapter width {width} is not divisible by {heads} heads")
        self.config = AdapterConfig(d_model=d_model, width=width, heads=heads, null_slot=null_slot, slot_value=slot_value,
                                    detector_bias=detector_bias, region_box=region_box)
        self.heads = heads
        self.head_dim = width // heads
        self.norm_q = nn.LayerNorm(d_model)
        self.norm_kv = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, width)
        self.k_proj = nn.Linear(d_model, width)
        self.v_proj = nn.Linear(d_model, width)
        self.out_proj = nn.Linear(width, d_model)
        # tanh(0) = 0: the residual branch is off until training opens the gate.
        self.gate = nn.Parameter(torch.zeros(()))
        if null_slot:
            # One key per head, zero at first (its logit starts at 0, beside the classes' q.k).
            self.null_key = nn.Parameter(torch.zeros(heads, self.head_dim))
        if slot_value:
            # The slot's value per head, zero at first: training starts from the null slot.
            self.null_value = nn.Parameter(torch.zeros(heads, self.head_dim))
        if detector_bias:
            # Weight of the detector's z-scores in the attention logits, learned.
            self.bias_scale = nn.Parameter(torch.ones(()))

    @classmethod
    def from_config(cls, cfg: AdapterConfig) -> "CrossAttentionAdapter":
        return cls(cfg.d_model, cfg.width, cfg.heads, cfg.null_slot, cfg.slot_value, cfg.detector_bias, cfg.region_box)

    def forward(self, visual_tokens: torch.Tensor, class_embeddings: torch.Tensor, return_attention: bool = False,
                class_bias: torch.Tensor | None = None):
        if self.config.detector_bias and class_bias is None:
            raise ValueError("this adapter was trained with detector_bias: pass class_bias [B, N, C], the detector's z-scores")
        if class_bias is not None and not self.config.detector_bias:
            raise ValueError("class_bias given to an adapter trained without detector_bias")
        x = visual_tokens
        wdtype = self.q_proj.weight.dtype
        q = self.q_proj(self.norm_q(x.to(wdtype)))  # [B, N, width]
        kv = self.norm_kv(class_embeddings.to(wdtype))  # [C, D]
        k = self.k_proj(kv).unflatten(-1, (self.heads, self.head_dim)).transpose(0, 1)  # [h, C, dh]
        v = self.v_proj(kv).unflatten(-1, (self.heads, self.head_dim)).transpose(0, 1)  # [h, C, dh]
        q = q.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # [B, h, N, dh]
        scale = 1.0 / math.sqrt(self.head_dim)
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, h, N, C]
        if class_bias is not None:
            logits = logits + self.bias_scale * class_bias.to(logits.dtype).unsqueeze(1)  # the same for every head
        if self.config.null_slot:
            null = torch.matmul(q, self.null_key.unsqueeze(-1)) * scale  # [B, h, N, 1]
            # Softmax over C + 1 written out (max-subtracted) so the graph needs no concat of dynamic C.
            top = torch.maximum(logits.amax(dim=-1, keepdim=True), null)
            e = torch.exp(logits - top)
            e_null = torch.exp(null - top)
            denom = e.sum(dim=-1, keepdim=True) + e_null
            attn = e / denom
        else:
            attn = torch.softmax(logits, dim=-1)
        o = torch.matmul(attn, v)  # [B, h, N, dh]
        if self.config.slot_value:
            o = o + (e_null / denom) * self.null_value.unsqueeze(1)  # the slot's share of its value
        o = o.transpose(1, 2).flatten(2)  # [B, N, width]
        delta = torch.tanh(self.gate) * self.out_proj(o)
        if return_attention:
            return x + delta.to(x.dtype), attn
        return x + delta.to(x.dtype)


class RareObjectDetector(nn.Module):
    """Scores every class of W on an image's VFM patch tokens.

    ``forward(patch_tokens [B, P, d_vfm], W [C, D]) -> (scores [B, C], similarity [B, C, P])``
    where ``similarity`` is the cosine between each projected patch and each row of W and
    ``scores`` its max over patches. Top-k above the threshold is ``select_detections``.
    """

    def __init__(self, d_vfm: int, d_llm: int, proj_hidden: int = 0, threshold: float = 0.3, top_k: int = 5):
        super().__init__()
        self.config = DetectorConfig(d_vfm=d_vfm, d_llm=d_llm, proj_hidden=proj_hidden, threshold=threshold, top_k=top_k)
        self.proj = Projection(d_vfm, d_llm, proj_hidden)

    @classmethod
    def from_config(cls, cfg: DetectorConfig) -> "RareObjectDetector":
        return cls(cfg.d_vfm, cfg.d_llm, cfg.proj_hidden, cfg.threshold, cfg.top_k)

    def forward(self, patch_tokens: torch.Tensor, class_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.proj(patch_tokens.to(self.proj.net[0].weight.dtype)), dim=-1)  # [B, P, D]
        w = F.normalize(class_embeddings.to(z.dtype), dim=-1)  # [C, D]
        similarity = torch.matmul(w, z.transpose(1, 2))  # [B, C, P]
        scores = similarity.amax(dim=-1)  # [B, C]
        return scores, similarity
