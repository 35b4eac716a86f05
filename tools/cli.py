"""The ``rtrt`` command line: one entry point that dispatches to each command's ``main(argv)``.

Each command lives in the module that owns it and is imported only when it runs, so
``rtrt --help`` and ``rtrt infer`` never pay for the trainer's or exporter's imports.
Errors that rtrt raises on purpose (``RtrtError``) print as one line and exit with code 2;
``--debug`` shows the traceback instead. Third-party libraries are quiet while a command runs (no
transformers progress bars or advisories, no Python warnings but rtrt's own, no ONNX Runtime
warnings), so a successful run's stderr is empty; ``rtrt --verbose CMD`` or ``CMD --verbose``
lets them speak.

    rtrt --version
    rtrt export --bundle B --backend onnx
    rtrt train embeddings --help
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings
from contextlib import contextmanager, nullcontext
from typing import Iterator, Sequence

from rtrt.runtime import version

__all__ = ["COMMANDS", "main", "version"]

# command -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "infer": ("rtrt.tools.infer", "answer a question about an image with the plug-in (detections, answer, timings)"),
    "export": ("rtrt.export.cli", "export the detector and adapter of a bundle to ONNX / TensorRT with parity checks"),
    "calibrate": ("rtrt.tools.calibrate", "fit per-class hint decisions on a held-out split and write them into a bundle"),
    "check": ("rtrt.tools.check", "rerun a bundle's graphs on every backend here against its reference outputs (exit 1 on a failure)"),
    "bench": ("rtrt.tools.bench", "benchmark per-stage latency and the plug-in's overhead"),
    "train": ("rtrt.trainer.cli", "train class embeddings (phase 1) or the adapter (phase 2)"),
    "synonyms": ("rtrt.trainer.synonyms", "generate per-class synonyms from an OpenAI-compatible endpoint"),
    "world": ("rtrt.tools.demo.world", "generate the procedural rare-object driving world (CODA-LM format)"),
    "eval": ("rtrt.tools.eval", "evaluate a bundle on CODA-LM-format data, with the four-way ablation"),
    "analyze": ("rtrt.tools.analyze", "analyse how the VLM sees: object-name attention on rare, common and background patches"),
}


# Read by the libraries when they load (and by any child process a command starts): errors only.
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}


def _transformers_quiet(on: bool) -> None:
    from transformers.utils import logging as tlog

    # Its logger (e.g. "Token indices sequence length is longer ...") and its tqdm bars ("Loading weights").
    (tlog.set_verbosity_error if on else tlog.set_verbosity_warning)()
    (tlog.disable_progress_bar if on else tlog.enable_progress_bar)()


def _onnxruntime_quiet(on: bool) -> None:
    import onnxruntime

    onnxruntime.set_default_logger_severity(3 if on else 2)  # 3: errors only; 2: ORT's default, warnings


# library -> switch between quiet and its default; run once the library is loaded, never to load it.
_SWITCHES = {"transformers": _transformers_quiet, "onnxruntime": _onnxruntime_quiet}


class _QuietOnImport(importlib.abc.MetaPathFinder):
    """Makes a library of ``_SWITCHES`` quiet right after its first import, so quieting never imports it."""

    def __init__(self) -> None:
        self._finding: set[str] = set()

    def find_spec(self, name, path=None, target=None):
        if name not in _SWITCHES or name in self._finding:
            return None
        self._finding.add(name)
        try:
            spec = importlib.util.find_spec(name)  # the other finders'
        finally:
            self._finding.discard(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_quiet(module) -> None:
            exec_module(module)
            _SWITCHES[name](True)

        spec.loader.exec_module = exec_then_quiet
        return spec


@contextmanager
def _quiet() -> Iterator[None]:
    """Third-party libraries print nothing on stderr inside; afterwards each loaded one is back at its default."""
    saved = {k: os.environ.get(k) for k in _QUIET_ENV}
    finder = _QuietOnImport()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"rtrt(\.|$)")  # rtrt's own (e.g. a TensorRT fallback) still show
        for k, v in _QUIET_ENV.items():
            os.environ.setdefault(k, v)  # a value the user set wins
        for name, switch in _SWITCHES.items():
            if name in sys.modules:
                switch(True)
        sys.meta_path.insert(0, finder)
        try:
            yield
        finally:
            sys.meta_path.remove(finder)
            for name, switch in _SWITCHES.items():
                if name in sys.modules:
                    switch(False)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _asks_verbose(args: Sequence[str]) -> bool:
    """Whether a command's own arguments hold --verbose (or an abbreviation argparse accepts), before any ``--``."""
    for a in args:
        if a == "--":
            return False
        if a.startswith("--verb") and "--verbose".startswith(a):
            return True
    return False


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: rtrt [--version] [--debug] [--verbose] COMMAND [ARGS...]",
        "",
        "Plug-in remedies for VLM blindness to rare road objects, deployed with ONNX Runtime and TensorRT.",
        "",
        "commands:",
    ]
    lines += [f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help  show this help and exit", "  --version   print the rtrt version and exit",
              "  --debug     show full tracebacks instead of one-line errors",
              "  --verbose   let third-party libraries print their logs, warnings and progress bars", "",
              "Run 'rtrt COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = verbose = False
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag in ("-h", "--help"):
            print(_usage())
            return 0
        if flag == "--version":
            print(f"rtrt {version()}")
            return 0
        if flag == "--debug":
            debug = True
            continue
        if flag == "--verbose":
            verbose = True
            continue
        print(f"rtrt: error: unknown option {flag}\n\n{_usage()}", file=sys.stderr)
        return 2
    if not args:
        print(_usage(), file=sys.stderr)
        return 2
    cmd, rest = args[0], args[1:]
    if cmd not in COMMANDS:
        print(f"rtrt: error: unknown command {cmd!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    from rtrt.runtime.errors import run_cli

    with nullcontext() if verbose or _asks_verbose(rest) else _quiet():
        return run_cli(f"rtrt {cmd}", lambda: importlib.import_module(COMMANDS[cmd][0]).main(rest), debug)


if __name__ == "__main__":
    sys.exit(main())
