"""Tests of the demo models (``rtrt.tools.demo``) on a tiny world and tiny model sizes.

The tokenizer round-trips and carries LLaVA-1.5's chat template; a briefly pretrained LLaVA saves,
loads offline with ``LlavaForConditionalGeneration.from_pretrained`` and through
``rtrt.runtime.vlm.load_vlm``, and its training prompts are token for token the runtime's; the
VFM trains, loads through ``load_vfm`` and gives one token per patch; training lowers the loss;
the full preset fits the bundle budget; the synonym encoder is the packaged all-MiniLM-L6-v2.

Run: ``.venv/bin/pytest tests/test_demo_models.py``
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from PIL import Image

from rtrt.tools.demo import build, presets, text_encoder, tokenizer, vfm, vlm
from fixtures.demo import one_thread, tiny_demo_world
from rtrt.tools.demo.world import RARE_CATEGORIES, WORLD_CATEGORIES, WorldObject

TINY_VLM = dict(vlm.VLMConfig(**presets.PRESETS["tiny"].vlm).__dict__)
TINY_VFM = dict(vfm.VFMConfig(**presets.PRESETS["tiny"].vfm, workers=1).__dict__)


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_demo_world(tmp_path_factory.mktemp("demo") / "world")


@pytest.fixture(scope="module")
def trained_vlm(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "vlm"
    cfg = vlm.VLMConfig(**{**TINY_VLM, "epochs": 4, "lr": 3e-3, "hint_prob": 0.5})
    return out, vlm.pretrain_vlm(world, out, cfg, progress=False)


def test_tokenizer_round_trips_and_has_the_llava_template():
    texts = ["The ego car drives on a road with two lanes. A red car in the ego lane about 20 meters ahead."] * 20
    tok = tokenizer.train_tokenizer(texts, vocab_size=320)
    assert tok.convert_ids_to_tokens(list(range(len(tokenizer.SPECIAL_TOKENS)))) == list(tokenizer.SPECIAL_TOKENS)
    for s in ["The ego car drives.", "A stroller, 12 m ahead: ünïcode ✓ and unseen words like zyzzyva!"]:
        ids = tok(s).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == s
    assert len(tok("The ego car drives").input_ids) <= 5  # frequent words are single tokens
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is ahead?"}]}]
    assert tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) == "USER: <image>\nWhat is ahead? ASSISTANT:"
    assert tok.convert_tokens_to_ids("<image>") == 3 and tok.image_token == "<image>"
    again = tokenizer.train_tokenizer(texts, vocab_size=320)
    assert again.get_vocab() == tok.get_vocab()


def test_name_tokens_make_each_multiword_name_one_token(world, tmp_path):
    # VLMConfig.name_tokens: " traffic cone" is one token (not " traffic" + " cone", whose first token it shares
    # with traffic light and traffic sign), in the saved tokenizer too (the ONNX runtime reads tokenizer.json).
    from tokenizers import Tokenizer

    from rtrt.tools.demo.world import COMMON_CATEGORIES, RARE_CATEGORIES
    from rtrt.trainer.name_embeddings import name_token_ids

    words = tokenizer.name_words((*COMMON_CATEGORIES, *RARE_CATEGORIES))
    assert " traffic cone" in words and " traffic light" in words and " garbage bag" in words and " car" not in words
    assert tokenizer.name_words((*COMMON_CATEGORIES, *RARE_CATEGORIES), shared_only=True) == (
        " traffic light", " traffic sign", " traffic cone")
    answer = "Objects that influence the ego car: car, traffic light, traffic cone, garbage bag."
    plain = tokenizer.train_tokenizer([answer] * 20, vocab_size=320)
    assert len(name_token_ids(plain, "traffic_cone")) == 2
    cfg = vlm.VLMConfig(**{**TINY_VLM, "name_tokens": "all", "tag_epochs": 0, "text_epochs": 0, "pseudo_epochs": 0,
                           "align_epochs": 0, "epochs": 0})
    vlm.pretrain_vlm(world, tmp_path / "vlm", cfg, progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "vlm", local_files_only=True)
    for name in ("traffic_cone", "traffic_light", "traffic_sign", "warning_sign", "concrete_block", "garbage_bag"):
        (i,) = name_token_ids(tok, name)
        assert tok.decode([i]) == " " + name.replace("_", " ")
    assert len(set(name_token_ids(tok, "traffic_cone") + name_token_ids(tok, "traffic_light"))) == 2
    ids = tok(answer, add_special_tokens=False).input_ids
    assert tok.decode(ids) == answer and tok.convert_tokens_to_ids(" traffic cone") in ids
    raw = Tokenizer.from_file(str(tmp_path / "vlm" / "tokenizer.json"))
    assert raw.encode(answer, add_special_tokens=False).ids == ids and raw.decode(ids) == answer
    with pytest.raises(ValueError, match="name_tokens"):
        vlm.VLMConfig(name_tokens="some")


def test_vlm_pretraining_lowers_the_loss(trained_vlm):
    _, report = trained_vlm
    losses = report["epoch_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3
    assert len(report["stage1_epoch_losses"]) == TINY_VLM["tag_epochs"]
    assert report["tokens_per_image"] == (TINY_VLM["image_size"] // TINY_VLM["patch_size"]) ** 2


def test_vlm_loads_offline_with_transformers(trained_vlm, monkeypatch):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path, report = trained_vlm
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    assert model.dtype == torch.float32  # stored as float16, loaded as float32
    assert sum(p.numel() for p in model.parameters()) == report["params"]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    batch = processor(images=[Image.new("RGB", (96, 96), (90, 90, 90))], text=[text], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == report["tokens_per_image"]
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= batch["input_ids"].shape[1] + 3


def test_vlm_loads_through_the_runtime_and_training_prompts_match(trained_vlm, world):
    from rtrt.runtime.vlm import load_vlm

    path, _ = trained_vlm
    family = load_vlm(path)
    assert family.name == "llava" and family.hidden_size == TINY_VLM["text_hidden"]
    question, hint = "What is ahead?", ["traffic_cone", "dog"]
    batch = family.prepare([Image.new("RGB", (96, 96))], [question], [hint])
    cache: dict = {}
    assert vlm._prompt_ids(family.processor, question, hint, cache) == batch["input_ids"][0].tolist()
    assert family.decode(family.generate(batch, max_new_tokens=2))[0] is not None
    res = vlm.evaluate_recall(path, world, "test", hints="rare", limit=2, max_new_tokens=4, progress=False)
    assert res["items"] == 2 and set(res["recall"]) == {"common", "rare"}


def test_training_forward_is_the_stock_llava_forward():
    tok = tokenizer.train_tokenizer(["a red car ahead"] * 5, vocab_size=300)
    torch.manual_seed(0)
    model, _ = vlm.build_vlm(tok, vlm.VLMConfig(**{**TINY_VLM, "init_range": 0.3}))
    n = (TINY_VLM["image_size"] // TINY_VLM["patch_size"]) ** 2
    ids = torch.tensor([[1] + [model.config.image_token_id] * n + [7, 8, 9, 2]] * 2)
    mask, pv = torch.ones_like(ids), torch.randn(2, 3, TINY_VLM["image_size"], TINY_VLM["image_size"])
    with torch.no_grad():
        hidden = vlm._patch_tokens(model, pv)
        ours = vlm._forward_with_visual(model, ids, mask, model.model.multi_modal_projector(hidden), ids)
        stock = model(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=ids)
    assert hidden.shape == (2, n, TINY_VLM["vision_hidden"])
    assert torch.allclose(ours.logits, stock.logits, atol=1e-5) and torch.allclose(ours.loss, stock.loss, atol=1e-6)


def test_scene_labels_cover_every_drawn_object_and_check_the_annotation(world, tmp_path):
    import shutil

    from rtrt.trainer.coda import CATEGORIES, image_path_for, iter_annotations

    anns = list(iter_annotations(world / "CODA-LM" / "pretrain"))
    paths = [image_path_for(p.name) for p, _ in anns]
    labels = vlm._scene_labels(world, {p: i for i, p in enumerate(paths)}, 96, 16)
    assert labels.shape == (len(paths), 6, 6)
    assert 0 <= int(labels.min()) and int(labels.max()) <= len(CATEGORIES) and (labels > 0).any()
    # Every object is labelled, named or not: more kinds than the annotations name (rare ones unnamed).
    named = {1 + CATEGORIES.index(r.category_name) for _, a in anns for r in a.region_perception}
    assert set(labels[labels > 0].tolist()) - named
    # A world that no longer matches the generator is refused, not silently mislabelled.
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    path, ann = next((p, a) for p, a in anns if a.region_perception)
    data = json.loads(path.read_text())
    data["region_perception"]["1"]["box"][0] += 3
    (copy / "CODA-LM" / "pretrain" / path.name).write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match="does not match"):
        vlm._scene_labels(copy, {image_path_for(path.name): 0}, 96, 16)


def test_short_answers_list_categories_in_coda_order():
    answer = ("The ego car drives on a road with two lanes. A black dog ahead. A red car in the ego lane about 9 meters ahead. "
              "Two orange traffic cones on the right about 12 to 15 meters ahead; they narrow the lane.")
    assert vlm.short_answer(answer) == "Objects that influence the ego car: car, traffic cone, dog."
    assert vlm.short_answer("The road ahead is clear and nothing in the scene strongly influences the ego car.") == vlm.SHORT_NONE
    assert vlm.short_answer_of({"dog", "car"}) == vlm.short_answer(answer).replace(", traffic cone", "")
    # hint_order: a hint's categories first or last, each part in CODA-LM's order (a hinted cat then no longer
    # takes the place of a traffic light the image shows, which in CODA-LM's order comes before it).
    both = {"car", "traffic_light", "cat", "traffic_cone"}
    assert vlm.short_answer_of(both, ["traffic_cone", "cat"], "first") == \
        "Objects that influence the ego car: traffic cone, cat, car, traffic light."
    assert vlm.short_answer_of(both, ["cat", "car"], "last") == "Objects that influence the ego car: traffic light, traffic cone, car, cat."
    assert vlm.short_answer_of(both, ["dog"], "first") == vlm.short_answer_of(both, ["cat"]) == \
        "Objects that influence the ego car: car, traffic light, traffic cone, cat."
    # "apart": the unhinted answer, then the hinted names it lacks in a sentence of their own.
    assert vlm.hinted_answer({"car", "traffic_light"}, ["stone", "cat"], "apart") == \
        "Objects that influence the ego car: car, traffic light. There might also be: cat, stone."
    assert vlm.hinted_answer({"car", "cat"}, ["cat"], "apart") == vlm.short_answer_of({"car", "cat"})
    assert vlm.hinted_answer(set(), ["cat"], "apart") == f"{vlm.SHORT_NONE} {vlm.HINT_APART} cat."
    for order in ("coda", "first", "last"):
        assert vlm.hinted_answer({"car"}, ["cat"], order) == vlm.short_answer_of({"car", "cat"}, ["cat"], order)
    with pytest.raises(ValueError, match="order"):
        vlm.short_answer_of(both, ["cat"], "middle")
    with pytest.raises(ValueError, match="hint_order"):
        vlm.VLMConfig(hint_order="middle")


@pytest.mark.parametrize("classes", ["rare", "any"])
def test_pretraining_hints_name_drawn_objects_and_the_answer_follows(world, classes):
    from rtrt.tools.judge import find_mentions
    from rtrt.trainer.coda import read_tasks, task_file

    cfg = vlm.VLMConfig(**{**TINY_VLM, "hint_prob": 1.0, "hint_rare_prob": 1.0, "hint_classes": classes})
    samples = vlm.load_samples(world, "pretrain", cfg)
    refs = {r.image: r.answer for r in read_tasks(task_file(world / "CODA-LM" / "pretrain" / "vqa_anno", "general_perception"))}
    drawn = {rel: {o.category for o in scene.objects} for rel, scene in vlm._scenes(world, "pretrain", set(refs))}
    assert len(samples) == len(refs)
    hinted = [s for s in samples if s.hint]
    assert hinted
    rare = set(RARE_CATEGORIES)
    for s in samples:
        named = find_mentions(refs[s.image])
        assert set(s.hint) <= drawn[s.image] | named and len(s.hint) <= cfg.hint_max
        assert find_mentions(s.answer) == named | set(s.hint)  # the answer names what the text and the hint name
        if s.hint and drawn[s.image] & rare:
            assert set(s.hint) & rare  # hint_rare_prob 1: a rare object drawn is always hinted
        if classes == "rare":
            # Hints list only the detector's classes, so the answer's common objects come from the image alone.
            assert set(s.hint) <= rare and bool(s.hint) == bool((drawn[s.image] | named) & rare)
    if classes == "any":
        assert any(set(s.hint) - rare for s in samples)
    # Rare objects drawn but not named stay unnamed without a hint (the blindness).
    quiet = vlm.load_samples(world, "pretrain", vlm.VLMConfig(**{**TINY_VLM, "hint_prob": 0.0}))
    assert all(find_mentions(s.answer) == find_mentions(refs[s.image]) and not s.hint for s in quiet)
    assert any((drawn[s.image] - find_mentions(s.answer)) & rare for s in quiet)
    assert [s.hint for s in vlm.load_samples(world, "pretrain", cfg)] == [s.hint for s in samples]
    # hint_order: the same samples, hints and named categories; a hinted answer lists the hint first / last / apart.
    for order in ("first", "last", "apart"):
        moved = vlm.load_samples(world, "pretrain", vlm.VLMConfig(**{**cfg.__dict__, "hint_order": order}))
        assert [(s.image, s.hint, find_mentions(s.answer)) for s in moved] == [(s.image, s.hint, find_mentions(s.answer)) for s in samples]
        for s in moved:
            if order == "apart":  # the list is the unhinted answer's; the hinted names it lacks follow it
                assert s.answer == vlm.hinted_answer(find_mentions(refs[s.image]), s.hint, order)
                assert s.answer.startswith(next(q.answer for q in quiet if q.image == s.image))
                continue
            assert s.answer == vlm.short_answer_of(find_mentions(s.answer), s.hint, order)
            if s.hint:
                names = s.answer.removeprefix(vlm.SHORT_PREFIX).strip().rstrip(".").split(", ")
                part = names[: len(s.hint)] if order == "first" else names[-len(s.hint):]
                assert find_mentions(", ".join(part)) == set(s.hint)


def test_short_task_file_keeps_records_and_shortens_answers(world, tmp_path):
    from rtrt.trainer.coda import read_tasks, task_file

    src = world / "CODA-LM" / "plugin" / "vqa_anno"
    [out] = vlm.write_short_tasks(src, tmp_path)
    before, after = read_tasks(task_file(src, "general_perception")), read_tasks(out)
    assert [(r.question_id, r.image, r.question) for r in before] == [(r.question_id, r.image, r.question) for r in after]
    assert [vlm.short_answer(r.answer) for r in before] == [r.answer for r in after]
    # images=N: the records of the first N images (by path) only, in the file's order; a larger world's first
    # N images are the same images (phase 2 keeps its questions when the plug-in split grows for phase 1).
    first = [r.image for r in before][:2]  # one question per image, in CODA-LM's order
    [part] = vlm.write_short_tasks(src, tmp_path / "part", images=2)
    assert [r.image for r in read_tasks(part)] == [r.image for r in before if r.image in first] and len(first) == 2
    assert len(read_tasks(part)) < len(before)
    assert read_tasks(vlm.write_short_tasks(src, tmp_path / "all", images=10**6)[0]) == after
    with pytest.raises(ValueError, match="images"):
        vlm.write_short_tasks(src, tmp_path / "bad", images=-1)


def test_patch_labels_nearest_object_wins_and_small_objects_mark_their_patch():
    def obj(cat, z, box):
        return WorldObject(cat, z, 0.0, "road", (0, 0, 1, 1), 0.0, 1.0, "", (0, 0, 0), box=box)

    objects = [obj("car", 30.0, (0, 0, 64, 64)), obj("dog", 10.0, (32, 32, 32, 32)), obj("stone", 20.0, (100, 100, 4, 4))]
    labels = vfm._patch_labels(objects, 128, 128, 4, WORLD_CATEGORIES)
    car, dog, stone = (1 + WORLD_CATEGORIES.index(c) for c in ("car", "dog", "stone"))
    assert labels[0, 0] == car and labels[1, 1] == dog and labels[3, 3] == stone and labels[0, 3] == 0


def test_vfm_trains_and_loads_through_load_vfm(world, tmp_path):
    from rtrt.runtime.bundle import VFMSpec
    from rtrt.runtime.vfm import load_vfm

    cfg = vfm.VFMConfig(**{**TINY_VFM, "scenes": 8, "epochs": 4, "batch_size": 8, "lr": 3e-3})
    report = vfm.train_vfm(world, tmp_path, cfg, progress=False)
    assert report["epoch_losses"][-1] < report["epoch_losses"][0]
    backbone, spec = vfm.load_demo_vfm(tmp_path)
    assert (spec.kind, spec.arch, spec.dim, spec.patch_size) == ("timm", "vit_small_patch16_dinov3", cfg.embed_dim, 16)
    again = load_vfm(VFMSpec(**json.loads((tmp_path / "vfm.json").read_text())["spec"]), resolve=lambda r: str(tmp_path / r))
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    tokens = backbone(x)
    assert tokens.shape == (2, (cfg.image_size // 16) ** 2, cfg.embed_dim)
    assert torch.equal(tokens, again(x))
    probe = vfm.probe_vfm(backbone, spec, world, train_split="plugin", test_split="plugin", epochs=20)
    assert probe["train_regions"] > 0 and 0 <= probe["linear"]["all"] <= 100


def test_full_preset_fits_the_bundle_budget():
    # VLM stored in float16; the VFM twice (float16 safetensors, float32 inside detector.onnx); the
    # adapter and the detector projection twice in float32 (safetensors and ONNX); 2 MiB for the rest.
    from rtrt.runtime.vfm import create_timm_vfm
    from transformers import LlavaForConditionalGeneration

    plan = presets.PRESETS["full"]
    vcfg = vlm.VLMConfig(**plan.vlm)
    fcfg = vfm.VFMConfig(**plan.vfm)
    with torch.device("meta"):
        vfm_params = sum(p.numel() for p in create_timm_vfm(fcfg.arch, fcfg.image_size, **fcfg.kwargs).parameters())
        tok = tokenizer.train_tokenizer(["a b c"], vocab_size=300)
        model, _ = vlm.build_vlm(tok, vcfg)
        vlm_params = sum(p.numel() for p in model.parameters()) + (vcfg.vocab_size - len(tok)) * vcfg.text_hidden
    assert isinstance(model, LlavaForConditionalGeneration)
    d = vcfg.text_hidden
    plugin = (4 * d * plan.adapter_width + fcfg.embed_dim * d) * 4 * 2
    total = 2 * vlm_params + 6 * vfm_params + plugin
    assert total + 2 * 2**20 <= presets.MAX_BUNDLE_BYTES, f"{total / 2**20:.1f} MiB of models"


def test_presets_are_valid_configs():
    for plan in presets.PRESETS.values():
        vlm.VLMConfig(**plan.vlm)
        vfm.VFMConfig(**plan.vfm)
        assert plan.size >= 32 and plan.test > 0 and plan.plugin > 0
        assert plan.phase2_tasks and set(plan.phase2_tasks) <= {"general_perception", "region_perception"}  # write_short_tasks' styles
    assert build.parse_args(["--out", "x"]).preset == "full"
    with pytest.raises(ValueError, match="phase2_slot_value needs phase2_null_slot"):
        dataclasses.replace(presets.PRESETS["tiny"], phase2_slot_value=True, phase2_null_slot=False)
    for bad in (-1, presets.PRESETS["tiny"].plugin + 1):  # phase 2's images are some of the plug-in split's
        with pytest.raises(ValueError, match="phase2_images must be from 0"):
            dataclasses.replace(presets.PRESETS["tiny"], phase2_images=bad)
    assert presets.PRESETS["full"].phase2_images == 600 < presets.PRESETS["full"].plugin
    from rtrt.tools.demo.world import config_from_args, parse_args

    for plan in presets.PRESETS.values():  # every plan's world flags are rtrt world's
        cfg = config_from_args(parse_args(["--out", "x", *plan.world_argv(7)]))
        assert (cfg.seed, cfg.width, cfg.pretrain, cfg.test) == (7, plan.size, plan.pretrain, plan.test)
        assert all(getattr(cfg, k) == v for k, v in plan.world.items())


def test_world_defaults_are_the_demo_world():
    # `rtrt world --seed N` with no other flag draws from the shipped demo's distribution (issue 14).
    from rtrt.tools.demo.world import WorldConfig

    plan = presets.PRESETS["full"]
    assert plan.world and all(getattr(WorldConfig(), k) == v for k, v in plan.world.items())
    assert (WorldConfig().width, WorldConfig().height) == (plan.size, plan.size)


def test_plan_world_flags_reach_the_world_and_the_eval_test_split():
    from rtrt.tools.demo.world import config_from_args, parse_args

    plan = dataclasses.replace(presets.PRESETS["tiny"], world={"object_scale": 1.3, "rare_prob": 0.5})
    cfg = config_from_args(parse_args(["--out", "x", *plan.world_argv(2, {"pretrain": 0, "val": 0})]))
    assert (cfg.object_scale, cfg.rare_prob, cfg.seed, cfg.pretrain, cfg.val, cfg.plugin) == (1.3, 0.5, 2, 0, 0, plan.plugin)


@pytest.mark.skipif(not text_encoder.DEMO_SYNONYMS, reason="no synonyms")
def test_synonyms_file_and_minilm_reference(tmp_path):
    from rtrt.trainer.synonyms import load_synonyms
    from rtrt.tools.demo.world import RARE_CATEGORIES

    assert set(text_encoder.DEMO_SYNONYMS) == set(RARE_CATEGORIES)
    path = text_encoder.write_synonyms(tmp_path / "syn.json", ["dog", "tire"])
    assert load_synonyms(path) == {"dog": text_encoder.DEMO_SYNONYMS["dog"], "tire": text_encoder.DEMO_SYNONYMS["tire"]}
    try:
        ref = text_encoder.minilm_ref()
    except Exception as e:  # the wheel is an optional training dependency
        pytest.skip(str(e))
    assert ref.startswith("hf:") and (text_encoder.minilm_dir() / "model.safetensors").is_file()


@pytest.mark.parametrize("classes", ["rare", "any"])
def test_stage0_text_samples_hint_random_categories_and_the_answer_names_them(world, classes):
    from rtrt.tools.judge import find_mentions

    cfg = vlm.VLMConfig(**{**TINY_VLM, "hint_prob": 0.0, "text_hint_prob": 1.0, "hint_classes": classes})
    samples = vlm.load_samples(world, "pretrain", cfg)
    texts = vlm.text_samples(samples, cfg)
    assert len(texts) == len(samples) and all(t.hint and len(t.hint) <= cfg.hint_max for t in texts)
    pool = set(RARE_CATEGORIES if classes == "rare" else WORLD_CATEGORIES)
    assert all(set(t.hint) <= pool for t in texts)
    if classes == "any":
        assert any(set(t.hint) - set(RARE_CATEGORIES) for t in texts)
    for s, t in zip(samples, texts):
        assert find_mentions(t.answer) == find_mentions(s.answer) | set(t.hint)
    assert [t.hint for t in vlm.text_samples(samples, cfg)] == [t.hint for t in texts]  # seeded
    last = vlm.text_samples(samples, vlm.VLMConfig(**{**cfg.__dict__, "hint_order": "last"}))  # the same hints, the hint last
    assert [t.hint for t in last] == [t.hint for t in texts]
    assert all(f.answer == vlm.short_answer_of(find_mentions(t.answer), t.hint, "last") for f, t in zip(last, texts))


def test_projector_starts_from_the_patch_classifier_and_the_names_embeddings():
    from rtrt.runtime.modules import display_name
    from rtrt.trainer.coda import CATEGORIES

    tok = tokenizer.train_tokenizer(["a dog and a traffic cone on the road"] * 5, vocab_size=300)
    torch.manual_seed(0)
    cfg = vlm.VLMConfig(**TINY_VLM)
    model, _ = vlm.build_vlm(tok, cfg)
    head = torch.nn.Linear(cfg.vision_hidden, 1 + len(CATEGORIES))
    vlm._init_projector_from_head(model, head, tok, gain=0.5)
    proj, emb = model.model.multi_modal_projector, model.get_input_embeddings().weight
    k = 1 + CATEGORIES.index("dog")
    assert torch.equal(proj.linear_1.weight[k], head.weight[k])
    ids = tok(" " + display_name("traffic_cone"), add_special_tokens=False).input_ids
    assert torch.allclose(proj.linear_2.weight[:, 1 + CATEGORIES.index("traffic_cone")], 0.5 * emb[ids].mean(0))
    # A feature that fires only the dog unit arrives as (gelu of its logit) x the word's embedding.
    with torch.no_grad():
        proj.linear_1.weight.zero_()
        proj.linear_1.bias.zero_()
        proj.linear_1.bias[k] = 4.0
        out = proj(torch.zeros(1, cfg.vision_hidden))[0]
    dog = tok(" dog", add_special_tokens=False).input_ids
    assert torch.allclose(out, torch.nn.functional.gelu(torch.tensor(4.0)) * 0.5 * emb[dog].mean(0), atol=1e-6)


def test_text_prompt_is_the_chat_template_without_the_image(trained_vlm):
    from rtrt.runtime.vlm import format_hint
    from transformers import AutoTokenizer

    path, _ = trained_vlm
    tok = AutoTokenizer.from_pretrained(path)
    ids = vlm._text_prompt_ids(tok, "What is ahead?", ["dog"], {})
    assert tok.decode(ids) == f"USER: {format_hint(['dog'])} What is ahead? ASSISTANT:"  # the template's text, no image


def test_vlm_config_refuses_unknown_hint_classes():
    with pytest.raises(ValueError, match="hint_classes"):
        vlm.VLMConfig(hint_classes="common")


def test_pseudo_image_slots_are_what_the_initial_projector_makes_of_a_typical_patch():
    from rtrt.trainer.coda import CATEGORIES

    tok = tokenizer.train_tokenizer(["a dog and a traffic cone on the road"] * 5, vocab_size=300)
    torch.manual_seed(0)
    cfg = vlm.VLMConfig(**TINY_VLM)
    model, _ = vlm.build_vlm(tok, cfg)
    table = vlm._name_table(tok)
    emb = model.get_input_embeddings().weight
    dog, cone = 1 + CATEGORIES.index("dog"), 1 + CATEGORIES.index("traffic_cone")
    labels = torch.tensor([[0, dog, cone, dog]])
    with torch.no_grad():
        slots = vlm._pseudo_image(model, table, labels, 0.5, 0.0, torch.Generator().manual_seed(0))
    cone_ids = tok(" traffic cone", add_special_tokens=False).input_ids
    assert torch.allclose(slots[0, 0], 0.5 * emb[tok.pad_token_id])
    assert torch.allclose(slots[0, 2], 0.5 * emb[cone_ids].mean(0), atol=1e-6) and torch.equal(slots[0, 1], slots[0, 3])
    # drop hides object patches (shown as background), never invents one
    many = torch.full((1, 400), dog)
    many[0, :200] = 0
    with torch.no_grad():
        hidden = vlm._pseudo_image(model, table, many, 0.5, 0.5, torch.Generator().manual_seed(0))
    is_bg = torch.isclose(hidden, 0.5 * emb[tok.pad_token_id]).all(-1)[0]
    assert is_bg[:200].all() and 50 < int(is_bg[200:].sum()) < 150
    # The projector's start maps a patch whose own logit is the typical one onto the same slot.
    head = torch.nn.Linear(cfg.vision_hidden, 1 + len(CATEGORIES))
    vlm._init_projector_from_head(model, head, tok, gain=0.5, logit=4.0)
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        proj.linear_1.weight.zero_()
        proj.linear_1.bias.zero_()
        proj.linear_1.bias[cone] = 4.0
        out = proj(torch.zeros(1, cfg.vision_hidden))[0]
    assert torch.allclose(out, torch.nn.functional.gelu(torch.tensor(4.0)) / 4.0 * slots[0, 2], atol=1e-6)
    feats = torch.randn(3, 5, cfg.vision_hidden)
    lab = torch.tensor([[0, 1, 2, 0, 3]] * 3)
    own = head(feats).gather(-1, lab.unsqueeze(-1)).squeeze(-1)[lab > 0].mean().item()
    assert vlm._typical_logit(head, feats, lab, batch=2) == pytest.approx(max(1.0, own))


def _tiny_rebuild(out) -> None:
    assert build.main(["--out", str(out), "--seed", "0", "--preset", "tiny", "--threads", "1", "--quiet"]) == 0


@pytest.fixture(scope="module")
def tiny_rebuild(tmp_path_factory):
    out = tmp_path_factory.mktemp("rebuild") / "demo"
    _tiny_rebuild(out)
    return out


def test_one_command_rebuild_end_to_end_tiny(tiny_rebuild):
    # The shipped demo's command at the tiny preset: every stage runs, the bundle loads with every
    # hash checked and carries fp32 and int8 graphs, the examples and the report are written.
    from rtrt.runtime.bundle import load_bundle

    out = tiny_rebuild
    bundle = load_bundle(out / "bundle")
    graphs = bundle.manifest.exports.graphs
    assert {"detector", "adapter", "detector.int8", "adapter.int8"} <= set(graphs)
    assert bundle.manifest.exports.vlm is not None and {"vision_encoder_refined", "decoder_model_merged"} <= set(bundle.manifest.exports.vlm.graphs)
    report = json.loads((out / "build_report.json").read_text())
    assert set(report["seconds"]) >= {"world", "vfm", "vlm", "phase1", "phase2", "export", "calibrate", "probes"}
    probes = report["probes"]  # the probes of the built bundle on its own test split
    assert probes["split"] == "test" and probes["images"] == presets.PRESETS["tiny"].eval_images
    assert {"baseline", "common", "oracle", "adapter", "detector"} <= set(probes)
    assert bundle.manifest.detector.calibrated and bundle.manifest.training["calibration"]["split"] == "val"
    assert report["examples"] and all((out / "examples" / name).is_file() for name in report["examples"])
    assert not out.with_name("demo.work").exists()  # intermediates removed without --keep-work


def test_tiny_rebuild_is_deterministic(tiny_rebuild, tmp_path):
    # The same command again gives the same models, byte for byte: every weight file of the bundle
    # (VFM, VLM, W, detector projection, adapter), the calibration and the examples.
    from rtrt.runtime.bundle import load_bundle

    again = tmp_path / "demo"
    _tiny_rebuild(again)
    weights = sorted(p.relative_to(tiny_rebuild) for p in tiny_rebuild.rglob("*.safetensors"))
    assert {"bundle/vlm/model.safetensors", "bundle/vfm/model.safetensors", "bundle/adapter.safetensors",
            "bundle/embeddings.safetensors"} <= {str(p) for p in weights}
    assert weights == sorted(p.relative_to(again) for p in again.rglob("*.safetensors"))
    for rel in weights:
        assert (tiny_rebuild / rel).read_bytes() == (again / rel).read_bytes(), rel
    a, b = (load_bundle(o / "bundle").manifest.detector for o in (tiny_rebuild, again))
    assert (a.score_mean, a.score_std, a.z_threshold, a.top_k) == (b.score_mean, b.score_std, b.z_threshold, b.top_k)
    for name in json.loads((tiny_rebuild / "build_report.json").read_text())["examples"]:
        assert (tiny_rebuild / "examples" / name).read_bytes() == (again / "examples" / name).read_bytes()


def test_rebuild_from_vfm_and_phase2_reuses_the_work_and_gives_the_same_bundle(tiny_rebuild, tmp_path):
    # --keep-work, then --from vfm and --from phase2 with the same plan: the earlier stages are reused,
    # and the rerun stages give the bytes of the one-command build (tiny_rebuild).
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--seed", "0", "--preset", "tiny", "--threads", "1", "--quiet"]
    assert build.main([*argv, "--keep-work", "--stop-after", "phase1"]) == 0
    vlm_bytes = (tmp_path / "demo.work" / "vlm" / "model.safetensors").read_bytes()
    from rtrt.runtime.bundle import load_bundle

    # the tiny plan trains phase 2 with the detector's hints: phase 1's bundle is calibrated on val first
    phase1 = load_bundle(tmp_path / "demo.work" / "bundle_phase1").manifest
    assert phase1.detector.calibrated and phase1.training["calibration"]["split"] == "val"
    # --from vfm: the VLM (before the VFM, which it does not use) is reused; VFM onward as one command.
    assert build.main([*argv, "--keep-work", "--from", "vfm"]) == 0
    assert (tmp_path / "demo.work" / "vlm" / "model.safetensors").read_bytes() == vlm_bytes
    assert json.loads((out / "build_report.json").read_text())["reused"] == ["world", "vlm"]
    for rel in ("bundle/vfm/model.safetensors", "bundle/adapter.safetensors", "bundle/embeddings.safetensors"):
        assert (out / rel).read_bytes() == (tiny_rebuild / rel).read_bytes(), rel
    assert build.main([*argv, "--keep-work", "--from", "phase2"]) == 0
    assert (tmp_path / "demo.work" / "vlm" / "model.safetensors").read_bytes() == vlm_bytes  # not retrained
    for rel in ("bundle/adapter.safetensors", "bundle/embeddings.safetensors", "bundle/vlm/model.safetensors"):
        assert (out / rel).read_bytes() == (tiny_rebuild / rel).read_bytes(), rel
    report = json.loads((out / "build_report.json").read_text())
    assert report["reused"] == ["world", "vlm", "vfm", "phase1"] and "vlm_recall" in report and "vfm_probe" in report
    assert {"phase2", "export", "vlm"} <= set(report["seconds"])  # reused stages keep their recorded times
    # --from vlm retrains the VLM and reuses the VFM built with the same plan (it does not read the VLM): same bytes.
    vfm_file = tmp_path / "demo.work" / "vfm" / "vfm.safetensors"
    vfm_stamp = vfm_file.stat().st_mtime_ns
    assert build.main([*argv, "--keep-work", "--from", "vlm"]) == 0
    assert json.loads((out / "build_report.json").read_text())["reused"] == ["world", "vfm"]
    assert vfm_file.stat().st_mtime_ns == vfm_stamp
    for rel in ("bundle/vlm/model.safetensors", "bundle/vfm/model.safetensors", "bundle/adapter.safetensors"):
        assert (out / rel).read_bytes() == (tiny_rebuild / rel).read_bytes(), rel
    # A plan that changes phase 1 cannot reuse phase 1; another seed cannot reuse anything.
    changed = dataclasses.replace(presets.PRESETS["tiny"], phase1_epochs=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(presets.PRESETS, "tiny", changed)
        assert build.main([*argv, "--keep-work", "--from", "phase2"]) == 2
        assert build.main([*argv, "--keep-work", "--from", "phase1", "--stop-after", "phase1"]) == 0
    assert build.main([*argv[:3], "1", *argv[4:], "--from", "vfm"]) == 2
    # phase2_hint_share reaches rtrt train adapter as --hint-share (with the detector's hints only)
    calls: list[list[str]] = []
    for hints, share, expect in (("detector", 0.5, ["--hint-share", "0.5"]), ("none", 1.0, [])):
        calls.clear()
        plan = dataclasses.replace(presets.PRESETS["tiny"], phase1_epochs=2, phase2_hints=hints, phase2_hint_share=share)
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(presets.PRESETS, "tiny", plan)
            mp.setattr(build, "_call_main", lambda module, a: calls.append(a))
            assert build.main([*argv, "--keep-work", "--from", "phase2", "--stop-after", "phase2"]) == 0
        (adapter,) = [a for a in calls if a[0] == "adapter"]
        got = adapter[adapter.index("--hint-share"):][:2] if "--hint-share" in adapter else []
        assert got == expect and adapter[adapter.index("--hints") + 1] == hints
    # A work directory written before a plan field existed: the missing field reads as its default
    # (phase1_ema: 0.99, the tiny plan's too), so a plan with another value is still refused.
    state_file = tmp_path / "demo.work" / "build_state.json"
    saved = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**saved, "key": {k: v for k, v in saved["key"].items() if k != "phase1_ema"}}))
    tiny = dataclasses.replace(presets.PRESETS["tiny"], phase1_epochs=2)  # the plan phase 1 was last built with
    assert tiny.phase1_ema == presets.BuildPlan.__dataclass_fields__["phase1_ema"].default
    for plan, expect in ((tiny, 0), (dataclasses.replace(tiny, phase1_ema=0.5), 2)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(presets.PRESETS, "tiny", plan)
            mp.setattr(build, "_call_main", lambda module, a: None)
            assert build.main([*argv, "--keep-work", "--from", "phase2", "--stop-after", "phase2"]) == expect
    assert build.main(["--out", str(tmp_path / "other"), "--preset", "tiny", "--from", "vlm"]) == 2  # no work directory


def test_every_plan_field_belongs_to_one_stage():
    fields = [f for stage in build.STAGES for f in build.STAGE_FIELDS[stage]]
    assert sorted(fields) == sorted(f.name for f in dataclasses.fields(presets.BuildPlan)) and len(set(fields)) == len(fields)


def _tiny_llava():
    """A tokenizer that knows a few class names, the tiny preset's config and a fresh LLaVA (seed 0)."""
    tok = tokenizer.train_tokenizer(["a dog and a traffic cone and a car on the road"] * 5, vocab_size=300)
    torch.manual_seed(0)
    cfg = vlm.VLMConfig(**TINY_VLM)
    model, _ = vlm.build_vlm(tok, cfg)
    return tok, cfg, model


