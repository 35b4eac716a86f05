"""The torch-free VLM preprocessing (``rtrt.runtime.vlm_ort.preprocess`` / ``.prompt``) against transformers.

For the three tiny families of ``tests/fixtures/tiny_vlm.py`` (saved to a folder that is then read
as a ``vlm_onnx`` folder) and the demo bundle's VLM, ``VlmProcessor.prepare`` must give the torch
path's ``VLMFamily.prepare`` batch: the same ``input_ids`` and ``attention_mask`` (a batch of two
prompts of different lengths, so one row is left-padded, with and without a hint), the same
``pixel_values`` to the bit (the resize reproduces torchvision's integer kernel; 0 difference
measured), the same ``image_grid_thw`` and positions; ``decode`` must equal ``batch_decode`` on
every id of the vocabulary. Qwen2.5-VL gets non-square images (different grids), InternVL an
aspect ratio that gives several tiles. A subprocess that refuses torch, torchvision and
transformers imports every module of ``rtrt.runtime.vlm_ort`` and runs the processor.

Run: ``.venv/bin/pytest tests/test_vlm_ort_preprocess.py``
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from rtrt.runtime.assets import default_bundle
from rtrt.runtime.errors import InputError, ModelMismatchError
from rtrt.runtime.vlm import load_vlm
from rtrt.runtime.vlm_ort.preprocess import load_image_processor, resize_bicubic
from rtrt.runtime.vlm_ort.prompt import VlmProcessor, compile_chat_template, step_position_ids
from fixtures.tiny_vlm import build_tiny_vlm

DEMO_VLM = default_bundle() / "vlm"
VLMS = ("llava", "qwen2_5_vl", "internvl", "demo")
# (height, width) of the two prompts' images per VLM: Qwen's give two different non-square grids,
# InternVL's first one a 3x1 tile grid (+ thumbnail), LLaVA's need resizing and cropping.
BATCH_IMAGES = {
    "llava": [(40, 100), (77, 50)],
    "qwen2_5_vl": [(50, 130), (90, 60)],
    "internvl": [(40, 100), (64, 64)],
    "demo": [(480, 640), (300, 200)],
}
QUESTIONS = ["What is in the scene?", "Is there a traffic cone on the road and a dog near the car?"]
HINTS = [["traffic_cone", "dog"], []]


def _image(h: int, w: int, seed: int) -> Image.Image:
    # Noise plus a gradient: noise exercises every tap of the resize, the gradient the smooth case.
    rng = np.random.default_rng(seed)
    grad = np.add.outer(np.linspace(0, 150, h), np.linspace(0, 90, w))[..., None] + np.array([0, 30, 60])
    return Image.fromarray(np.clip(grad + rng.integers(0, 16, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """VLM name -> folder; the tiny ones are built on first use."""
    built = {"demo": DEMO_VLM}

    def get(name):
        if name not in built:
            built[name] = build_tiny_vlm(name, tmp_path_factory.mktemp(name) / "vlm_onnx")
        return built[name]

    return get


@pytest.fixture(scope="module")
def loaded(folders):
    """VLM name -> (torch VLMFamily, VlmProcessor of the same folder)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = (load_vlm(folders(name)), VlmProcessor.from_dir(folders(name)))
        return cache[name]

    return get


# ---------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("size", [(480, 640, 448, 597), (100, 50, 448, 224), (7, 9, 56, 84), (1080, 1920, 448, 796),
                                  (333, 517, 28, 28), (31, 29, 112, 84), (449, 1000, 448, 997), (64, 64, 64, 32)])
def test_resize_equals_torchvision_uint8_antialiased_bicubic(size):
    tvF = pytest.importorskip("torchvision.transforms.v2.functional")
    h, w, oh, ow = size
    image = np.array(_image(h, w, seed=h * w))
    ref = tvF.resize(torch.from_numpy(image).permute(2, 0, 1).contiguous(), [oh, ow],
                     interpolation=tvF.InterpolationMode.BICUBIC, antialias=True).permute(1, 2, 0).numpy()
    out = resize_bicubic(image, oh, ow)
    assert out.shape == ref.shape
    assert np.array_equal(out, ref), f"max difference {np.abs(out.astype(int) - ref.astype(int)).max()} grey levels"


