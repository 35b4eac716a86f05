"""``rtrt analyze attention`` (issue 14, item 6): on a tiny world, a tiny LLaVA and a tiny bundle, and on constructed cases."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from rtrt.runtime.errors import InputError
from rtrt.tools import analyze
from rtrt.tools.cli import COMMANDS
from rtrt.trainer.coda import iter_annotations
from fixtures.tiny_bundle import tiny_world_and_llava_bundle


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    world, _, bundle = tiny_world_and_llava_bundle(root)
    return root, world, bundle


@pytest.fixture(scope="module")
def pipe(setup):
    from rtrt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(setup[2], backend="torch", vlm_backend="torch")


def test_registered_as_a_command():
    assert COMMANDS["analyze"][0] == "rtrt.tools.analyze"


def test_end_to_end_writes_json_table_and_plot(setup):
    root, world, bundle = setup
    out = root / "out"
    # Reference answers name every annotated object, so a random tiny VLM still has name tokens to read.
    assert analyze.main(["attention", "--bundle", str(bundle), "--data", str(world), "--out", str(out),
                         "--answers", "reference", "--max-new-tokens", "400", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(analyze.FILES)
    res = json.loads((out / "attention.json").read_text())
    assert res["images"] == 3 and res["vlm"] == {"family": "llava", "layers": 2, "heads": 4, "grid": 4}
    assert res["objects_from"] == "scene" and res["middle_layers"] == [0, 1]
    for e in res["per_image"]:
        assert sum(e["patches"].values()) == 16
        # The same reference tokens are read under both conditions.
        assert e["baseline"]["answer"] == e["refined"]["answer"] and e["baseline"]["names"] == e["refined"]["names"]
    for cond in analyze.CONDITIONS:
        c = res["conditions"][cond]
        assert c["name_tokens"] > 0 and len(c["layers"]) == len(c["rare_name_layers"]) == 2
        assert c["rare_name_layers"][0]["queries"]["background"] == c["rare_name_tokens"] <= c["name_tokens"]
        for layer in c["layers"]:
            assert sum(layer["share"].values()) == pytest.approx(1.0, abs=1e-5)
            assert all(v is None or v >= 0 for v in layer["relative"].values())
            assert layer["queries"]["background"] == c["name_tokens"]  # every tiny image has background patches
    baseline, refined = (res["conditions"][c]["layers"][1]["share"] for c in analyze.CONDITIONS)
    assert baseline != refined  # the tiny adapter (gate 0.5) changes what the names see
    table = (out / "attention.md").read_text()
    rare_table = res["conditions"]["baseline"]["rare_name_tokens"] > 0
    assert ("Only the tokens naming a rare class" in table) == rare_table
    assert table.count("\n| 0 |") == table.count("\n| 1 |") == 2 + rare_table and "| middle (0-1) |" in table
    with Image.open(out / "attention.png") as png:
        assert png.format == "PNG" and png.size == (820, 460)


def test_shares_per_query_token_sum_to_one_and_refinement_changes_them(setup, pipe):
    root, world, _ = setup
    vlm = pipe.vlm
    image = Image.open(world / "test" / "images" / "000000.jpg").convert("RGB")
    ids = vlm.processor.tokenizer("a car, traffic cones and the ego car", add_special_tokens=False)["input_ids"]
    decode = lambda x: vlm.processor.tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    queries = analyze.name_queries(ids, decode)
    assert {c for _, c in queries} == {"car", "traffic_cone"}
    codes = np.array([analyze.RARE] * 3 + [analyze.COMMON] * 4 + [analyze.BACKGROUND] * 9)
    W = torch.from_numpy(pipe.W)

    def refine(v):
        return torch.as_tensor(pipe.backend.refine(v[None], W))[0]

    with analyze.eager_attention(vlm.model), torch.inference_mode():
        base = analyze.image_attention(vlm, image, "Describe the scene", codes, answer_ids=ids)
        ref = analyze.image_attention(vlm, image, "Describe the scene", codes, answer_ids=ids, transform=refine)
        pred = analyze.image_attention(vlm, image, "Describe the scene", codes, answer_ids=ids, query="predict")
        generated = analyze.image_attention(vlm, image, "Describe the scene", codes, max_new_tokens=5)
    assert vlm.model.config._attn_implementation != "eager"  # restored
    for it in (base, ref, pred):
        assert it.shares.shape == (2, len(queries), 4) and it.names == [c for _, c in queries]
        np.testing.assert_allclose(it.shares.sum(-1), 1.0, atol=1e-5)
        assert (it.shares >= 0).all()
    np.testing.assert_allclose(base.fractions, [3 / 16, 4 / 16, 9 / 16])
    assert not np.allclose(base.shares, ref.shares)
    assert not np.allclose(base.shares, pred.shares)
    assert generated.shares.shape == (2, len(generated.names), 4)


def test_shares_and_relative_to_uniform_on_a_constructed_case():
    # Sequence of 8 positions; the image's 4 patch tokens sit at positions 2..5: rare, common, background, background.
    rows = np.array([[[0.1, 0.1, 0.2, 0.1, 0.3, 0.1, 0.1, 0.0],
                      [0.0, 0.5, 0.0, 0.3, 0.1, 0.0, 0.05, 0.05]]])  # [1 layer, 2 queries, 8]
    codes = np.array([analyze.RARE, analyze.COMMON, analyze.BACKGROUND, analyze.BACKGROUND])
    shares = analyze.group_shares(rows, [2, 3, 4, 5], codes)
    np.testing.assert_allclose(shares, [[[0.2, 0.1, 0.4, 0.3], [0.0, 0.3, 0.1, 0.6]]])
    one = analyze.ImageAttention("a", ["car", "car"], shares, np.array([0.25, 0.25, 0.5]))
    # A second image without rare patches: its token counts for the shares, not for rare's relative value.
    other = analyze.ImageAttention("b", ["dog"], np.array([[[0.0, 0.2, 0.2, 0.6]]]), np.array([0.0, 0.5, 0.5]))
    (layer,) = analyze.aggregate([one, other], 1)
    assert layer["relative"]["rare"] == pytest.approx((0.2 / 0.25 + 0.0) / 2)
    assert layer["relative"]["common"] == pytest.approx((0.1 / 0.25 + 0.3 / 0.25 + 0.2 / 0.5) / 3)
    assert layer["relative"]["background"] == pytest.approx((0.4 / 0.5 + 0.1 / 0.5 + 0.2 / 0.5) / 3)
    assert layer["share"] == pytest.approx({"rare": 0.2 / 3, "common": 0.2, "background": 0.7 / 3, "text": 0.5})
    assert layer["queries"] == {"rare": 2, "common": 3, "background": 3}
    (dog,) = analyze.aggregate([one, other], 1, lambda n: n == "dog")  # only the tokens naming a dog
    assert dog["relative"] == pytest.approx({"rare": None, "common": 0.4, "background": 0.4})
    assert dog["queries"] == {"rare": 0, "common": 1, "background": 1} and dog["share"]["text"] == pytest.approx(0.6)
    with pytest.raises(InputError):
        analyze.group_shares(rows, [2, 3, 4], codes)
    assert analyze.middle_layers(2) == [0, 1] and analyze.middle_layers(32) == list(range(8, 24))


def test_object_names_map_to_their_tokens():
    text = "Objects that influence the ego car: car, Traffic-cones and a garbage bag."
    assert analyze.object_name_spans(text) == [(36, 39, "car"), (41, 54, "traffic_cone"), (61, 72, "garbage_bag")]
    pieces = ["Objects", " that", " influence", " the", " ego", " car", ":", " car", ",", " Traffic", "-", "cones",
              " and", " a", " garbage", " bag", ".", "</s>"]
    decode = lambda ids: "".join(pieces[i] for i in ids if pieces[i] != "</s>")  # noqa: E731
    ids = list(range(len(pieces)))
    assert analyze.token_spans(ids, decode)[5] == (30, 34) and analyze.token_spans(ids, decode)[-1] == (73, 73)
    assert analyze.name_queries(ids, decode) == [(7, "car"), (9, "traffic_cone"), (10, "traffic_cone"), (11, "traffic_cone"),
                                                 (14, "garbage_bag"), (15, "garbage_bag")]


def test_patch_groups_rare_wins_where_boxes_meet():
    proc = CLIPImageProcessor(size={"shortest_edge": 100}, crop_size={"height": 100, "width": 100})
    objects = [("car", (0, 0, 50, 25)), ("traffic_cone", (30, 0, 10, 10)), ("dog", (75, 75, 25, 25))]
    codes = analyze.patch_groups(objects, {"traffic_cone"}, (100, 100), 4, proc)
    R, C, B = analyze.RARE, analyze.COMMON, analyze.BACKGROUND
    assert codes.tolist() == [C, R, B, B, B, B, B, B, B, B, B, B, B, B, B, C]


def test_world_objects_recovers_every_drawn_object_or_falls_back(setup, tmp_path):
    _, world, _ = setup
    found = list(iter_annotations(world / "CODA-LM" / "test"))
    paths, anns = [p for p, _ in found], [a for _, a in found]
    objects, source = analyze.world_objects(world, "test", paths, anns)
    assert source == "scene"
    regions = [[(r.category_name, tuple(r.box)) for r in a.region_perception] for a in anns]
    assert all(set(r) <= set(o) for r, o in zip(regions, objects))
    assert sum(map(len, objects)) >= sum(map(len, regions))
    assert analyze.world_objects(tmp_path, "test", paths, anns) == (regions, "annotations")  # no world.json
    meta = json.loads((world / "world.json").read_text())
    meta["config"]["seed"] += 1  # another world's scenes do not hold these regions
    (tmp_path / "world.json").write_text(json.dumps(meta))
    assert analyze.world_objects(tmp_path, "test", paths, anns) == (regions, "annotations")


def test_bad_arguments_are_one_line_errors(setup, tmp_path):
    _, world, bundle = setup
    with pytest.raises(InputError, match="--limit"):
        analyze.main(["attention", "--bundle", str(bundle), "--data", str(world), "--out", str(tmp_path), "--limit", "0"])
    with pytest.raises(InputError, match="no CODA-LM split 'nope'"):
        analyze.main(["attention", "--bundle", str(bundle), "--data", str(world), "--out", str(tmp_path / "o"),
                      "--split", "nope", "--quiet"])
    assert not (tmp_path / "o").exists()
