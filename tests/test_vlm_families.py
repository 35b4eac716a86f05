"""Tests of ``rtrt.runtime.vlm`` on tiny random VLMs of every family (``tests/fixtures/tiny_vlm.py``).

Each family is built once per module, saved with ``save_pretrained`` and loaded back from disk
through ``load_vlm``. A batch of two images of different sizes with questions of different
lengths (left padding) checks that the plug-in path (visual tokens -> transform ->
``inputs_embeds``) is the stock pixel path when the adapter is the identity, that wrong positions
are caught by these comparisons, that a real adapter's output is what the first decoder layer
sees, and that hints land in the family's own prompt.

Run: ``.venv/bin/pytest tests/test_vlm_families.py``
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from rtrt.runtime.errors import InputError, ModelMismatchError
from rtrt.runtime.modules import CrossAttentionAdapter
from rtrt.runtime.vlm import FAMILIES, HINT_TEMPLATE, VLMFamily, detect_family, format_hint, load_vlm
from fixtures import tiny_vlm

FAMILY_NAMES = list(FAMILIES)
QUESTIONS = ["What is in the image?", "Describe the traffic scene and any traffic cone on the road, please."]
NEW_TOKENS = 6
# Logit differences of a correct path are ~1e-6; wrong positions or tokens give differences of ~1-10.
TOL = 1e-4
WRONG = 1e-2

# The prompt each family's real template gives for one image and one question (image tokens
# collapsed to one, padding and BOS removed).
PLAIN_PROMPTS = {
    "llava": "USER: <image>\n{q} ASSISTANT:",
    "qwen2_5_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "internvl": "<|im_start|>user\n<img><IMG_CONTEXT></img>\n{q}<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {name: tiny_vlm.build_tiny_vlm(name, root / name) for name in FAMILY_NAMES}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request, tiny_dirs) -> VLMFamily:
    return load_vlm(tiny_dirs[request.param])


@pytest.fixture(scope="module")
def images():
    # Different sizes: Qwen2.5-VL gives 6 and 4 tokens (grids 4x6, 4x4), InternVL 3 and 5 tiles (12, 20 tokens).
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)),
    ]


@pytest.fixture(scope="module")
def batch(family, images):
    return family.prepare(images, QUESTIONS)


def make_transform(family: VLMFamily, gate: float, seed: int = 0):
    """The adapter as ``generate`` takes it: [T, D] -> [T, D] through ``adapter(V[None], W)``."""
    torch.manual_seed(seed)
    adapter = CrossAttentionAdapter(family.hidden_size, width=32, heads=4)
    with torch.no_grad():
        adapter.gate.fill_(gate)
    classes = torch.randn(5, family.hidden_size)
    return lambda v: adapter(v[None], classes)[0], adapter


def first_decoder_layer(family: VLMFamily):
    return family.model.model.language_model.layers[0]


def stock_generate(family: VLMFamily, batch, new_tokens: int = NEW_TOKENS):
    return family.model.generate(
        **batch, max_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def param_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def normalised_prompt(family: VLMFamily, ids: torch.Tensor, mask: torch.Tensor) -> str:
    """Decoded prompt without padding and BOS, each run of image tokens collapsed to one."""
    tok = family.processor.tokenizer
    text = tok.decode(ids[mask.bool()], skip_special_tokens=False)
    if tok.bos_token and text.startswith(tok.bos_token):
        text = text[len(tok.bos_token):]
    image_token = tok.convert_ids_to_tokens(family.image_token_id)
    return re.sub(f"(?:{re.escape(image_token)})+", image_token, text)


# ---------------------------------------------------------------------------- hint sentence
def test_format_hint():
    assert HINT_TEMPLATE == "In this image, there might be objects such as: {names}."
    assert format_hint([]) == ""
    assert format_hint(["traffic_cone", "dog"]) == "In this image, there might be objects such as: traffic cone, dog."
    assert format_hint(["concrete_block"]) == "In this image, there might be objects such as: concrete block."


# ---------------------------------------------------------------------------- loading
def test_loaded_frozen_and_described(family):
    assert isinstance(family, FAMILIES[family.name])
    assert not family.model.training
    assert not any(p.requires_grad for p in family.model.parameters())
    assert family.hidden_size == tiny_vlm.TEXT_HIDDEN
    layout = family.image_token_layout()
    assert json.loads(json.dumps(layout)) == layout  # stored in bundle manifests
    assert layout["family"] == family.name and layout["image_token_id"] == family.image_token_id
    assert layout["tokens_per_image"] == (16 if family.name == "llava" else None)


def test_batch_is_left_padded(family, batch):
    mask = batch["attention_mask"]
    assert (mask == 0).any(), "the two prompts should differ in length"
    assert (mask[:, -1] == 1).all()
    assert (mask.diff(dim=1) >= 0).all(), "padding must be on the left"
    visual = family.visual_tokens(batch)
    assert visual.shape == (int(family.image_mask(batch).sum()), family.hidden_size)


# ---------------------------------------------------------------------------- 1. identity adapter == stock
def test_identity_adapter_matches_stock_generate(family, batch):
    transform, _ = make_transform(family, gate=0.0)
    prompt_len = batch["input_ids"].shape[1]
    stock = stock_generate(family, batch)
    ours = family.generate(batch, transform=transform, max_new_tokens=NEW_TOKENS, output_logits=True,
                           return_dict_in_generate=True)
    assert torch.equal(ours.sequences, stock.sequences[:, prompt_len:])
    assert len(ours.logits) == len(stock.logits) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(ours.logits, stock.logits)):
        assert max_diff(a, b) < TOL, f"step {step}"
    # The plain call returns the same new tokens as a LongTensor.
    tokens = family.generate(batch, transform=transform, max_new_tokens=NEW_TOKENS)
    assert tokens.dtype == torch.long and torch.equal(tokens, stock.sequences[:, prompt_len:])
    assert family.decode(tokens) == family.processor.batch_decode(tokens, skip_special_tokens=True)
    # The teacher-forced forward (the trainer's path) gives the first step's logits.
    with torch.no_grad():
        logits = family.forward(batch, transform=transform).logits[:, -1]
    assert max_diff(logits, stock.logits[0]) < TOL


def test_teacher_forced_forward_matches_every_generate_step(family, batch):
    """The trainer's path: prompt + the generated tokens in one forward gives each step's logits.

    The appended tokens extend ``input_ids`` only (no ``mm_token_type_ids``), as a trainer that
    appends answers would; positions (Qwen's M-RoPE included) must still line up.
    """
    transform, _ = make_transform(family, gate=0.0)
    prompt_len = batch["input_ids"].shape[1]
    stock = stock_generate(family, batch)
    appended = stock.sequences[:, prompt_len:-1]
    extended = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    extended["input_ids"] = torch.cat([batch["input_ids"], appended], dim=1)
    extended["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(appended)], dim=1)
    with torch.no_grad():
        logits = family.forward(extended, transform=transform).logits[:, prompt_len - 1:]
    assert max_diff(logits, torch.stack(stock.logits, dim=1)) < TOL


def test_misplaced_visual_tokens_are_caught(family, batch):
    """Scattering the visual tokens shifted by one must fail the comparison used above."""
    reference = stock_generate(family, batch, new_tokens=1).logits[0]
    visual = family.visual_tokens(batch)
    with torch.no_grad():
        for tokens, should_match in ((visual, True), (visual.roll(1, dims=0), False)):
            out = family.model(
                inputs_embeds=family.inputs_embeds(batch, tokens),
                attention_mask=batch["attention_mask"],
                position_ids=family.position_ids(batch),
            ).logits[:, -1]
            assert (max_diff(out, reference) < TOL) is should_match
            assert should_match or max_diff(out, reference) > WRONG


def test_qwen_1d_positions_are_caught(tiny_dirs, images):
    """Qwen2.5-VL: the M-RoPE positions matter at this init scale; the 1-D fallbacks must mismatch."""
    family = load_vlm(tiny_dirs["qwen2_5_vl"])
    batch = family.prepare(images, QUESTIONS)
    reference = stock_generate(family, batch, new_tokens=1).logits[0]
    embeds = family.inputs_embeds(batch, family.visual_tokens(batch))
    common = dict(attention_mask=batch["attention_mask"], max_new_tokens=1, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        right = family.model.generate(input_ids=batch["input_ids"], inputs_embeds=embeds, **common,
                                      mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"])
        no_types = family.model.generate(input_ids=batch["input_ids"], inputs_embeds=embeds, **common,
                                         image_grid_thw=batch["image_grid_thw"])
        embeds_only = family.model.generate(inputs_embeds=embeds, **common)
        flat = family.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                            position_ids=family.position_ids(batch)[0])
    assert max_diff(right.logits[0], reference) < TOL
    assert max_diff(no_types.logits[0], reference) > WRONG
    assert max_diff(embeds_only.logits[0], reference) > WRONG
    assert max_diff(flat.logits[:, -1], reference) > WRONG
    # The stock pixel path itself falls back to 1-D positions without mm_token_type_ids.
    without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    assert max_diff(stock_generate(family, without, new_tokens=1).logits[0], reference) > WRONG


# ---------------------------------------------------------------------------- 2. adapter output reaches the LLM
@pytest.mark.parametrize("path", ["forward", "generate"])
def test_adapter_output_enters_first_decoder_layer(family, batch, path):
    transform, _ = make_transform(family, gate=1.0, seed=1)
    seen = []

    def grab(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = first_decoder_layer(family).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            if path == "forward":
                family.forward(batch, transform=transform)
            else:
                family.generate(batch, transform=transform, max_new_tokens=2)
    finally:
        handle.remove()
    hidden = seen[0]  # the prompt (prefill) pass
    mask = family.image_mask(batch)
    with torch.no_grad():
        visual = family.visual_tokens(batch)
        refined = transform(visual)
        text = family.model.get_input_embeddings()(batch["input_ids"])
    assert max_diff(refined, visual) > WRONG, "the adapter under test must not be the identity"
    assert hidden.shape == text.shape
    assert torch.equal(hidden[mask], refined)
    assert torch.equal(hidden[~mask], text[~mask])


# ---------------------------------------------------------------------------- 3. hints in the prompt
def test_prompt_is_the_family_template_with_hint(family, images, batch):
    names = [["traffic_cone", "dog"], []]
    hinted = family.prepare(images, QUESTIONS, hints=names)
    plain = PLAIN_PROMPTS[family.name]
    hint = format_hint(names[0])
    for row in range(2):
        assert normalised_prompt(family, batch["input_ids"][row], batch["attention_mask"][row]) == plain.format(
            q=QUESTIONS[row]
        )
    assert normalised_prompt(family, hinted["input_ids"][0], hinted["attention_mask"][0]) == plain.format(
        q=f"{hint} {QUESTIONS[0]}"
    )
    # No names, no sentence: the second prompt is unchanged.
    assert normalised_prompt(family, hinted["input_ids"][1], hinted["attention_mask"][1]) == plain.format(
        q=QUESTIONS[1]
    )
    # The hinted batch runs through the plug-in path as well.
    assert family.generate(hinted, max_new_tokens=2).shape == (2, 2)


# ---------------------------------------------------------------------------- 4. loading, errors, frozen weights
def test_load_vlm_offline_in_fresh_process(tiny_dirs):
    code = textwrap.dedent(
        """
        import sys
        from rtrt.runtime.vlm import load_vlm
        for path in sys.argv[1:]:
            f = load_vlm(path)
            assert not any(p.requires_grad for p in f.model.parameters())
            print(f.name)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    dirs = [str(tiny_dirs[n]) for n in FAMILY_NAMES]
    done = subprocess.run([sys.executable, "-c", code, *dirs], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == FAMILY_NAMES


def test_unsupported_configs_raise_one_line(tmp_path):
    from transformers import BertConfig

    cases = [
        BertConfig(),
        {"model_type": "internvl_chat", "architectures": ["InternVLChatModel"]},
        {"model_type": "llava", "architectures": ["LlavaModel"]},
    ]
    for config in cases:
        with pytest.raises(ModelMismatchError) as err:
            detect_family(config)
        assert "\n" not in str(err.value)
    assert detect_family({"model_type": "qwen2_5_vl"}) is FAMILIES["qwen2_5_vl"]

    bert_dir = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert_dir)
    with pytest.raises(ModelMismatchError, match="unsupported VLM") as err:
        load_vlm(bert_dir)
    assert "\n" not in str(err.value)

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "architectures": ["InternVLChatModel"]}))
    with pytest.raises(ModelMismatchError) as err:
        load_vlm(remote)
    assert "\n" not in str(err.value)


