"""What ships inside the runtime: the embedded demo bundle and the example scenes it is shown on.

``default_bundle()`` is the default bundle of ``rtrt infer``/``bench``/``check``/``eval`` and of the
C++ API's ``rtrt::default_bundle()``; ``example_images()`` are the scenes (``examples/examples.json``
holds each one's reference answer). ``python -m rtrt.tools.demo.build`` rebuilds both from nothing;
the shipped build's report is ``tools/demo/demo_build_report.json``.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["default_bundle", "example_images"]

_HERE = Path(__file__).resolve().parent


def default_bundle() -> Path:
    """The demo bundle shipped inside the package."""
    return _HERE / "demo_bundle"


def example_images() -> list[Path]:
    """Example scene images shipped beside the demo bundle, sorted by name."""
    folder = _HERE / "examples"
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")) if folder.is_dir() else []
