"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): native-resolution ViT + 2x2 merger + Qwen2.5 with M-RoPE.

The number of image tokens depends on each image's resolution (``image_grid_thw``), and the
language model's rotary positions are 3-D (temporal, height, width) at image tokens. These
positions come from ``get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, attention_mask)``;
without ``mm_token_type_ids`` transformers silently falls back to 1-D positions, and
``generate(inputs_embeds=...)`` alone does too. So ``generate`` here passes ``input_ids``,
``mm_token_type_ids`` and ``image_grid_thw`` beside ``inputs_embeds``, and the teacher-forced
forward passes the [4, B, S] position ids that ``generate`` builds (text row + 3 M-RoPE rows).
"""
from __future__ import annotations

from typing import Any

import torch

from .base import VLMFamily

__all__ = ["Qwen2_5_VLFamily"]


class Qwen2_5_VLFamily(VLMFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    vision_inputs = ("pixel_values", "image_grid_thw")

    def image_token_layout(self) -> dict:
        vision = self.model.config.vision_config
        # One token per merge x merge block of patch x patch pixels; the count follows the resolution,
        # which the processor resizes into [min_pixels, max_pixels] (bounds of the engines' profiles).
        size = getattr(getattr(self.processor, "image_processor", None), "size", None) or {}
        bounds = {}
        for key, field_ in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            value = size.get(field_) if isinstance(size, dict) else getattr(size, field_, None)
            if value is not None:
                bounds[key] = int(value)
        return {**super().image_token_layout(), "patch_size": vision.patch_size, "spatial_merge_size": vision.spatial_merge_size, **bounds}

    def mm_token_type_ids(self, batch) -> torch.Tensor:
        """1 at image tokens, 0 elsewhere, as the processor builds it; rebuilt from ``input_ids``
        so that a batch extended by the trainer (an appended answer) stays consistent."""
        return self.image_mask(batch).to(torch.int)

    def position_ids(self, batch) -> torch.Tensor:
        text = super().position_ids(batch)
        rope, _ = self.model.model.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=self.mm_token_type_ids(batch),
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
        return torch.cat([text[None], rope], dim=0)

    def _generation_inputs(self, batch) -> dict[str, Any]:
        return {"mm_token_type_ids": self.mm_token_type_ids(batch), "image_grid_thw": batch["image_grid_thw"]}
