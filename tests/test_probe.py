"""The demo probes (issue 14, item 7) end to end on a tiny world, a tiny bundle and a tiny LLaVA."""
from __future__ import annotations

import json

import pytest
from transformers import CLIPImageProcessor

from rtrt.tools.demo import probe
from rtrt.tools.demo.world import COMMON_CATEGORIES
from fixtures.tiny_bundle import tiny_world_and_llava_bundle


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    _, _, bundle = tiny_world_and_llava_bundle(root)
    return root, bundle


def _share(v):
    return v is None or 0.0 <= v <= 1.0


def test_probe_end_to_end(setup, capsys):
    root, bundle = setup
    out = root / "probe.json"
    assert probe.main(["--bundle", str(bundle), "--data", str(root / "world"), "--backend", "torch", "--limit", "3",
                       "--max-new-tokens", "6", "--batch-size", "2", "--json", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["images"] == 3 and res["split"] == "test"
    assert 1 <= res["baseline"]["distinct_answers"] <= res["baseline"]["answers"] == 3
    assert set(res["common"]) == set(COMMON_CATEGORIES)
    for e in res["common"].values():
        assert e["present"] + e["absent"] == 3
        assert _share(e["named_when_present"]) and _share(e["named_when_absent"])
        assert (e["difference"] is None) == (e["present"] == 0 or e["absent"] == 0)
        if e["difference"] is not None:
            assert e["difference"] == pytest.approx(e["named_when_present"] - e["named_when_absent"])
    o = res["oracle"]
    assert o["rare_objects"] > 0 and 0 <= o["named"] <= o["rare_objects"] and o["share"] == pytest.approx(o["named"] / o["rare_objects"])
    for k in ("name_added", "name_and_marker_added"):
        assert 0 <= o[f"named_with_{k}"] <= o["rare_objects"]
        assert o[f"share_with_{k}"] == pytest.approx(o[f"named_with_{k}"] / o["rare_objects"])
    assert 0 <= res["baseline"]["with_a_repeat"] <= 3
    e = res["hint_echo"]
    assert 1 <= e["answers"] <= 3 and 0 <= e["with_a_repeat"] <= e["answers"] and e["hinted"] >= e["answers"]
    assert e["hinted"] == sum(v["hinted"] for v in e["per_class"].values()) and 0 <= e["named"] <= e["hinted"]
    assert e["named"] == sum(v["named"] for v in e["per_class"].values())
    assert all(v["hinted"] > 0 and v["share"] == pytest.approx(v["named"] / v["hinted"]) for v in e["per_class"].values())
    a = res["adapter"]
    # The tiny bundle's gate is 0.5.
    assert a["tanh_gate"] == [pytest.approx(0.46211715726)]
    assert a["rare_patches"] > 0 and _share(a["attention_on_own_class"]) and a["chance"] == pytest.approx(1 / 8)
    d = res["detector"]
    assert len(d["auroc"]) == 8 and all(_share(v) for v in d["auroc"].values())
    known = [v for v in d["auroc"].values() if v is not None]
    assert (d["mean_auroc"] is None) == (not known)
    if known:
        assert d["mean_auroc"] == pytest.approx(sum(known) / len(known))
    r = res["region_oracle"]  # the tiny world writes region questions
    assert r["rare_boxes"] > 0 and 0 <= r["named"] <= r["rare_boxes"] and 0 <= r["named_with_name_embedding"] <= r["rare_boxes"]
    assert r["share"] == pytest.approx(r["named"] / r["rare_boxes"]) and r["rare_boxes"] <= 3
    for k in ("name_added", "name_and_marker_added"):
        assert 0 <= r[f"named_with_{k}"] <= r["rare_boxes"]
        assert r[f"share_with_{k}"] == pytest.approx(r[f"named_with_{k}"] / r["rare_boxes"])
    c = r["adapter_change_in_box"]
    assert c["relative_norm"] >= 0 and c["oracle_relative_norm"] > 0 and all(-1 - 1e-6 <= c[k] <= 1 + 1e-6 for k in ("cosine_with_name", "cosine_with_marker"))
    text = capsys.readouterr().out
    assert "distinct answers" in text and "detector AUROC" in text


def test_repeated_categories_by_hand():
    assert probe.repeated_categories("Objects that influence the ego car: car, cat, cat, garbage bag.") == ["cat"]
    assert probe.repeated_categories("Objects that influence the ego car: warning sign, warning sign, traffic light.") == ["warning_sign"]
    assert probe.repeated_categories("Objects that influence the ego car: car, traffic light, traffic cone.") == []
    assert probe.repeated_categories("Objects that influence the ego car: car, sedan, truck.") == ["car"]  # a synonym counts
    assert probe.repeated_categories("") == []


def test_auroc_by_hand():
    assert probe.auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert probe.auroc([0.1, 0.5, 0.5], [True, True, False]) == pytest.approx(0.25)  # one loss, one tie
    assert probe.auroc([0.3, 0.4], [True, True]) is None


def test_box_slots_follow_resize_and_centre_crop():
    # A 200 x 100 image: shortest edge to 100 (no change), centre crop 100 x 100 drops x < 50 and x >= 150.
    proc = CLIPImageProcessor(size={"shortest_edge": 100}, crop_size={"height": 100, "width": 100})
    assert probe.box_slots((50, 0, 25, 25), (200, 100), 4, proc) == [0]
    assert probe.box_slots((0, 0, 40, 40), (200, 100), 4, proc) == []  # cropped away
    assert probe.box_slots((140, 60, 30, 30), (200, 100), 4, proc) == [11, 15]
