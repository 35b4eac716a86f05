"""InternVL3 in its ``-hf`` form (``InternVLForConditionalGeneration``): InternViT + pixel shuffle + MLP + Qwen2.

Checked in transformers 5.23's ``modeling_internvl.py`` / ``processing_internvl.py``:

- ``get_image_features(pixel_values)`` runs the vision tower on every 448x448 tile, drops CLS
  ("default" strategy), pixel-shuffles the 32x32 patch grid by 0.5 (-> 16x16, channels x4) and
  projects: ``pooler_output`` is one tensor [tiles, 256, D].
- The processor tiles each image (``crop_to_patches=True``: up to 12 tiles + a thumbnail when
  there is more than one) and writes ``<img>`` + 256 x tiles ``<IMG_CONTEXT>`` + ``</img>``; only
  ``<IMG_CONTEXT>`` (``config.image_token_id``) positions hold visual tokens, so the count per
  image depends on its aspect ratio. ``pixel_values`` hold the tiles in prompt order.
- The language model uses plain 1-D RoPE; the forward scatters features with ``masked_scatter``
  as LLaVA does, so ``generate(input_ids, inputs_embeds, attention_mask)`` matches the pixel path.
"""
from __future__ import annotations

from .base import VLMFamily

__all__ = ["InternVLFamily"]


class InternVLFamily(VLMFamily):
    name = "internvl"
    model_types = ("internvl",)
    model_class = "InternVLForConditionalGeneration"

    def image_token_layout(self) -> dict:
        config = self.model.config
        size, patch = config.vision_config.image_size, config.vision_config.patch_size
        grid = (size[0] // patch[0]) * (size[1] // patch[1])
        # Tiles are dynamic, so only the count per tile is fixed: the patch grid after pixel shuffle.
        tokens_per_tile = int(grid * config.downsample_ratio**2)
        layout = {**super().image_token_layout(), "tokens_per_tile": tokens_per_tile}
        # The processor's tiling bounds decide how many tiles (and tokens) one image can give.
        proc = getattr(self.processor, "image_processor", None)
        if proc is not None:
            tile = getattr(proc, "size", None) or {}
            hw = [tile.get(k) if isinstance(tile, dict) else getattr(tile, k, None) for k in ("height", "width")]
            if all(v is not None for v in hw):
                layout["tile_size"] = [int(v) for v in hw]
            for key in ("min_patches", "max_patches"):
                if getattr(proc, key, None) is not None:
                    layout[key] = int(getattr(proc, key))
            if getattr(proc, "crop_to_patches", None) is not None:
                layout["crop_to_patches"] = bool(proc.crop_to_patches)
        return layout
