"""Tiny random-weight VLMs with working processors, built locally (nothing is downloaded).

``build_tiny_vlm(family, out_dir)`` writes a directory that ``transformers``'
``AutoProcessor`` / ``AutoModelForImageTextToText`` and ``rtrt.runtime.vlm.load_vlm`` load
offline, for the three families rtrt supports:

- ``llava``: ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama text model), LLaVA-1.5's
  chat template ("USER: <image>\\n... ASSISTANT:"), BOS added by the tokenizer, 16 tokens per image.
- ``qwen2_5_vl``: ``Qwen2_5_VLForConditionalGeneration`` with M-RoPE, Qwen2.5-VL's chat template
  (default system turn, ``<|vision_start|><|image_pad|><|vision_end|>``), a resolution-dependent
  number of image tokens (patch 14, 2x2 merge: a 56x56 image gives 4 tokens).
- ``internvl``: ``InternVLForConditionalGeneration`` (InternVL3 ``-hf`` form: InternViT + pixel
  shuffle + Qwen2), InternVL3-hf's chat template (``<IMG_CONTEXT>`` expanded by the processor to
  ``<img>`` + 4 tokens per 32x32 tile + ``</img>``), dynamic tiling on (at most 4 tiles + thumbnail).

Each model is small (text hidden 64, 2 layers; vision hidden 32, 2 layers; images of 28-64 px)
so a test builds, loads and generates with it in about a second on a CPU. Weights are random
(``seed``); the text model is initialised with ``init_range`` (default 0.3, not HF's 0.02: at 0.02
the logits are so flat that wrong positions or misplaced visual tokens still give the same tokens).

The tokenizer is a byte-level BPE built with the ``tokenizers`` library: the 256 byte symbols, one
token per word of ``vocab_words`` (so prompts stay short and generated ids decode to words), and
the family's special tokens with its real names. It round-trips any text; it is not the real
vocabulary, so token ids differ from the released checkpoints.

Run: ``python -m rtrt.tools.tiny_vlm qwen2_5_vl /tmp/tiny-qwen``
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["TINY_FAMILIES", "DEFAULT_VOCAB_WORDS", "build_tiny_vlm", "build_byte_bpe", "main", "parse_args"]

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

# Qwen2.5-VL-*-Instruct: a default system turn, each image as vision_start + image_pad + vision_end.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# InternVL3-*-hf (transformers' convert_internvl_weights_to_hf.py): ChatML, no default system turn.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# Words of the chat templates, the hint sentence and common road objects; each becomes one token.
DEFAULT_VOCAB_WORDS = (
    "USER ASSISTANT system user assistant You are a helpful In this image there might be objects such as "
    "What is in the Describe describe scene Is any Are on road of and to it Please focus that have great "
    "influence ego driving behavior car truck bus tram pedestrian cyclist bicycle motorcycle traffic "
    "sign light cone barrier bollard dog cat debris stone tire machinery concrete block"
).split()

TEXT_HIDDEN = 64  # language model width D_llm of every tiny model
TEXT_LAYERS = 2
TEXT_HEADS = 4
VISION_HIDDEN = 32
VISION_LAYERS = 2
VISION_HEADS = 4


def build_byte_bpe(vocab_words: Sequence[str], head_specials: Sequence[str], tail_specials: Sequence[str]):
    """A byte-level BPE ``tokenizers.Tokenizer`` with one token per word (and per " word").

    ``head_specials`` take the first ids (Llama's ``<unk> <s> </s>`` sit at 0, 1, 2),
    ``tail_specials`` the ids after the vocabulary (Qwen's and LLaVA's added tokens sit there).
    Each word is reached through a chain of merges (``Ġt``+``r``, ``Ġtr``+``a``, ...), so the
    result is deterministic and needs no training corpus.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(head_specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in vocab_words:
        for variant in (word, " " + word):
            # The pre-tokenizer maps bytes to the printable symbols the BPE model works on.
            for piece, _ in byte_level.pre_tokenize_str(variant):
                prefix = piece[0]
                for symbol in piece[1:]:
                    merged = prefix + symbol
                    if merged not in vocab:
                        vocab[merged] = len(vocab)
                        merges.append((prefix, symbol))
                    prefix = merged
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in head_specials])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tail_specials])
    return tok


def _text_config(vocab_size: int, init_range: float, **extra) -> dict:
    # Shared shape of the tiny language models; ``extra`` adds family keys (ids, rope).
    return dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_HEADS // 2,
        max_position_embeddings=1024,
        initializer_range=init_range,
        **extra,
    )


