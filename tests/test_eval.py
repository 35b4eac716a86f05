"""`rtrt eval` end to end on a tiny generated world, a tiny bundle and a tiny LLaVA (issue 6)."""
from __future__ import annotations

import json

import pytest

from rtrt.runtime.errors import InputError
from rtrt.runtime.pipeline import Pipeline
from rtrt.tools.eval import ABLATION_ROWS, run_eval
from fixtures.tiny_bundle import tiny_world_and_llava_bundle


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    _, _, bundle = tiny_world_and_llava_bundle(root)
    pipe = Pipeline.from_bundle(bundle, backend="torch", max_new_tokens=6)
    return root, bundle, pipe


@pytest.mark.parametrize("task", ["general", "region"])
def test_ablation_writes_predictions_and_tables(setup, task):
    root, bundle, pipe = setup
    out = root / f"out_{task}"
    res = run_eval(bundle, root / "world", task, out, rows=ABLATION_ROWS, limit=3, batch_size=2, pipeline=pipe, progress=False)
    assert list(res["rows"]) == [r.name for r in ABLATION_ROWS]
    coda_task = res["task"]
    for row in ABLATION_ROWS:
        lines = (out / row.name / f"{coda_task}_answer.jsonl").read_text().splitlines()
        assert len(lines) == 3
        rec = json.loads(lines[0])
        assert {"question_id", "answer", "hints"} <= set(rec)
        if task == "general":
            assert (rec["hints"] != []) == (row.hints and rec["detections"] != [])
        else:  # the box's class, when it stands out (the tiny bundle is uncalibrated: always)
            assert rec["hints"] == ([rec["region"]["name"]] if row.hints else []) and rec["region"]["box"]
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["rows"]["both"]["groups"]) >= {"vehicle", "vru", "traffic_cone", "barrier", "miscellaneous", "all"}
    assert "rare" in scores["rows"]["baseline"]["rare_common"]
    md = (out / "scores.md").read_text()
    assert "| baseline |" in md and "| both |" in md
    hinted = {k for k, e in scores["rows"].items() if "hints" in e}
    if task == "general":
        assert hinted == {"text_hints", "both"} and "detector hints on test" in md
        assert scores["rows"]["both"]["hints"]["per_image"] == pytest.approx(
            sum(len(json.loads(x)["hints"]) for x in (out / "both" / f"{coda_task}_answer.jsonl").read_text().splitlines()) / 3)
    else:
        assert hinted == {"text_hints", "both"} and "hints per region" in md and "the box's category" in md



@pytest.mark.parametrize("task", ["general", "region"])
def test_the_ablation_runs_the_detector_once_per_frame_with_the_same_answers(setup, task, monkeypatch):
    # The four rows share each batch's detector results: one detector call per batch, not per row and
    # batch, and every answer, hint and detection as when each row ran the detector itself.
    root, bundle, pipe = setup
    calls = []
    detect = type(pipe.backend).detect
    monkeypatch.setattr(type(pipe.backend), "detect", lambda self, *a, **k: calls.append(1) or detect(self, *a, **k))
    out = root / f"shared_{task}"
    run_eval(bundle, root / "world", task, out, rows=ABLATION_ROWS, limit=3, batch_size=2, pipeline=pipe, progress=False)
    assert len(calls) == 2  # 3 questions in batches of 2
    calls.clear()
    monkeypatch.setattr(pipe, "detect_batch", lambda images: None)  # each row runs the detector itself again
    monkeypatch.setattr(type(pipe), "batch", _without_shared_detections(type(pipe).batch))
    alone = root / f"alone_{task}"
    run_eval(bundle, root / "world", task, alone, rows=ABLATION_ROWS, limit=3, batch_size=2, pipeline=pipe, progress=False)
    assert len(calls) == 2 * len(ABLATION_ROWS)
    for row in ABLATION_ROWS:
        name = f"{row.name}/{'general_perception' if task == 'general' else 'region_perception'}_answer.jsonl"
        assert (out / name).read_text() == (alone / name).read_text()


def _without_shared_detections(batch):
    def run(self, *a, detections=None, **k):
        return batch(self, *a, **k)
    return run


