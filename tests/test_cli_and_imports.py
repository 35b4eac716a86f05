"""The console script and the runtime's import footprint (issue 2)."""
from __future__ import annotations

import json
import subprocess
import sys

from rtrt.tools.cli import COMMANDS, main, version


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rtrt {version()}"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


def test_unknown_command_is_one_line_error(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rtrt: error: unknown command") and "\n" not in err


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "rtrt.tools.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("rtrt ")


def test_runtime_import_is_lean():
    code = (
        "import sys, json, rtrt.runtime, rtrt.runtime.vlm;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('timm','open_clip','onnx','onnxscript') or m.startswith('rtrt.trainer') or m.startswith('rtrt.export')];"
        "print(json.dumps(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
