"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT-L/336 + MLP projector + Vicuna.

Every image gives the same number of tokens (576 for LLaVA-1.5: 24x24 patches, CLS dropped by the
"default" feature strategy), all ``<image>`` tokens in ``input_ids``. Positions are plain 1-D, so
``generate(input_ids, inputs_embeds, attention_mask)`` matches the stock pixel path exactly.
"""
from __future__ import annotations

from .base import VLMFamily

__all__ = ["LlavaFamily"]


class LlavaFamily(VLMFamily):
    name = "llava"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"

    def image_token_layout(self) -> dict:
        vision = self.model.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2
        # "full" keeps the CLS token of the CLIP tower, "default" drops it.
        if self.model.config.vision_feature_select_strategy == "full":
            tokens += 1
        return {**super().image_token_layout(), "tokens_per_image": tokens}
