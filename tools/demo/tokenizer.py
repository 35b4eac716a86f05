"""The demo VLM's tokenizer: a byte-level BPE learned from the world's pretraining text.

``train_tokenizer(texts, vocab_size)`` learns merges with the ``tokenizers`` library (as GPT-2 and
Llama-3 tokenizers are made, only on a much smaller corpus) and wraps the result as a
``PreTrainedTokenizerFast`` with Llama's special tokens (``<unk> <s> </s>``), LLaVA's ``<image>``,
a ``<pad>``, a BOS put in front of every sequence (as Llama's tokenizer does) and LLaVA-1.5's chat
template ("USER: <image>\\n... ASSISTANT:"). Byte-level means every string round-trips, words the
corpus never saw included; words it saw often become single tokens.

Training is deterministic for the same texts in the same order. ``word_tokens`` (``name_words``:
the multi-word category names after a space, " traffic cone") are added as whole tokens after the
learned ones: the text is split at them before the BPE runs, so each such name is one token.
"""
from __future__ import annotations

from typing import Iterable

__all__ = ["SPECIAL_TOKENS", "IMAGE_TOKEN", "LLAVA_CHAT_TEMPLATE", "name_words", "train_tokenizer"]

# In id order: Llama's three at 0-2, then LLaVA's image token and the pad token.
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<image>", "<pad>")
IMAGE_TOKEN = "<image>"

# LLaVA-1.5 (llava-hf/llava-1.5-7b-hf): images first, then the text of the turn, "ASSISTANT:" to answer.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def name_words(categories: Iterable[str], shared_only: bool = False) -> tuple[str, ...]:
    """The multi-word categories' display names as written after another word: ``(" traffic cone", ...)``;
    ``shared_only``: only those whose first word starts another category's name too (traffic light, sign, cone)."""
    from rtrt.runtime.names import display_name

    names = [display_name(c) for c in categories]
    firsts = [n.split()[0] for n in names]
    return tuple(" " + n for n in names if " " in n and (not shared_only or firsts.count(n.split()[0]) > 1))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2, word_tokens: Iterable[str] = ()):
    """A ``PreTrainedTokenizerFast`` whose BPE merges are learned from ``texts``.

    ``vocab_size`` counts the 256 byte symbols and the special tokens (``word_tokens`` come on top);
    ``min_frequency`` is the fewest occurrences a pair needs to be merged. Each of ``word_tokens`` is
    one token wherever its exact text occurs (not special: it decodes as its text).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    words = list(dict.fromkeys(word_tokens))
    if words:
        raw.add_tokens([AddedToken(w, special=False, normalized=False) for w in words])
    bos = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        chat_template=LLAVA_CHAT_TEMPLATE,
        model_max_length=1024,
    )
