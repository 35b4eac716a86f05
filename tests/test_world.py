"""The procedural world: determinism, CODA-LM round trip, naming statistics, atomic output, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rtrt.tools.demo import world
from rtrt.tools.judge import find_mentions
from rtrt.tools.demo.world import RARE_CATEGORIES, WORLD_CATEGORIES, WorldConfig, generate_world
from rtrt.trainer import coda

SMALL = dict(pretrain=4, plugin=3, val=2, test=2, width=96, height=80)
# The world's defaults before the demo's last rebuild (rare_prob 0.7, at most 5 common objects, each kind's own range, narrow cyclists)
BEFORE_KNOBS = dict(rare_prob=0.7, max_common=5, max_distance=0.0, cyclist_width=0.7)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    generate_world(WorldConfig(seed=3, **SMALL), out, progress=False)
    return out


def test_same_seed_same_bytes_different_seed_differs(small_world, tmp_path):
    again = tmp_path / "again"
    generate_world(WorldConfig(seed=3, **SMALL), again, progress=False, workers=2)  # workers do not change bytes
    a, b = _tree(small_world), _tree(again)
    assert a == b and len(a) > 30
    other = tmp_path / "other"
    generate_world(WorldConfig(seed=4, **SMALL), other, progress=False)
    c = _tree(other)
    assert set(c) >= {"val/images/000000.jpg"}
    assert c["val/images/000000.jpg"] != a["val/images/000000.jpg"]
    assert c["CODA-LM/val/val_000000.json"] != a["CODA-LM/val/val_000000.json"]


def test_image_depends_only_on_seed_split_and_index(small_world, tmp_path):
    out = tmp_path / "bigger"
    generate_world(WorldConfig(seed=3, **{**SMALL, "pretrain": 1, "val": 3}), out, progress=False)
    for rel in ("val/images/000001.jpg", "CODA-LM/val/val_000001.json", "test/images/000000.jpg"):
        assert (out / rel).read_bytes() == (small_world / rel).read_bytes()


def test_test_split_alone_is_byte_identical(small_world, tmp_path):
    # The README's ablation command regenerates only the demo build's test split this way.
    out = tmp_path / "test_only"
    generate_world(WorldConfig(seed=3, **{**SMALL, "pretrain": 0, "plugin": 0, "val": 0}), out, progress=False)
    alone = {k: v for k, v in _tree(out).items() if "test" in Path(k).parts}
    full = {k: v for k, v in _tree(small_world).items() if "test" in Path(k).parts}
    assert alone == full and len(full) >= 4


def test_layout_and_coda_round_trip(small_world):
    meta = json.loads((small_world / "world.json").read_text())
    assert meta["config"]["seed"] == 3 and meta["images"] == {"pretrain": 4, "plugin": 3, "val": 2, "test": 2}
    for split, n in meta["images"].items():
        anns = list(coda.iter_annotations(small_world / "CODA-LM" / split, image_size=(96, 80)))
        assert [p.name for p, _ in anns] == [f"{split}_{i:06d}.json" for i in range(n)]
        vqa = small_world / "CODA-LM" / split / "vqa_anno"
        general = coda.read_tasks(coda.task_file(vqa, "general_perception"))
        suggestion = coda.read_tasks(coda.task_file(vqa, "driving_suggestion"))
        region = coda.read_tasks(coda.task_file(vqa, "region_perception"))
        assert [r.question_id for r in general] == list(range(n)) == [r.question_id for r in suggestion]
        assert [r.question_id for r in region] == list(range(len(region)))
        assert len(region) == len(coda.region_category_names(a for _, a in anns)) == meta["questions"][split]["region_perception"]
        for (path, ann), g, s in zip(anns, general, suggestion):
            assert g.image == s.image == coda.image_path_for(path.name) == f"{split}/images/{path.stem.split('_')[1]}.jpg"
            assert g.question == coda.GENERAL_QUESTION and s.question == coda.SUGGESTION_QUESTION
            assert g.answer == ann.general_summary and s.answer == ann.driving_suggestion
            with Image.open(small_world / g.image) as im:
                assert im.size == (96, 80) and im.mode == "RGB"
        regions = [r for _, a in anns for r in a.region_perception]
        for rec, reg in zip(region, regions):
            assert rec.question == coda.REGION_QUESTION and rec.answer == reg.description_and_explanation
            assert "images_w_boxes" in rec.image and (small_world / rec.image).is_file()
    assert not list(small_world.parent.glob(".world.*"))  # no temporary folder left


def test_world_categories_are_coda_categories_in_the_right_general_key():
    assert set(WORLD_CATEGORIES) <= set(coda.CATEGORIES) and len(RARE_CATEGORIES) >= 12
    cfg = WorldConfig(width=224, height=224, rare_prob=1.0)
    seen = set()
    for i in range(40):
        rng = np.random.default_rng([0, 9, i])
        scene = world.sample_scene(cfg, rng)
        ann = world.scene_annotation(scene)
        named = {o.category for o in scene.objects}
        seen |= named
        # Every text names exactly the objects it should, so the keyword judge's references are exact.
        assert find_mentions(ann.general_summary) == named
        assert find_mentions(ann.driving_suggestion) <= named
        for key, items in ann.general_perception.items():
            for it in items:
                (cat,) = find_mentions(it.description + " " + it.explanation)
                assert coda.GENERAL_KEY_OF_GROUP[coda.category_group(cat)] == key
        for r in ann.region_perception:
            assert find_mentions(r.description_and_explanation) == {r.category_name}
            x, y, w, h = r.box
            assert w >= 1 and h >= 1 and x + w <= 224 and y + h <= 224
        # Perspective: along the road, farther objects sit higher and are smaller.
        road = sorted((o for o in scene.objects if o.zone != "pole"), key=lambda o: o.z)
        for a, b in zip(road, road[1:]):
            assert a.ground_y >= b.ground_y and a.ppm >= b.ppm
    assert len(seen) >= 15


def test_pretrain_rarely_names_rare_objects_plugin_always(tmp_path):
    cfg = WorldConfig(seed=1, pretrain=80, plugin=30, val=0, test=0, width=64, height=64, rare_prob=1.0, boxed_images=False)
    s = generate_world(cfg, tmp_path / "w", progress=False)
    rare = set(RARE_CATEGORIES)

    def count(table, split, which):
        return sum(n for c, n in table[split].items() if (c in rare) == which)

    drawn, named = count(s.objects, "pretrain", True), count(s.named, "pretrain", True)
    assert drawn > 80 and 0 < named / drawn < 0.25
    assert count(s.named, "pretrain", False) == count(s.objects, "pretrain", False) > 0  # common: always named
    assert s.named["plugin"] == s.objects["plugin"]
    assert not (tmp_path / "w" / "pretrain" / "images_w_boxes").exists()
    region = coda.read_tasks(tmp_path / "w/CODA-LM/pretrain/vqa_anno/region_perception.jsonl")
    assert all(r.image.startswith("pretrain/images/") for r in region)


def test_existing_output_is_refused_or_replaced(small_world, tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_world(WorldConfig(**SMALL), out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    generate_world(WorldConfig(seed=3, **SMALL), out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and _tree(out) == _tree(small_world)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = world.render_scene

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(world, "render_scene", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        generate_world(WorldConfig(**SMALL), tmp_path / "w", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(width=8), "minimum"),
        (dict(pretrain=-1), "pretrain must be >= 0"),
        (dict(name_prob=1.5), "name_prob must be in [0, 1]"),
        (dict(image_format="gif"), "image_format"),
        (dict(rare_categories=("unicorn",)), "rare_categories"),
        (dict(rare_scale=0.0), "rare_scale must be in [0.25, 4]"),
        (dict(object_scale=5.0), "object_scale must be in [0.25, 4]"),
        (dict(max_distance=10.0), "from 12 .the farthest near limit, traffic lights.. to 200 m, got 10.0"),
        (dict(max_distance=-1.0), "to 200 m, got -1.0"),
        (dict(cyclist_width=0.3), "cyclist_width must be in [0.5, 2] m, got 0.3"),
    ],
)
def test_config_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        WorldConfig(**kwargs)


def test_rare_scale_enlarges_rare_objects_and_object_scale_every_object():
    # Every drawn box is the object's physical size times pixels per metre: rare ones times rare_scale, all times object_scale.
    seen = {"rare": 0, "common": 0}
    for scale, every in ((1.0, 1.0), (1.8, 1.0), (1.0, 1.5), (1.3, 1.4)):
        cfg = WorldConfig(rare_scale=scale, object_scale=every, rare_prob=1.0, cyclist_width=0.7)  # 0.7: the spec's cyclist width
        for i in range(30):
            for o in world.sample_scene(cfg, np.random.default_rng([0, 9, i])).objects:
                w_m, h_m = world._SPEC[o.category][:2]
                k = (scale if o.category in RARE_CATEGORIES else 1.0) * every
                x0, y0, x1, y1 = o.fbox
                assert (x1 - x0) / o.ppm == pytest.approx(w_m * k) and (y1 - y0) / o.ppm == pytest.approx(h_m * k)
                seen["rare" if o.category in RARE_CATEGORIES else "common"] += 1
    assert min(seen.values()) > 20


def test_max_distance_caps_every_placement_and_only_those_beyond_it():
    # Rare kinds reach at most 30 m on their own, so a 30-m cap leaves them alone and pulls common ones in.
    far = {"capped": 0, "default": 0}
    for cap in (0.0, 30.0):
        cfg = WorldConfig(max_distance=cap, rare_prob=1.0)
        for i in range(60):
            for o in world.sample_scene(cfg, np.random.default_rng([0, 9, i])).objects:
                if o.category not in world._ROWS:  # a row's later members stand behind its first
                    assert o.z <= (cap or world._SPEC[o.category][5][1]) + 1e-9
                    far["capped" if cap else "default"] += o.z > 30.0
    assert far["default"] > 20 and far["capped"] == 0
    assert max(spec[5][1] for c, spec in world._SPEC.items() if c in RARE_CATEGORIES) <= 30.0


def test_cyclist_width_widens_cyclists_only():
    # The same draws with a side-on cyclist: its box is cyclist_width x object_scale wide, every other box unchanged.
    # On the world's earlier defaults: with today's (up to 9 common objects) a cyclist's width also moves other draws in some scenes.
    seen = 0
    for i in range(60):
        rng_args = [0, 9, i]
        narrow = world.sample_scene(WorldConfig(**BEFORE_KNOBS), np.random.default_rng(rng_args)).objects
        wide = world.sample_scene(WorldConfig(**{**BEFORE_KNOBS, "cyclist_width": 1.7}), np.random.default_rng(rng_args)).objects
        for o in wide:
            x0, _, x1, _ = o.fbox
            w_m = 1.7 if o.category == "cyclist" else world._SPEC[o.category][0]
            assert (x1 - x0) / o.ppm == pytest.approx(w_m * 1.6)
            seen += o.category == "cyclist"
        if not any(o.category == "cyclist" for o in narrow + wide):
            assert [(o.category, o.fbox) for o in narrow] == [(o.category, o.fbox) for o in wide]
    assert seen >= 3


def test_scale_one_is_todays_world(tmp_path):
    # At object_scale 1.0 the world draws what it drew before the knobs existed: these boxes (seed 0, test images 1
    # and 2 of the demo world before issue 14) were taken from the code without the knobs.
    before = {
        1: [("pedestrian", (163, 201, 8, 23)), ("pedestrian", (116, 199, 14, 41)), ("carton", (302, 234, 16, 12)),
            ("cat", (6, 285, 36, 23))],
        2: [("traffic_light", (155, 143, 5, 11)), ("car", (173, 169, 19, 16)), ("bus", (112, 142, 44, 54)),
            ("dustbin", (29, 177, 14, 24)), ("pedestrian", (14, 164, 13, 39)), ("cat", (161, 210, 18, 12)),
            ("stroller", (280, 187, 27, 44))],
    }
    for i, want in before.items():
        scene = world.sample_scene(WorldConfig(object_scale=1.0, **BEFORE_KNOBS), np.random.default_rng([0, world.SPLITS["test"], i]))
        assert [(o.category, o.box) for o in scene.objects] == want
    big = tmp_path / "big"
    generate_world(WorldConfig(seed=3, rare_scale=2.0, **SMALL), big, progress=False)
    assert json.loads((big / "world.json").read_text())["config"]["rare_scale"] == 2.0
    for i, want in before.items():  # rare_scale 1 is the default too
        scene = world.sample_scene(WorldConfig(rare_scale=1.0, object_scale=1.0, **BEFORE_KNOBS), np.random.default_rng([0, world.SPLITS["test"], i]))
        assert [(o.category, o.box) for o in scene.objects] == want


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--seed", "5", "--pretrain", "2", "--plugin", "1", "--val", "1", "--test", "0",
            "--size", "64x48", "--format", "png", "--rare", "dog", "tire", "--rare-scale", "1.5", "--object-scale", "1.25", "--max-distance", "25", "--cyclist-width", "1.5", "--quiet"]
    assert world.main(argv) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    cfg = json.loads((out / "world.json").read_text())["config"]
    assert (cfg["width"], cfg["height"], cfg["image_format"], cfg["rare_categories"], cfg["rare_scale"], cfg["object_scale"],
            cfg["max_distance"], cfg["cyclist_width"]) == (64, 48, "png", ["dog", "tire"], 1.5, 1.25, 25.0, 1.5)
    assert (out / "plugin/images/000000.png").is_file()
    assert world.main(argv) == 2  # exists: refused
    assert "exists and is not empty" in capsys.readouterr().err
    assert world.main(["--out", str(tmp_path / "x"), "--size", "10", "--quiet"]) == 2
    with pytest.raises(SystemExit):
        world.parse_args(["--out", "x", "--rare", "unicorn"])
