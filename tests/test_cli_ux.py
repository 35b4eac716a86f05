"""The command line as a person meets it: quiet, fast to answer --help, several images, warm timings, examples.

- a successful ``rtrt infer`` leaves stderr empty, byte for byte; ``--verbose`` lets transformers speak;
- every command's ``--help`` loads none of torch, transformers, onnxruntime (checked in ``sys.modules``);
- ``--image`` takes several files or a folder: one JSON line per image, a bad one reported and exit 2;
- every shipped example is distinct, has a reference answer, and ``rtrt bench`` defaults to the README's.
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rtrt.runtime.assets import example_images
from rtrt.tools.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = {p.name: p for p in example_images()}
SCENE = str(EXAMPLES["scene_1.jpg"])
HEAVY = ("torch", "transformers", "onnxruntime")


def _rtrt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtrt.tools.cli", *args], capture_output=True, timeout=300)


def test_a_successful_infer_leaves_stderr_empty_and_verbose_shows_the_libraries():
    # The transformers VLM path: the one whose libraries print (the default ONNX Runtime path loads none of them).
    quiet = _rtrt("infer", "--image", SCENE, "--json", "--max-new-tokens", "2", "--vlm-backend", "torch")
    assert quiet.returncode == 0, quiet.stderr.decode()
    assert quiet.stderr == b""
    line = json.loads(quiet.stdout)
    assert line["image"] == SCENE and line["warmup"] == 0 and line["detections"] and line["vlm_backend"] == "torch"
    loud = _rtrt("--verbose", "infer", "--image", SCENE, "--json", "--max-new-tokens", "2", "--vlm-backend", "torch")
    assert loud.returncode == 0 and b"Loading weights" in loud.stderr
    assert json.loads(loud.stdout)["answer"] == line["answer"]
    default = _rtrt("infer", "--image", SCENE, "--json", "--max-new-tokens", "2")
    assert default.returncode == 0 and default.stderr == b""
    assert json.loads(default.stdout)["vlm_backend"] == "ort" and json.loads(default.stdout)["answer"] == line["answer"]


def test_a_too_long_question_prints_only_rtrt_own_error():
    r = _rtrt("infer", "--image", SCENE, "--question", "word " * 3000)
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b""
    assert err.startswith("rtrt infer: error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_help_loads_no_heavy_library(cmd):
    code = ("import contextlib, io, json, sys\n"
            "from rtrt.tools.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n"
            f"        main([{cmd!r}, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            f"print(json.dumps([[m for m in {HEAVY!r} if m in sys.modules], out.getvalue()]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded, text = json.loads(r.stdout)
    assert "usage:" in text
    assert loaded == [], f"rtrt {cmd} --help imports {loaded}"


def test_several_images_and_a_folder_one_model_load_one_json_line_each(tmp_path, capsys, monkeypatch):
    from rtrt.runtime.pipeline import Pipeline

    loads = []
    real = Pipeline.from_bundle.__func__

    def counted(cls, *a, **k):
        loads.append(a)
        return real(cls, *a, **k)

    monkeypatch.setattr(Pipeline, "from_bundle", classmethod(counted))
    folder = tmp_path / "frames"
    folder.mkdir()
    shutil.copy(EXAMPLES["scene_2.jpg"], folder / "b.jpg")
    shutil.copy(EXAMPLES["scene_1.jpg"], folder / "a.jpg")
    (folder / "notes.txt").write_text("not an image")  # skipped: not an image suffix
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")

    code = main(["infer", "--image", str(EXAMPLES["scene_3.jpg"]), str(bad), str(folder), "--json",
                 "--max-new-tokens", "2", "--warmup", "1"])
    cap = capsys.readouterr()
    assert code == 2 and len(loads) == 1
    lines = [json.loads(x) for x in cap.out.splitlines()]
    assert [x["image"] for x in lines] == [str(EXAMPLES["scene_3.jpg"]), str(bad), str(folder / "a.jpg"),
                                            str(folder / "b.jpg")]
    assert lines[1] == {"image": str(bad), "error": f"{bad}: not a recognised image"}
    for x in (lines[0], lines[2], lines[3]):
        assert x["warmup"] == 1 and {"answer", "detections", "timings_ms"} <= set(x)
    assert cap.err == f"rtrt infer: error: {bad}: not a recognised image\n"
    # The same frame gives the same detections alone and in a batch.
    assert main(["infer", "--image", str(folder / "a.jpg"), "--json", "--max-new-tokens", "2"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["detections"] == lines[2]["detections"]


def test_text_output_prints_label_score_and_box_per_image(capsys):
    assert main(["infer", "--image", SCENE, str(EXAMPLES["scene_2.jpg"]), "--max-new-tokens", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"== {SCENE} ==\n") and f"\n== {EXAMPLES['scene_2.jpg']} ==\n" in out
    rows = re.findall(r"^  (.+) \((\d\.\d\d)\) at \[(\d+), (\d+), (\d+), (\d+)\]$", out, flags=re.M)
    assert rows and all("_" not in label for label, *_ in rows)  # labels, not machine names
    assert all(int(x0) < int(x1) and int(y0) < int(y1) for _, _, x0, y0, x1, y1 in rows)
    assert out.count("timings (ms, after 1 warm-up call): ") == 2


def test_bad_image_of_a_single_run_and_empty_folder_are_one_line_errors(tmp_path, capsys):
    assert main(["infer", "--image", str(tmp_path / "missing.png")]) == 2
    assert capsys.readouterr().err == f"rtrt infer: error: {tmp_path / 'missing.png'}: file not found\n"
    assert main(["infer", "--image", str(tmp_path), "--warmup", "-1"]) == 2
    assert capsys.readouterr().err == "rtrt infer: error: --warmup must be at least 0\n"
    assert main(["infer", "--image", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"rtrt infer: error: {tmp_path}: no image files (")


def test_every_shipped_example_is_distinct_and_has_a_reference():
    refs = json.loads((REPO / "runtime" / "assets" / "examples" / "examples.json").read_text())
    assert sorted(refs) == sorted(EXAMPLES) and len(EXAMPLES) >= 4
    for name, entry in refs.items():
        assert entry["source"].startswith("test/images/") and len(entry["reference"]) > 100, name
    assert len({e["source"] for e in refs.values()}) == len(refs)
    pixels = {n: np.asarray(Image.open(p).convert("RGB")) for n, p in EXAMPLES.items()}
    for a, b in itertools.combinations(pixels, 2):
        assert pixels[a].shape != pixels[b].shape or not np.array_equal(pixels[a], pixels[b]), (a, b)


def test_bench_defaults_to_the_readme_bench_image():
    from rtrt.tools.bench import default_image

    readme = (REPO / "README.md").read_text()
    used = set(re.findall(r"^rtrt bench .*--image (\S+)", readme, flags=re.M))  # the README's bench commands
    assert used == {"runtime/assets/examples/scene_1.jpg"}
    assert default_image() == REPO / "runtime" / "assets" / "examples" / "scene_1.jpg"