def _build_llava(vocab_words: Sequence[str], init_range: float):
    from tokenizers import processors
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    raw = build_byte_bpe(vocab_words, ["<unk>", "<s>", "</s>"], ["<image>", "<pad>"])
    # Llama's tokenizer puts BOS in front of every sequence; the LLaVA template relies on it.
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
    image_size, patch = 32, 8  # 4x4 patches + CLS; the "default" strategy drops CLS: 16 image tokens
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=VISION_LAYERS,
            num_attention_heads=VISION_HEADS, image_size=image_size, patch_size=patch, projection_dim=VISION_HIDDEN,
        ),
        text_config=LlamaConfig(**_text_config(
            len(tokenizer), init_range, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        )),
        image_token_id=ids["<image>"],
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        initializer_range=init_range,
        pad_token_id=ids["<pad>"],
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    gen = dict(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    return LlavaForConditionalGeneration, config, processor, gen


def _qwen_tokenizer(vocab_words: Sequence[str], extra_specials: Sequence[str] = (), **named):
    # Qwen2's tokenizer: no BOS, <|endoftext|> pads, <|im_end|> ends a chat turn.
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", *extra_specials]
    raw = build_byte_bpe(vocab_words, [], specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left", **named,
    )


def _build_qwen2_5_vl(vocab_words: Sequence[str], init_range: float):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tokenizer = _qwen_tokenizer(vocab_words)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    config = Qwen2_5_VLConfig(
        text_config=_text_config(
            len(tokenizer), init_range,
            # M-RoPE splits the head_dim / 2 = 8 frequencies into temporal, height and width sections.
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=VISION_LAYERS, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_heads=VISION_HEADS,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=TEXT_HIDDEN,
            fullatt_block_indexes=[VISION_LAYERS - 1], tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    # Images are resized to multiples of 28 px (patch 14 x merge 2) with 56*56 .. 112*112 pixels,
    # so every image gives 4 to 16 tokens and different sizes give different counts.
    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    gen = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    return Qwen2_5_VLForConditionalGeneration, config, processor, gen


def _build_internvl(vocab_words: Sequence[str], init_range: float):
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVideoProcessor)

    # The InternVL processor reads these four names from the tokenizer (as the -hf conversion sets them).
    tokenizer = _qwen_tokenizer(
        vocab_words, ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        extra_special_tokens={
            "start_image_token": "<img>", "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>",
        },
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<IMG_CONTEXT>")}
    tile, patch = 32, 8  # 4x4 patches per tile, pixel shuffle 0.5 -> 2x2 = 4 tokens per tile
    tokens_per_tile = ((tile // patch) // 2) ** 2
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=VISION_LAYERS,
            num_attention_heads=VISION_HEADS, image_size=[tile, tile], patch_size=[patch, patch],
        ),
        text_config=dict(model_type="qwen2", **_text_config(
            len(tokenizer), init_range,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        )),
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    size = {"height": tile, "width": tile}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size=size, crop_to_patches=True, min_patches=1, max_patches=4,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        ),
        video_processor=InternVLVideoProcessor(size=size),
        tokenizer=tokenizer,
        image_seq_length=tokens_per_tile,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    gen = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    return InternVLForConditionalGeneration, config, processor, gen


# family name -> builder(vocab_words, init_range) -> (model class, config, processor, generation ids)
TINY_FAMILIES: dict[str, Callable] = {
    "llava": _build_llava,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "internvl": _build_internvl,
}


def build_tiny_vlm(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    init_range: float = 0.3,
    vocab_words: Sequence[str] | None = None,
) -> Path:
    """Build a tiny random VLM of ``family`` with its processor and save both to ``out_dir``.

    ``seed`` fixes the weights; ``init_range`` is the std of the text model's (and projector's)
    initial weights; ``vocab_words`` replaces ``DEFAULT_VOCAB_WORDS`` (each word gets a token).
    Returns ``out_dir`` as a ``Path``; ``from_pretrained(out_dir)`` works offline.
    """
    import torch
    from transformers import GenerationConfig

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(TINY_FAMILIES)}")
    out = Path(out_dir)
    words = list(DEFAULT_VOCAB_WORDS if vocab_words is None else vocab_words)
    model_cls, config, processor, gen_ids = TINY_FAMILIES[family](words, init_range)
    config.architectures = [model_cls.__name__]
    # fork_rng: building a model must not move the caller's global random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config = GenerationConfig(do_sample=False, **gen_ids)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Build a tiny random-weight VLM with its processor (offline).")
    p.add_argument("family", choices=sorted(TINY_FAMILIES), help="VLM family to mimic")
    p.add_argument("out_dir", help="directory to write (model + processor, save_pretrained layout)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--init-range", type=float, default=0.3, help="std of the text model's initial weights")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = build_tiny_vlm(args.family, args.out_dir, seed=args.seed, init_range=args.init_range)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