def test_vlm_unchanged_and_only_transform_gets_gradients(family, batch):
    before = param_hash(family.model)
    transform, adapter = make_transform(family, gate=0.5)
    family.generate(batch, transform=transform, max_new_tokens=2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = family.forward(batch, transform=transform, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in adapter.parameters())
    assert all(p.grad is None for p in family.model.parameters())
    assert param_hash(family.model) == before


def test_bad_inputs_raise(family, images, batch):
    visual = family.visual_tokens(batch)
    with pytest.raises(InputError):
        family.inputs_embeds(batch, visual[:-1])
    with pytest.raises(InputError):
        family.generate(batch, transform=lambda v: v[:-1], max_new_tokens=1)
    with pytest.raises(InputError):
        family.prepare(images, QUESTIONS[:1])
    with pytest.raises(InputError):
        family.prepare(images, QUESTIONS, hints=[["dog"]])


# ---------------------------------------------------------------------------- the builder itself
def test_tiny_vlm_main_is_deterministic(tmp_path):
    assert tiny_vlm.main(["internvl", str(tmp_path / "a"), "--seed", "3"]) == 0
    tiny_vlm.build_tiny_vlm("internvl", tmp_path / "b", seed=3)
    tiny_vlm.build_tiny_vlm("internvl", tmp_path / "c", seed=4)
    digest = {d: hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest() for d in "abc"}
    assert digest["a"] == digest["b"] != digest["c"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError):
        tiny_vlm.build_tiny_vlm("blip", tmp_path / "d")
