"""The content-keyed TensorRT engine cache: keys, atomic writes, the lock.

These tests inject a fake builder (a function returning bytes) into ``EngineCache.load_or_build``:
they test the cache's keying, locking and crash-safety, not TensorRT (see test_trt.py for that).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rtrt.runtime.engine_cache import EngineCache, engine_key
from rtrt.runtime.errors import EngineBuildError
from rtrt.runtime.trt_engine import PlatformInfo

PLAT = PlatformInfo(trt_version="10.9.0", gpu_name="NVIDIA Orin", compute_capability="8.7")
PROFILE = {"pixel_values": [(1, 3, 64, 64), (1, 3, 64, 64), (4, 3, 64, 64)], "class_embeddings": [(1, 64), (8, 64), (256, 64)]}
ENGINE = bytes(range(256)) * 4096  # 1 MiB of recognisable "engine"


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    p = tmp_path / "detector.onnx"
    p.write_bytes(b"onnx graph v1")
    return p


def test_key_changes_with_every_part(onnx_file: Path, tmp_path: Path):
    base = engine_key(onnx_file, "fp16", PROFILE, PLAT)
    assert engine_key(onnx_file, "fp16", dict(reversed(list(PROFILE.items()))), PLAT) == base  # order-free
    other_onnx = tmp_path / "other.onnx"
    other_onnx.write_bytes(b"onnx graph v2")
    profile2 = dict(PROFILE, class_embeddings=[(1, 64), (8, 64), (512, 64)])
    variants = {
        "onnx sha256": engine_key(other_onnx, "fp16", PROFILE, PLAT),
        "precision": engine_key(onnx_file, "int8", PROFILE, PLAT),
        "profile": engine_key(onnx_file, "fp16", profile2, PLAT),
        "trt version": engine_key(onnx_file, "fp16", PROFILE, PlatformInfo("10.10.0", PLAT.gpu_name, PLAT.compute_capability)),
        "gpu name": engine_key(onnx_file, "fp16", PROFILE, PlatformInfo(PLAT.trt_version, "NVIDIA H100", PLAT.compute_capability)),
        "compute capability": engine_key(onnx_file, "fp16", PROFILE, PlatformInfo(PLAT.trt_version, PLAT.gpu_name, "9.0")),
    }
    digests = {name: k.digest for name, k in variants.items()}
    for name, d in digests.items():
        assert d != base.digest, f"changing the {name} did not change the key"
    assert len(set(digests.values())) == len(digests)
    # The key follows the file's content, not its path.
    same_content = tmp_path / "renamed.onnx"
    same_content.write_bytes(onnx_file.read_bytes())
    assert engine_key(same_content, "fp16", PROFILE, PLAT) == base


def test_build_once_then_reuse(onnx_file: Path, tmp_path: Path):
    cache = EngineCache(tmp_path / "cache")
    key = engine_key(onnx_file, "fp16", PROFILE, PLAT)
    calls = []

    def build():
        calls.append(1)
        return ENGINE

    first = cache.load_or_build(key, build, name="detector.fp16")
    second = cache.load_or_build(key, build, name="detector.fp16")
    assert first.built and not second.built and len(calls) == 1
    assert first.path == second.path and first.path.read_bytes() == ENGINE
    assert json.loads(first.path.with_suffix(".json").read_text())["digest"] == key.digest
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_builder_failure_leaves_nothing(onnx_file: Path, tmp_path: Path):
    cache = EngineCache(tmp_path / "cache")
    key = engine_key(onnx_file, "fp16", PROFILE, PLAT)

    def broken():
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError):
        cache.load_or_build(key, broken)
    assert cache.get(key) is None and not list(cache.root.glob(".*.tmp"))
    with pytest.raises(EngineBuildError, match="no engine"):
        cache.load_or_build(key, lambda: b"")
    assert cache.load_or_build(key, lambda: ENGINE).built  # the lock was released


_CRASH = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import rtrt.runtime.engine_cache as ec
    from rtrt.runtime.trt_engine import PlatformInfo

    def half_then_die(f, data):  # the process dies mid-write: no exception handler runs
        f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        os._exit(3)

    ec._write_chunks = half_then_die
    key = ec.engine_key(sys.argv[2], "fp16", {"x": [(1,), (1,), (1,)]}, PlatformInfo("10.9.0", "gpu", "8.7"))
    ec.EngineCache(sys.argv[1]).load_or_build(key, lambda: bytes(range(256)) * 4096, name="detector.fp16")
    """
)