def test_text_answers_hint_names_only_the_hint(world):
    """``text_answers="hint"``: a text prompt shows only its hint, so the stage-0 answer names only that."""
    from rtrt.tools.judge import find_mentions

    cfg = vlm.VLMConfig(**{**TINY_VLM, "hint_prob": 0.0, "text_hint_prob": 0.5, "text_answers": "hint"})
    texts = vlm.text_samples(vlm.load_samples(world, "pretrain", cfg), cfg)
    assert any(t.hint for t in texts) and any(not t.hint for t in texts)
    for t in texts:
        assert find_mentions(t.answer) == set(t.hint)
        assert (t.answer == vlm.SHORT_NONE) == (not t.hint)


def test_drawn_answers_name_every_category_with_a_slot_plus_the_hint():
    """``pseudo_answers="drawn"``: stage 0b's answer names each category whose label is in the pseudo-image."""
    from rtrt.tools.judge import find_mentions
    from rtrt.trainer.coda import CATEGORIES

    tok = tokenizer.train_tokenizer(["a dog and a traffic cone and a car on the road"] * 5, vocab_size=300)
    cfg = vlm.VLMConfig(**{**TINY_VLM, "max_answer_tokens": 400})  # a byte-level answer, never cut
    _, processor = vlm.build_vlm(tok, cfg)
    labels = torch.zeros((2, 2, 2), dtype=torch.long)
    labels[0, 0, 1] = 1 + CATEGORIES.index("dog")
    labels[0, 1, 1] = 1 + CATEGORIES.index("car")
    samples = [vlm.Sample("a.jpg", "What is ahead?", "unused", ["stone"]), vlm.Sample("b.jpg", "What is ahead?", "unused")]
    seqs = vlm._drawn_seqs(samples, [0, 1], labels, tok, processor, cfg, {})
    answers = [tok.decode(a, skip_special_tokens=True) for _, a in seqs]
    assert find_mentions(answers[0]) == {"dog", "car", "stone"}
    assert answers[1].strip() == vlm.SHORT_NONE
    assert all(a[-1] == tok.eos_token_id for _, a in seqs)
    assert answers[0].strip() == vlm.short_answer_of({"dog", "car", "stone"})  # one CODA-LM order: car, dog, stone
    # hint_order: the hinted stone first or last, the slots' objects in CODA-LM's order.
    for order, text in (("first", "stone, car, dog"), ("last", "car, dog, stone"), ("apart", "car, dog. There might also be: stone")):
        moved = vlm._drawn_seqs(samples, [0, 1], labels, tok, processor, vlm.VLMConfig(**{**cfg.__dict__, "hint_order": order}), {})
        assert tok.decode(moved[0][1], skip_special_tokens=True).strip() == f"Objects that influence the ego car: {text}."
        assert moved[1] == seqs[1]


