"""The layers' arrows point only down: tools -> trainer/export -> runtime, and the C++ API -> runtime.

Every module under ``runtime/``, ``export/``, ``trainer/`` and ``tools/`` is parsed with ``ast``
(nothing is imported) and every import it can make is collected: ``import``/``from`` statements
anywhere in the file (inside functions too, where the lazy imports live), relative imports
resolved against the module's package, and string literals passed to ``importlib.import_module``,
``find_spec`` or ``__import__``. The C++ API's sources (``runtime/cpp``) are searched for
``py::module_::import("...")``. An arrow that runs upward fails the test with the file and line:

- ``runtime`` imports nothing from ``export``, ``trainer`` or ``tools``;
- ``export`` and ``trainer`` import nothing from ``tools``;
- the C++ API imports no ``rtrt`` module outside ``rtrt.runtime`` (the standard library and numpy
  are not layers).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("runtime", "export", "trainer", "tools")
# layer -> the layers it must not import
FORBIDDEN = {
    "runtime": {"export", "trainer", "tools"},
    "export": {"tools"},
    "trainer": {"tools"},
    "tools": set(),
}
_DYNAMIC = {"import_module", "find_spec", "__import__"}
_CPP_IMPORT = re.compile(r'py::module_::import\(\s*"([^"]+)"\s*\)')


def _module_name(root: Path, path: Path) -> str:
    """``runtime/vlm/base.py`` -> ``rtrt.runtime.vlm.base`` (``__init__.py`` names its package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["rtrt", *parts])


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import the module can make."""
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from rtrt import tools`` (or ``from .. import tools`` at the top): the names are the layers.
            names = [f"{target}.{a.name}" for a in node.names] if target == "rtrt" else [target]
            out += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            arg = node.args[0].value
            if name in _DYNAMIC and isinstance(arg, str) and not arg.startswith("."):
                out.append((node.lineno, arg))
    return out


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "rtrt" and parts[1] in LAYERS else None


def upward_arrows(root: Path) -> list[str]:
    """Every import under ``root`` (a checkout's top level) that runs against the layering."""
    bad: list[str] = []
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            module = _module_name(root, path)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, name in sorted(_imports(tree, module, path.name == "__init__.py")):
                if _layer(name) in FORBIDDEN[layer]:
                    bad.append(f"{path.relative_to(root)}:{line}: {layer} imports {name}")
    cpp = root / "runtime" / "cpp"
    for path in sorted(p for p in cpp.rglob("*") if p.suffix in (".cpp", ".hpp", ".h", ".cc")):
        text = path.read_text(encoding="utf-8")
        for m in _CPP_IMPORT.finditer(text):
            name = m.group(1)
            if name.split(".")[0] == "rtrt" and _layer(name) != "runtime":
                line = text.count("\n", 0, m.start()) + 1
                bad.append(f"{path.relative_to(root)}:{line}: the C++ API imports {name}")
    return bad


def test_arrows_point_only_down():
    bad = upward_arrows(REPO)
    assert not bad, "imports that run upward:\n" + "\n".join(bad)


def test_the_walk_sees_every_kind_of_upward_import(tmp_path):
    """The checker itself: each way of importing upward is caught, downward ones are not."""
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text("")
    (tmp_path / "runtime" / "vlm").mkdir()
    (tmp_path / "runtime" / "vlm" / "__init__.py").write_text("from .. import tools_free\n")
    (tmp_path / "runtime" / "vlm" / "base.py").write_text(
        "from ..bundle import load_bundle\n"  # down within the runtime: fine
        "from ... import tools\n"  # relative, up to rtrt and down into tools
        "def rebuild():\n"
        "    from rtrt.export.cli import main\n"  # lazy, inside a function
        "    return main\n"
    )
    (tmp_path / "runtime" / "a.py").write_text(
        "import rtrt.trainer.loop\n"
        "from rtrt import tools\n"
        "import importlib\n"
        "importlib.import_module('rtrt.tools.infer')\n"
        "from importlib.util import find_spec\n"
        "find_spec('rtrt.export')\n"
        "find_spec('onnx')\n"  # a third-party module: not a layer
    )
    (tmp_path / "export" / "b.py").write_text("from rtrt.runtime.errors import RtrtError\nfrom rtrt.tools.demo import world\n")
    (tmp_path / "trainer" / "c.py").write_text("def f():\n    import rtrt.tools.cli\n")
    (tmp_path / "tools" / "d.py").write_text("from rtrt.export.cli import main\nfrom rtrt.trainer import loop\n")
    (tmp_path / "runtime" / "cpp" / "src").mkdir(parents=True)
    (tmp_path / "runtime" / "cpp" / "src" / "x.cpp").write_text(
        'auto a = py::module_::import("rtrt.runtime.pipeline");\n'
        'auto b = py::module_::import("numpy");\n'
        'auto c = py::module_::import("rtrt.tools.infer");\n'
    )
    bad = upward_arrows(tmp_path)
    assert bad == [
        "runtime/a.py:1: runtime imports rtrt.trainer.loop",
        "runtime/a.py:2: runtime imports rtrt.tools",
        "runtime/a.py:4: runtime imports rtrt.tools.infer",
        "runtime/a.py:6: runtime imports rtrt.export",
        "runtime/vlm/base.py:2: runtime imports rtrt.tools",
        "runtime/vlm/base.py:4: runtime imports rtrt.export.cli",
        "export/b.py:2: export imports rtrt.tools.demo",
        "trainer/c.py:2: trainer imports rtrt.tools.cli",
        "runtime/cpp/src/x.cpp:3: the C++ API imports rtrt.tools.infer",
    ]
