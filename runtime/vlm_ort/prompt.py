"""The VLM's prompt without transformers: chat template, tokens, image placeholders, padding, positions, detokenisation.

``VlmProcessor.from_dir(path)`` reads only the VLM's own config files in an exported VLM folder
(``rtrt.runtime.names.VLM_CONFIG_FILES``: config.json, tokenizer.json, tokenizer_config.json,
the chat template, the processor config, generation_config.json) and does what the torch path's
``VLMFamily.prepare`` gets from ``processor.apply_chat_template(conversations,
add_generation_prompt=True, tokenize=True, padding=True, padding_side="left")`` in
transformers 5, as numpy feeds:

1. the user turn ``[image, text]`` rendered with the VLM's chat template in the sandboxed jinja2
   environment transformers sets up (``trim_blocks``, ``lstrip_blocks``, loop controls, the
   ``{% generation %}`` tag, ``raise_exception``, ``strftime_now``, its ``tojson``, ``dict`` and
   ``namespace``), with the tokenizer's named special tokens as template variables;
2. the image placeholder the template writes replaced as the family's processor does: LLaVA
   ``<image>`` x (crop / patch)^2 (- CLS); Qwen2.5-VL ``<|image_pad|>`` x grid_t*grid_h*grid_w /
   merge^2; InternVL ``<img>`` + ``<IMG_CONTEXT>`` x image_seq_length x tiles + ``</img>``;
3. ``tokenizers.Tokenizer`` on tokenizer.json, with transformers' special-token handling (every
   named special token registered as special, the post-processor's BOS skipped when the rendered
   prompt already starts with BOS; like ``TokenizersBackend``, tokenizer.json's post-processor is
   kept whatever ``add_bos_token`` / ``add_eos_token`` say);
4. rows left-padded with the tokenizer's pad id, ``attention_mask``, and the decoder's positions:
   ``position_ids`` [B, S] = cumsum(mask) - 1 (0 at padding) for LLaVA and InternVL; for
   Qwen2.5-VL the M-RoPE rows [3, B, S] of ``get_rope_index`` and ``rope_deltas`` [B];
5. ``decode(rows)`` = ``processor.batch_decode(rows, skip_special_tokens=True)``.

Generation stops a row at any of ``eos_token_ids`` and fills it with ``generation_pad_token_id``
afterwards, as ``generate`` does. ``step_position_ids(attention_mask, rope_deltas)`` gives a new
token's positions as ``generate`` continues them: each row's count of real tokens - 1, plus
``rope_deltas[b]`` on all three M-RoPE rows for Qwen2.5-VL (left padding is not counted). Imports
numpy, PIL, jinja2 and tokenizers, never torch or transformers.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

from ..errors import InputError, ModelMismatchError
from .preprocess import GotOcr2ImageProcessor, ImageProcessor, Qwen2VLImageProcessor, load_image_processor

__all__ = [
    "FAMILY_MODEL_TYPES", "VlmProcessor", "compile_chat_template", "qwen_rope_index", "step_position_ids",
    "text_position_ids",
]

# config.json model_type -> family name (the names of rtrt.runtime.vlm.FAMILIES)
FAMILY_MODEL_TYPES = {"llava": "llava", "qwen2_5_vl": "qwen2_5_vl", "internvl": "internvl"}
# The tokenizer's named special tokens (transformers' SPECIAL_TOKENS_ATTRIBUTES); other *_token keys
# of tokenizer_config.json are the model's own named specials (image_token, context_image_token, ...).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Transformers' spelling of the rule a BPE decoder is exempt from (cleanup would strip real spaces).
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


# ---------------------------------------------------------------------------------------- chat template
class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (transformers tracks it for
    assistant masks, which inference never asks for)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateDict:
    # transformers' ``dict`` global: a constructor without attribute access to the type.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # transformers' ``namespace``: no underscore-prefixed attributes (the sandbox's guard).
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes, got {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: plain json.dumps (jinja's own escapes HTML characters).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled in the environment transformers' ``render_jinja_template`` uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ModelMismatchError(f"the VLM's chat template does not compile: {err.message} (line {err.lineno})") from None


# ---------------------------------------------------------------------------------------- positions
def text_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """[B, S] int64: cumsum(mask) - 1, 0 at left padding (``VLMFamily.position_ids``)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    return np.where(mask == 0, 0, np.cumsum(mask, axis=-1) - 1).astype(np.int64)


