"""``rtrt infer --viz``: each detection's box with its label and score drawn on the image.

On a generated scene holding one barrier (the construction of tests/test_boxes.py), the picture
has the barrier's box outline in its colour around the annotated object and a filled label tag
with text on it; ``--viz-class`` blends that class's map underneath; missing folders and unknown
classes are refused with one line.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rtrt.runtime.errors import InputError
from rtrt.tools.viz import class_index, font_size, layout, render, save_viz

W, H = 640, 480


@pytest.fixture(scope="module")
def barrier_scene():
    """A 640 x 480 road with one large barrier (as tests/test_boxes.py builds it), and the demo bundle's detections."""
    from rtrt.runtime import Pipeline
    from rtrt.runtime.assets import default_bundle
    from fixtures.scenes import one_barrier_scene

    image, box = one_barrier_scene(W, H)
    pipe = Pipeline.from_bundle(default_bundle(), "ort", load_vlm_model=False)
    return image, box, pipe.detect(image), pipe.class_names


def _outline(box: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    x0, y0, x1, y1 = box
    return ([(x, y) for x in range(x0, x1 + 1) for y in (y0, y1)]
            + [(x, y) for y in range(y0 + 1, y1) for x in (x0, x1)])


def _inside(p: tuple[int, int], r: tuple[int, int, int, int]) -> bool:
    return r[0] <= p[0] <= r[2] and r[1] <= p[1] <= r[3]


def test_viz_draws_a_labelled_box_over_the_true_object(barrier_scene):
    image, (x, y, w, h), res, _ = barrier_scene
    out = render(image, res.detections)
    assert out.size == image.size
    tags = layout(image.size, res.detections)
    assert [t.text for t in tags] == [f"{d.label} {d.score:.2f}" for d in res.detections]
    assert len({t.colour for t in tags}) == len(tags)  # one colour per detection
    k = [d.name for d in res.detections].index("barrier")
    g = tags[k]
    assert g.text.startswith("barrier ")
    # The box lies around the annotated object: it holds the object's centre and overlaps most of it.
    assert _inside((int(x + w / 2), int(y + h / 2)), g.box)
    ix = max(0, min(g.box[2], x + w) - max(g.box[0], x)) * max(0, min(g.box[3], y + h) - max(g.box[1], y))
    assert ix >= 0.5 * w * h
    # Its outline is drawn in its colour, which the scene itself lacks there
    src, pix = np.asarray(image.convert("RGB")), np.asarray(out)
    # (Where no label tag and no better-ranked detection's outline, drawn over it, covers it.)
    lw = max(2, round(W / 320))
    ring = lambda p, b: _inside(p, b) and not _inside(p, (b[0] + lw, b[1] + lw, b[2] - lw, b[3] - lw))  # noqa: E731
    edge = [p for p in _outline(g.box)
            if not any(_inside(p, t.tag) for t in tags) and not any(ring(p, t.box) for t in tags[:k])]
    assert len(edge) > 100
    drawn = np.mean([tuple(pix[py, px]) == g.colour for px, py in edge])
    before = np.mean([tuple(src[py, px]) == g.colour for px, py in edge])
    assert drawn >= 0.95 and before < 0.05, (drawn, before)
    # The label tag sits on the box's top edge, is filled with the box's colour and carries text in another ink.
    assert g.tag[0] == g.box[0] and g.tag[3] + 1 in (g.box[1], g.box[1] + (g.tag[3] - g.tag[1] + 1))
    assert g.tag[3] - g.tag[1] + 1 >= font_size(W, H) >= 14
    patch, under = pix[g.tag[1]:g.tag[3] + 1, g.tag[0]:g.tag[2] + 1], src[g.tag[1]:g.tag[3] + 1, g.tag[0]:g.tag[2] + 1]
    assert np.mean(np.any(patch != under, axis=-1)) > 0.9  # the tag replaces the image there
    fill = np.all(patch == g.colour, axis=-1)
    assert 0.5 < fill.mean() < 0.97  # mostly fill, with text pixels on it
    ink = patch[~fill].astype(int)
    assert np.abs(ink - np.array(g.colour)).sum(axis=-1).max() > 200  # the text contrasts with the fill
    # Tags never cover one another.
    for i, a in enumerate(tags):
        for b in tags[i + 1:]:
            assert a.tag[2] < b.tag[0] or b.tag[2] < a.tag[0] or a.tag[3] < b.tag[1] or b.tag[3] < a.tag[1]


def test_viz_class_blends_that_class_map_under_the_boxes(barrier_scene):
    image, _, res, names = barrier_scene
    k = class_index("barrier", names)
    plain, heat = np.asarray(render(image, [])).astype(int), np.asarray(render(image, [], res.similarity, k)).astype(int)
    m = res.similarity[k]
    gh, gw = m.shape
    # Away from the label tag: at the peak patch's centre the picture changes, at a patch below the median it does not.
    pi, pj = np.unravel_index(int(np.argmax(m)), m.shape)
    li, lj = np.unravel_index(int(np.argmin(m)), m.shape)
    at = lambda a, i, j: a[int((i + 0.5) * H / gh), int((j + 0.5) * W / gw)]  # noqa: E731
    assert np.abs(at(heat, pi, pj) - at(plain, pi, pj)).sum() > 60
    assert np.abs(at(heat, li, lj) - at(plain, li, lj)).sum() <= 3
    # No detection: the picture says so in a tag.
    assert np.any(plain[:10, :10] != np.asarray(image.convert("RGB"))[:10, :10])


def test_class_index_takes_a_machine_name_or_a_label_and_refuses_others():
    names = ["traffic_cone", "garbage_bag"]
    assert class_index("garbage_bag", names) == class_index("garbage bag", names) == 1
    with pytest.raises(InputError) as e:
        class_index("unicorn", names)
    msg = str(e.value)
    assert "\n" not in msg and "'unicorn'" in msg and "traffic_cone, garbage_bag" in msg


def test_save_viz_refuses_a_missing_folder_and_writes_a_png(tmp_path):
    image = Image.new("RGB", (64, 48), (90, 90, 90))
    missing = tmp_path / "nope" / "out.png"
    with pytest.raises(InputError, match="does not exist"):
        save_viz(missing, image, [])
    assert not missing.parent.exists()
    save_viz(tmp_path / "out.png", image, [])
    assert Image.open(tmp_path / "out.png").size == (64, 48)


def _cli(args, capsys) -> tuple[int, str, str]:
    from rtrt.tools.cli import main

    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("extra,want", [
    (["--viz", "{tmp}/nope/out.png"], "folder {tmp}/nope does not exist"),
    (["--viz", "{tmp}/out.png", "--viz-class", "unicorn"], "--viz-class 'unicorn' is not a class of this bundle (classes: "),
    (["--viz-class", "barrier"], "--viz-class needs --viz"),
    (["--image", "{img}", "{img}", "--viz", "{tmp}/out.png"], "2 images need an existing folder for their pictures"),
])
def test_infer_viz_refusals_are_one_line_before_any_model_loads(extra, want, tmp_path, capsys, monkeypatch):
    from rtrt.runtime.assets import example_images
    from rtrt.runtime.pipeline import Pipeline

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(Pipeline, "from_bundle", no_load)
    img = str(example_images()[0])
    code, out, err = _cli(["infer", "--image", img, *[a.format(tmp=tmp_path, img=img) for a in extra]], capsys)
    assert code == 2 and out == ""
    assert err.startswith("rtrt infer: error: ") and err.count("\n") == 1, err
    assert want.format(tmp=tmp_path) in err
    assert not (tmp_path / "nope").exists() and not (tmp_path / "out.png").exists()