def test_projector_rare_gain_and_quiet_start():
    """``rare_gain`` scales the rare categories' columns; ``quiet`` zeroes the random units' columns."""
    from rtrt.trainer.coda import CATEGORIES

    tok, cfg, model = _tiny_llava()
    head = torch.nn.Linear(cfg.vision_hidden, 1 + len(CATEGORIES))
    gains = torch.tensor([1.0] + [0.25 if c in RARE_CATEGORIES else 1.0 for c in CATEGORIES])
    vlm._init_projector_from_head(model, head, tok, gain=0.5, unit_gain=gains, quiet=True)
    w2 = model.model.multi_modal_projector.linear_2.weight
    emb = model.get_input_embeddings().weight
    k = len(gains)
    cone, car = 1 + CATEGORIES.index("traffic_cone"), 1 + CATEGORIES.index("car")
    cone_ids = tok(" traffic cone", add_special_tokens=False).input_ids
    car_ids = tok(" car", add_special_tokens=False).input_ids
    assert torch.allclose(w2[:, cone], 0.25 * 0.5 * emb[cone_ids].mean(0), atol=1e-6)
    assert torch.allclose(w2[:, car], 0.5 * emb[car_ids].mean(0), atol=1e-6)
    assert k < w2.shape[1] and torch.count_nonzero(w2[:, k:]) == 0
    # Without quiet the random columns stay as built.
    model2, _ = vlm.build_vlm(tok, cfg)
    vlm._init_projector_from_head(model2, head, tok, gain=0.5)
    assert torch.count_nonzero(model2.model.multi_modal_projector.linear_2.weight[:, k:]) > 0