def test_crash_mid_write_never_leaves_a_partial_engine(onnx_file: Path, tmp_path: Path):
    root = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-c", _CRASH, str(root), str(onnx_file)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    cache = EngineCache(root)
    key = engine_key(onnx_file, "fp16", {"x": [(1,), (1,), (1,)]}, PlatformInfo("10.9.0", "gpu", "8.7"))
    leftovers = list(root.glob(".*.tmp"))
    assert leftovers and leftovers[0].stat().st_size == len(ENGINE) // 2  # the half-written file exists...
    assert cache.get(key, "detector.fp16") is None  # ...but never under the engine's name
    res = cache.load_or_build(key, lambda: ENGINE, name="detector.fp16")
    assert res.built and res.path.read_bytes() == ENGINE
    assert not list(root.glob(".*.tmp"))  # cleaned under the lock


_RACER = textwrap.dedent(
    """
    import json, sys, time
    import rtrt.runtime.engine_cache as ec
    from rtrt.runtime.trt_engine import PlatformInfo

    root, onnx, log, go, ready = sys.argv[1:6]
    open(ready, "w").close()  # imported: ready to race
    while not __import__("os").path.exists(go):  # start both racers together
        time.sleep(0.01)

    def fake_build():  # stands in for TensorRT: slow, and logs each call
        with open(log, "a") as f:
            f.write("build\\n")
        time.sleep(1.0)
        return bytes(range(256)) * 4096

    key = ec.engine_key(onnx, "fp16", {"x": [(1,), (2,), (4,)]}, PlatformInfo("10.9.0", "gpu", "8.7"))
    res = ec.EngineCache(root).load_or_build(key, fake_build, name="adapter.fp16")
    print(json.dumps({"path": str(res.path), "built": res.built, "waited": res.waited_s}))
    """
)


def test_two_concurrent_exports_build_once(onnx_file: Path, tmp_path: Path):
    root, log, go = tmp_path / "cache", tmp_path / "builds.log", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(root), str(onnx_file), str(log), str(go), str(r)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in ready
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:  # both imported (imports take seconds under load)
        time.sleep(0.01)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert log.read_text().splitlines() == ["build"]  # exactly one build
    assert sorted(r["built"] for r in results) == [False, True]
    waiter = next(r for r in results if not r["built"])
    assert waiter["waited"] > 0.5  # it waited on the lock, then reused
    assert results[0]["path"] == results[1]["path"] and Path(results[0]["path"]).read_bytes() == ENGINE
    assert not list(root.glob(".*.tmp"))


def test_threads_share_the_lock(onnx_file: Path, tmp_path: Path):
    key = engine_key(onnx_file, "fp32", PROFILE, PLAT)
    seen_partial, calls, results = [], [], []
    stop = threading.Event()
    final = EngineCache(tmp_path / "c").path_for(key, "g")

    def watcher():  # the engine name must only ever hold complete bytes
        while not stop.is_set():
            if final.exists() and final.stat().st_size not in (0, len(ENGINE)):
                seen_partial.append(final.stat().st_size)

    def build():
        calls.append(1)
        threading.Event().wait(0.5)
        return ENGINE

    def racer():
        results.append(EngineCache(tmp_path / "c").load_or_build(key, build, name="g"))

    w = threading.Thread(target=watcher)
    w.start()
    threads = [threading.Thread(target=racer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    w.join()
    assert len(calls) == 1 and sum(r.built for r in results) == 1 and not seen_partial
    assert os.path.getsize(final) == len(ENGINE)


def test_lock_timeout_is_an_error(onnx_file: Path, tmp_path: Path):
    from filelock import FileLock

    cache = EngineCache(tmp_path / "c", lock_timeout=0.2)
    key = engine_key(onnx_file, "fp16", PROFILE, PLAT)
    cache.root.mkdir(parents=True)
    with FileLock(str(cache.path_for(key)) + ".lock"):
        with pytest.raises(EngineBuildError, match="timed out"):
            cache.load_or_build(key, lambda: ENGINE)
