"""CODA-LM data layer: group table, annotation and task-file round trips, one-line validation errors."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from rtrt.trainer import coda
from rtrt.trainer.coda import (
    CATEGORIES,
    EVAL_GROUPS,
    GENERAL_KEYS,
    CodaAnnotation,
    CodaFormatError,
    PerceptionItem,
    RegionItem,
    TaskRecord,
    category_group,
)

# The groups exactly as NOTES.md ("CODA-LM (public facts)") lists them.
NOTES_GROUPS = {
    "vehicle": "car truck tram tricycle bus trailer construction_vehicle recreational_vehicle",
    "vru": "pedestrian cyclist bicycle moped motorcycle stroller wheelchair cart",
    "traffic_sign": "warning_sign traffic_sign",
    "traffic_light": "traffic_light",
    "traffic_cone": "traffic_cone",
    "barrier": "barrier bollard",
    "miscellaneous": "dog cat sentry_box traffic_box traffic_island debris suitcase dustbin concrete_block machinery "
    "chair phone_booth basket cardboard carton garbage garbage_bag plastic_bag stone tire misc",
}


def _annotation() -> CodaAnnotation:
    general = {k: [] for k in GENERAL_KEYS}
    general["traffic cones"] = [PerceptionItem("An orange traffic cone in the ego lane.", "It closes the lane.")]
    general["vehicles"] = [PerceptionItem("A white car ahead.", "Keep distance.")]
    return CodaAnnotation(
        general,
        "A white car ahead and an orange traffic cone in the ego lane.",
        [RegionItem("An orange traffic cone.", (10, 20, 30, 40), "traffic_cone"), RegionItem("A car.", [0.5, 1.5, 5, 6], "car")],
        "Slow down and change lanes.",
    )


def test_group_table_is_the_notes_table():
    assert {g: " ".join(c) for g, c in EVAL_GROUPS.items()} == NOTES_GROUPS
    assert list(EVAL_GROUPS) == list(NOTES_GROUPS)  # report order
    assert len(CATEGORIES) == len(set(CATEGORIES)) == 43
    for group, cats in EVAL_GROUPS.items():
        for c in cats:
            assert category_group(c) == group
    assert coda.GENERAL_KEY_OF_GROUP["miscellaneous"] == "other objects"
    assert coda.GENERAL_KEY_OF_GROUP["vru"] == "vulnerable_road_users"


@pytest.mark.parametrize("bad", ["rock", "", "Traffic_Cone", None])
def test_unknown_category_is_a_one_line_value_error(bad):
    with pytest.raises(ValueError) as e:
        category_group(bad)
    assert isinstance(e.value, CodaFormatError)
    assert "\n" not in str(e.value) and "unknown CODA-LM category" in str(e.value)


def test_annotation_round_trip(tmp_path):
    ann = _annotation()
    path = tmp_path / "val_0001.json"
    coda.save_annotation(path, ann, image_size=(64, 64))
    assert coda.load_annotation(path, image_size=(64, 64)) == ann
    raw = json.loads(path.read_text())
    assert list(raw) == ["general_perception", "region_perception", "driving_suggestion"]
    assert list(raw["general_perception"]) == [*GENERAL_KEYS, "description and explanation"]
    assert list(raw["region_perception"]) == ["1", "2"]
    assert raw["region_perception"]["1"] == {
        "description and explanation": "An orange traffic cone.",
        "box": [10.0, 20.0, 30.0, 40.0],
        "category_name": "traffic_cone",
    }
    # Writing what was read gives the same bytes.
    coda.save_annotation(tmp_path / "val_0002.json", coda.load_annotation(path))
    assert (tmp_path / "val_0002.json").read_bytes() == path.read_bytes()
    assert [p.name for p, _ in coda.iter_annotations(tmp_path)] == ["val_0001.json", "val_0002.json"]
    assert coda.region_category_names(a for _, a in coda.iter_annotations(tmp_path)) == ["traffic_cone", "car"] * 2


def test_missing_general_keys_read_as_empty(tmp_path):
    path = tmp_path / "a_1.json"
    path.write_text(json.dumps({"general_perception": {"vehicles": []}, "region_perception": {}, "driving_suggestion": "Go."}))
    ann = coda.load_annotation(path)
    assert set(ann.general_perception) == set(GENERAL_KEYS) and ann.general_summary == ""


def _valid_json() -> dict:
    return coda.annotation_to_json(_annotation())


def _edit(f):
    d = _valid_json()
    f(d)
    return json.dumps(d)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "top level must be an object"),
        (_edit(lambda d: d.pop("driving_suggestion")), "missing key 'driving_suggestion'"),
        (_edit(lambda d: d["region_perception"]["1"].update(box=[60, 0, 10, 10])), "outside the 64x64 image"),
        (_edit(lambda d: d["region_perception"]["1"].update(box=[0, 0, 0, 10])), "zero area"),
        (_edit(lambda d: d["region_perception"]["1"].update(box=[-1, 0, 5, 5])), "starts outside the image"),
        (_edit(lambda d: d["region_perception"]["1"].update(box=[0, 0, 5])), "must be [x, y, w, h]"),
        (_edit(lambda d: d["region_perception"]["1"].update(box=[0, 0, "5", 5])), "non-numeric"),
        (_edit(lambda d: d["region_perception"]["2"].update(category_name="spaceship")), "unknown category 'spaceship'"),
        (_edit(lambda d: d["region_perception"]["2"].pop("category_name")), "missing 'category_name'"),
        (_edit(lambda d: d["general_perception"].update(vehicles={"a": 1})), "must be a list"),
        (_edit(lambda d: d["general_perception"].update(boats=[])), "unknown keys ['boats']"),
        (_edit(lambda d: d.update(driving_suggestion=3)), "driving_suggestion must be a string"),
    ],
)
def test_bad_annotations_give_one_line_errors_naming_the_file(tmp_path, text, needle):
    path = tmp_path / "val_0007.json"
    path.write_text(text)
    with pytest.raises(CodaFormatError) as e:
        coda.load_annotation(path, image_size=(64, 64))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and needle in msg, msg


def test_not_utf8_and_missing_files(tmp_path):
    path = tmp_path / "x_1.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(CodaFormatError, match="not UTF-8"):
        coda.load_annotation(path)
    with pytest.raises(CodaFormatError, match="file not found"):
        coda.load_annotation(tmp_path / "nope.json")
    with pytest.raises(CodaFormatError, match="annotation directory not found"):
        list(coda.iter_annotations(tmp_path / "nope"))


def test_save_refuses_invalid_and_writes_nothing(tmp_path):
    ann = _annotation()
    ann.region_perception[0].box = (0.0, 0.0, 100.0, 10.0)
    with pytest.raises(CodaFormatError, match="outside the 64x64 image"):
        coda.save_annotation(tmp_path / "v_1.json", ann, image_size=(64, 64))
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_leaves_old_file_and_no_temp_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    coda.atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        coda.atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_task_files_round_trip(tmp_path):
    recs = [
        TaskRecord(0, "val/images/0001.jpg", coda.GENERAL_QUESTION, "A car ahead."),
        TaskRecord(1, "val/images/0002.jpg", coda.GENERAL_QUESTION),  # CODA-LM test: no answer
        TaskRecord(2, "val/images_w_boxes/0002_object_1.jpg", coda.REGION_QUESTION, "Ünïcode ok", {"label_name": "dog"}),
    ]
    path = tmp_path / "general_perception.jsonl"
    coda.write_tasks(path, recs)
    assert coda.read_tasks(path) == recs
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"question_id": 0, "image": "val/images/0001.jpg", "question": coda.GENERAL_QUESTION, "answer": "A car ahead."}
    assert "answer" not in json.loads(lines[1])
    assert coda.task_file(tmp_path, "general_perception") == path
    (tmp_path / "region_perception.json").write_text(lines[0] + "\n\n")  # CODA-LM's own suffix, blank line
    assert coda.task_file(tmp_path, "region_perception").name == "region_perception.json"
    assert len(coda.read_tasks(tmp_path / "region_perception.json")) == 1
    with pytest.raises(CodaFormatError, match="no driving_suggestion.jsonl"):
        coda.task_file(tmp_path, "driving_suggestion")
    with pytest.raises(CodaFormatError, match="unknown CODA-LM task"):
        coda.task_file(tmp_path, "qa")


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"question_id": 0, "image": "a.jpg"', "line 2: malformed JSON"),
        ('{"question_id": 1, "question": "q"}', "line 2: missing 'image'"),
        ('{"question_id": "x", "image": "a", "question": "q"}', "question_id must be an integer"),
        ('{"question_id": 1, "image": "a", "question": "q", "answer": 5}', "answer must be a string"),
    ],
)
def test_bad_task_lines(tmp_path, line, needle):
    path = tmp_path / "t.jsonl"
    path.write_text('{"question_id": 0, "image": "a", "question": "q"}\n' + line + "\n")
    with pytest.raises(CodaFormatError) as e:
        coda.read_tasks(path)
    assert str(path) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_lenient_prediction_files(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question_id": "3", "answer": "A dog."}\n')
    assert coda.read_tasks(path, strict=False) == [TaskRecord(3, "", "", "A dog.")]


def test_questions_and_image_paths():
    assert coda.GENERAL_QUESTION.startswith("There is an image of traffic captured from the perspective of the ego car.")
    assert coda.GENERAL_QUESTION.endswith("the reasons why they influence ego car driving.")
    assert list(coda.TASK_QUESTIONS) == ["general_perception", "region_perception", "driving_suggestion"]
    assert coda.image_path_for("val_0001.json") == "val/images/0001.jpg"
    assert coda.image_path_for("pretrain_000012.json", ".png") == "pretrain/images/000012.png"
    with pytest.raises(CodaFormatError, match="not '<folder>_<image id>.json'"):
        coda.image_path_for("0001.json")


def test_region_frame_is_the_image_the_box_was_drawn_on():
    assert coda.region_frame("val/images_w_boxes/000012_object_3.jpg") == "val/images/000012.jpg"
    assert coda.region_frame("test/images_w_boxes/a_b_object_10.png") == "test/images/a_b.png"
    for same in ("val/images/000012.jpg", "val/images_w_boxes/000012.jpg", "val/images_w_boxes/x_object_y.jpg"):
        assert coda.region_frame(same) == same


def test_draw_region_box_red_width_2():
    img = Image.new("RGB", (20, 20), (0, 128, 0))
    out = coda.draw_region_box(img, [4, 5, 10, 8])
    assert img.getpixel((4, 5)) == (0, 128, 0)  # the input is not touched
    for xy in [(4, 5), (5, 6), (14, 13), (13, 12), (9, 5), (4, 9)]:
        assert out.getpixel(xy) == (255, 0, 0), xy
    for xy in [(6, 7), (9, 9), (3, 5), (15, 13)]:
        assert out.getpixel(xy) == (0, 128, 0), xy
    assert coda.draw_region_box(img.convert("L"), [1, 1, 3, 3]).mode == "RGB"