def test_batch_checks_the_detector_results_it_is_given(setup):
    root, _, pipe = setup
    from PIL import Image

    im = Image.new("RGB", (64, 48), (90, 90, 90))
    dets = pipe.detect_batch([im, im])
    with pytest.raises(InputError, match="2 images but 1 detector results"):
        pipe.batch([im, im], ["q?", "q?"], detections=dets[:1])
    given = pipe.batch([im], ["q?"], detections=dets[:1])[0]
    fresh = pipe.batch([im], ["q?"])[0]
    assert (given.answer, given.hints, [d.to_dict() for d in given.detections]) == (
        fresh.answer, fresh.hints, [d.to_dict() for d in fresh.detections])

def test_hint_quality_by_hand():
    from rtrt.tools.eval import _hint_quality

    q = _hint_quality([["dog", "tire"], [], ["dog"]], [["dog", "car"], ["tire"], ["barrier", "car"]], ["dog", "tire", "barrier"])
    # tp: dog (image 1); fp: tire (1), dog (3); fn: tire (2), barrier (3); car is not a detector class
    assert q["precision"] == pytest.approx(100 / 3) and q["recall"] == pytest.approx(100 / 3) and q["per_image"] == 1.0
    assert _hint_quality([[]], [["car"]], ["dog"]) == {"precision": None, "recall": None, "per_image": 0.0}


def test_missing_split_is_one_line_error(setup):
    root, bundle, pipe = setup
    with pytest.raises(InputError, match="no CODA-LM split 'nosuch'"):
        run_eval(bundle, root / "world", "general", root / "o", split="nosuch", pipeline=pipe)
    with pytest.raises(InputError, match="no general_perception questions"):
        run_eval(bundle, root / "world", "general", root / "o", split="val", pipeline=pipe)


def test_default_data_is_the_demo_worlds_test_split(tmp_path, monkeypatch):
    import dataclasses
    import filecmp

    from rtrt.tools.demo import presets
    from rtrt.tools.eval import demo_test_world
    from rtrt.tools.demo.world import main as world_main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(presets.PRESETS, "full", dataclasses.replace(presets.PRESETS["full"], test=3, size=96))
    root = demo_test_world(progress=False)
    assert root == tmp_path / "cache" / "rtrt" / "demo-world-test-seed0"
    assert world_main(["--out", str(tmp_path / "w"), "--seed", "0", "--pretrain", "0", "--plugin", "0", "--val", "0",
                       "--test", "3", "--size", "96", "--quiet"]) == 0
    cmp = filecmp.dircmp(root, tmp_path / "w")
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files
    for sub in ("test/images", "CODA-LM/test", "CODA-LM/test/vqa_anno"):
        names = sorted(p.name for p in (root / sub).iterdir() if p.is_file())
        assert names and filecmp.cmpfiles(root / sub, tmp_path / "w" / sub, names, shallow=False)[0] == names
    stamp = (root / "world.json").stat().st_mtime_ns
    assert demo_test_world(progress=False) == root and (root / "world.json").stat().st_mtime_ns == stamp  # reused
    monkeypatch.setitem(presets.PRESETS, "full", dataclasses.replace(presets.PRESETS["full"], test=2, size=96))
    demo_test_world(progress=False)  # another plan: regenerated
    assert len(list((root / "test" / "images").iterdir())) == 2
    monkeypatch.setitem(presets.PRESETS, "full", dataclasses.replace(presets.PRESETS["full"], test=2, size=96, world={"object_scale": 1.5}))
    demo_test_world(progress=False)  # the plan's world flags make its world
    assert json.loads((root / "world.json").read_text())["config"]["object_scale"] == 1.5


def test_precision_reaches_the_backend(setup):
    from rtrt.runtime.errors import BackendUnavailableError
    from rtrt.tools.eval import parse_args

    root, bundle, _ = setup
    assert parse_args(["--precision", "int8"]).precision == "int8" and parse_args([]).precision == "fp32"
    # The tiny bundle has no exported graphs: an int8 ORT eval must ask for them, not fall back silently.
    with pytest.raises(BackendUnavailableError, match="rtrt export .*--precision int8"):
        run_eval(bundle, root / "world", "general", root / "o8", backend="ort", precision="int8", progress=False)
