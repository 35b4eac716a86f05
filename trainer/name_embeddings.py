"""The class names' token embeddings: where a class name lives in the VLM's input-embedding space.

``name_embeddings(vlm, names)`` gives, per class, the mean of the VLM's input-embedding rows of the
tokens of its display name as written inside a sentence (``traffic_cone`` -> ``" traffic cone"``,
with the leading space a word has after another word): what the frozen LLM reads when the name
appears in its prompt. Phase 1 starts W there or pulls W toward it (``rtrt train embeddings
--w-init names`` / ``--w-name-tie``); the demo's probes write it into image slots and compare W with it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from rtrt.runtime.errors import InputError
from rtrt.runtime.names import display_name

__all__ = ["name_token_ids", "name_embeddings"]


def name_token_ids(tokenizer, name: str) -> list[int]:
    """Token ids of ``" " + display_name(name)`` without special tokens; a token that is only the
    word-boundary marker (a SentencePiece tokenizer's lone "▁") is dropped, since it carries no name."""
    ids = tokenizer(" " + display_name(name), add_special_tokens=False)["input_ids"]
    kept = [i for i in ids if tokenizer.decode([i]).strip()]
    if not kept:
        raise InputError(f"class {name!r}: the VLM's tokenizer gives no token for its name")
    return kept


def name_embeddings(vlm, names: Sequence[str]) -> torch.Tensor:
    """``[C, D]`` float32 on the CPU: each name's mean input-embedding row (``vlm`` is a ``VLMFamily``)."""
    table = vlm.model.get_input_embeddings().weight
    tokenizer = vlm.processor.tokenizer
    with torch.no_grad():
        return torch.stack([table[name_token_ids(tokenizer, n)].float().mean(0) for n in names]).cpu()
