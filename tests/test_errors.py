"""Honest errors and honest reports (issue 15, item 6).

A device this machine lacks, a device name that is none, or a precision a backend cannot run is
refused with one line naming what is available (CLI: exit 2; API: ``InputError`` /
``BackendUnavailableError``), never run on another device or at fp32 under an fp16 label; and
``rtrt infer --json``, ``rtrt bench`` and ``rtrt eval`` report the backend, precision and ONNX
Runtime providers that actually ran. Uses the shipped demo bundle (ONNX fp32 + int8 graphs, no
TensorRT engines) and the tiny test bundle.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from rtrt.runtime.assets import default_bundle, example_images
from rtrt.runtime.backends import make_backend, precision_support
from rtrt.runtime.bundle import load_bundle
from rtrt.runtime.devices import available_devices, check_device
from rtrt.runtime.errors import BackendUnavailableError, InputError
from rtrt.runtime.pipeline import Pipeline
from rtrt.runtime.trt_engine import PlatformInfo, tensorrt_status
from rtrt.tools.cli import main
from fixtures.tiny_bundle import make_tiny_bundle

DEMO = default_bundle()
AVAIL = f"(available: {', '.join(available_devices())})"
MISSING_GPU = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on every machine
no_trt = pytest.mark.skipif(tensorrt_status() is None, reason="TensorRT is usable here")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
no_trt_ep = pytest.mark.skipif(
    "TensorrtExecutionProvider" in __import__("onnxruntime").get_available_providers() and torch.cuda.is_available(),
    reason="onnxruntime's TensorRT EP and a GPU are here")


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code, out, err, cmd, *needles):
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"rtrt {cmd}: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


# ----------------------------------------------------------------------------- devices (API)
def test_available_devices_lists_cpu_and_each_gpu():
    assert available_devices() == ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0))]


def test_check_device_accepts_what_is_here():
    assert str(check_device("cpu")) == "cpu" and check_device("cpu").type == "cpu"
    assert check_device(None) is None
    for d in available_devices()[1:]:
        assert str(check_device(d)) == d and check_device(torch.device(d)) == check_device(d)


def test_missing_gpu_index_is_refused_naming_the_available_devices():
    with pytest.raises(BackendUnavailableError) as e:
        check_device(MISSING_GPU)
    assert str(e.value) == f"device '{MISSING_GPU}' is not available on this machine {AVAIL}"


@no_cuda
def test_cuda_without_cuda_is_refused():
    with pytest.raises(BackendUnavailableError, match=r"^device 'cuda' is not available on this machine \(available: cpu\)$"):
        check_device("cuda")


@pytest.mark.parametrize("name", ["gpu0", "CUDA", "cuda:x", ""])
def test_nonsense_device_names_are_input_errors(name):
    with pytest.raises(InputError) as e:
        check_device(name)
    assert str(e.value) == f"device {name!r} is not a device name {AVAIL}"


@pytest.mark.parametrize("name", ["mps", "meta", "cpu:1"])
def test_devices_rtrt_does_not_run_on_are_refused(name):
    with pytest.raises(BackendUnavailableError, match=r"is not available on this machine \(available: cpu"):
        check_device(name)


@pytest.mark.parametrize("backend", ["ort", "torch", "trt"])
def test_make_backend_refuses_a_missing_device_before_loading(backend, tmp_path):
    # The bundle path does not exist: the device is refused first, before anything is read.
    with pytest.raises(BackendUnavailableError, match=f"device '{MISSING_GPU}' is not available"):
        make_backend(backend, tmp_path / "nope", device=MISSING_GPU)
    with pytest.raises(InputError, match="is not a device name"):
        make_backend(backend, tmp_path / "nope", device="gpu")


def test_pipeline_refuses_a_missing_device_before_loading(tmp_path):
    with pytest.raises(BackendUnavailableError, match=f"device '{MISSING_GPU}' is not available"):
        Pipeline.from_bundle(tmp_path / "nope", device=MISSING_GPU)
    with pytest.raises(InputError, match="'nonsense' is not a device name"):
        Pipeline.from_bundle(DEMO, device="nonsense")


# ----------------------------------------------------------------------------- precision matrix (API)
def test_precision_matrix_on_the_demo_bundle():
    b = load_bundle(DEMO)
    torch_ = precision_support("torch", b, "cpu")
    assert torch_["fp32"] is None and torch_["fp16"] and torch_["int8"]
    ort = precision_support("ort", b, "cpu")
    assert ort["fp32"] is None and ort["int8"] is None  # the demo ships detector/adapter .onnx and .int8.onnx
    assert "TensorRT execution provider" in ort["fp16"]  # never on cpu, whatever onnxruntime has


def test_precision_matrix_for_trt_engines_needs_no_gpu():
    """The trt column is a function of the manifest and a platform record; a made-up platform
    (plain data, no TensorRT) checks the decisions: no engines are recorded in the demo bundle,
    fp32/fp16 can be built from its ONNX, int8 cannot (no ``*.qdq`` graphs)."""
    b = load_bundle(DEMO)
    here = PlatformInfo("10.0.0", "Some GPU", "8.9")
    rebuild = precision_support("trt", b, platform=here, on_engine_mismatch="rebuild")
    assert rebuild["fp32"] is None and rebuild["fp16"] is None
    assert "no exported detector.qdq graph to build one from" in rebuild["int8"]
    for policy in ("fail", "fallback"):
        strict = precision_support("trt", b, platform=here, on_engine_mismatch=policy)
        assert all("no engine recorded in the bundle" in strict[p] for p in ("fp32", "fp16", "int8"))


def test_ort_fp16_on_cpu_is_refused_naming_fp32_and_int8():
    with pytest.raises(BackendUnavailableError) as e:
        make_backend("ort", DEMO, device="cpu", precision="fp16")
    msg = str(e.value)
    assert msg.startswith("precision 'fp16' is not available with the ort backend: ")
    assert msg.endswith("(available: fp32, int8)") and "\n" not in msg


@no_trt_ep
def test_ort_fp16_without_the_tensorrt_ep_is_refused_on_any_device():
    with pytest.raises(BackendUnavailableError, match=r"precision 'fp16' is not available with the ort backend"):
        make_backend("ort", DEMO, precision="fp16")  # device None: every provider onnxruntime has


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_torch_backend_runs_fp32_only(precision):
    with pytest.raises(BackendUnavailableError, match=rf"^precision '{precision}' is not available with the torch backend: .*\(available: fp32\)$"):
        make_backend("torch", DEMO, precision=precision)


def test_ort_int8_without_int8_graphs_names_the_export_command(tmp_path):
    tiny = make_tiny_bundle(tmp_path / "b")  # nothing exported
    with pytest.raises(BackendUnavailableError, match=r"no exported detector.int8 graph; run `rtrt export --bundle .* --precision int8` \(available: none\)"):
        make_backend("ort", tiny, precision="int8")
    with pytest.raises(BackendUnavailableError, match=r"precision 'fp32' is not available with the ort backend: .*\(available: none\)"):
        make_backend("ort", tiny)
    with pytest.raises(BackendUnavailableError, match="precision 'int8'"):
        Pipeline.from_bundle(tiny, backend="ort", precision="int8", load_vlm_model=False)


@no_trt
def test_trt_without_tensorrt_names_the_available_backends():
    with pytest.raises(BackendUnavailableError, match=r"^trt backend unavailable: .* \(available backends: torch, ort\)$"):
        make_backend("trt", DEMO)


@no_trt
def test_trt_fallback_reports_ort_and_refuses_what_ort_cannot_run():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        be = make_backend("trt", DEMO, on_engine_mismatch="fallback", device="cpu")
        assert (be.name, be.precision, be.providers) == ("ort", "fp32", ["CPUExecutionProvider"])
        be = make_backend("trt", DEMO, on_engine_mismatch="fallback", device="cpu", precision="int8")
        assert (be.name, be.precision) == ("ort", "int8")
        with pytest.raises(BackendUnavailableError,
                           match=r"^trt backend unavailable \(.*\), and the ort fallback cannot run it: precision 'fp16' .*\(available: fp32, int8\)$"):
            make_backend("trt", DEMO, on_engine_mismatch="fallback", device="cpu", precision="fp16")


def test_backends_expose_precision_and_the_providers_their_sessions_use():
    ort = make_backend("ort", DEMO, device="cpu", precision="int8")
    assert ort.precision == "int8"
    assert ort.providers == ["CPUExecutionProvider"]
    assert ort.providers == list(dict.fromkeys(p for s in ort.sessions.values() for p in s.get_providers()))
    t = make_backend("torch", DEMO)
    assert (t.precision, t.providers) == ("fp32", [])


# ----------------------------------------------------------------------------- CLI refusals
IMAGE = str(example_images()[0])


@pytest.mark.parametrize("cmd,extra", [
    ("infer", ["--image", IMAGE]),
    ("bench", ["--runs", "1", "--warmup", "0", "--new-tokens", "1"]),
    ("eval", ["--data", "/nonexistent-data", "--limit", "1"]),
])
def test_cli_refuses_a_missing_device(cmd, extra, capsys):
    _one_line_error(*_run([cmd, *extra, "--device", MISSING_GPU], capsys), cmd,
                    f"device '{MISSING_GPU}' is not available on this machine", AVAIL)
    _one_line_error(*_run([cmd, *extra, "--device", "gpu0"], capsys), cmd, "device 'gpu0' is not a device name", AVAIL)


@no_cuda
def test_cli_infer_cuda_without_cuda_is_the_issue_s_line(capsys):
    code, out, err = _run(["infer", "--image", IMAGE, "--device", "cuda"], capsys)
    assert code == 2 and out == ""
    assert err == "rtrt infer: error: device 'cuda' is not available on this machine (available: cpu)\n"


@pytest.mark.parametrize("cmd,extra", [
    ("infer", ["--image", IMAGE]),
    ("bench", ["--runs", "1", "--warmup", "0", "--new-tokens", "1"]),
    ("eval", ["--data", "/nonexistent-data", "--limit", "1"]),  # refused before the data is read
])
def test_cli_refuses_precisions_the_backend_cannot_run(cmd, extra, capsys):
    _one_line_error(*_run([cmd, *extra, "--precision", "fp16"], capsys), cmd,
                    "precision 'fp16' is not available with the ort backend", "(available: fp32, int8)")
    _one_line_error(*_run([cmd, *extra, "--backend", "torch", "--precision", "int8"], capsys), cmd,
                    "precision 'int8' is not available with the torch backend", "(available: fp32)")


@no_trt
def test_cli_trt_without_tensorrt(capsys):
    _one_line_error(*_run(["infer", "--image", IMAGE, "--backend", "trt"], capsys), "infer",
                    "trt backend unavailable", "(available backends: torch, ort)")


# ----------------------------------------------------------------------------- what ran, reported
def test_infer_json_reports_backend_precision_and_providers(capsys):
    code, out, err = _run(["infer", "--image", IMAGE, "--json", "--max-new-tokens", "2", "--precision", "int8"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert (d["backend"], d["precision"], d["providers"]) == ("ort", "int8", ["CPUExecutionProvider"])


@no_trt
def test_infer_json_after_a_trt_fallback_says_ort(capsys):
    # The fallback is rtrt's own warning: the quiet CLI lets it through, so the user sees trt did not run.
    with pytest.warns(RuntimeWarning, match="falling back to ort"):
        code, out, err = _run(["infer", "--image", IMAGE, "--json", "--max-new-tokens", "2", "--backend", "trt",
                               "--on-engine-mismatch", "fallback"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert (d["backend"], d["precision"], d["providers"]) == ("ort", "fp32", ["CPUExecutionProvider"])


def test_describe_and_results_report_what_ran():
    pipe = Pipeline.from_bundle(DEMO, max_new_tokens=2)
    info = pipe.describe()
    assert (info["backend"], info["precision"], info["providers"], info["device"]) == ("ort", "fp32", ["CPUExecutionProvider"], "cpu")
    res = pipe(IMAGE)
    assert (res.backend, res.precision, res.providers) == ("ort", "fp32", ["CPUExecutionProvider"])
    base = pipe.batch([IMAGE], plugin=False)[0]  # the VLM alone: no backend ran
    assert (base.backend, base.precision, base.providers) == (None, None, [])


def test_bench_header_and_json_report_what_ran(capsys):
    args = ["bench", "--runs", "1", "--warmup", "0", "--new-tokens", "1", "--precision", "int8"]
    code, out, err = _run([*args, "--json"], capsys)
    assert code == 0, err
    p = json.loads(out)["pipeline"]
    assert (p["backend"], p["precision"], p["providers"], p["device"]) == ("ort", "int8", ["CPUExecutionProvider"], "cpu")
    code, out, err = _run(args, capsys)
    assert code == 0, err
    assert "backend ort int8 (CPUExecutionProvider) on cpu" in out.splitlines()[0]


def test_eval_scores_json_records_what_ran(tmp_path, capsys):
    from rtrt.tools.demo.world import WorldConfig, generate_world

    generate_world(WorldConfig(seed=3, pretrain=0, plugin=0, val=0, test=1, width=96, height=96), tmp_path / "w", progress=False)
    code, out, err = _run(["eval", "--data", str(tmp_path / "w"), "--limit", "1", "--max-new-tokens", "2", "--quiet",
                           "--precision", "int8", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert (s["backend"], s["precision"], s["providers"], s["device"]) == ("ort", "int8", ["CPUExecutionProvider"], "cpu")