@pytest.mark.parametrize("name", VLMS)
def test_image_processor_equals_transformers_torchvision_backend(name, folders, loaded):
    family, mine = loaded(name)
    proc = family.processor.image_processor
    # What AutoProcessor gives (and so what the torch path runs) is the torchvision backend.
    assert proc.backend == "torchvision"
    kwargs = {"crop_to_patches": True} if name == "internvl" else {}  # InternVLProcessor's default
    for i, (h, w) in enumerate([(32, 32), (40, 100), (100, 40), (27, 19), (333, 517), (111, 57), (56, 56)]):
        image = _image(h, w, seed=i)
        ref = proc([image], return_tensors="np", **kwargs)
        out = mine.image_processor([image])
        assert set(out) == set(ref.keys())
        for key, value in out.items():
            expected = np.asarray(ref[key])
            assert value.shape == expected.shape, (key, h, w)
            assert value.dtype == expected.dtype or key == "num_patches", (key, value.dtype, expected.dtype)
            assert np.array_equal(value, expected), f"{key} of a {w}x{h} image: max difference {np.abs(value - expected).max()}"


def test_image_processor_config_errors():
    with pytest.raises(ModelMismatchError, match="not reproduced"):
        load_image_processor({"image_processor_type": "SiglipImageProcessor"})
    with pytest.raises(ModelMismatchError, match="only bicubic"):
        load_image_processor({"image_processor_type": "CLIPImageProcessor", "resample": 2})
    with pytest.raises(ModelMismatchError, match="max_patches"):
        load_image_processor({"image_processor_type": "GotOcr2ImageProcessor", "max_patches": 0})


# ---------------------------------------------------------------------------------------- feeds
@pytest.mark.parametrize("name", VLMS)
def test_feeds_equal_the_torch_paths_prepare(name, loaded):
    family, mine = loaded(name)
    images = [_image(h, w, seed=10 + i) for i, (h, w) in enumerate(BATCH_IMAGES[name])]
    batch = family.prepare(images, QUESTIONS, HINTS)
    feeds = mine.prepare(images, [family.user_text(q, h) for q, h in zip(QUESTIONS, HINTS)])
    mask = batch["attention_mask"].numpy()
    assert mask.min() == 0 and mask[:, 0].tolist().count(1) == 1, "one row must be left-padded"
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        if key in batch:
            expected = batch[key].numpy()
            assert feeds[key].shape == expected.shape, key
            assert np.array_equal(feeds[key], expected), key
    assert set(feeds) == {"input_ids", "attention_mask", "pixel_values", "position_ids"} | (
        {"image_grid_thw", "rope_deltas"} if name == "qwen2_5_vl" else set())
    assert all(v.dtype == (np.float32 if k == "pixel_values" else np.int64) for k, v in feeds.items())
    positions = family.position_ids(batch).numpy()
    if name == "qwen2_5_vl":
        assert feeds["image_grid_thw"][:, 1:].tolist() != [[4, 10], [4, 10]]  # non-square, distinct grids
        assert np.array_equal(feeds["position_ids"], positions[1:])
        _, deltas = family.model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=family.mm_token_type_ids(batch),
            image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
        assert np.array_equal(feeds["rope_deltas"], deltas.numpy().reshape(-1))
    else:
        assert np.array_equal(feeds["position_ids"], positions)
    if name == "internvl":
        assert feeds["pixel_values"].shape[0] > 4  # 3x1 tiles + thumbnail, then 2x2 + thumbnail
    assert (feeds["input_ids"] == mine.image_token_id).sum() == (batch["input_ids"] == family.image_token_id).sum()


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "internvl"])
def test_step_positions_follow_generate(name, loaded):
    family, mine = loaded(name)
    images = [_image(h, w, seed=20 + i) for i, (h, w) in enumerate(BATCH_IMAGES[name])]
    batch = family.prepare(images, QUESTIONS, HINTS)
    feeds = mine.prepare(images, [family.user_text(q, h) for q, h in zip(QUESTIONS, HINTS)])
    seen = []
    hook = family.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].numpy()), with_kwargs=True)
    try:
        family.generate(batch, max_new_tokens=4, min_new_tokens=4)
    finally:
        hook.remove()
    assert len(seen) == 4
    mask = feeds["attention_mask"]
    for k, positions in enumerate(seen[1:], start=1):
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
        mine_step = step_position_ids(mask, feeds.get("rope_deltas"))
        torch_step = positions[1:] if name == "qwen2_5_vl" else positions  # drop Qwen's text row
        assert np.array_equal(mine_step, torch_step), k


