"""The hint sentence and the user turn, shared by the transformers and the torch-free VLM paths.

``format_hint(names)`` writes the detector's sentence ("In this image, there might be objects such
as: traffic cone, dog."), ``user_text(question, names)`` the text of the user turn: the hint, then
the question. Imports nothing heavy.
"""
from __future__ import annotations

from typing import Sequence

from .names import display_name

__all__ = ["HINT_TEMPLATE", "format_hint", "user_text"]

HINT_TEMPLATE = "In this image, there might be objects such as: {names}."


def format_hint(names: Sequence[str]) -> str:
    """The hint sentence for detected class names; ``""`` when there are none.

    ``format_hint(["traffic_cone", "dog"])`` -> ``"In this image, there might be objects such as: traffic cone, dog."``
    """
    shown = [display_name(str(n)) for n in names]
    shown = [n for n in shown if n]
    return HINT_TEMPLATE.format(names=", ".join(shown)) if shown else ""


def user_text(question: str, names: Sequence[str] | None = None) -> str:
    """Text of the user turn: the hint sentence (when there are names), then the question."""
    hint = format_hint(names or [])
    return f"{hint} {question}" if hint else question
