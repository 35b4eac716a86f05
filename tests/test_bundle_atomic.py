"""Re-export (``Bundle.add_files``) and overwrite (``write_bundle(overwrite=True)``) are crash-safe at every step (issue 15).

Every function of ``rtrt.runtime.fileio`` that writes, renames or deletes (``fileio.MUTATORS``) is
wrapped. A clean run counts their calls: n steps. Then for every k in 1..n a fresh run is stopped
at call k: the folder as it is at that instant (what a kill there would leave) is copied aside, and
the call raises. Both the copy and what the exception leaves must hold, at the bundle's path, a
bundle that loads with ``verify=True`` and equals the old or the new version (manifest and the
hash of every file). Temporary siblings may remain after a kill, but only under the hidden
``.NAME.*`` names, never taken for the bundle. The same runs again where the OS cannot swap
directories (two renames): a kill between them leaves no bundle at the path, and ``load_bundle``
must name the ``mv`` that restores a complete version. A subprocess killed with SIGKILL in the
middle of ``add_files`` checks the same for a real kill. A static check makes sure bundle.py
writes only through those functions, so a new write step cannot escape the enumeration.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rtrt.runtime import BundleError, fileio, load_bundle, write_bundle
from rtrt.runtime.bundle import MANIFEST_NAME, ClassInfo, Manifest
from rtrt.runtime.exports import Exports, OnnxExports

ROOT = Path(__file__).resolve().parents[1]


class Crash(Exception):
    """The injected failure."""


def _manifest() -> Manifest:
    return Manifest(classes=[ClassInfo("cone"), ClassInfo("dog", ["puppy"])], d_llm=4)


def _sources(tmp_path: Path) -> Path:
    """Files the operations copy from, outside the folder under test."""
    src = tmp_path / "src"
    (src / "model" / "sub").mkdir(parents=True, exist_ok=True)
    (src / "model" / "config.json").write_text('{"a": 1}')
    (src / "model" / "sub" / "weights.bin").write_bytes(b"w" * 100)
    (src / "graph.onnx").write_bytes(b"onnx bytes")
    return src


def _old_bundle(work: Path, src: Path) -> Path:
    """The bundle before the operation: tensors, a copied file and a carried folder."""
    torch.manual_seed(0)
    write_bundle(work / "b", _manifest(), {"embeddings.safetensors": {"W": torch.randn(2, 4)}},
                 files={"notes.txt": src / "graph.onnx"}, dirs={"vfm": src / "model"})
    return work / "b"


def _add_files(path: Path, src: Path) -> None:
    # a new file, a replaced file (its old version is hard-linked in the old bundle), a copied file
    load_bundle(path).add_files({"detector.onnx": b"new graph", "notes.txt": b"replaced", "extra/g.onnx": src / "graph.onnx"},
                                exports=Exports(onnx=OnnxExports(opset=18)))


def _overwrite(path: Path, src: Path) -> None:
    torch.manual_seed(1)
    write_bundle(path, _manifest(), {"embeddings.safetensors": {"W": torch.randn(2, 4)}},
                 files={"other.onnx": src / "graph.onnx"}, dirs={"vlm": src / "model"}, overwrite=True)


OPS = {"add_files": _add_files, "overwrite": _overwrite}


def _state(path: Path) -> tuple[str, dict[str, str]]:
    """A bundle's content: its manifest and the hash of every listed file (loaded with verify=True)."""
    b = load_bundle(path, verify=True)
    return (b.root / MANIFEST_NAME).read_text(), {rel: fileio.sha256_file(b.path(rel)) for rel in b.manifest.files}


