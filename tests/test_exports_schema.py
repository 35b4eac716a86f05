"""The typed ``manifest.exports`` (rtrt.runtime.exports), the artifact names (rtrt.runtime.names) and ``run_cli``.

The shipped bundle's exports load and write back as the same JSON; unknown keys are ignored and a
wrong type is one ``BundleError`` line naming the key; every file the shipped bundle records is the
name ``rtrt.runtime.names`` gives; no module reads the exports as a dict or spells a file name or the
precision list itself; the one CLI error wrapper prints what the commands always printed.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from rtrt.runtime.assets import default_bundle
from rtrt.runtime.bundle import DEFAULT_IMAGE_SIZE, MANIFEST_NAME, Manifest
from rtrt.runtime.errors import BundleError, InputError, run_cli
from rtrt.runtime.exports import Exports, OnnxExports
from rtrt.runtime.names import (
    GRAPHS,
    PRECISIONS,
    REFERENCE_FILE,
    engine_file,
    engine_name,
    graph_key,
    onnx_file,
    ort_variant,
    source_graph,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads((Path(default_bundle()) / MANIFEST_NAME).read_text(encoding="utf-8"))


def test_shipped_exports_load_and_write_back_as_the_same_json(raw):
    exports = Manifest.from_dict(raw).exports
    assert exports.onnx is not None and exports.reference is not None  # parsed into the typed objects
    assert exports.to_dict() == raw["exports"]
    # Key order too: a re-written manifest reads the same as the shipped one.
    assert json.dumps(exports.to_dict(), indent=2) == json.dumps(raw["exports"], indent=2)
    assert Manifest.from_dict(raw).to_dict()["exports"] == raw["exports"]


def test_accessors_on_the_shipped_bundle(raw):
    m = Manifest.from_dict(raw)
    e = m.exports
    assert e.graph("detector.int8").method == "dynamic" and e.graph("detector").image_size == m.vfm.image_size == 448
    assert e.graph("detector.qdq") is None and e.engine("detector.fp16") is None and e.engines == {}
    assert e.image_size(999) == raw["exports"]["onnx"]["image_size"]
    assert m.image_size() == raw["exports"]["onnx"]["image_size"] and m.image_size(exported=False) == raw["vfm"]["image_size"]
    assert e.reference.graphs["detector"].shapes["pixel_values"] == raw["exports"]["reference"]["graphs"]["detector"]["shapes"]["pixel_values"]


def test_one_image_size_rule_and_default(raw):
    bare = copy.deepcopy(raw)
    del bare["exports"]
    m = Manifest.from_dict(bare)
    assert m.exports == Exports() and m.exports.to_dict() == {}
    assert m.image_size() == m.image_size(exported=False) == raw["vfm"]["image_size"]  # not exported: the VFM's
    del bare["vfm"]
    assert Manifest.from_dict(bare).image_size() == DEFAULT_IMAGE_SIZE  # no VFM either: the one default
    assert Exports(onnx=OnnxExports(image_size=0)).image_size(7) == 7  # 0 means "not recorded"


def test_every_recorded_file_has_the_name_from_names(raw):
    e = Manifest.from_dict(raw).exports
    assert set(e.graphs) == {graph_key(g, v) for g in GRAPHS for v in ("", "int8")}
    for g in GRAPHS:
        for v in ("", "int8"):
            assert e.graph(graph_key(g, v)).file == onnx_file(g, v)
    assert e.reference.file == REFERENCE_FILE


def test_names():
    assert [onnx_file("detector", v) for v in ("", "int8", "qdq", "fp16")] == [
        "detector.onnx", "detector.int8.onnx", "detector.qdq.onnx", "detector.fp16.onnx"]
    assert engine_name("adapter", "fp16") == "adapter.fp16" and engine_file("adapter", "int8") == "engines/adapter.int8.engine"
    assert [ort_variant(p) for p in PRECISIONS] == ["", "", "int8"]
    assert [source_graph("adapter", p, strongly_typed=False) for p in PRECISIONS] == ["adapter", "adapter", "adapter.qdq"]
    assert [source_graph("adapter", p, strongly_typed=True) for p in PRECISIONS] == ["adapter", "adapter.fp16", "adapter.qdq"]
    for bad in (lambda: graph_key("vlm"), lambda: onnx_file("detector", "int4"), lambda: engine_file("detector", "fp8")):
        with pytest.raises(ValueError):
            bad()


def test_unknown_keys_are_ignored(raw):
    d = copy.deepcopy(raw)
    d["exports"]["from_the_future"] = {"x": 1}
    d["exports"]["onnx"]["new_setting"] = True
    d["exports"]["onnx"]["graphs"]["detector"]["new_stat"] = [1, 2]
    d["exports"]["reference"]["graphs"]["adapter"]["new"] = "y"
    assert Manifest.from_dict(d).exports.to_dict() == raw["exports"]


@pytest.mark.parametrize("path,value,needle", [
    (("onnx", "graphs", "detector", "opset"), "18", "exports.onnx.graphs.detector.opset must be an integer"),
    (("onnx", "graphs", "detector", "file"), None, "exports.onnx.graphs.detector.file must be a string"),
    (("onnx", "graphs", "adapter", "problems"), "none", "exports.onnx.graphs.adapter.problems must be a list"),
    (("onnx", "graphs", "adapter", "size"), True, "exports.onnx.graphs.adapter.size must be an integer"),
    (("onnx", "graphs"), [], "exports.onnx.graphs must be an object"),
    (("onnx", "versions", "torch"), 2, "exports.onnx.versions.torch must be a string"),
    (("reference", "graphs", "detector", "shapes", "pixel_values"), [2, "3"], "shapes.pixel_values[1] must be an integer"),
    (("engines",), {"detector.fp16": {"key": "k"}}, "exports.engines.detector.fp16.file missing"),
    (("engines",), {"detector.fp16": {"file": "e", "built": 1}}, "exports.engines.detector.fp16.built must be true or false"),
])
def test_a_wrong_type_is_one_line_naming_the_key(raw, path, value, needle):
    d = copy.deepcopy(raw)
    node = d["exports"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(BundleError) as e:
        Manifest.from_dict(d)
    assert needle in str(e.value) and str(e.value).startswith(MANIFEST_NAME) and "\n" not in str(e.value)


def test_exports_must_be_an_object(raw):
    for value in ([], "onnx", 3):
        d = dict(raw, exports=value)
        with pytest.raises(BundleError, match="exports must be an object"):
            Manifest.from_dict(d)
    assert Manifest.from_dict(dict(raw, exports=None)).exports == Exports()


def _sources(*folders: str) -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for f in folders for p in sorted((ROOT / f).rglob("*.py"))}


def test_no_module_reads_exports_as_a_dict_or_spells_names_itself():
    """One schema and one place for names: no ``exports.get(..)``, ``exports["onnx"]``, ``f"{g}.int8"``,
    ``engines/{...}`` or precision/backend tuple outside rtrt.runtime.names."""
    patterns = {
        "exports read as a dict": r"exports(\.get\(|\[\")",
        "graph variant by formatting": r"\}\.(int8|qdq|fp16)\b|\+ \"\.(int8|qdq|fp16)\"",
        "engine file by formatting": r"engines/\{",
        "precision list": r"[\[(]\"fp32\", \"fp16\", \"int8\"[\])]",
        "backend list": r"[\[(]\"(torch|ort)\", \"(ort|trt)\", \"(trt|torch)\"[\])]",
    }
    found = []
    for path, text in _sources("runtime", "export", "tools", "trainer").items():
        if path.name == "names.py":
            continue
        for what, pattern in patterns.items():
            for m in re.finditer(pattern, text):
                found.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {what}")
    assert found == []


def test_run_cli_ends_quietly_when_the_reader_of_stdout_leaves():
    # `rtrt infer ... | head -1`: the pipe closes while the command still prints.
    import subprocess
    import sys

    code = ("import sys\nfrom rtrt.runtime.errors import run_cli\n"
            "def main():\n    for i in range(200000):\n        print('line', i)\n"
            "sys.exit(run_cli('rtrt x', main))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == b""


def test_run_cli_prints_one_line_and_the_exit_code(capsys):
    def fail(exc):
        def main():
            raise exc
        return main

    assert run_cli("rtrt x", lambda: 3) == 3 and run_cli("rtrt x", lambda: None) == 0
    assert run_cli("rtrt x", fail(InputError("bad thing"))) == 2
    assert capsys.readouterr().err == "rtrt x: error: bad thing\n"
    assert run_cli("rtrt x", fail(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "rtrt x: interrupted\n"
    assert run_cli("rtrt x", fail(ModuleNotFoundError("no", name="tensorrt.foo"))) == 2
    assert capsys.readouterr().err == "rtrt x: error: missing dependency 'tensorrt'; install the matching extra, e.g. pip install 'rtrt[dev]'\n"
    assert run_cli("rtrt x", fail(ModuleNotFoundError("no", name="rtrt.gone"))) == 2
    assert capsys.readouterr().err == "rtrt x: error: this command is not available in this build (rtrt.gone)\n"
    with pytest.raises(InputError):
        run_cli("rtrt x", fail(InputError("bad")), debug=True)
    with pytest.raises(ValueError):  # not an error rtrt raises on purpose: a traceback
        run_cli("rtrt x", fail(ValueError("bug")))


def test_every_command_uses_the_one_error_wrapper():
    """The one-line handler of RtrtError is written once (rtrt.runtime.errors.run_cli), not per command."""
    handler = re.compile(r"except RtrtError as e:(\n.*){0,3}\n\s*print\(f\"[^\"]*error: \{e\}\"")
    found = [str(p.relative_to(ROOT)) for p, text in _sources("runtime", "export", "tools", "trainer").items() if handler.search(text)]
    assert found == ["runtime/errors.py"]