def test_vlm_config_refuses_unknown_answer_modes():
    with pytest.raises(ValueError, match="text_answers"):
        vlm.VLMConfig(text_answers="all")
    with pytest.raises(ValueError, match="pseudo_answers"):
        vlm.VLMConfig(pseudo_answers="all")


def test_slot_targets_are_the_stage0b_slots_times_the_unit_gain():
    """Stage 2a's slot alignment aims each slot at its label's name (times ``rare_gain`` for rare ones)."""
    from rtrt.trainer.coda import CATEGORIES

    tok, cfg, model = _tiny_llava()
    table = vlm._name_table(tok)
    cone, car = 1 + CATEGORIES.index("traffic_cone"), 1 + CATEGORIES.index("car")
    labels = torch.tensor([[0, cone, car], [car, 0, 0]])
    gains = torch.tensor([1.0] + [0.25 if c in RARE_CATEGORIES else 1.0 for c in CATEGORIES])
    target = vlm._slot_targets(model, (table, labels, None, gains), [1, 0], 0.5)
    with torch.no_grad():
        plain = vlm._pseudo_image(model, table, labels[[1, 0]], 0.5, 0.0, torch.Generator())
    assert target.shape == plain.shape
    assert torch.allclose(target[1, 1], 0.25 * plain[1, 1]) and torch.allclose(target[1, 2], plain[1, 2])
    assert torch.allclose(target[0], plain[0])


