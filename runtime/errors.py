"""The small, documented set of exceptions the rtrt runtime raises.

Every message is one line that names the problem (and the file, where there is
one), so a CLI can print it as is and a perception stack can log it; ``run_cli`` is how every
command does.
"""
from __future__ import annotations

import sys
from typing import Callable

__all__ = [
    "RtrtError",
    "BundleError",
    "ImageError",
    "InputError",
    "ModelMismatchError",
    "EngineMismatchError",
    "EngineBuildError",
    "BackendUnavailableError",
    "ParityError",
    "run_cli",
]


class RtrtError(Exception):
    """Base class of every error rtrt raises on purpose."""


class BundleError(RtrtError):
    """A bundle is missing a file, has a file altered, a newer schema or an unsafe path."""


class ImageError(RtrtError):
    """An input image cannot be decoded or is outside the accepted limits."""


class InputError(RtrtError):
    """Any other bad input: a question too long for the model, a bad argument."""


class ModelMismatchError(RtrtError):
    """The VLM (or VFM) does not fit the bundle: hidden size, image-token layout."""


class EngineMismatchError(RtrtError):
    """A cached TensorRT engine was built for another TensorRT version or GPU."""


class EngineBuildError(RtrtError):
    """A TensorRT engine cannot be built: a graph TensorRT cannot parse or cannot give the precision, no range for a dynamic axis, the build failed or timed out."""


class BackendUnavailableError(RtrtError):
    """The requested backend (trt, ort provider, CUDA) is not usable on this machine."""


class ParityError(RtrtError):
    """A graph's outputs on this machine differ from the bundle's reference outputs beyond tolerance."""


def run_cli(prog: str, main: Callable[[], int | None], debug: bool = False) -> int:
    """Run a command's ``main()`` and return its exit code, with the errors every rtrt command prints the same way.

    An ``RtrtError`` prints ``"<prog>: error: <message>"`` (one line) on stderr -> 2; Ctrl-C prints
    ``"<prog>: interrupted"`` -> 130; a closed stdout pipe ends quietly -> 141 (128 + SIGPIPE); a missing module (a dependency of an extra, or a command this
    build lacks) prints one line naming it -> 2. ``debug``: errors are raised instead, with their
    traceback.
    """
    try:
        return int(main() or 0)
    except RtrtError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout left (``rtrt infer ... | head -2``): stop quietly, as Unix tools do, and
        # keep the interpreter's final flush from raising again on the closed pipe.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ModuleNotFoundError as e:
        if debug:
            raise
        top = (e.name or "").split(".")[0]
        if top == "rtrt":
            print(f"{prog}: error: this command is not available in this build ({e.name})", file=sys.stderr)
        else:
            print(f"{prog}: error: missing dependency {top!r}; install the matching extra, e.g. pip install 'rtrt[dev]'", file=sys.stderr)
        return 2
