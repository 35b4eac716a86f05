"""Fixtures of the C++ ctest tests: a bundle, test images and the Python API's output on them.

    python tests/cpp/make_fixtures.py --out build/cpp_fixtures [--backend torch] [--bundle DIR]

ctest runs this first (FIXTURES_SETUP); ``tests/cpp/test_rtrt.cpp`` then checks that the C++ API
gives what is written here. Without ``--bundle`` the bundle is the tiny test bundle
(``tests/fixtures/tiny_bundle.py``) with a tiny random LLaVA (``tests/fixtures/tiny_vlm.py``), built in well under a
minute with nothing downloaded (and exported with ``rtrt export`` for ``--backend ort|trt``). Images: the shipped examples (``runtime/assets/examples/*.png``) when
there are any, else two generated road-like scenes; each is written as PNG and as binary PPM.

``expected.txt`` is one record per line, fields separated by spaces, every string hex-encoded
(answers of a random model may hold any character), every float as Python's repr (it round-trips).
The expected values are computed by the Python API exactly as ``rtrt infer`` calls it (image given
as a path), in this separate process. The ``Options`` records (precision, threads) load the shipped
demo bundle, whose int8 graphs the tiny bundle lacks; the ``verify`` records a copy of the bundle whose
reference outputs are shifted, so that ``verify=True`` fails on it (or, for a bundle without reference
data, the error that says so).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

# (id, question or None for the default question, hints, refine, max_new_tokens or 0 for the default,
#  region [x0, y0, x1, y1] or None: a region question about that box)
ANSWER_CASES = (
    ("default", None, True, True, 0, None),
    ("question", "What is on the road?", True, True, 0, None),
    ("plain", "What is on the road?", False, False, 0, None),
    ("short", "Describe the scene.", True, False, 5, None),
    ("region", "region", True, True, 0, (10.0, 8.0, 58.5, 40.0)),
)


# ONNX Runtime threads of the Options records: fixed, so both processes sum in the same order.
OPTION_THREADS = 1


def hexs(s: str) -> str:
    return s.encode("utf-8").hex() or "-"


def detection_fields(d) -> str:
    """score index name label x0 y0 x1 y1 px py: what test_rtrt.cpp compares, floats exactly."""
    if d.box is None or d.peak is None:
        raise AssertionError(f"the runtime gave detection {d.name} no box or peak")
    coords = " ".join(repr(float(v)) for v in (*d.box, *d.peak))
    return f"{float(d.score)!r} {d.index} {hexs(d.name)} {hexs(d.label)} {coords}"


def synthetic_scene(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A small deterministic road scene: sky, road, lane marks and an orange cone-like blob."""
    rng = np.random.default_rng(seed)
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2] = (110, 160, 220)
    a[h // 2 :] = (70, 70, 75)
    a[h // 2 + 4 :: 8, w // 2 - 1 : w // 2 + 1] = (240, 240, 240)
    cx, cy = rng.integers(10, w - 10), rng.integers(h // 2 + 5, h - 8)
    a[cy - 6 : cy + 6, cx - 3 : cx + 3] = (250, 120, 20)
    a = np.clip(a.astype(np.int16) + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def write_ppm(path: Path, img: Image.Image) -> None:
    a = np.asarray(img.convert("RGB"), dtype=np.uint8)
    path.write_bytes(b"P6\n# rtrt test image\n%d %d\n255\n" % (a.shape[1], a.shape[0]) + a.tobytes())


def tiny_bundle(out: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures.tiny_bundle import make_tiny_bundle
    from fixtures.tiny_vlm import build_tiny_vlm

    from rtrt.runtime.bundle import VLMSpec
    from rtrt.runtime.vlm import load_vlm

    vlm_dir = build_tiny_vlm("llava", out / "tiny_llava")
    family = load_vlm(vlm_dir)
    spec = VLMSpec(family="llava", ref=str(vlm_dir.resolve()), hidden_size=int(family.hidden_size),
                   image_token_layout=family.image_token_layout())
    return make_tiny_bundle(out / "bundle", d_llm=int(family.hidden_size), vlm=spec)


def error_message(fn) -> str:
    from rtrt.runtime.errors import RtrtError

    try:
        fn()
    except RtrtError as e:
        return str(e)
    raise AssertionError(f"{fn} did not raise an RtrtError")


def option_records(image: Path, mask_candidates: list[Path]) -> list[str]:
    """Options that must reach Pipeline.from_bundle: precision and threads, on the demo bundle's ORT graphs."""
    from rtrt.runtime.assets import default_bundle
    from rtrt.runtime.pipeline import Pipeline

    demo = Path(default_bundle())
    lines = [f"demo {hexs(str(demo))} {OPTION_THREADS}"]
    for precision in ("fp32", "int8"):
        pipe = Pipeline.from_bundle(demo, "ort", load_vlm_model=False, precision=precision, threads=OPTION_THREADS)
        lines.append(f"oprecision {hexs(precision)} {hexs(','.join(pipe.describe()['providers']))}")
        lines += [f"odetect {detection_fields(d)}" for d in pipe.detect(image).detections]
    # The CPU has no TensorRT EP: fp16 on ORT is refused. A bad thread count is refused by the runtime.
    fp16 = error_message(lambda: Pipeline.from_bundle(demo, "ort", load_vlm_model=False, precision="fp16"))
    threads = error_message(lambda: Pipeline.from_bundle(demo, "ort", load_vlm_model=False, threads=-1))
    # refine_mask_z on an image where refinement changes the answer: the bundle's own setting (describe()
    # says which), a z no cell reaches (no token refined), every token refined; the refusal without a VLM.
    # The first candidate where refinement changes the answer (none of them: the records could not tell).
    pipe = Pipeline.from_bundle(demo, "ort")
    bundle_z = pipe.refine_mask_z  # the bundle's own setting, which from_bundle applied
    for mask_image in mask_candidates:
        pipe.refine_mask_z = bundle_z
        own = (pipe(mask_image).answer, str(pipe.describe()["refine_mask_z"]))  # as describe() in C++ prints it
        pipe.refine_mask_z = 1e6
        none = pipe(mask_image).answer
        pipe.refine_mask_z = None
        every = pipe(mask_image).answer
        if none != every:
            break
    else:
        raise AssertionError(f"refinement changes the answer on none of {[str(p) for p in mask_candidates]}")
    no_vlm = error_message(lambda: Pipeline.from_bundle(demo, "ort", load_vlm_model=False, refine_mask_z=0.0))
    return lines + [f"ofp16 {hexs(fp16)}", f"othreads {hexs(threads)}",
                    f"omask {hexs(str(mask_image))} {hexs(own[0])} {hexs(own[1])} {hexs(none)} {hexs(every)} {hexs(no_vlm)}"]


def verify_records(bundle: Path, out: Path, backend: str) -> list[str]:
    """verify=True: the bundle loads (or fails for want of reference data); a copy with shifted reference
    scores raises ParityError. Each record: bundle, then the error's type and message, or - - when it loads."""
    from rtrt.runtime.bundle import load_bundle
    from rtrt.runtime.check import REFERENCE_FILE
    from rtrt.runtime.errors import RtrtError
    from rtrt.runtime.pipeline import Pipeline

    def outcome(path: Path) -> str:
        try:
            Pipeline.from_bundle(path, backend, load_vlm_model=False, verify=True)
        except RtrtError as e:
            return f"verify {hexs(str(path))} {hexs(type(e).__name__)} {hexs(str(e))}"
        return f"verify {hexs(str(path))} - -"

    lines = [outcome(bundle)]
    if load_bundle(bundle).has(REFERENCE_FILE):
        from fixtures.tiny_bundle import shifted_reference_copy

        lines.append(outcome(shifted_reference_copy(bundle, out / "shifted_reference_bundle")))
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="fixture directory (replaced)")
    p.add_argument("--backend", default="torch", choices=["ort", "torch", "trt"], help="backend to load (default: torch)")
    p.add_argument("--bundle", default="", help="use this bundle instead of building the tiny one")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from rtrt.runtime.pipeline import Pipeline

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if args.bundle:
        bundle = Path(args.bundle).resolve()
    else:
        bundle = tiny_bundle(out)
        if args.backend != "torch":  # ONNX graphs (and TensorRT engines) for the ort / trt backends
            from rtrt.export.cli import export_bundle

            export_bundle(bundle, backend="onnx" if args.backend == "ort" else "trt", log=lambda msg: None)

    examples = sorted((REPO / "runtime" / "assets" / "examples").glob("*.png"))[:2]
    images = []
    for i in range(2):
        src = Image.open(examples[i]).convert("RGB") if i < len(examples) else synthetic_scene(i)
        png, ppm = out / f"scene{i}.png", out / f"scene{i}.ppm"
        src.save(png)
        write_ppm(ppm, src)
        images.append((png, ppm))

    pipe = Pipeline.from_bundle(bundle, backend=args.backend)
    lines = [f"bundle {hexs(str(bundle))}", f"backend {hexs(args.backend)}"]
    lines += [f"class {hexs(c)}" for c in pipe.class_names]
    for png, ppm in images:
        lines.append(f"image {hexs(str(png))} {hexs(str(ppm))}")
        for d in pipe.detect(png).detections:  # a path, as rtrt infer passes it
            lines.append(f"detect {detection_fields(d)}")
        for cid, q, hints, refine, n, region in ANSWER_CASES:
            if q == "region":
                from rtrt.runtime.pipeline import REGION_QUESTION as q
            res = pipe(png, q, hints=hints, refine=refine, max_new_tokens=n or None, region=region)
            lines.append(f"case {hexs(cid)} {hexs(q) if q is not None else '*'} {int(hints)} {int(refine)} {n}")
            if region is not None:
                lines.append("cregion " + " ".join(repr(float(v)) for v in region))
                lines.append(f"aregion {detection_fields(res.region)}" if res.region is not None else "aregion -")
            lines.append(f"answer {hexs(res.answer)}")
            lines += [f"hint {hexs(h)}" for h in res.hints]
            lines += [f"adetect {detection_fields(d)}" for d in res.detections]
            lines.append(f"timings {' '.join(hexs(k) for k in res.timings_ms)}")

    # Bad inputs: the C++ side must throw rtrt::Error with these very messages.
    bad = out / "not_an_image.png"
    bad.write_bytes(b"this is not an image\n")
    truncated = out / "truncated.png"
    truncated.write_bytes(images[0][0].read_bytes()[:60])
    from rtrt.runtime.image import load_image

    for path in (bad, truncated):
        lines.append(f"bad_image {hexs(str(path))} {hexs(error_message(lambda p=path: load_image(p)))}")
    empty = np.zeros((0, 0, 3), np.uint8)
    lines.append(f"empty_image {hexs(error_message(lambda: pipe.detect(empty)))}")
    lines.append(f"empty_question {hexs(error_message(lambda: pipe(images[0][0], '')))}")

    tampered = out / "tampered_bundle"
    shutil.copytree(bundle, tampered, symlinks=True)
    victim = tampered / "detector.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last weight byte: the sha256 no longer matches
    victim.write_bytes(bytes(data))
    lines.append(f"tampered {hexs(str(tampered))} "
                 f"{hexs(error_message(lambda: Pipeline.from_bundle(tampered, backend=args.backend)))}")
    missing = out / "no_such_bundle"
    lines.append(f"tampered {hexs(str(missing))} "
                 f"{hexs(error_message(lambda: Pipeline.from_bundle(missing, backend=args.backend)))}")

    lines += option_records(images[0][0], [images[1][0], images[0][0], *sorted((REPO / "runtime" / "assets" / "examples").glob("*.jpg"))])
    lines += verify_records(bundle, out, args.backend)

    (out / "expected.txt").write_text("\n".join(lines) + "\n")
    print(f"fixtures in {out}: bundle {bundle}, backend {args.backend}, {len(images)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
