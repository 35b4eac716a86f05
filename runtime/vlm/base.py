"""The frozen-VLM interface the plug-in works through: ``VLMFamily``, one subclass per family.

A family wraps a transformers VLM and its processor and offers the one path rtrt needs:

    prompt (chat template, optional hint) -> visual tokens V [T, D] -> transform(V) (the adapter)
    -> text embeddings with transform(V) at the image positions (``inputs_embeds``)
    -> generate / teacher-forced forward, with the positional inputs the stock pixel path builds.

With ``transform=None`` (or an adapter whose gate is 0) the output is the stock
``model.generate(**batch)``'s, token for token. The VLM's parameters are never changed; the only
thing that differs from the stock path is what enters the first decoder layer at image positions.

``HINT_TEMPLATE`` / ``format_hint`` (``rtrt.runtime.prompts``) write the detector's sentence that
``prepare`` puts into the user turn before the question.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import torch

from ..errors import InputError, ModelMismatchError
from ..prompts import HINT_TEMPLATE, format_hint, user_text

__all__ = ["HINT_TEMPLATE", "format_hint", "VLMFamily"]


class VLMFamily:
    """A frozen transformers VLM with its processor, seen through the plug-in's one path.

    Subclasses set the class attributes and override ``position_ids`` / ``_generation_inputs``
    when the family's positions are not plain 1-D (Qwen2.5-VL's M-RoPE).
    """

    name: ClassVar[str]  # "llava" | "qwen2_5_vl" | "internvl"
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this family serves
    model_class: ClassVar[str]  # transformers class that loads it (also expected in config.architectures)
    vision_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)  # batch keys get_image_features takes

    def __init__(self, model, processor):
        config = model.config
        if config.model_type not in self.model_types:
            raise ModelMismatchError(f"{type(self).__name__} cannot wrap a {config.model_type!r} model")
        self.model = model
        self.processor = processor
        self.hidden_size: int = int(config.get_text_config().hidden_size)
        self.image_token_id: int = int(config.image_token_id)

    # ------------------------------------------------------------------ description
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_token_layout(self) -> dict:
        """How images appear in the token sequence; stored in bundles and compared on load.

        ``tokens_per_image`` is ``None`` when the count depends on the image (resolution, tiles).
        """
        return {"family": self.name, "image_token_id": self.image_token_id, "tokens_per_image": None}

    # ------------------------------------------------------------------ prompt
    def user_text(self, question: str, names: Sequence[str] | None = None) -> str:
        """Text of the user turn: the hint sentence (when there are names), then the question."""
        return user_text(question, names)

    def prepare(self, images: list, questions: list[str], hints: list[list[str]] | None = None):
        """Tokenised batch (``BatchFeature`` on the model's device) of one image + one question each.

        Each prompt is the user turn ``[image, text]`` rendered by the family's own chat template
        with the generation prompt; the batch is left-padded so generated tokens follow directly.
        """
        if len(images) != len(questions):
            raise InputError(f"{len(images)} images for {len(questions)} questions")
        if hints is not None and len(hints) != len(questions):
            raise InputError(f"{len(hints)} hint lists for {len(questions)} questions")
        if not questions:
            raise InputError("prepare needs at least one image and question")
        conversations = [
            [{"role": "user", "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": self.user_text(question, hints[i] if hints is not None else None)},
            ]}]
            for i, (image, question) in enumerate(zip(images, questions))
        ]
        batch = self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        )
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and batch["input_ids"].shape[1] > limit:
            raise InputError(f"prompt of {batch['input_ids'].shape[1]} tokens exceeds the model's {limit} positions")
        return batch.to(self.device)

    # ------------------------------------------------------------------ visual tokens
    def visual_tokens(self, batch) -> torch.Tensor:
        """V [T, D]: vision tower + projector output of every image, in image-token order."""
        features = self.model.get_image_features(**{k: batch[k] for k in self.vision_inputs}).pooler_output
        # LLaVA returns a list per image, Qwen2.5-VL a tuple, InternVL one tensor [tiles, tokens, D].
        if isinstance(features, torch.Tensor):
            features = [features]
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in features], dim=0)

    def image_mask(self, batch) -> torch.Tensor:
        """Bool [B, S]: positions of image tokens in ``input_ids``."""
        return batch["input_ids"] == self.image_token_id

    def inputs_embeds(self, batch, visual_tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings [B, S, D] with ``visual_tokens`` [T, D] placed at the image positions.

        Placed with ``masked_scatter`` in row-major order, as the stock forward does.
        """
        embeds = self.model.get_input_embeddings()(batch["input_ids"])
        mask = self.image_mask(batch)
        expected = (int(mask.sum()), embeds.shape[-1])
        if tuple(visual_tokens.shape) != expected:
            raise InputError(f"visual tokens of shape {tuple(visual_tokens.shape)}, the prompt needs {expected}")
        return embeds.masked_scatter(mask.unsqueeze(-1), visual_tokens.to(embeds.dtype))

    def _embeds(self, batch, transform: Callable[[torch.Tensor], torch.Tensor] | None,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.visual_tokens(batch) if tokens is None else tokens
        if transform is not None:
            refined = transform(tokens)
            if refined.shape != tokens.shape:
                raise InputError(f"transform changed the visual tokens' shape {tuple(tokens.shape)} to {tuple(refined.shape)}")
            tokens = refined
        return self.inputs_embeds(batch, tokens)

    # ------------------------------------------------------------------ positions
    def position_ids(self, batch) -> torch.Tensor:
        """Position ids of the prompt exactly as ``generate`` builds them (left padding skipped)."""
        mask = batch["attention_mask"]
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)

    def _generation_inputs(self, batch) -> dict[str, Any]:
        """Extra ``generate`` inputs the family needs for its positions (none for 1-D RoPE)."""
        return {}

    # ------------------------------------------------------------------ running
    def generate(self, batch, transform=None, max_new_tokens: int = 32, **gen_kwargs):
        """Only the new tokens [B, new]; greedy unless ``gen_kwargs`` says otherwise.

        ``input_ids`` go in beside ``inputs_embeds`` so that anything in ``generate`` that reads the
        prompt ids (repetition penalty, M-RoPE positions) sees the same ids as the stock path;
        ``pixel_values`` do not, or the model would overwrite the transformed tokens.
        With ``return_dict_in_generate=True`` the output object is returned, its ``sequences``
        cut to the new tokens.
        """
        gen_kwargs.setdefault("do_sample", False)
        with torch.no_grad():
            embeds = self._embeds(batch, transform)
            out = self.model.generate(
                input_ids=batch["input_ids"],
                inputs_embeds=embeds,
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                **self._generation_inputs(batch),
                **gen_kwargs,
            )
        prompt_len = batch["input_ids"].shape[1]
        if isinstance(out, torch.Tensor):
            return out[:, prompt_len:]
        out.sequences = out.sequences[:, prompt_len:]
        return out

    def forward(self, batch, transform=None, labels: torch.Tensor | None = None, *, logits_to_keep: int = 0,
                visual_tokens: torch.Tensor | None = None):
        """One teacher-forced forward through the same ``inputs_embeds`` path as ``generate``.

        Gradients flow into ``transform`` (the VLM's parameters do not require them). The output is
        the model's (``logits`` [B, S, vocab], ``loss`` when ``labels`` [B, S] with -100 ignored).
        ``logits_to_keep`` > 0: only the last that many positions' logits (transformers' argument),
        and the loss over them (``labels`` cut to match; the caller keeps every labelled position).
        ``visual_tokens``: this batch's ``visual_tokens(batch)`` computed before (the tower is frozen).
        """
        embeds = self._embeds(batch, transform, visual_tokens)
        if logits_to_keep and labels is not None:
            if bool((labels[:, : labels.shape[1] - logits_to_keep + 1] != -100).any()):
                raise InputError(f"logits_to_keep {logits_to_keep} leaves out labelled positions")
            labels = labels[:, -logits_to_keep:]
        return self.model(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            position_ids=self.position_ids(batch),
            labels=labels,
            use_cache=False,
            logits_to_keep=logits_to_keep,
        )

    def decode(self, tokens) -> list[str]:
        """Text of each row of ``tokens``, special tokens removed."""
        return self.processor.batch_decode(tokens, skip_special_tokens=True)
