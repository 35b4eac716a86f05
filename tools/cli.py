"""The ``rtrt`` command line: one entry point that dispatches to each command's ``main(argv)``.

Each command lives in the module that owns it and is imported only when it runs, so
``rtrt --help`` and ``rtrt infer`` never pay for the trainer's or exporter's imports.
Errors that rtrt raises on purpose (``RtrtError``) print as one line and exit with code 2;
``--debug`` shows the traceback instead.

    rtrt --version
    rtrt export --bundle B --backend onnx
    rtrt train embeddings --help
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

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
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: rtrt [--version] [--debug] COMMAND [ARGS...]",
        "",
        "Plug-in remedies for VLM blindness to rare road objects, deployed with ONNX Runtime and TensorRT.",
        "",
        "commands:",
    ]
    lines += [f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help  show this help and exit", "  --version   print the rtrt version and exit",
              "  --debug     show full tracebacks instead of one-line errors", "",
              "Run 'rtrt COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = False
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
        print(f"rtrt: error: unknown option {flag}\n\n{_usage()}", file=sys.stderr)
        return 2
    if not args:
        print(_usage(), file=sys.stderr)
        return 2
    cmd, rest = args[0], args[1:]
    if cmd not in COMMANDS:
        print(f"rtrt: error: unknown command {cmd!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    from rtrt.runtime.errors import RtrtError

    try:
        module = importlib.import_module(COMMANDS[cmd][0])
        code = module.main(rest)
        return int(code or 0)
    except RtrtError as e:
        if debug:
            raise
        print(f"rtrt {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rtrt {cmd}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if debug:
            raise
        top = (e.name or "").split(".")[0]
        if top == "rtrt":
            print(f"rtrt {cmd}: error: this command is not available in this build ({e.name})", file=sys.stderr)
        else:
            print(f"rtrt {cmd}: error: missing dependency {top!r}; install the matching extra, e.g. pip install 'rtrt[dev]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