@pytest.mark.parametrize("name", VLMS)
def test_decode_and_generation_ids_equal_the_processors(name, loaded):
    family, mine = loaded(name)
    vocab = len(family.processor.tokenizer)
    ids = np.resize(np.arange(vocab), (-(-vocab // 7), 7))  # every id (the specials at the end too), wrapped
    rows = np.concatenate([ids, np.array([[5, 9, 11, mine.eos_token_ids[0]] + [mine.generation_pad_token_id] * 3])])
    assert mine.decode(rows) == family.decode(torch.from_numpy(rows))
    gen = family.model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert mine.eos_token_ids == tuple(eos)
    assert mine.generation_pad_token_id == gen.pad_token_id
    assert mine.pad_token_id == family.processor.tokenizer.pad_token_id
    assert mine.image_token_id == family.image_token_id
    assert mine.family == family.name


def test_prepare_errors_are_one_line(loaded, folders, tmp_path):
    _, mine = loaded("llava")
    image = _image(40, 40, seed=0)
    with pytest.raises(InputError, match="2 images for 1 questions"):
        mine.prepare([image, image], ["q"])
    with pytest.raises(InputError, match="image placeholder"):
        mine.prepare([image], ["what is <image> here"])
    with pytest.raises(InputError, match="PIL image"):
        mine.prepare(["not an image"], ["q"])
    broken = tmp_path / "broken"
    shutil.copytree(folders("llava"), broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelMismatchError, match="tokenizer.json is missing") as err:
        VlmProcessor.from_dir(broken)
    assert "\n" not in str(err.value)
    config = json.loads((folders("llava") / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "paligemma"}))
    with pytest.raises(ModelMismatchError, match="paligemma"):
        VlmProcessor.from_dir(broken)


def test_chat_template_environment_equals_transformers():
    from transformers.utils.chat_template_utils import render_jinja_template

    # The pieces transformers adds to jinja: the generation tag, namespace, tojson, loop controls,
    # trim/lstrip blocks, raise_exception.
    source = textwrap.dedent("""\
        {% set ns = namespace(n=0) %}
        {% for m in messages %}
          {% if m['role'] == 'system' %}{% continue %}{% endif %}
          {% set ns.n = ns.n + 1 %}
          {% generation %}[{{ m['role'] }}]{% endgeneration %} {{ m['content'] | tojson }}
        {% endfor %}
        {{ ns.n }} {{ bos_token }}{% if add_generation_prompt %}<go>{% endif %}""")
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "é <a>"}]}]
    ref, _ = render_jinja_template(conversations=[messages], chat_template=source, add_generation_prompt=True, bos_token="<s>")
    out = compile_chat_template(source).render(messages=messages, tools=None, documents=None,
                                                add_generation_prompt=True, bos_token="<s>")
    assert out == ref[0]
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="no images"):
        compile_chat_template("{{ raise_exception('no images') }}").render(messages=[])


def test_runtime_vlm_ort_imports_neither_torch_nor_transformers(folders):
    folder = folders("qwen2_5_vl")
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        BLOCKED = ("torch", "torchvision", "transformers")

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Refuse())
        import rtrt.runtime.vlm_ort as pkg
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module("rtrt.runtime.vlm_ort." + mod.name)
        import numpy as np
        from PIL import Image
        from rtrt.runtime.vlm_ort.prompt import VlmProcessor
        proc = VlmProcessor.from_dir({str(folder)!r})
        feeds = proc.prepare([Image.new("RGB", (90, 50), (10, 200, 30))], ["What is in the scene?"])
        print(sorted(feeds), proc.decode(feeds["input_ids"])[0])
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "['attention_mask', 'image_grid_thw', 'input_ids', 'pixel_values', 'position_ids', 'rope_deltas']" in out.stdout
    assert "What is in the scene?" in out.stdout


def test_tokenizer_config_flags_follow_transformers(folders, tmp_path):
    # transformers 5's TokenizersBackend keeps tokenizer.json's post-processor whatever
    # add_bos_token / add_eos_token say (no </s> appended), and so must the torch-free tokenizer.
    folder = tmp_path / "eos"
    shutil.copytree(folders("llava"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True, "add_eos_token": True}))
    family, mine = load_vlm(folder), VlmProcessor.from_dir(folder)
    images = [_image(h, w, seed=30 + i) for i, (h, w) in enumerate(BATCH_IMAGES["llava"])]
    batch = family.prepare(images, QUESTIONS, HINTS)
    feeds = mine.prepare(images, [family.user_text(q, h) for q, h in zip(QUESTIONS, HINTS)])
    assert mine.eos_token_ids[0] not in batch["input_ids"][:, -1].tolist()
    assert np.array_equal(feeds["input_ids"], batch["input_ids"].numpy())


def test_named_special_tokens_are_skipped_in_decode_as_transformers_does(tmp_path):
    # The demo tokenizer names <image> in tokenizer_config.json; transformers registers every named
    # token as special, so decode skips it even when tokenizer.json says special: false.
    folder = tmp_path / "vlm"
    shutil.copytree(DEMO_VLM, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    for token in tokenizer["added_tokens"]:
        if token["content"] == "<image>":
            token["special"] = False
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    from transformers import AutoProcessor

    rows = [[5, 3, 3, 6, 2, 4]]
    expected = AutoProcessor.from_pretrained(folder).batch_decode(rows, skip_special_tokens=True)
    assert "<image>" not in expected[0]
    assert VlmProcessor.from_dir(folder).decode(rows) == expected
