"""Region questions in the demo VLM (issue 14, item 5): the object in the red box.

The answer style names the region's category; a boxed image maps back to its base image and box;
the red-box labels mark exactly the patches on or inside the box; the projector's extra unit and the
pseudo-images mark boxed slots with the " red box" embedding; a tiny VLM pretrained with region
questions runs through ``rtrt eval --task region`` with a row per evaluation group.

Run: ``.venv/bin/pytest tests/test_demo_regions.py``
"""
from __future__ import annotations

import json

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from rtrt.tools.demo import presets, tokenizer, vlm
from fixtures.demo import one_thread, tiny_demo_world

TINY_VLM = dict(vlm.VLMConfig(**presets.PRESETS["tiny"].vlm).__dict__)
BOTH = ("general_perception", "region_perception")


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_demo_world(tmp_path_factory.mktemp("regions") / "world")


def _processor(size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def test_region_short_answer_names_only_the_category():
    from rtrt.tools.judge import find_mentions
    from rtrt.trainer.coda import CATEGORIES

    assert vlm.region_short_answer("traffic_cone") == "The object in the red box is a traffic cone."
    assert vlm.region_short_answer("excavator") == "The object in the red box is an excavator."
    for c in CATEGORIES:
        if c != "misc":  # "misc" is the judge's catch-all, never a keyword
            assert find_mentions(vlm.region_short_answer(c)) == {c}


def test_region_hints_list_rare_objects_of_the_image_and_keep_the_answer(world):
    from rtrt.tools.demo.world import RARE_CATEGORIES

    cfg = vlm.VLMConfig(**{**TINY_VLM, "tasks": BOTH, "region_per_image": 0})
    plain = vlm.load_samples(world, "pretrain", cfg)
    hinted = vlm.load_samples(world, "pretrain", dataclasses.replace(cfg, region_hint_prob=1.0))
    assert len(plain) == len(hinted)
    drawn = dict(vlm._scenes(world, "pretrain", {s.base for s in plain if s.box is not None}))
    with_rare = 0
    for a, b in zip(plain, hinted):
        assert (a.image, a.question, a.answer, a.box) == (b.image, b.question, b.answer, b.box)  # answers never move
        if a.box is None:
            assert a.hint == b.hint  # general samples keep their hints
            continue
        rare = {o.category for o in drawn[b.base].objects} & set(RARE_CATEGORIES)
        assert not a.hint and set(b.hint) <= rare and (bool(b.hint) == bool(rare))
        with_rare += bool(rare)
    assert with_rare > 0


def test_box_labels_mark_exactly_the_patches_on_or_inside_the_box():
    # 96 x 96 image -> 48 px input, 3 x 3 grid: each cell is 32 x 32 input pixels.
    samples = [vlm.Sample("b.jpg", "q", "a", box=(40.0, 8.0, 40.0, 20.0)), vlm.Sample("p.jpg", "q", "a"),
               vlm.Sample("s.jpg", "q", "a", box=(70.0, 70.0, 3.0, 3.0))]
    labels = vlm._box_labels(samples, {"b.jpg": 0, "p.jpg": 1, "s.jpg": 2}, (96, 96), 3, _processor(48))
    want = torch.zeros(3, 3, 3)
    want[0, 0, 1:3] = 1  # x 40..80 covers columns 1 and 2, y 8..28 row 0
    want[2, 2, 2] = 1  # a box smaller than a cell marks the cell holding it
    assert torch.equal(labels, want)
    # A wide image: resized 128 x 96 -> 64 x 48, centre-cropped by 8 px each side (16 input px).
    wide = vlm._box_labels([vlm.Sample("w.jpg", "q", "a", box=(16.0, 0.0, 32.0, 32.0))],
                           {"w.jpg": 0}, (128, 96), 3, _processor(48))
    assert wide[0].nonzero().tolist() == [[0, 0]]


def test_region_samples_map_the_boxed_image_to_its_base_image_and_box(world):
    from rtrt.trainer.coda import iter_annotations, read_tasks, task_file

    anns = {p.stem.split("_", 1)[1]: a for p, a in iter_annotations(world / "CODA-LM" / "pretrain")}
    records = read_tasks(task_file(world / "CODA-LM" / "pretrain" / "vqa_anno", "region_perception"))
    cfg = vlm.VLMConfig(**{**TINY_VLM, "tasks": BOTH, "region_per_image": 0, "hint_prob": 1.0})
    samples = vlm.load_samples(world, "pretrain", cfg)
    regions = [s for s in samples if s.box is not None]
    assert [s.image for s in regions] == [r.image for r in records] and regions
    for s in regions:
        image_id, k = s.image.split("/")[-1].split(".")[0].split("_object_")
        region = anns[image_id].region_perception[int(k) - 1]
        assert s.base == f"pretrain/images/{image_id}.jpg" and s.box == tuple(region.box) and not s.hint
        assert s.answer == vlm.region_short_answer(region.category_name)
        # The boxed image is its base image with a red outline along that box, nothing else.
        boxed = np.asarray(Image.open(world / s.image).convert("RGB"), dtype=np.int16)
        base = np.asarray(Image.open(world / s.base).convert("RGB"), dtype=np.int16)
        ys, xs = np.nonzero(np.abs(boxed - base).max(-1) > 60)
        x, y, w, h = s.box
        assert len(xs) and x - 8 <= xs.min() and xs.max() <= x + w + 8 and y - 8 <= ys.min() and ys.max() <= y + h + 8
    # The general samples (and their seeded hints) are those of the general task alone.
    general = vlm.load_samples(world, "pretrain", vlm.VLMConfig(**{**TINY_VLM, "hint_prob": 1.0}))
    assert [(s.image, s.answer, s.hint) for s in samples if s.box is None] == [(s.image, s.answer, s.hint) for s in general]
    # region_per_image 1: at most one region question per image, the same ones on every call.
    one = [s for s in vlm.load_samples(world, "pretrain", dataclasses.replace(cfg, region_per_image=1)) if s.box]
    assert len({s.base for s in one}) == len(one) == len({s.base for s in regions})
    assert one == [s for s in vlm.load_samples(world, "pretrain", dataclasses.replace(cfg, region_per_image=1)) if s.box]


def test_a_region_question_without_a_boxed_image_is_refused(world):
    from rtrt.trainer.coda import read_tasks, task_file

    rec = read_tasks(task_file(world / "CODA-LM" / "pretrain" / "vqa_anno", "region_perception"))[0]
    plain = rec.__class__(rec.question_id, "pretrain/images/000000.jpg", rec.question, rec.answer)
    with pytest.raises(ValueError, match="does not show a boxed image"):
        vlm.region_sources(world / "CODA-LM" / "pretrain", [plain])
    stale = rec.__class__(rec.question_id, rec.image, rec.question, "Something else.")
    with pytest.raises(ValueError, match="stale task file"):
        vlm.region_sources(world / "CODA-LM" / "pretrain", [stale])


def test_boxed_images_take_their_base_images_scene_labels(world):
    cfg = vlm.VLMConfig(**{**TINY_VLM, "tasks": BOTH, "region_per_image": 0})
    samples = vlm.load_samples(world, "pretrain", cfg)
    index = {p: i for i, p in enumerate(sorted({s.image for s in samples}))}
    labels = vlm._scene_labels(world, index, 96, 16, {s.image: s.base for s in samples if s.base})
    plain = vlm._scene_labels(world, {s.base: 0 for s in samples[-1:]}, 96, 16)
    for s in samples:
        if s.base:
            assert torch.equal(labels[index[s.image]], labels[index[s.base]])
    assert torch.equal(labels[index[samples[-1].image]], plain[0]) and (plain > 0).any()


def test_projector_box_unit_and_pseudo_image_mark_the_box_with_the_red_box_embedding():
    from rtrt.trainer.coda import CATEGORIES

    tok = tokenizer.train_tokenizer(["The object in the red box is a dog."] * 5, vocab_size=300)
    torch.manual_seed(0)
    cfg = vlm.VLMConfig(**TINY_VLM)
    model, _ = vlm.build_vlm(tok, cfg)
    emb = model.get_input_embeddings().weight
    marker = emb[tok(" red box", add_special_tokens=False).input_ids].mean(0)
    head, box_head = torch.nn.Linear(cfg.vision_hidden, 1 + len(CATEGORIES)), torch.nn.Linear(cfg.vision_hidden, 1)
    vlm._init_projector_from_head(model, head, tok, gain=0.5, logit=4.0, box_head=box_head, box_logit=2.0)
    proj, k = model.model.multi_modal_projector, 1 + len(CATEGORIES)
    assert torch.equal(proj.linear_1.weight[k], box_head.weight[0]) and proj.linear_1.bias[k] == box_head.bias[0]
    assert torch.allclose(proj.linear_2.weight[:, k], 0.25 * marker)
    # Stage 0b: a slot inside the box is its name's slot plus gain * the marker; outside, unchanged.
    table, dog = vlm._name_table(tok), 1 + CATEGORIES.index("dog")
    labels, inside = torch.tensor([[0, dog, dog, 0]]), torch.tensor([[False, True, False, True]])
    with torch.no_grad():
        plain = vlm._pseudo_image(model, table, labels, 0.5, 0.0, torch.Generator().manual_seed(0))
        marked = vlm._pseudo_image(model, table, labels, 0.5, 0.0, torch.Generator().manual_seed(0),
                                   marks=(vlm._marker_ids(tok), inside))
    assert torch.equal(marked[0, [0, 2]], plain[0, [0, 2]])
    assert torch.allclose(marked[0, [1, 3]] - plain[0, [1, 3]], (0.5 * marker).expand(2, -1), atol=1e-6)
    # A box unit at the typical logit arrives as the pseudo-image's marker (the other units silent).
    with torch.no_grad():
        proj.linear_1.weight.zero_()
        proj.linear_1.bias.zero_()
        proj.linear_1.bias[k] = 2.0
        out = proj(torch.zeros(1, cfg.vision_hidden))[0]
    assert torch.allclose(out, torch.nn.functional.gelu(torch.tensor(2.0)) / 2.0 * 0.5 * marker, atol=1e-6)


def test_region_vlm_end_to_end_through_rtrt_eval(world, tmp_path):
    from fixtures.tiny_bundle import make_tiny_bundle
    from rtrt.runtime.bundle import VLMSpec
    from rtrt.runtime.pipeline import Pipeline
    from rtrt.runtime.vlm import load_vlm
    from rtrt.tools.eval import run_eval
    from rtrt.trainer.coda import read_tasks

    cfg = vlm.VLMConfig(**{**TINY_VLM, "tasks": BOTH, "pseudo_regions": 1.0, "pseudo_answers": "drawn"})
    report = vlm.pretrain_vlm(world, tmp_path / "vlm", cfg, progress=False)
    assert report["region_samples"] > 0 and report["images"] == 8 + report["region_samples"]
    assert report["pseudo_region_samples"] > 0  # stage 0b's extra rare-box questions ran
    assert len(report["stage1_epoch_losses"]) == cfg.tag_epochs and report["epoch_losses"]
    fam = load_vlm(tmp_path / "vlm")
    bundle = make_tiny_bundle(tmp_path / "bundle", d_llm=fam.hidden_size,
                              vlm=VLMSpec("llava", str(tmp_path / "vlm"), fam.hidden_size, fam.image_token_layout()))
    pipe = Pipeline.from_bundle(bundle, backend="torch", max_new_tokens=12)
    res = run_eval(bundle, world, "region", tmp_path / "eval", limit=4, batch_size=2, pipeline=pipe, progress=False)
    groups = res["rows"]["both"]["groups"]
    assert {"vehicle", "vru", "traffic_cone", "barrier", "miscellaneous", "all"} <= set(groups)
    # Each region question's reference holds at least its own category.
    assert groups["all"]["support"] >= 4 and 0 <= (groups["all"]["f1"] or 0) <= 100
    answers = [json.loads(line) for line in (tmp_path / "eval" / "both" / "region_perception_answer.jsonl").read_text().splitlines()]
    assert len(answers) == 4
    # Hints from the box (the default): one class each, the box's on the frame without the box.
    from rtrt.runtime.detection import region_detection
    from rtrt.runtime.image import load_image
    from rtrt.trainer.coda import iter_annotations, region_frame

    assert res["region_hints"] == "box"
    # Hint quality per region question: precision over the hinted boxes, recall over the boxes holding a class.
    cats = [r.category_name for _, a in iter_annotations(world / "CODA-LM" / "test") for r in a.region_perception][:4]
    hinted = [a["hints"] for a in answers]
    tp = sum(h == [c] for h, c in zip(hinted, cats))
    q = res["rows"]["both"]["hints"]
    assert q["per_image"] == sum(map(len, hinted)) / 4
    assert q["precision"] == (100.0 * tp / sum(map(len, hinted)) if any(hinted) else None)
    known = sum(c in pipe.class_names for c in cats)
    assert q["recall"] == (100.0 * tp / known if known else None)
    boxes = [r.box for _, a in iter_annotations(world / "CODA-LM" / "test") for r in a.region_perception]
    cfg = pipe.detector_cfg
    for a, (x, y, w, h) in zip(answers, boxes):
        frame = load_image(world / region_frame(a["image"]))
        sim = pipe.detect(frame).similarity
        want = region_detection(sim, (x, y, x + w, y + h), frame.size, pipe.class_names,
                                cfg.decision_scores if cfg.calibrated else None)
        assert a["hints"] == [want.name]
    # "image": the boxed image's own detections, as a general question's.
    res2 = run_eval(bundle, world, "region", tmp_path / "eval2", limit=4, batch_size=2, pipeline=pipe, progress=False,
                    region_hints="image")
    assert res2["region_hints"] == "image" and "hints" not in res2["rows"]["both"]
    for line in (tmp_path / "eval2" / "both" / "region_perception_answer.jsonl").read_text().splitlines():
        a = json.loads(line)
        assert a["hints"] == [d["name"] for d in a["detections"]] == [d.name for d in pipe.detect(world / a["image"]).detections]
    # Phase 2's task files in the same style (build.py: --task region_perception).
    general, region = vlm.write_short_tasks(world / "CODA-LM" / "plugin" / "vqa_anno", tmp_path / "tasks", BOTH)
    recs = read_tasks(region)
    assert recs and all(r.answer.startswith(vlm.REGION_PREFIX) for r in recs) and general.name == "general_perception.jsonl"
    # images=N counts a boxed image as its base image: every region question of the first N images stays.
    from rtrt.trainer.coda import region_frame

    first = [r.image for r in read_tasks(general)][:2]  # the general file lists every image once, in CODA-LM's order
    _, part = vlm.write_short_tasks(world / "CODA-LM" / "plugin" / "vqa_anno", tmp_path / "part", BOTH, images=2)
    assert read_tasks(part) == [r for r in recs if region_frame(r.image) in first] and len(read_tasks(part)) > 2


def test_pseudo_regions_box_a_rare_object_in_view_and_name_it(world):
    from transformers import CLIPImageProcessor

    from rtrt.trainer.coda import CATEGORIES, REGION_QUESTION
    from rtrt.tools.demo.world import RARE_CATEGORIES
    from rtrt.tools.judge import find_mentions

    cfg = vlm.VLMConfig(**{**TINY_VLM, "tasks": BOTH, "pseudo_regions": 1.0, "region_hint_prob": 0.5})
    samples = vlm.load_samples(world, "pretrain", cfg)
    index = {rel: i for i, rel in enumerate(sorted({s.image for s in samples}))}
    labels = vlm._scene_labels(world, index, cfg.image_size, cfg.patch_size, {s.image: s.base for s in samples if s.base})
    size = cfg.image_size
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    extra, ex_labels, ex_boxes = vlm.pseudo_region_samples(world, samples, index, labels, proc, cfg)
    bases = {s.image for s in samples if s.box is None}
    scenes = dict(vlm._scenes(world, "pretrain", bases))
    grid = size // cfg.patch_size
    in_view = 0
    for rel, scene in scenes.items():  # share 1: every image with a rare object on a patch of its box gets one
        lab = labels[index[rel]].flatten()
        in_view += any(o.category in RARE_CATEGORIES and bool((lab == 1 + CATEGORIES.index(o.category)).any())
                       for o in scene.objects)
    assert 0 < len(extra) <= in_view and len(extra) == len(ex_labels) == len(ex_boxes)
    assert len({s.image for s in extra}) == len(extra)  # one per image
    hinted = 0
    for s, lab, box in zip(extra, ex_labels, ex_boxes):
        (cat,) = find_mentions(s.answer)
        assert cat in RARE_CATEGORIES and s.answer == vlm.region_short_answer(cat) and s.question == REGION_QUESTION
        assert s.base == s.image and torch.equal(lab, labels[index[s.image]])  # its image's labels, in a row of its own
        assert any(o.category == cat and tuple(o.box) == s.box for o in scenes[s.image].objects)
        assert bool((lab.flatten()[box.flatten() > 0] == 1 + CATEGORIES.index(cat)).any())  # in view inside its box
        assert set(s.hint) <= set(RARE_CATEGORIES)
        hinted += bool(s.hint)
    assert 0 < hinted < len(extra)
    again = vlm.pseudo_region_samples(world, samples, index, labels, proc, cfg)
    assert [(s.image, s.box, s.hint) for s in again[0]] == [(s.image, s.box, s.hint) for s in extra]
    none = vlm.pseudo_region_samples(world, samples, index, labels, proc, dataclasses.replace(cfg, pseudo_regions=0.0))
    assert none[0] == [] and none[1].shape == (0, grid, grid)
    with pytest.raises(ValueError, match="pseudo_regions"):
        vlm.VLMConfig(**{**TINY_VLM, "tasks": ("general_perception",), "pseudo_regions": 0.5})


def test_hidden_hints_blank_only_the_hinted_objects_and_keep_their_names(monkeypatch):
    from rtrt.trainer.coda import CATEGORIES

    cone, car, dog = (1 + CATEGORIES.index(c) for c in ("traffic_cone", "car", "dog"))
    labels = torch.tensor([[[cone, car], [dog, 0]], [[car, car], [0, 0]]])  # two images, 2 x 2 patches
    boxes = torch.zeros((2, 2, 2))
    samples = [vlm.Sample("a.png", "q", "", hint=["traffic_cone"]),  # hinted general sample on image 0
               vlm.Sample("b.png", "q", ""),  # no hint: keeps its row
               vlm.Sample("a.png", "q", "", hint=["dog"], box=(0.0, 0.0, 1.0, 1.0), base="a.png")]  # region: keeps its row
    rows, out, out_boxes = vlm.hide_hinted(samples, [0, 1, 0], labels, 1.0, seed=0, boxes=boxes)
    assert rows[1:] == [1, 0] and rows[0] == 2 and out.shape == (3, 2, 2) and out_boxes.shape == (3, 2, 2)
    assert out[2].tolist() == [[0, car], [dog, 0]]  # the hinted cone is background, the rest as drawn
    assert torch.equal(out[:2], labels)  # the shared rows are untouched
    # The drawn answer still names the hidden cone: only the hint can tell it now.
    monkeypatch.setattr(vlm, "_prompt_ids", lambda *a: [])
    monkeypatch.setattr(vlm, "_answer_ids", lambda tok, answer, cfg: answer)
    (_, answer), = vlm._drawn_seqs(samples[:1], rows[:1], out, None, None, vlm.VLMConfig(**TINY_VLM), {})
    assert answer == vlm.short_answer_of({"car", "dog", "traffic_cone"})
    none = vlm.hide_hinted(samples, [0, 1, 0], labels, 0.0, seed=0, boxes=boxes)
    assert none[0] == [0, 1, 0] and none[1] is labels
    some = [vlm.hide_hinted([samples[0]] * 200, [0] * 200, labels, 0.5, seed=s)[0] for s in (0, 0, 1)]
    assert some[0] == some[1] != some[2] and 60 < sum(r != 0 for r in some[0]) < 140  # seeded share
    with pytest.raises(ValueError, match="pseudo_hint_hide"):
        vlm.VLMConfig(**{**TINY_VLM, "pseudo_hint_hide": 1.5})


def test_pretrain_with_hidden_hints_runs_stage_0b(world, tmp_path):
    cfg = vlm.VLMConfig(**{**TINY_VLM, "hint_prob": 1.0, "pseudo_hint_hide": 1.0, "pseudo_answers": "drawn"})
    report = vlm.pretrain_vlm(world, tmp_path / "vlm", cfg, progress=False)
    assert len(report["stage0b_epoch_losses"]) == cfg.pseudo_epochs and report["config"]["pseudo_hint_hide"] == 1.0
    # The hidden rows reached stage 0b: the same build without them trains on other pseudo-images.
    shown = vlm.pretrain_vlm(world, tmp_path / "shown", dataclasses.replace(cfg, pseudo_hint_hide=0.0), progress=False)
    assert shown["stage0_epoch_losses"] == report["stage0_epoch_losses"]  # stage 0 does not read it
    assert shown["stage0b_epoch_losses"] != report["stage0b_epoch_losses"]