def test_slot_loss_weighs_object_and_background_slots_half_each():
    """A projector that shows background everywhere is not nearly right when objects are 2% of the slots."""
    target = torch.zeros(1, 100, 4)
    target[..., 0] = 1.0  # background slots
    labels = torch.zeros(1, 100, dtype=torch.long)
    labels[0, :2] = 5
    target[0, :2] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # two object slots
    all_background = target.clone()
    all_background[0, :2] = target[0, 2]
    assert vlm._slot_loss(target, target, labels) == 0
    assert vlm._slot_loss(all_background, target, labels).item() == pytest.approx(0.5 * 2.0)  # half the weight on the 2 wrong slots
    no_objects = torch.zeros(1, 100, dtype=torch.long)
    assert vlm._slot_loss(all_background, target, no_objects).item() == pytest.approx(2 * 2.0 / 100)


def test_stage1_fresh_scenes_are_world_scenes_and_train_the_tower(world, trained_vlm, monkeypatch, tmp_path):
    """``tag_scenes``: stage 1's fresh scenes are drawn, encoded, resized and labelled as the world's own images."""
    from transformers import AutoProcessor

    from rtrt.tools.demo.world import SPLITS

    processor = AutoProcessor.from_pretrained(trained_vlm[0])
    cfg = vlm.VLMConfig(**{**TINY_VLM, "tag_scenes": 3, "seed": 3})  # the tiny world's seed
    px, labels = vlm._render_tower_scenes(world, cfg, 0, processor.image_processor)
    g = cfg.image_size // cfg.patch_size
    assert px.dtype == torch.uint8 and px.shape == (3, 3, cfg.image_size, cfg.image_size) and labels.shape == (3, g, g)
    again = vlm._render_tower_scenes(world, cfg, 0, processor.image_processor)
    assert torch.equal(px, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(px, vlm._render_tower_scenes(world, cfg, 1, processor.image_processor)[0])  # each epoch new scenes
    # Drawn from the pretrain split's seed stream, the fresh scenes are that split's images, pixel for pixel and label for label.
    monkeypatch.setattr(vlm, "TOWER_SEED_STREAM", SPLITS["pretrain"])
    px, labels = vlm._render_tower_scenes(world, cfg, 0, processor.image_processor)
    paths = [f"pretrain/images/{i:06d}.jpg" for i in range(3)]
    own, index = vlm._load_pixels(world, paths, processor.image_processor, "px")
    assert torch.equal(px, own[[index[p] for p in paths]])
    assert torch.equal(labels, vlm._scene_labels(world, {p: i for i, p in enumerate(paths)}, cfg.image_size, cfg.patch_size))
    monkeypatch.undo()
    report = vlm.pretrain_vlm(world, tmp_path / "vlm", vlm.VLMConfig(**{**TINY_VLM, "tag_scenes": 4, "tag_epochs": 2, "epochs": 1}),
                              progress=False)
    assert len(report["stage1_epoch_losses"]) == 2 and all(map(math.isfinite, report["stage1_epoch_losses"]))


def test_vlm_config_refuses_negative_tag_scenes():
    with pytest.raises(ValueError, match="tag_scenes"):
        vlm.VLMConfig(tag_scenes=-1)


def test_tag_balance_weighs_categories_by_inverse_patch_count():
    """``tag_balance``: a category's stage-1 weight is (mean count / its count) ** balance; background keeps bg_weight."""
    labels = torch.zeros((2, 4, 4), dtype=torch.long)
    labels[0, 0, :4] = 1  # 4 patches of category 1 (index 1: the first of CATEGORIES)
    labels[1, 0, 0] = 3  # 1 patch of category 3
    w = vlm.tag_class_weights(labels, 6, 0.2, 0.5)
    mean = (4 + 1) / 2
    assert w[0].item() == pytest.approx(0.2)
    assert w[1].item() == pytest.approx((mean / 4) ** 0.5)
    assert w[3].item() == pytest.approx((mean / 1) ** 0.5)
    assert w[3] > 1 > w[1]
    assert w[2].item() == w[4].item() == w[5].item() == 1.0  # no patch: weight 1
    off = vlm.tag_class_weights(labels, 6, 0.2, 0.0)
    assert off.tolist() == pytest.approx([0.2, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="tag_balance"):
        vlm.VLMConfig(tag_balance=1.5)


def test_realign_redoes_stage_2_of_a_saved_vlm_exactly(world, tmp_path):
    # head_refit: stage 2 depends only on the saved (float16) weights, the world and the config, so
    # re-running it on the saved VLM writes the same bytes as the build from nothing.
    cfg = vlm.VLMConfig(**{**TINY_VLM, "head_refit": True, "tasks": ("general_perception", "region_perception"), "epochs": 0})
    built, again = tmp_path / "built", tmp_path / "again"
    vlm.pretrain_vlm(world, built, cfg, progress=False)
    report = vlm.realign_vlm(built, world, again, cfg, progress=False)
    files = sorted(f.name for f in built.iterdir() if f.name != "demo_vlm.json")
    assert "model.safetensors" in files and "config.json" in files and "tokenizer_config.json" in files
    assert sorted(f.name for f in again.iterdir() if f.name != "demo_vlm.json") == files
    for name in files:  # the weights, and the config and processor files (not saved again with loading-time keys)
        assert (again / name).read_bytes() == (built / name).read_bytes(), name
    assert report["realigned_from"] == str(built) and len(report["stage2a_epoch_losses"]) == cfg.align_epochs
    # refit_balance is a stage-2 field: realign takes it, and it changes the refit classifier, so the weights
    other = vlm.realign_vlm(built, world, tmp_path / "balanced", dataclasses.replace(cfg, refit_balance=0.5), progress=False)
    assert other["config"]["refit_balance"] == 0.5
    assert (tmp_path / "balanced" / "model.safetensors").read_bytes() != (built / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="refit_balance"):
        dataclasses.replace(cfg, refit_balance=1.5)
    with pytest.raises(ValueError, match="head_refit"):
        vlm.realign_vlm(built, world, tmp_path / "no", vlm.VLMConfig(**TINY_VLM), progress=False)
    with pytest.raises(ValueError, match="text_epochs"):  # stages 0-1 are the saved VLM's
        vlm.realign_vlm(built, world, tmp_path / "no", dataclasses.replace(cfg, text_epochs=2), progress=False)
    with pytest.raises(ValueError, match="epochs=0"):
        vlm.realign_vlm(built, world, tmp_path / "no", dataclasses.replace(cfg, epochs=1), progress=False)
    assert not (tmp_path / "no").exists()


def test_refit_head_separates_a_small_category():
    # Three categories along three directions, one of them 2% of the patches: the refit head, weighted
    # as stage 1 weighs background, names most of the small one's patches and keeps background.
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(4000, dtype=torch.long)
    labels[:80], labels[80:1500] = 2, 1
    centres = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    feats = centres[labels] + torch.randn(4000, 3, generator=gen) + 5.0  # offset: the fold-back to raw features matters
    weight = vlm.tag_class_weights(labels.view(1, -1), 3, 0.2, 0.0)
    head = vlm._refit_head(feats.view(40, 100, 3), labels.view(40, 100), weight, seed=0)
    pred = head(feats).argmax(-1)
    for c in range(3):
        assert (pred[labels == c] == c).float().mean() > 0.8, c


def test_build_realign_vlm_redoes_stage_2_as_a_build_from_nothing(tmp_path):
    # --from vlm --realign-vlm keeps the work directory's stages 0-1 and redoes stage 2 (here with
    # another stage-2 field than the saved VLM's), giving the bytes a build from nothing writes.
    vlm_plan = {**presets.PRESETS["tiny"].vlm, "head_refit": True, "epochs": 0, "tasks": ("general_perception", "region_perception")}
    plan = dataclasses.replace(presets.PRESETS["tiny"], vlm=vlm_plan)
    before = dataclasses.replace(plan, vlm={**vlm_plan, "align_lr": 1e-2})

    def run(p, name, *extra):
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(presets.PRESETS, "tiny", p)
            stop = [] if "--stop-after" in extra else ["--stop-after", "vlm"]
            return build.main(["--out", str(tmp_path / name), "--preset", "tiny", "--threads", "1", "--quiet",
                               *stop, "--keep-work", *extra])

    assert run(plan, "fresh") == 0
    assert run(before, "re", "--stop-after", "vfm") == 0
    vfm_bytes = (tmp_path / "re.work" / "vfm" / "vfm.safetensors").read_bytes()
    weights = tmp_path / "re.work" / "vlm" / "model.safetensors"
    assert weights.read_bytes() != (tmp_path / "fresh.work" / "vlm" / "model.safetensors").read_bytes()
    assert run(plan, "re", "--from", "vlm", "--realign-vlm", "--stop-after", "vfm") == 0
    assert weights.read_bytes() == (tmp_path / "fresh.work" / "vlm" / "model.safetensors").read_bytes()
    report = json.loads((tmp_path / "re" / "build_report.json").read_text())
    assert "vlm stage 2" in report["seconds"] and report["vlm"]["realigned_from"].endswith("vlm")
    # the VFM (which does not read the VLM) is reused, not retrained
    assert report["reused"] == ["world", "vfm"] and "vfm_probe" in report and "vfm" in report["seconds"]
    assert {"vlm_recall", "blind"} <= set(report) and "vlm eval hints=none" in report["seconds"]
    state = json.loads((tmp_path / "re.work" / "build_state.json").read_text())
    assert state["done"] == ["world", "vlm", "vfm"] and state["key"]["vlm"]["head_refit"] and "align_lr" not in state["key"]["vlm"]
    assert (tmp_path / "re.work" / "vfm" / "vfm.safetensors").read_bytes() == vfm_bytes
    assert not (tmp_path / "re.work" / "vlm.realign").exists() and not (tmp_path / "re.work" / "vlm.stale").exists()
    # Not with another stage-0 plan, without head_refit, or without --from vlm.
    assert run(dataclasses.replace(plan, vlm={**vlm_plan, "text_epochs": 2}), "re", "--from", "vlm", "--realign-vlm") == 2
    assert run(dataclasses.replace(plan, vlm={**vlm_plan, "head_refit": False}), "re", "--from", "vlm", "--realign-vlm") == 2
    assert run(plan, "re", "--realign-vlm") == 2


def test_normalisers_in_place_give_the_same_bits_and_leave_the_input():
    # The VLM's stage-1 and the VFM's normalisers run in place on one float copy (faster); the bits are
    # those of (u8 / 255 - mean) / std, and the caller's tensor (uint8 or already float) is left as it was.
    import torch

    from rtrt.tools.demo import vfm as demo_vfm
    from rtrt.tools.demo import vlm as demo_vlm

    class IP:
        image_mean, image_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8, generator=g)
    mean, std = torch.tensor(IP.image_mean).view(1, 3, 1, 1), torch.tensor(IP.image_std).view(1, 3, 1, 1)
    norm = demo_vlm._normaliser(IP)
    assert torch.equal(norm(u8), (u8.float() / 255.0 - mean) / std)
    f = u8.float()
    before = f.clone()
    norm(f)
    assert torch.equal(f, before)
    hwc = u8.permute(0, 2, 3, 1).contiguous()
    m2, s2 = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = (hwc.permute(0, 3, 1, 2).float() / 255.0 - m2) / s2
    got = demo_vfm._normalise(hwc)
    assert torch.equal(got, want) and got.stride() == want.stride()