def step_position_ids(attention_mask: np.ndarray, rope_deltas: np.ndarray | None = None) -> np.ndarray:
    """Positions of the token just appended during generation: [B, 1], or [3, B, 1] with ``rope_deltas``.

    ``attention_mask`` [B, P + 1] includes the new token. ``generate`` continues each row from its
    last prompt position, so the position is the row's real-token count - 1 (padding skipped),
    plus Qwen2.5-VL's ``rope_deltas`` [B] on all three M-RoPE rows.
    """
    last = np.cumsum(np.asarray(attention_mask, dtype=np.int64), axis=-1)[:, -1:] - 1
    if rope_deltas is None:
        return last.astype(np.int64)
    deltas = np.asarray(rope_deltas, dtype=np.int64).reshape(-1, 1)
    return np.broadcast_to(last + deltas, (3,) + last.shape).astype(np.int64)


def qwen_rope_index(input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: np.ndarray,
                    image_token_id: int, spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's M-RoPE positions of a prompt batch: (position_ids [3, B, S], rope_deltas [B]).

    transformers' ``Qwen2_5_VLModel.get_rope_index`` for images: padding skipped, a text run
    counts on from the previous position on all three rows, an image run of ``t*h*w / merge^2``
    tokens takes (start + t, start + row, start + column) and moves the start by
    ``max(h, w) / merge``; padding positions are 0. ``rope_deltas`` = last position + 1 - real length.
    Images are taken from ``image_grid_thw`` in order, one per run of image tokens.
    """
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask).astype(bool)
    positions = np.zeros((3,) + ids.shape, dtype=np.int64)
    deltas = np.zeros(ids.shape[0], dtype=np.int64)
    grids = iter(np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3))
    for b in range(ids.shape[0]):
        row = ids[b][mask[b]]
        parts, start = [], 0
        for is_image, run in itertools.groupby(row == image_token_id):
            length = len(list(run))
            if not is_image:
                parts.append(np.broadcast_to(np.arange(length, dtype=np.int64) + start, (3, length)))
                start += length
                continue
            grid = next(grids, None)
            if grid is None:
                raise InputError(f"prompt {b} has more image-token runs than image_grid_thw has images")
            t, h, w = int(grid[0]), int(grid[1]) // spatial_merge_size, int(grid[2]) // spatial_merge_size
            if t * h * w != length:
                raise InputError(f"prompt {b}: an image run of {length} tokens for a {t}x{h}x{w} grid")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h) + start, np.arange(w) + start, indexing="ij")
            parts.append(np.stack([tt + start, hh, ww]).reshape(3, -1))
            start += max(int(grid[1]), int(grid[2])) // spatial_merge_size
        llm = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
        positions[:, b, mask[b]] = llm
        deltas[b] = (int(llm.max()) + 1 if llm.size else 0) - len(row)
    return positions, deltas


# ---------------------------------------------------------------------------------------- files
def _read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise ModelMismatchError(f"{path} is missing: the torch-free VLM runtime needs it")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelMismatchError(f"{path}: not readable JSON ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ModelMismatchError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    # A token in a tokenizer config: a string, or a serialised AddedToken {"content": ...}.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_token(value: Any) -> AddedToken:
    # transformers registers a named special token as AddedToken(special=True, normalized=False),
    # keeping the flags of a serialised AddedToken.
    if isinstance(value, Mapping):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=True, **flags)
    return AddedToken(value, special=True, normalized=False)


def _special_tokens(tokenizer_config: Mapping, legacy_map: Mapping) -> tuple[dict[str, Any], list[Any]]:
    """(named special tokens as configured, extra special tokens): transformers 5's reading of
    tokenizer_config.json, with special_tokens_map.json on top when the config has no added_tokens_decoder."""
    named: dict[str, Any] = {}
    extra: list[Any] = []
    sources = [tokenizer_config] + ([legacy_map] if "added_tokens_decoder" not in tokenizer_config else [])
    for source in sources:
        for key, value in source.items():
            if key == "extra_special_tokens" or key == "additional_special_tokens":
                if isinstance(value, Mapping):
                    named.update({k: v for k, v in value.items() if _token_text(v) is not None})
                elif isinstance(value, (list, tuple)):
                    extra += [v for v in value if _token_text(v) is not None and v not in extra]
            elif key.endswith("_token") and _token_text(value) is not None:
                named[key] = value
    return named, extra


def _load_tokenizer(folder: Path, tokenizer_config: Mapping) -> tuple[Tokenizer, dict[str, str]]:
    """The tokenizer as transformers' ``TokenizersBackend`` leaves it, and its named special tokens (strings)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelMismatchError(f"{path} is missing: the torch-free VLM runtime needs the fast tokenizer's file")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust loader raises a plain Exception
        raise ModelMismatchError(f"{path}: not a tokenizers file ({' '.join(str(err).split())})") from None
    tok.no_padding()
    tok.no_truncation()
    tok.encode_special_tokens = bool(tokenizer_config.get("split_special_tokens", False))
    named, extra = _special_tokens(tokenizer_config, _read_json(folder / "special_tokens_map.json", required=False))
    registered = [_added_token(v) for v in list(named.values()) + extra]
    if registered:
        tok.add_special_tokens(registered)
    # tokenizer.json's post-processor decides BOS/EOS: transformers 5's TokenizersBackend ignores
    # tokenizer_config's add_bos_token / add_eos_token (tests/test_vlm_ort_preprocess.py checks it).
    strings = {k: _token_text(v) for k, v in named.items()}
    return tok, {k: v for k, v in strings.items() if v is not None}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _ids(value: Any, what: str) -> tuple[int, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelMismatchError(f"{what} must be a token id or a list of them, got {value!r}")
    return tuple(values)


# ---------------------------------------------------------------------------------------- processor
@dataclass
class VlmProcessor:
    """Images and user texts -> the exported VLM's numpy feeds, and generated ids -> text (see the module docstring)."""

    family: str  # "llava" | "qwen2_5_vl" | "internvl" (rtrt.runtime.vlm.FAMILIES' names)
    tokenizer: Tokenizer  # tokenizer.json with transformers' special-token registration
    template: jinja2.Template  # the VLM's chat template, compiled as transformers does
    special_tokens: dict[str, str]  # named special tokens: the template's variables (bos_token, eos_token, ...)
    image_processor: ImageProcessor  # the family's numpy image processor
    image_token: str  # placeholder the template writes for an image (and the token repeated per visual token)
    image_token_id: int  # id of the visual-token positions in input_ids (config.json's image_token_id)
    pad_token_id: int  # the tokenizer's pad id: left padding of the prompt batch
    eos_token_ids: tuple[int, ...]  # ids that end a row (generation_config.json, else config.json)
    generation_pad_token_id: int  # id generate writes after a row has ended (its pad id, else the first EOS)
    max_positions: int | None = None  # text model's max_position_embeddings (longer prompts are refused)
    clean_up_spaces: bool = False  # tokenizer_config's clean_up_tokenization_spaces (ignored for BPE, as transformers does)
    image_tokens: dict[str, Any] = field(default_factory=dict)  # family's expansion values (patch_size, image_seq_length, ...)
    config: dict[str, Any] = field(default_factory=dict)  # config.json as read

    @classmethod
    def from_dir(cls, path: str | Path) -> "VlmProcessor":
        """Read an exported VLM folder (``vlm_onnx/``) or a transformers VLM folder; nothing else is read."""
        folder = Path(path)
        if not folder.is_dir():
            raise InputError(f"{folder} is not a VLM folder")
        config = _read_json(folder / "config.json")
        family = FAMILY_MODEL_TYPES.get(config.get("model_type"))
        if family is None:
            raise ModelMismatchError(f"{folder}: model_type {config.get('model_type')!r} is not one of {sorted(FAMILY_MODEL_TYPES)}")
        tokenizer_config = _read_json(folder / "tokenizer_config.json", required=False)
        tok, specials = _load_tokenizer(folder, tokenizer_config)
        processor_config = _read_json(folder / "processor_config.json", required=False)
        image_config = processor_config.get("image_processor")
        if not isinstance(image_config, Mapping):
            image_config = _read_json(folder / "preprocessor_config.json")
        image_processor = load_image_processor(image_config)
        template = cls._chat_template(folder, processor_config)
        generation = _read_json(folder / "generation_config.json", required=False)
        text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config

        def token_id(token: str, what: str) -> int:
            found = tok.token_to_id(token)
            if found is None:
                raise ModelMismatchError(f"{folder}: the tokenizer has no {what} {token!r}")
            return found

        image_tokens: dict[str, Any] = {}
        if family == "llava":
            if not type(image_processor).__name__.startswith("Clip"):
                raise ModelMismatchError(f"{folder}: LLaVA with a {type(image_processor).__name__}")
            image_token = specials.get("image_token") or processor_config.get("image_token") or "<image>"
            encoded = tok.encode(image_token, add_special_tokens=False).ids
            image_id = encoded[0] if encoded else token_id(image_token, "image token")
            for key in ("patch_size", "vision_feature_select_strategy"):
                if processor_config.get(key) is None:
                    raise ModelMismatchError(f"{folder}: processor_config.json has no {key} (LlavaProcessor needs it)")
            image_tokens = {"patch_size": int(processor_config["patch_size"]),
                            "num_additional_image_tokens": int(processor_config.get("num_additional_image_tokens", 0)),
                            "vision_feature_select_strategy": processor_config["vision_feature_select_strategy"]}
        elif family == "qwen2_5_vl":
            if not isinstance(image_processor, Qwen2VLImageProcessor):
                raise ModelMismatchError(f"{folder}: Qwen2.5-VL with a {type(image_processor).__name__}")
            image_token = specials.get("image_token", "<|image_pad|>")
            image_id = token_id(image_token, "image token")
        else:
            if not isinstance(image_processor, GotOcr2ImageProcessor):
                raise ModelMismatchError(f"{folder}: InternVL with a {type(image_processor).__name__}")
            names = ("start_image_token", "context_image_token", "end_image_token")
            missing = [n for n in names if n not in specials]
            if missing:
                raise ModelMismatchError(f"{folder}: tokenizer_config.json has no {', '.join(missing)} (InternVLProcessor needs them)")
            image_token = specials["context_image_token"]
            image_id = token_id(image_token, "image token")
            image_tokens = {"start": specials["start_image_token"], "end": specials["end_image_token"],
                            "image_seq_length": int(processor_config.get("image_seq_length", 256))}
        expected = config.get("image_token_id", config.get("image_token_index"))
        if expected is not None and expected != image_id:
            raise ModelMismatchError(f"{folder}: the tokenizer's {image_token!r} is id {image_id}, config.json's image_token_id is {expected}")

        pad = specials.get("pad_token")
        if pad is None:
            raise ModelMismatchError(f"{folder}: the tokenizer has no pad token, so a batch cannot be left-padded")
        # generate's ids: generation_config.json first, then the text config, then the top config.
        eos = _first(generation.get("eos_token_id"), text.get("eos_token_id"), config.get("eos_token_id"))
        if eos is None:
            raise ModelMismatchError(f"{folder}: no eos_token_id in generation_config.json or config.json")
        eos_ids = _ids(eos, "eos_token_id")
        gen_pad = _first(generation.get("pad_token_id"), text.get("pad_token_id"), config.get("pad_token_id"))
        limit = text.get("max_position_embeddings")
        return cls(
            family=family, tokenizer=tok, template=template, special_tokens=specials,
            image_processor=image_processor, image_token=image_token, image_token_id=image_id,
            pad_token_id=token_id(pad, "pad token"), eos_token_ids=eos_ids,
            generation_pad_token_id=eos_ids[0] if gen_pad is None else _ids(gen_pad, "pad_token_id")[0],
            max_positions=int(limit) if isinstance(limit, int) else None,
            clean_up_spaces=bool(tokenizer_config.get("clean_up_tokenization_spaces", False)),
            image_tokens=image_tokens, config=config,
        )

    @staticmethod
    def _chat_template(folder: Path, processor_config: Mapping) -> jinja2.Template:
        # The processor's template as transformers 5 loads it: chat_template.jinja, else the legacy
        # chat_template.json, else a chat_template key of processor_config.json.
        source = None
        if (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            source = _read_json(folder / "chat_template.json").get("chat_template")
        else:
            source = processor_config.get("chat_template")
        if not isinstance(source, str):
            raise ModelMismatchError(f"{folder}: no chat template (chat_template.jinja or chat_template.json)")
        return compile_chat_template(source)

    # ------------------------------------------------------------------ prompt
    def render(self, user_text: str, image: Any = None) -> str:
        """The chat template on one user turn ``[image, text]`` with the generation prompt (before image expansion)."""
        # The template sees the image as transformers hands it over: a placeholder naming its type.
        placeholder = f"<{type(image).__name__}>" if image is not None else "<Image>"
        messages = [{"role": "user", "content": [{"type": "image", "image": placeholder},
                                                 {"type": "text", "text": str(user_text)}]}]
        try:
            return self.template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                        **self.special_tokens)
        except jinja2.exceptions.TemplateError as err:
            raise ModelMismatchError(f"the VLM's chat template refused the user turn: {' '.join(str(err).split())}") from None

    def _replacement(self, pixels: Mapping[str, np.ndarray], i: int) -> str:
        # What the family's processor writes in place of the i-th image placeholder.
        if self.family == "llava":
            height, width = pixels["pixel_values"][i].shape[-2:]
            patch = self.image_tokens["patch_size"]
            count = (height // patch) * (width // patch) + self.image_tokens["num_additional_image_tokens"]
            if self.image_tokens["vision_feature_select_strategy"] == "default":
                count -= 1
            return self.image_token * count
        if self.family == "qwen2_5_vl":
            merge = self.image_processor.merge_size
            return self.image_token * int(np.prod(pixels["image_grid_thw"][i]) // merge**2)
        count = self.image_tokens["image_seq_length"] * int(pixels["num_patches"][i])
        return f"{self.image_tokens['start']}{self.image_token * count}{self.image_tokens['end']}"

    def prepare(self, images: Sequence[Any], user_texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Feeds for one image + one user text each (the texts already hold the hint): ``input_ids``,
        ``attention_mask``, ``position_ids``, ``pixel_values`` (+ ``image_grid_thw`` and
        ``rope_deltas`` for Qwen2.5-VL); int64 except ``pixel_values`` (float32). Left-padded."""
        images, user_texts = list(images), list(user_texts)
        if len(images) != len(user_texts):
            raise InputError(f"{len(images)} images for {len(user_texts)} questions")
        if not images:
            raise InputError("prepare needs at least one image and question")
        pixels = self.image_processor(images)
        prompts = []
        for i, (image, text) in enumerate(zip(images, user_texts)):
            rendered = self.render(text, image)
            found = rendered.count(self.image_token)
            if found != 1:
                raise InputError(f"prompt {i} holds the image placeholder {self.image_token!r} {found} times "
                                 "(the question must not contain it)")
            prompts.append(rendered.replace(self.image_token, self._replacement(pixels, i)))
        # transformers skips the BOS post-processor when the (first) rendered prompt already starts with BOS.
        bos = self.special_tokens.get("bos_token")
        add_special = not (bos is not None and prompts[0].startswith(bos))
        rows = [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=add_special)]
        length = max(len(r) for r in rows)
        if self.max_positions is not None and length > self.max_positions:
            raise InputError(f"prompt of {length} tokens exceeds the model's {self.max_positions} positions")
        input_ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for b, row in enumerate(rows):
            input_ids[b, length - len(row):] = row
            attention_mask[b, length - len(row):] = 1
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "pixel_values": np.ascontiguousarray(pixels["pixel_values"], dtype=np.float32)}
        if self.family == "qwen2_5_vl":
            feeds["image_grid_thw"] = pixels["image_grid_thw"].astype(np.int64)
            feeds["position_ids"], feeds["rope_deltas"] = qwen_rope_index(
                input_ids, attention_mask, feeds["image_grid_thw"], self.image_token_id, self.image_processor.merge_size)
        else:
            feeds["position_ids"] = text_position_ids(attention_mask)
        return feeds

    # ------------------------------------------------------------------ output
    def decode(self, rows: Any) -> list[str]:
        """Text of each row of generated ids, special tokens removed (``processor.batch_decode(rows, skip_special_tokens=True)``)."""
        out = []
        for row in rows:
            text = self.tokenizer.decode([int(t) for t in np.asarray(row).reshape(-1)], skip_special_tokens=True)
            if self.clean_up_spaces and type(self.tokenizer.model).__name__ != "BPE":
                for before, after in _CLEANUP:
                    text = text.replace(before, after)
            out.append(text)
        return out