def _instrument(monkeypatch, fail_at: int | None, on_fail=lambda: None) -> list[str]:
    """Wrap every writing function of fileio; call ``fail_at`` runs ``on_fail`` (the snapshot) and raises Crash."""
    calls: list[str] = []
    for name in fileio.MUTATORS:
        real = getattr(fileio, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            if len(calls) == fail_at:
                on_fail()
                raise Crash(f"step {fail_at}: {_name}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(fileio, name, wrapper)
    return calls


def _no_swap(monkeypatch) -> None:
    """An OS or filesystem without an atomic directory swap."""
    monkeypatch.setattr(fileio, "exchange_paths", lambda a, b: False)


def _check(work: Path, allowed: list, where: str, gap_allowed: bool) -> str:
    """The bundle at ``work/b`` is one of ``allowed``; only hidden temporary siblings beside it. Returns which."""
    strays = sorted(p.name for p in work.iterdir() if p.name != "b")
    assert all(re.fullmatch(r"\.b\..+\.(partial|old|tmp)", s) for s in strays), (where, strays)
    path = work / "b"
    if not path.exists():
        # only where two renames replace the swap: the error names the mv that restores a complete version
        assert gap_allowed, f"{where}: no bundle at the path"
        with pytest.raises(BundleError) as e:
            load_bundle(path)
        msg = str(e.value)
        assert "\n" not in msg
        m = re.search(r"mv (\S+) (\S+)$", msg)
        assert m and Path(m.group(2)) == path, (where, msg)
        os.rename(m.group(1), m.group(2))
    state = _state(path)
    assert state in allowed, f"{where}: the bundle at the path is neither the old nor the new version"
    return "old" if state == allowed[0] else "new"


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_a_crash_at_every_step_leaves_the_old_or_the_new_bundle(tmp_path, monkeypatch, op, swap):
    src = _sources(tmp_path)
    if swap == "exchange" and not _can_swap(tmp_path):
        pytest.skip("this filesystem cannot swap directories atomically")

    # The clean run: the old and new versions, and the steps between them.
    ref = tmp_path / "ref"
    old = _state(_old_bundle(ref, src))
    with monkeypatch.context() as mp:
        if swap != "exchange":
            _no_swap(mp)
        steps = _instrument(mp, None)
        OPS[op](ref / "b", src)
    new = _state(ref / "b")
    assert new != old and len(steps) >= 5
    assert [p.name for p in ref.iterdir()] == ["b"]  # nothing left beside it
    if swap == "exchange":
        assert "exchange_paths" in steps and "rename_path" not in steps

    seen = set()
    for k in range(1, len(steps) + 1):
        work, snap = tmp_path / f"w{k}", tmp_path / f"s{k}"
        _old_bundle(work, src)
        with monkeypatch.context() as mp:
            if swap != "exchange":
                _no_swap(mp)
            _instrument(mp, k, on_fail=lambda: shutil.copytree(work, snap, symlinks=True))
            with pytest.raises(Crash):
                OPS[op](work / "b", src)
        where = f"{op}, {swap}, killed before step {k} ({steps[k - 1]})"
        seen.add(_check(snap, [old, new], where, gap_allowed=swap != "exchange"))
        # The exception path: the bundle is whole, and no temporary sibling is left (unless the cleanup
        # itself was what failed; remove_tree never raises outside this test).
        _check(work, [old, new], where.replace("killed", "exception"), gap_allowed=False)
        if steps[k - 1] != "remove_tree":
            assert [p.name for p in work.iterdir()] == ["b"], where
        shutil.rmtree(work)
        shutil.rmtree(snap)
    assert seen == {"old", "new"}  # the enumeration reaches past the commit point


def _can_swap(tmp_path: Path) -> bool:
    a, b = tmp_path / "probe_a", tmp_path / "probe_b"
    a.mkdir()
    b.mkdir()
    ok = fileio.exchange_paths(a, b)
    a.rmdir()
    b.rmdir()
    return ok


def test_add_files_keeps_the_root_and_the_old_files_intact(tmp_path):
    src = _sources(tmp_path)
    path = _old_bundle(tmp_path / "w", src)
    b = load_bundle(path)
    before = (path / "notes.txt").stat().st_ino
    kept = open(path / "notes.txt", "rb")  # a reader of the old version keeps reading it
    b.add_files({"notes.txt": b"replaced"}, exports=Exports(onnx=OnnxExports(image_size=64)))
    assert kept.read() == b"onnx bytes"
    kept.close()
    assert b.root == path and b.path("notes.txt").read_bytes() == b"replaced"
    assert (path / "notes.txt").stat().st_ino != before  # replaced, never written in place
    assert load_bundle(path).manifest.exports == Exports(onnx=OnnxExports(image_size=64)) == b.manifest.exports
    with pytest.raises(BundleError, match="manifest is written by the bundle"):
        b.add_files({MANIFEST_NAME: b"{}"})


def test_a_symlinked_bundle_keeps_its_link(tmp_path):
    src = _sources(tmp_path)
    real = _old_bundle(tmp_path / "w", src)
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    load_bundle(link).add_files({"detector.onnx": b"g"})
    assert link.is_symlink() and load_bundle(real).has("detector.onnx")


def test_bundle_writes_only_through_fileio():
    """Every write in bundle.py goes through fileio (so the crash tests above enumerate it)."""
    text = (ROOT / "runtime" / "bundle.py").read_text()
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    direct = r"os\.(replace|rename|link|symlink|remove|unlink|rmdir|mkdir|makedirs)\(|shutil\.|tempfile\.|save_file\(" \
             r"|\.write_(bytes|text)\(|\bopen\(|\.mkdir\(|\.unlink\(|\.touch\("
    assert re.findall(direct, code) == []
    bare = r"(?<![\w.])(" + "|".join(fileio.MUTATORS) + r")\("
    assert re.findall(bare, code) == []  # called as _fio.NAME, which the tests patch


_KILL_CHILD = textwrap.dedent("""
    import sys, time
    from rtrt.runtime import fileio, load_bundle
    from rtrt.runtime.exports import Exports, OnnxExports
    path, stop = sys.argv[1], int(sys.argv[2])
    calls = []
    for name in fileio.MUTATORS:
        real = getattr(fileio, name)
        def wrapper(*a, _real=real, **kw):
            calls.append(1)
            if len(calls) == stop:
                print("ready", flush=True)
                time.sleep(120)
            return _real(*a, **kw)
        setattr(fileio, name, wrapper)
    load_bundle(path).add_files({"detector.onnx": b"new graph", "notes.txt": b"replaced"}, exports=Exports(onnx=OnnxExports(opset=1)))
    print("done", flush=True)
""")


def test_sigkill_in_the_middle_of_add_files(tmp_path):
    """A real kill: one child stopped before the swap, one between the swap and the cleanup."""
    src = _sources(tmp_path)
    ref = _old_bundle(tmp_path / "ref", src)
    old = _state(ref)
    load_bundle(ref).add_files({"detector.onnx": b"new graph", "notes.txt": b"replaced"}, exports=Exports(onnx=OnnxExports(opset=1)))
    new = _state(ref)
    steps = _count_steps(tmp_path, src)
    cases = {"before the swap": steps.index("replace_dir") + 1, "before the cleanup": len(steps)}
    assert steps[-1] == "remove_tree"
    for label, stop in cases.items():
        work = tmp_path / label.replace(" ", "_")
        _old_bundle(work, src)
        child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(work / "b"), str(stop)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            assert line.strip() == "ready", (line, child.stderr.read() if child.poll() is not None else "")
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=30)
            child.stdout.close()
            child.stderr.close()
        assert child.returncode == -signal.SIGKILL
        got = _check(work, [old, new], f"SIGKILL {label}", gap_allowed=False)
        assert got == ("old" if label == "before the swap" else "new")
        assert any(p.name.startswith(".b.") for p in work.iterdir())  # the kill left its temporary sibling


def _count_steps(tmp_path: Path, src: Path) -> list[str]:
    work = tmp_path / "count"
    _old_bundle(work, src)
    mp = pytest.MonkeyPatch()
    try:
        steps = _instrument(mp, None)
        load_bundle(work / "b").add_files({"detector.onnx": b"new graph", "notes.txt": b"replaced"}, exports=Exports(onnx=OnnxExports(opset=1)))
    finally:
        mp.undo()
    return steps


def test_replace_dir_puts_the_old_version_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    old, new = tmp_path / "d", tmp_path / ".d.x.partial"
    old.mkdir()
    (old / "f").write_text("old")
    new.mkdir()
    (new / "f").write_text("new")
    _no_swap(monkeypatch)
    real = fileio.rename_path
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("disk gone")
        real(a, b)

    monkeypatch.setattr(fileio, "rename_path", rename)
    with pytest.raises(OSError, match="disk gone"):
        fileio.replace_dir(new, old)
    assert (old / "f").read_text() == "old" and (new / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.x.partial", "d"]


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    """A bundle is copied to a vehicle and read by its service user: files 0666 and folders 0777 minus the umask."""
    import os

    from rtrt.runtime import fileio

    old = os.umask(0o022)
    try:
        fileio.atomic_write_bytes(tmp_path / "f.bin", b"x")
        d = fileio.make_temp_dir(tmp_path / "b")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644
    assert d.stat().st_mode & 0o777 == 0o755
